"""Unit tests of fimwatch's pure functions, in-process, no daemon (< 1 s).

compare() on baseline records, SPEC patterns, durations/sizes/booleans, config
values (_convert, LIMITS/_check_limit, _show), check-config's directory count
and watch recommendation, event times and change lists, the escaping of
untrusted names (esc, syslog's logfmt), email subjects, URL and diff
redaction. Every assertion here states one rule of SPEC.md, so breaking
the rule in fimwatch.py fails the test."""

import datetime
import hashlib
import os
import time

import pytest

import fimwatch


def rec(**kw):
    """A baseline record; unnamed fields default to a 0644 root file."""
    fields = dict(kind="file", mode=0o644, uid=0, gid=0, size=3, mtime_ns=1, ctime_ns=1,
                  ino=1, sha256="a" * 64, target=None, skipped=0)
    fields.update(kw)
    if hasattr(fimwatch.Rec, "_fields"):            # typing.NamedTuple
        return fimwatch.Rec(**fields)
    return fimwatch.Rec(tuple(fields[f] for f in fimwatch.FIELDS))


# --- compare -------------------------------------------------------------------

def test_compare_created_deleted_and_nothing():
    assert fimwatch.compare(None, rec()) == ("created", [])
    assert fimwatch.compare(rec(), None) == ("deleted", [])
    assert fimwatch.compare(None, None) is None


def test_compare_touch_and_identical_rewrite_are_not_changes():
    assert fimwatch.compare(rec(), rec(mtime_ns=99, ctime_ns=99)) is None
    assert fimwatch.compare(rec(), rec(ino=7, mtime_ns=5)) is None     # rename-over save


def test_compare_content_and_attributes():
    assert fimwatch.compare(rec(), rec(sha256="b" * 64)) == ("modified", ["content"])
    assert fimwatch.compare(rec(), rec(mode=0o600)) == ("attributes", ["mode"])
    assert fimwatch.compare(rec(), rec(uid=1, gid=1)) == ("attributes", ["owner", "group"])
    assert fimwatch.compare(rec(), rec(sha256="b" * 64, mode=0o755)) == \
        ("modified", ["content", "mode"])


def test_compare_type_and_symlink_target():
    link = rec(kind="symlink", mode=0o777, sha256=None, target="/a")
    assert fimwatch.compare(link, rec(kind="symlink", mode=0o777, sha256=None, target="/b")) \
        == ("attributes", ["target"])
    assert fimwatch.compare(rec(), link)[1][0] == "type"


def test_compare_files_over_hash_max_size_use_size_and_mtime():
    big = rec(sha256=None, skipped=1, size=10)
    assert fimwatch.compare(big, rec(sha256=None, skipped=1, size=10)) is None
    assert fimwatch.compare(big, rec(sha256=None, skipped=1, size=11)) == \
        ("modified", ["content"])
    assert fimwatch.compare(big, rec(sha256=None, skipped=1, size=10, mtime_ns=2)) == \
        ("modified", ["content"])


def test_compare_big_file_whose_ctime_moved_alone_is_a_content_change():
    # Not hashed: a ctime that moved with nothing else changed is a write
    # whose mtime was put back.
    big = rec(sha256=None, skipped=1, size=10)
    assert fimwatch.compare(big, rec(sha256=None, skipped=1, size=10, ctime_ns=2)) == \
        ("modified", ["content"])
    # A change that explains the new ctime is all there is to say.
    assert fimwatch.compare(big, rec(sha256=None, skipped=1, size=10, ctime_ns=2,
                                     mode=0o600)) == ("attributes", ["mode"])
    # A hashed file's ctime alone is no change: its content is known.
    assert fimwatch.compare(rec(), rec(ctime_ns=2)) is None


def test_compare_on_snapshots_of_a_real_file(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"one\n")
    before = fimwatch.snapshot(str(p), 1 << 20)
    os.utime(p, ns=(5, 5))
    assert fimwatch.compare(before, fimwatch.snapshot(str(p), 1 << 20)) is None
    p.write_bytes(b"two\n")
    assert fimwatch.compare(before, fimwatch.snapshot(str(p), 1 << 20)) == \
        ("modified", ["content"])


# --- patterns ------------------------------------------------------------------

def test_pattern_without_slash_matches_a_base_name_anywhere():
    ps = fimwatch.PatternSet(["*.swp", "4913"])
    assert ps.match("/etc/.passwd.swp") and ps.match("/a/b/4913")
    assert not ps.match("/etc/passwd") and not ps.match("/etc/x.swp.bak")


def test_pattern_with_slash_star_stays_in_one_component():
    ps = fimwatch.PatternSet(["/etc/*.conf"])
    assert ps.match("/etc/a.conf")
    assert not ps.match("/etc/sub/a.conf")


def test_pattern_double_star_crosses_components_and_covers_the_dir():
    ps = fimwatch.PatternSet(["/var/www/**/cache/**"])
    assert ps.match("/var/www/site/cache/x") and ps.match("/var/www/a/b/cache/c/d")
    assert ps.match("/var/www/site/cache", is_dir=True)      # no watch for the dir itself
    assert not ps.match("/var/www/site/cachex/y") and not ps.match("/var/www/index.html")


def test_relative_pattern_with_slash_is_rejected():
    with pytest.raises(ValueError):
        fimwatch.PatternSet(["etc/*.conf"])


# --- durations, sizes, booleans ----------------------------------------------

@pytest.mark.parametrize("text,sec", [("500ms", 0.5), ("30s", 30), ("5m", 300),
                                      ("24h", 86400), ("7d", 604800), ("0", 0), ("2", 2)])
def test_parse_duration(text, sec):
    assert fimwatch.parse_duration(text) == sec


@pytest.mark.parametrize("text", ["", "5x", "-1s", "s", "1 2s"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        fimwatch.parse_duration(text)


@pytest.mark.parametrize("text,n", [("512K", 512 << 10), ("64M", 64 << 20), ("1G", 1 << 30),
                                    ("100", 100), ("1g", 1 << 30)])
def test_parse_size(text, n):
    assert fimwatch.parse_size(text) == n


def test_parse_size_and_bool_reject_garbage():
    for bad in ("", "1.5M", "12Q"):
        with pytest.raises(ValueError):
            fimwatch.parse_size(bad)
    with pytest.raises(ValueError):
        fimwatch.parse_bool("maybe")


def test_parse_bool():
    assert [fimwatch.parse_bool(t) for t in ("yes", "True", "on", "1")] == [True] * 4
    assert [fimwatch.parse_bool(t) for t in ("no", "FALSE", "off", "0")] == [False] * 4


@pytest.mark.parametrize("sec,text", [(45, "45s"), (720, "12m"), (3 * 3600 + 300, "3h 5m"),
                                      (2 * 86400 + 4 * 3600, "2d 4h")])
def test_fmt_duration(sec, text):
    assert fimwatch.fmt_duration(sec) == text


@pytest.mark.parametrize("sec,text", [(366 * 86400, "366d"), (300, "5m"), (0.1, "100ms"),
                                      (7200, "2h"), (90, "90s"), (0, "0")])
def test_show_duration_in_the_largest_whole_unit(sec, text):
    assert fimwatch._show("duration", sec) == text
    assert fimwatch.parse_duration(text) == sec         # and it reads back


# --- config values: conversion and range limits ------------------------------

def test_convert_normalises_paths_and_refuses_watching_the_root():
    assert fimwatch._convert("path", "//etc") == "/etc"
    assert fimwatch._convert("paths", " //etc /var//log/ /etc ") == ["/etc", "/var/log"]
    with pytest.raises(ValueError, match="not supported"):
        fimwatch._convert("paths", "//")
    with pytest.raises(ValueError, match="absolute"):
        fimwatch._convert("path", "etc")


def test_within_is_the_path_or_below_it_never_a_sibling_with_the_same_prefix():
    assert fimwatch.within("/etc", "/etc")
    assert fimwatch.within("/etc/ssh/sshd_config", "/etc")
    assert not fimwatch.within("/etcetera/x", "/etc")          # a shared prefix is no parent
    assert not fimwatch.within("/et", "/etc")
    assert fimwatch.within("/var/www", "/")
    assert not fimwatch.within("relative/x", "/")


def test_convert_refuses_a_duration_of_many_digits():
    assert fimwatch._convert("duration", "3650d") == fimwatch.DURATION_MAX
    with pytest.raises(ValueError, match="too long"):
        fimwatch._convert("duration", "9999999999d")


def test_every_limit_is_a_range_on_a_numeric_key():
    for (sect, key), (lo, hi) in fimwatch.LIMITS.items():
        assert fimwatch.SCHEMA[sect][key][0] in ("duration", "size", "int"), (sect, key)
        assert 0 <= lo < hi, (sect, key)


@pytest.mark.parametrize("sect,key,v", [
    ("fimwatch", "settle", 0.0), ("fimwatch", "settle", 60.0),
    ("fimwatch", "scan_interval", 0.0),                 # 0: never
    ("fimwatch", "scan_interval", 1.0), ("webhook ops", "timeout", 300),
    ("syslog", "enabled", True),                        # no limit
])
def test_check_limit_accepts(sect, key, v):
    assert fimwatch._check_limit(sect, key, v) is None


@pytest.mark.parametrize("sect,key,v,msg", [
    ("fimwatch", "settle", 90.0, "must be between 0 and 1m"),
    ("fimwatch", "scan_interval", 0.5, "0 (never) or between 1s and 3650d"),
    ("webhook ops", "timeout", 0.1, "must be between 500ms and 5m"),
    ("fimwatch", "hash_max_size", 0, "must be at least 1"),
])
def test_check_limit_refuses_and_names_the_range(sect, key, v, msg):
    with pytest.raises(ValueError) as exc:
        fimwatch._check_limit(sect, key, v)
    assert str(exc.value) == msg


# --- check-config: directories and inotify limits ----------------------------

def test_count_dirs_skips_excluded_dirs_as_the_config_names_them(tmp_path):
    top = tmp_path / "staged"
    for d in ("a/b", "cache/c1/c2", "node_modules/m", "x.swp"):
        (top / d).mkdir(parents=True)
    (top / "a" / "file").write_text("not a dir\n")
    (top / "link").symlink_to(top / "a")                # never followed
    ex = fimwatch.PatternSet(["/etc/cache/**", "node_modules/", "*.swp"])
    # staged, a, a/b, x.swp: a base-name pattern never hides a directory
    assert fimwatch.count_dirs([(str(top), "/etc")], ex) == 4
    # the excludes see the logical path (a tree staged under another root)
    assert fimwatch.count_dirs([(str(top), "/srv")], ex) == 7
    assert fimwatch.count_dirs([(str(top), "/etc")], fimwatch.PatternSet([])) == 9
    assert fimwatch.count_dirs([(str(top), "/etc"), (str(top / "a"), "/etc/a")], ex) == 6
    assert fimwatch.count_dirs([(str(top), "/etc")], ex, limit=2) == 2


@pytest.mark.parametrize("need,want", [(0, 8192), (1000, 10240), (100000, 158720)])
def test_recommended_watches_adds_half_and_headroom_rounded_up_to_1024(need, want):
    # need + need/2 + 8192 spare, rounded up to a multiple of 1024
    assert fimwatch.recommended_watches(need) == want


# --- events ------------------------------------------------------------------------

def test_event_epoch_reads_back_the_time_of_new_event():
    t0 = time.time()
    ev = fimwatch.new_event("h", "created", "warning")
    t1 = time.time()
    assert t0 - 0.001 <= fimwatch.event_epoch(ev) <= t1, (t0, ev["time"], t1)
    when = datetime.datetime(2024, 2, 29, 23, 59, 58, 250000, datetime.timezone.utc)
    assert fimwatch.event_epoch({"time": "2024-02-29T23:59:58.250Z"}) == when.timestamp()
    # no time, or a broken one: now
    assert abs(fimwatch.event_epoch({"time": "garbage"}) - time.time()) < 5
    assert abs(fimwatch.event_epoch({}) - time.time()) < 5


def test_times_formatted_once_a_second_match_datetime_and_read_back():
    """iso_ms/iso_s keep the last second's text and event_epoch the last
    second's value: each call must still give what datetime gives, also
    around a second's end (fromtimestamp rounds to the microsecond) and when
    the seconds asked alternate."""
    def by_datetime(t, ms):
        d = datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
        return d.strftime("%Y-%m-%dT%H:%M:%S") + (".%03dZ" % (d.microsecond // 1000) if ms else "Z")
    base = 1767225599                       # 2025-12-31T23:59:59Z
    for t in [base + f for f in (0.0, 0.0004, 0.9994, 0.9999996, 0.5)] + \
             [base + 86400.25, base + 0.75, 0.0, 951782399.999]:
        assert fimwatch.iso_ms(t) == by_datetime(t, True), t
        assert fimwatch.iso_s(t) == by_datetime(t, False), t
        when = fimwatch.iso_ms(t)
        back = datetime.datetime.strptime(when, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
            tzinfo=datetime.timezone.utc).timestamp()
        assert fimwatch.event_epoch({"time": when}) == back, when


def test_event_ids_are_random_version_4_uuids():
    import uuid
    ids = [fimwatch.new_event("h", "created", "warning")["id"] for _ in range(600)]
    assert len(set(ids)) == len(ids)
    for i in ids:
        u = uuid.UUID(hex=i)
        assert u.hex == i and u.version == 4 and u.variant == uuid.RFC_4122, i


def test_change_list_of_old_and_new_events():
    assert fimwatch.change_list({"changes": ["content", "mode"]}) == ["content", "mode"]
    assert fimwatch.change_list({"changes": ("owner",)}) == ["owner"]
    assert fimwatch.change_list({"event": "verified", "changes": 3}) == []   # before 0.2
    assert fimwatch.change_list({"event": "created"}) == []


# --- escaping of untrusted names ---------------------------------------------

def test_esc_control_characters_bytes_and_backslash():
    assert fimwatch.esc("/etc/passwd") == "/etc/passwd"
    assert fimwatch.esc("a\nb\tc\rd") == "a\\nb\\tc\\rd"
    assert fimwatch.esc("x\x1b[31my") == "x\\x1b[31my"
    assert fimwatch.esc(os.fsdecode(b"caf\xe9")) == "caf\\xe9"        # not UTF-8
    assert fimwatch.esc("a\\nb") == "a\\\\nb"                          # cannot be forged
    assert fimwatch.esc("evil\u202etxt.exe") == "evil\\u202etxt.exe"    # bidi override


def test_logfmt_value_quotes_and_escapes():
    assert fimwatch.logfmt_value("plain") == "plain"
    assert fimwatch.logfmt_value("two words") == '"two words"'
    assert fimwatch.logfmt_value('a="b"') == '"a=\\"b\\""'
    assert fimwatch.logfmt_value("") == '""'
    assert "\n" not in fimwatch.logfmt_value("x\ny")


def _event(**kw):
    ev = fimwatch.new_event("web1", "modified", "critical", "realtime", "/etc/passwd",
                            kind="file", changes=["content", "mode"], mode="0644",
                            previous={"mode": "0600"})
    ev.update(kw)
    return ev


def test_syslog_message_format():
    ev = _event()
    msg = fimwatch.syslog_message(ev)
    assert msg.startswith("critical modified /etc/passwd detected=realtime "), msg
    assert "changes=content,mode" in msg and "prev_mode=0600" in msg, msg
    assert msg.endswith("id=" + ev["id"]), msg


def test_syslog_message_is_one_line_whatever_the_name():
    ev = _event(path="/etc/evil\nfimwatch[1]: info deleted /etc/shadow", message="a\rb")
    msg = fimwatch.syslog_message(ev)
    assert "\n" not in msg and "\r" not in msg, msg
    assert '"/etc/evil\\nfimwatch[1]: info deleted /etc/shadow"' in msg, msg


# --- email subjects -------------------------------------------------------------

def test_event_subject():
    assert fimwatch.event_subject(_event()) == \
        "[fimwatch] CRITICAL modified /etc/passwd on web1"
    dig = fimwatch.new_event("web1", "digest", "warning", "realtime", "", count=7)
    assert fimwatch.event_subject(dig) == "[fimwatch] WARNING 7 changes on web1"


def test_event_subject_no_header_injection_and_bounded():
    s = fimwatch.event_subject(_event(path="/tmp/x\r\nBcc: victim@example.com"))
    assert "\r" not in s and "\n" not in s, s
    assert len(fimwatch.event_subject(_event(path="/" + "a" * 500))) <= 160


# --- secrets ---------------------------------------------------------------------

def test_redact_url_hides_credentials_path_and_query():
    r = fimwatch.redact_url("https://user:pw@hooks.example.com:8443/T0K3N/x?key=SECRET")
    assert r == "https://hooks.example.com:8443/…", r
    assert "pw" not in r and "T0K3N" not in r and "SECRET" not in r


def test_unified_diff_redacts_secrets_and_keeps_the_rest():
    d = fimwatch.unified_diff(b"listen = 80\npassword = hunter2\n",
                              b"listen = 8080\npassword = swordfish\n", "/etc/app.conf")
    assert "-listen = 80\n" in d and "+listen = 8080\n" in d, d
    assert "hunter2" not in d and "swordfish" not in d, d
    assert "password = [redacted]" in d, d


def test_unified_diff_none_for_binary_and_private_keys():
    assert fimwatch.unified_diff(b"a\0b", b"a\0c", "/bin/x") is None
    key = b"-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n"
    assert fimwatch.unified_diff(b"x\n", key, "/root/k") is None


def test_hash_file_reads_no_further_than_lstat_saw(tmp_path):
    """A file that grows while it is hashed is hashed up to the size lstat
    saw (never "until EOF", which a fast writer could put off for ever), and
    the stat returned is that one, so the next look hashes it again."""
    p = tmp_path / "grows"
    p.write_bytes(b"a" * 100 + b"b" * (3 << 20))
    st = os.lstat(p)
    with open(p, "ab") as f:
        f.write(b"c" * 5000)                 # grown after lstat, before the hash
    sha, fst, data = fimwatch.hash_file(str(p), st)
    assert sha == hashlib.sha256(b"a" * 100 + b"b" * (3 << 20)).hexdigest()
    assert fst.st_size == st.st_size and data is None


def test_hash_file_sizes_around_the_buffers_on_the_loop_and_in_a_worker(tmp_path):
    """Small files come from one read, bigger ones through the thread's
    buffer (HASH_SMALL on the loop's thread, HASH_CHUNK in a worker; a
    quarter of HASH_CHUNK was the loop's before 0.2): every size
    around those edges hashes to what hashlib says, with and without
    content kept, and up to lstat's size when it grew after its lstat."""
    import threading
    small, quarter = fimwatch.HASH_SMALL, fimwatch.HASH_CHUNK // 4
    sizes = [0, 1, small - 1, small, small + 1, quarter - 1, quarter + 1,
             fimwatch.HASH_CHUNK + 7]
    out = []

    def run():
        for n in sizes:
            p = tmp_path / ("f%d" % n)
            body = bytes(range(256)) * (n // 256) + b"x" * (n % 256)
            for keep, grow in ((0, b"grown"), (100, b"")):
                p.write_bytes(body)
                st = os.lstat(p)
                with open(p, "ab") as f:
                    f.write(grow)            # after lstat: not hashed
                sha, fst, data = fimwatch.hash_file(str(p), st, keep=keep)
                out.append((n, keep, sha == hashlib.sha256(body).hexdigest(),
                            fst.st_size == n, data == (body if keep and n <= keep else None)))
    run()
    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert len(out) == 4 * len(sizes)
    assert [o for o in out if o[2:] != (True, True, True)] == []


_ARENAS = r"""
import ctypes, sys, threading
sys.path.insert(0, sys.argv[1])
import fimwatch
if sys.argv[2] == "limit":
    print(fimwatch.one_malloc_arena({}), flush=True)
keep = []
t = threading.Thread(target=lambda: keep.extend(bytearray(4000) for _ in range(100)))
t.start()
t.join()
ctypes.CDLL(None).malloc_stats()     # one "Arena N:" block per arena, on stderr
"""


@pytest.mark.parametrize("how", ["limit", "default"])
def test_one_malloc_arena_keeps_a_threads_allocations_in_the_main_arena(how):
    """A thread that allocates gets an arena of its own from glibc (the
    control), none after one_malloc_arena(); MALLOC_ARENA_MAX wins."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", _ARENAS, os.path.dirname(fimwatch.__file__), how],
                       capture_output=True, text=True, timeout=60)
    arenas = r.stderr.count("Arena ")
    if how == "limit":
        assert r.stdout.strip() == "True" and arenas == 1, r.stdout + r.stderr
    else:
        assert arenas >= 2, r.stderr
    assert fimwatch.one_malloc_arena({"MALLOC_ARENA_MAX": "4"}) is False


_MMAP = r"""
import ctypes, sys
sys.path.insert(0, sys.argv[1])
import fimwatch
if sys.argv[2] == "fixed":
    print(fimwatch.fixed_mmap_threshold({}), flush=True)
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
# Bigger than what the import left free in the heap, never touched (no RSS).
big = libc.malloc(30 << 20)          # mmap()ed; freeing it raises a dynamic threshold
libc.free(big)
keep = libc.malloc(25 << 20)
print(libc.mallinfo2().hblkhd >= 25 << 20, flush=True)   # mmap()ed too, or from the heap
libc.free(keep)
"""


@pytest.mark.parametrize("how", ["fixed", "default"])
def test_fixed_mmap_threshold_keeps_big_blocks_out_of_the_heap(how):
    """After a freed 30 MiB block, glibc's dynamic threshold puts the next
    25 MiB block in the heap (the control); fixed_mmap_threshold() keeps it
    mmap()ed; MALLOC_MMAP_THRESHOLD_ in the environment wins."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", _MMAP, os.path.dirname(fimwatch.__file__), how],
                       capture_output=True, text=True, timeout=60)
    want = "True\nTrue" if how == "fixed" else "False"
    assert r.stdout.strip() == want, r.stdout + r.stderr
    assert fimwatch.fixed_mmap_threshold({"MALLOC_MMAP_THRESHOLD_": "65536"}) is False


def test_notification_reads_stay_below_the_mmap_threshold():
    """drain()'s reads come from the heap: at or over MMAP_THRESHOLD each one
    would mmap() and unmap its buffer (~17 us a read, measured)."""
    assert fimwatch.DRAIN_READ < fimwatch.MMAP_THRESHOLD


_TRIM = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
import fimwatch
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
store = fimwatch.Store(sys.argv[2])
rec = fimwatch.snapshot(sys.argv[1] + "/fimwatch.py", 1 << 20)
blocks = [bytearray(4000) for _ in range(4000)]    # ~16 MB of heap, below the mmap threshold
pin = bytearray(4000)                              # keeps the heap's top from shrinking
before = rss()
del blocks                                         # free, in the heap, still resident
rows = [store.file_row("/d/f%d" % i, rec) for i in range(fimwatch.TX_SPLIT + 1)]
store.put_many(rows)                               # a baseline's split commit
print((before - rss()) // 1024, flush=True)        # MiB given back
store.close()
"""


def test_a_baseline_build_gives_freed_heap_back(tmp_path):
    """A baseline build's commit every TX_SPLIT rows trims the heap: ~16 MB
    freed between live blocks goes back to the kernel (without the trim, a
    freed hole below a live block stays resident)."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", _TRIM, os.path.dirname(fimwatch.__file__),
                        str(tmp_path / "state")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and int(r.stdout) >= 12, r.stdout + r.stderr


_IMPORTS = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
import fimwatch
p = fimwatch.build_parser()
p.parse_args(["run"])
p.format_help()
ino_mod = fimwatch.import_inotify()
d = sys.argv[2]
ino = ino_mod.INotify(nonblocking=True)
ino.add_watch(d, ino_mod.flags.CREATE)
open(os.path.join(d, "f"), "w").close()
events = [e.name for e in ino.read(timeout=5000)]
print(sorted(m for m in ("shutil", "tempfile", "ctypes.util", "lzma", "bz2") if m in sys.modules))
print(events)
print(bool(ino_mod.find_library("c")))       # the stand-in imports the real one
import ctypes.util
print(ctypes.util.find_library is not ino_mod.find_library, bool(ctypes.util.find_library("c")))
"""


def test_daemon_start_imports_neither_shutil_nor_ctypes_util(tmp_path):
    """The daemon's argument parse and inotify_simple's import leave out
    shutil, tempfile, bz2, lzma and ctypes.util (~1.5 MB resident), and
    inotify_simple still works; its find_library, if called, is the real
    one."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", _IMPORTS, os.path.dirname(fimwatch.__file__),
                        str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.stdout.split("\n")[:4] == ["[]", "['f']", "True", "True True"], r.stdout + r.stderr


@pytest.mark.parametrize("proc, text", [
    ({"pid": 812, "exe": "/usr/bin/vim", "user": "root", "login_user": "alice", "session": 4,
      "confidence": "live"}, "alice (session 4) ran /usr/bin/vim as root (pid 812)"),
    ({"pid": 5, "exe": None, "comm": "sh", "user": "root", "confidence": "cached",
      "script": "/root/dropper"},
     "process /root/dropper as root (pid 5, named from its exec, it had exited)"),
    ({"pid": 7, "exe": None, "comm": "kworker"}, "process kworker (pid 7)"),
    ({"pid": 9, "exe": None}, "process an unknown program (pid 9)"),
])
def test_process_phrase_never_says_none(proc, text):
    assert fimwatch.process_phrase(proc) == text


# --- DirTree (fanotify's handle <-> directory map) ------------------------------


class _DirModel:
    """What DirTree must answer, as the two dicts it replaced."""

    def __init__(self):
        self.dirs, self.keys = {}, {}

    def set(self, key, path):
        old = self.keys.pop(path, None)
        self.dirs.pop(old, None)
        oldp = self.dirs.pop(key, None)
        self.keys.pop(oldp, None)
        self.dirs[key], self.keys[path] = path, key

    def pop(self, path):
        self.dirs.pop(self.keys.pop(path, None), None)

    def under(self, top):
        pre = top.rstrip("/") + "/"
        return sorted(p for p in self.keys if p == top or p.startswith(pre))

    def move(self, src, dst):
        if src == dst or src == "/" or not self.under(src):
            return
        for p in self.under(dst):
            self.pop(p)
        for p in self.under(src):
            key = self.keys.pop(p)
            q = dst + p[len(src):]
            self.keys[q], self.dirs[key] = key, q


def _check_tree(t, m):
    assert len(t) == len(m.keys)
    assert sorted(t.paths()) == sorted(m.keys)
    for key, path in m.dirs.items():
        assert t.get(key) == path and key in t
        assert t.key_of(path) == key


@pytest.mark.parametrize("compact", [1 << 20, 0])
def test_dirtree_answers_as_the_dicts_did_through_random_changes(compact):
    import random
    rnd = random.Random(14)
    names = ["a", "b", "c", "d\udcff", "ü", "x y"]
    t, m = fimwatch.DirTree(), _DirModel()
    t.COMPACT = compact                                # 0: compacted at every chance
    paths = ["/"] + ["/" + "/".join(rnd.choice(names) for _ in range(rnd.randint(1, 5)))
                     for _ in range(300)]
    for step in range(6000):
        op = rnd.random()
        p = rnd.choice(paths)
        if op < 0.5:
            key = b"fsid0000" + bytes([rnd.randrange(256) for _ in range(rnd.choice((8, 12)))])
            if rnd.random() < 0.2 and m.dirs:
                key = rnd.choice(list(m.dirs))         # a known dir seen at a new path
            t.set(key, p)
            m.set(key, p)
        elif op < 0.7:
            t.pop(p)
            m.pop(p)
        elif op < 0.85:
            q = rnd.choice(paths)
            if "/" in (p, q) or q == p or q.startswith(p + "/") or p.startswith(q + "/"):
                continue                               # rename(2) refuses these
            t.move(p, q)
            m.move(p, q)
        else:
            assert sorted(t.under(p)) == m.under(p)
            t.drop_tree(p)
            for x in m.under(p):
                m.pop(x)
        if step % 250 == 0:
            _check_tree(t, m)
    _check_tree(t, m)
    for p in list(m.keys):
        t.pop(p)
    assert len(t) == 0 and t.paths() == []
    assert len(t.parent) - len(t.free) == 1            # only "/" is left


# --- the start-up check's ordered read of the baseline ------------------------------

def test_keys_reader_gives_each_directory_the_rows_keys_in_gives(tmp_path):
    """KeysReader (one ordered scan of the files table, beside a walk that
    visits directories in the byte order of their paths) must give every
    directory asked for exactly Store.keys_in()'s rows: across names that
    sort around '/', non-UTF-8 and high code points, directories it is not
    asked for (passed over, or sought past), its restarts, and rows of
    another root beside its top."""
    store = fimwatch.Store(str(tmp_path / "state"))
    dirs = ["/t", "/t/d", "/t/d-x", "/t/d.y", "/t/d/c", "/t/d/e", "/t/d/e/f", "/t/d0",
            os.fsdecode(b"/t/u\xff"), "/t/u\ue000", "/t/u\U0001F600", "/t/w", "/t/w/big"]
    outside = ["/t-b", "/t.c", "/tt", "/"]
    n = 0
    for d in dirs + outside:
        for name in ("a", "b-c", os.fsdecode(b"n\xfe"), "z\u00e9", "sub"):
            n += 1
            kind = "dir" if name == "sub" else "file"
            store.put(d.rstrip("/") + "/" + name,
                      rec(kind=kind, mode=0o755 if kind == "dir" else 0o644, ino=n, links=1,
                          xattrs="" if n % 3 else None, capability=None, acl="a%d" % n))
    for i in range(40):                              # more than SKIP_SEEK rows
        store.put("/t/w/big/%d" % i, rec(ino=1000 + i, links=1, xattrs=""))
    store.commit()
    asked = sorted((os.fsencode(d) for d in dirs), key=bytes)
    assert asked == [os.fsencode(d) for d in sorted(dirs, key=os.fsencode)]
    for skip in ((), ("/t/d/c", "/t/w/big"), ("/t/d", "/t/d.y", "/t/u\ue000")):
        reader = store.keys_reader("/t", 1 << 30)
        reader.RESTART_DIRS, reader.SKIP_SEEK = 3, 4
        try:
            for b in asked:
                if os.fsdecode(b) in skip:
                    continue
                got = {k: v[:13] for k, v in reader.keys_in(b).items()}
                assert got == store.keys_in(os.fsdecode(b), 1 << 30), (b, skip)
                assert got, b
        finally:
            reader.close()
    reader = store.keys_reader("/", 1 << 30)
    try:
        for d in ("/", "/t", "/t-b", "/t.c", "/t/d", "/tt"):
            got = {k: v[:13] for k, v in reader.keys_in(os.fsencode(d)).items()}
            assert got == store.keys_in(d, 1 << 30) and got, d
    finally:
        reader.close()
    store.close()


def test_files_filter_matches_every_file_path_a_pattern_set_matches():
    """The start-up check trusts an unchanged file without the exact pattern
    checks only when PatternSet.files_filter() says none could match: it
    must match whatever any of its sets matches (more is allowed)."""
    sets = [fimwatch.PatternSet(["*.swp", "*~", ".#*", "4913", "node_modules/"]),
            fimwatch.PatternSet(["/var/log/**", "/t/a[!b]c", "**/cache/*.bin", "/t/x?y"]),
            fimwatch.PatternSet(["/t/log/*.log", "wtmp"]), fimwatch.PatternSet([])]
    paths = ["/t/a.swp", "/t/d/a.swp", "/t/a.swpx", "/t/x~", "/t/.#x", "/t/4913", "/t/49134",
             "/var/log/syslog", "/var/log/a/b", "/var/logx", "/t/aac", "/t/abc", "/t/a/c",
             "/t/cache/x.bin", "/t/u/cache/y.bin", "/t/cache/d/y.bin", "/t/xzy", "/t/x/y",
             "/t/log/a.log", "/t/log/d/a.log", "/var/wtmp", "/wtmp", "/t/node_modules",
             "/t/\n.swp", os.fsdecode(b"/t/\xff.swp"), "/t/plain", "/t/swp"]
    matched = 0
    for picked in (sets, sets[:1], sets[1:2], sets[2:], sets[3:], []):
        full, base = fimwatch.PatternSet.files_filter(*picked)
        for p in paths:
            if any(ps.match(p) for ps in picked):
                matched += 1
                assert full.match(p) or base.match(p.rpartition("/")[2]), \
                    (p, [ps.patterns for ps in picked])
        assert not full.match("/t/plain") and not base.match("plain"), \
            [ps.patterns for ps in picked]
    assert matched > 20
