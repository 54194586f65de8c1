"""Never lose a change: across restarts, after kill -9, during a queue
overflow, past the watch limit, by the periodic scan; signals and reloads;
the state directory's permissions."""

import mmap
import os
import signal
import stat
import time

import pytest

import fimwatch
from conftest import (assert_scan_finds, control_file, flood_queue, inotify_watch_count,
                      is_event, needs_root, wait_until, write)

FILE_EVENTS = {"created", "modified", "attributes", "deleted", "moved"}


def test_offline_changes_are_reported_at_startup(fim):
    mod = write(fim.root / "mod.txt", "v1\n")
    gone = write(fim.root / "gone.txt", "bye\n")
    perm = write(fim.root / "perm.txt", "p\n", mode=0o644)
    (fim.root / "sub").mkdir()
    d = fim.daemon()
    d.stop()
    write(mod, "v2\n")
    os.unlink(gone)
    os.chmod(perm, 0o600)
    new = write(fim.root / "sub" / "new.txt", "new\n")
    d2 = fim.daemon()
    for pred in (is_event("modified", mod), is_event("deleted", gone),
                 is_event("attributes", perm), is_event("created", new)):
        e = d2.wait_for(pred, since=d2.start_index)
        assert e["detected"] == "startup", e
    # reported once: a third start has nothing to say
    d2.stop()
    d3 = fim.daemon()
    d3.assert_quiet(lambda e: e.get("detected") == "startup", since=d3.start_index,
                    control=control_file())
    d3.stop()


@needs_root
def test_startup_check_trusts_only_an_unchanged_lstat(fim):
    """The start-up check skips a file whose lstat matches its baseline row
    in every field (Engine._walk_quick): each field a change moves must
    still be looked at, among many unchanged files in the same directories."""
    sub = fim.root / "sub"
    sub.mkdir()
    for i in range(50):
        write(fim.root / ("same-%d.txt" % i), "same %d\n" % i)
        write(sub / ("same-%d.txt" % i), "same %d\n" % i)
    kept = write(sub / "kept-mtime.txt", "aaaa\n")
    owned = write(fim.root / "owned.txt", "o\n")
    linked = write(sub / "linked.txt", "l\n")
    gone = write(sub / "gone.txt", "g\n")
    link = fim.root / "link"
    os.symlink("target-a", link)
    d = fim.daemon()
    d.stop()
    st = os.stat(kept)
    write(kept, "bbbb\n")                      # same size, mtime put back: only ctime moved
    os.utime(kept, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.chown(owned, 1, 1)
    os.link(linked, fim.outside / "second-name")
    os.unlink(gone)
    new = write(sub / "new.txt", "n\n")
    os.symlink("target-b", fim.root / "link.tmp")   # same length, same name
    os.replace(fim.root / "link.tmp", link)
    os.chmod(sub, 0o700)
    d2 = fim.daemon()
    for pred, changes in ((is_event("modified", kept), ["content"]),
                          (is_event("attributes", owned), ["owner", "group"]),
                          (is_event("attributes", linked), ["links"]),
                          (is_event("deleted", gone), None),
                          (is_event("created", new), None),
                          (is_event("attributes", link), ["target"]),
                          (is_event("attributes", sub), ["mode"])):
        e = d2.wait_for(pred, since=d2.start_index)
        assert e["detected"] == "startup" and e.get("changes") == changes, e
    d2.wait_for(is_event("verified"), since=d2.start_index)
    same = [e for e in d2.events() if "/same-" in e.get("path", "")]
    assert not same, same
    d2.stop()
    d3 = fim.daemon()
    d3.assert_quiet(lambda e: e.get("detected") == "startup", since=d3.start_index,
                    control=control_file())
    d3.stop()


def test_startup_check_reads_each_directory_s_rows_in_path_order(fim):
    """The start-up check reads the baseline in one ordered scan beside its
    walk (KeysReader), which visits directories in the byte order of their
    paths: names that sort around '/' (d, d-x, d.y, d/e, d0), a non-UTF-8
    name against a high code point (their str and byte orders differ), and a
    deleted directory of more rows than the reader passes over before it
    seeks, sorting between walked ones. In each directory a modified and a
    deleted file must be found, and nothing else said."""
    broot = os.fsencode(str(fim.root))
    names = [b"d", b"d-x", b"d.y", b"d/e", b"d/e/f", b"d0", b"u\xff", "u\ue000".encode(),
             "u\U0001F600".encode(), b"w"]
    for n in names:
        os.mkdir(broot + b"/" + n)
        write(broot + b"/" + n + b"/mod.txt", "v1\n")
        write(broot + b"/" + n + b"/gone.txt", "g\n")
        write(broot + b"/" + n + b"/same.txt", "s\n")
    os.mkdir(broot + b"/d/c-gone")                # between d's files and d/e
    for i in range(300):
        write(broot + b"/d/c-gone/%d.txt" % i, "x\n")
    d = fim.daemon()
    d.stop()
    for n in names:
        write(broot + b"/" + n + b"/mod.txt", "v2\n")
        os.unlink(broot + b"/" + n + b"/gone.txt")
    for i in range(300):
        os.unlink(broot + b"/d/c-gone/%d.txt" % i)
    os.rmdir(broot + b"/d/c-gone")
    want = {("deleted", str(fim.root / "d" / "c-gone"))}
    for n in names:
        for what, f in (("modified", b"/mod.txt"), ("deleted", b"/gone.txt")):
            want.add((what, fimwatch.esc(os.fsdecode(broot + b"/" + n + f))))
    d2 = fim.daemon()
    for what, path in sorted(want):
        d2.wait_for(is_event(what, path, detected="startup"), since=d2.start_index)
    d2.wait_for(is_event("verified"), since=d2.start_index)
    got = {(e["event"], e["path"]) for e in d2.events()
           if e.get("detected") == "startup"}
    inside = str(fim.root / "d" / "c-gone") + "/"      # its files: deleted, or nothing
    assert all(ev == "deleted" for ev, path in got if path.startswith(inside)), got
    got = {(ev, path) for ev, path in got if not path.startswith(inside)}
    assert got == want, (sorted(got - want), sorted(want - got))
    d2.stop()


def test_startup_check_drops_files_excluded_while_stopped(fim):
    """An unchanged file that the config excludes since the last run leaves
    the baseline at the start-up check, silently, by a base-name pattern
    or a path pattern, among unchanged files that stay."""
    import sqlite3
    sub = fim.root / "sub"
    sub.mkdir()
    for i in range(20):
        write(sub / ("same-%d.txt" % i), "s\n")
    write(sub / "old.tmp", "t\n")
    write(sub / "private.key", "k\n")
    d = fim.daemon()
    d.stop()
    fim.write_config(watch={"exclude": "*.swp *.swx *~ .#* 4913 *.tmp %s" % (sub / "*.key")})
    d2 = fim.daemon()
    d2.wait_for(is_event("verified"), since=d2.start_index)
    d2.stop()
    said = [(e["event"], e["path"]) for e in d2.events()
            if e.get("detected") == "startup" and e["path"].startswith(str(sub))]
    assert not said, said
    db = sqlite3.connect(str(fim.state_dir / "baseline.db"))
    try:
        names = {os.fsdecode(r[0]) for r in db.execute(
            "SELECT name FROM files WHERE parent=?", (os.fsencode(str(sub)),))}
    finally:
        db.close()
    assert names == {"same-%d.txt" % i for i in range(20)}, sorted(names)


def test_quick_walk_trusts_rows_written_after_its_read_began(fim):
    """The quick walk's rows (KeysReader) are a snapshot taken when its read
    began; real-time changes recorded after that (a file created, one
    deleted, one modified, in a directory the walk has not reached) must
    not be reported a second time by the walk: it compares them with the
    rows as they are now. In-process, the walk stepped by hand, the changes
    recorded between two steps as the daemon's real-time path does."""
    zz = fim.root / "zz"
    zz.mkdir()
    for i in range(5):
        write(zz / ("same-%d.txt" % i), "s\n")
    mod = write(zz / "mod.txt", "v1\n")
    gone = write(zz / "gone.txt", "g\n")
    fim.baseline()
    cfg = fimwatch.load_config(str(fim.conf))
    store = fimwatch.Store(cfg.state_dir)
    said = []
    eng = fimwatch.Engine(cfg, store, said.append)
    try:
        walk = eng.walk(str(fim.root), "quick", "scan", watch=False)
        assert next(walk) == str(fim.root)       # the reader has begun; zz is next
        new = write(zz / "new.txt", "n\n")
        write(mod, "v2\n")
        os.unlink(gone)
        for p in (new, mod, gone):
            eng.visit(str(p), store.get(str(p)), "realtime", "quick")
        store.commit()
        got = {(e["event"], e["path"]) for e in said}
        assert got == {("created", str(new)), ("modified", str(mod)),
                       ("deleted", str(gone))}, got
        del said[:]
        for _ in walk:
            pass
        assert not [(e["event"], e["path"]) for e in said], said
    finally:
        store.close()


def test_clean_stop_writes_stopped_and_start_has_no_gap(fim):
    d = fim.daemon()
    d.stop()
    d2 = fim.daemon()
    assert not d2.started.get("unclean"), d2.started
    assert "gap" not in d2.started, d2.started
    d2.stop()


def test_sigint_stops_cleanly(fim):
    d = fim.daemon()
    d.stop(sig=signal.SIGINT)


def test_kill_9_then_restart_reports_the_gap(fim):
    p = write(fim.root / "f.txt", "before\n")
    d = fim.daemon()
    d.kill()
    write(p, "during the gap\n")
    d2 = fim.daemon()
    s = d2.started
    assert s.get("unclean") is True, s
    assert "from" in s.get("gap", {}) and "to" in s.get("gap", {}), s
    assert "not watching from" in s.get("message", ""), s
    e = d2.wait_for(is_event("modified", p), since=d2.start_index)
    assert e["detected"] == "startup", e
    d2.stop()


def test_state_dir_and_baseline_are_private(fim):
    d = fim.daemon()
    d.stop()
    st = os.stat(fim.state_dir)
    assert stat.S_IMODE(st.st_mode) == 0o700, oct(st.st_mode)
    db = fim.state_dir / "baseline.db"
    assert db.exists(), sorted(os.listdir(fim.state_dir))
    assert stat.S_IMODE(os.stat(db).st_mode) & 0o077 == 0, oct(os.stat(db).st_mode)
    # the events file can hold diffs of config files: not for everyone to read
    mode = stat.S_IMODE(os.stat(fim.events_file).st_mode)
    assert mode & 0o007 == 0, "events_file is world-readable: %o" % mode


# --- reload ------------------------------------------------------------------

def test_sighup_with_a_bad_config_keeps_the_old_one(fim):
    d = fim.daemon()
    m = d.mark()
    good = fim.conf.read_text()
    fim.write_config(good.replace("[watch]", "[watch]\nbogus_key = 1"))
    d.hup()
    # the error is reported (an event, or at least on stderr) ...
    wait_until(lambda: [e for e in d.events(m) if e.get("event") not in FILE_EVENTS
                        and "bogus_key" in str(e)] or "bogus_key" in d.stderr(),
               timeout=10, what="the reload error to be reported")
    assert d.alive(), d.stderr()
    # ... and the daemon keeps watching with the old config
    p = write(fim.root / "after-bad-hup.txt")
    d.wait_for(is_event("created", p), since=m)
    d.stop()


def test_sighup_with_a_good_config_adds_an_exclude(fim):
    d = fim.daemon()
    fim.write_config(watch={"exclude": "*.swp *.swx *~ .#* 4913 *.tmp"})
    d.hup()
    # The reload takes effect at some point after the signal: probe until a
    # *.tmp file goes unreported while its control file is reported.
    for i in range(40):
        m = d.mark()
        probe = write(fim.root / ("probe-%d.tmp" % i))
        ctl = write(fim.root / ("ctl-%d.txt" % i))
        d.wait_for(is_event("created", ctl), since=m)
        time.sleep(0.2)
        if not d.matching(lambda e: e.get("path") == str(probe), since=m):
            break
    else:
        raise AssertionError("*.tmp files still reported after SIGHUP with the new exclude")
    # and it stays in effect
    m = d.mark()
    t = write(fim.root / "later.tmp")
    d.assert_quiet(lambda e: e.get("path") == str(t), since=m, control=control_file())
    d.stop()


# --- never lose a change -----------------------------------------------------

@pytest.mark.inotify
@pytest.mark.timeout(240)
def test_queue_overflow_rescans_and_loses_nothing(fim):
    sentinel = write(fim.root / "sentinel.conf", "before\n")
    (fim.root / "storm").mkdir()
    fill = [write(fim.root / "fill-a"), write(fim.root / "fill-b")]
    d = fim.daemon()
    with d.paused():
        flood_queue(*fill)          # the queue is full before the changes below
        n = 3000
        for i in range(n):
            write(fim.root / "storm" / ("f%04d" % i), "storm %d\n" % i)
        write(sentinel, "after\n")
    e = d.wait_for(is_event("rescan"), timeout=60)
    assert e.get("message") or e.get("events") is not None or len(e) > 5, e
    d.wait_for(lambda e: e.get("path") == str(sentinel) and e.get("event") == "modified",
               timeout=60)
    # all storm files are reported as created (in the rescan or in real time)
    created = wait_until(
        lambda: (lambda s: s if len(s) >= n else None)(
            {e["path"] for e in d.events() if e.get("event") == "created"
             and e.get("path", "").startswith(str(fim.root / "storm") + "/")}),
        timeout=90, what="%d created events for the storm files" % n)
    assert len(created) == n
    d.stop()
    r = fim.cli("scan", "--no-alert", "--json", timeout=120)
    assert r.returncode == 0, "baseline incomplete after the rescan:\n" + r.stdout[:3000]


@needs_root
@pytest.mark.inotify
@pytest.mark.timeout(240)
def test_watch_limit_falls_back_to_scans_and_says_so(fim):
    for i in range(4):
        (fim.root / "small" / ("s%d" % i)).mkdir(parents=True)
    for i in range(60):
        (fim.root / "big" / ("b%02d" % i)).mkdir(parents=True)
        write(fim.root / "big" / ("b%02d" % i) / "f.txt", "v1\n")
    # leave room for about a third of the 66 directories (in the daemon's own
    # user namespace: the host's limit is not touched)
    d = fim.daemon(timeout=40, watch_limit=20)
    e = d.wait_for(is_event("watch_limit"), since=d.start_index, timeout=30)
    assert inotify_watch_count(d.pid) <= 20
    text = str(e)
    assert "max_user_watches" in text, e
    subtree = e.get("path")
    assert subtree and subtree.startswith(str(fim.root)), e
    assert d.alive()
    # a change in the unwatched subtree is still found by a scan
    victims = sorted(p for p in fim.root.rglob("f.txt") if str(p).startswith(subtree))
    assert victims, "no test file under the reported subtree %s" % subtree
    assert_scan_finds(fim, d, victims[-1])
    d.stop()


def test_watch_estimate_in_check_config(fim):
    for i in range(10):
        (fim.root / ("d%d" % i)).mkdir()
    r = fim.cli("check-config")
    assert r.returncode == 0, r.stderr
    assert "max_user_watches" in r.stdout or "watch" in r.stdout.lower(), r.stdout


def test_scan_interval_catches_what_inotify_cannot_see(fim):
    """A write through a shared mapping makes no inotify event."""
    p = write(fim.root / "mapped.bin", b"A" * 4096)
    fim.write_config(fimwatch={"scan_interval": "3s"})
    d = fim.daemon()
    fd = os.open(p, os.O_RDWR)
    mm = mmap.mmap(fd, 4096)
    os.close(fd)             # IN_CLOSE_WRITE now, while the content is unchanged
    try:
        time.sleep(1)
        mm[0:4] = b"BBBB"    # no IN_MODIFY for this
        mm.flush()
        # Python's mmap holds a dup() of the fd: closing it would be an
        # IN_CLOSE_WRITE, so keep the mapping open until the scan found it.
        e = d.wait_for(is_event("modified", p), timeout=20)
        assert e["detected"] == "scan", e
    finally:
        mm.close()
    d.stop()


def test_signal_storms(fim):
    d = fim.daemon()
    for _ in range(25):
        d.hup()
    p = write(fim.root / "after-hups.txt")
    d.wait_for(is_event("created", p))
    assert d.alive(), d.stderr()
    assert "Traceback" not in d.stderr(), d.stderr()
    # two SIGTERMs in a row still end in a clean stop
    d.proc.send_signal(signal.SIGTERM)
    d.stop()


def test_sighup_with_the_config_file_gone_keeps_running(fim):
    d = fim.daemon()
    os.rename(fim.conf, str(fim.conf) + ".moved")
    d.hup()
    time.sleep(0.5)
    p = write(fim.root / "still-watching.txt")
    d.wait_for(is_event("created", p))
    assert "Traceback" not in d.stderr(), d.stderr()
    d.stop()
