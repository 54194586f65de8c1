"""Harder cases: real tools (sed -i, cp, mv, rm -rf), rename-over saves with
non-excluded temp names, work done while the daemon could not read its
queue, watch bookkeeping (no leaks), missing roots, scan_only paths, path
patterns, reloads that change the watched paths."""

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import (SETTLE, about, assert_change_is_quiet, churn, control_file, event_after,
                      inotify_watch_count, is_event, tree_watch_count, wait_until, write)

FILE_EVENTS = {"created", "modified", "attributes", "deleted", "moved"}


def under(dirpath):
    prefix = str(dirpath) + "/"
    return lambda e: e.get("event") in FILE_EVENTS and (
        e.get("path", "").startswith(prefix) or (e.get("from") or "").startswith(prefix))


# --- saves by real tools: one modified, no temp-file noise ----------------------

def test_sed_in_place_is_one_modified_and_no_temp_file(fim):
    p = write(fim.root / "app.conf", "port = 80\n", mode=0o644)
    d = fim.daemon()
    m = d.mark()
    subprocess.run(["sed", "-i", "s/80/8080/", str(p)], check=True)
    e = d.wait_for(is_event("modified", p), since=m)
    assert e["changes"] == ["content"], e
    d.assert_quiet(lambda e: e.get("event") in FILE_EVENTS and "sed" in os.path.basename(
        e.get("path", "") + "|" + (e.get("from") or "")), since=m, control=control_file())
    evs = [e for e in d.events(m) if e.get("event") in FILE_EVENTS
           and not os.path.basename(e.get("path", "")).startswith("control")]
    assert len(evs) == 1, "sed -i should be one event, got %s" % evs
    d.stop()


def test_atomic_write_via_temp_and_rename_is_one_modified(fim):
    p = fim.root / "settings.json"
    tmp = fim.root / ".settings.json.tmp-8f3a"

    def save(p):
        write(tmp, '{"a": 2}\n')
        os.rename(tmp, p)
    d, m, e = event_after(fim, p, '{"a": 1}\n', save, is_event("modified", p))
    assert e["changes"] == ["content"], e
    d.assert_quiet(about(tmp), since=m, control=control_file())
    assert len(d.matching(about(p), since=m)) == 1, d.matching(about(p), since=m)
    d.stop()


def test_delete_and_recreate_with_identical_content_is_not_an_event(fim):
    def recreate(p):
        os.unlink(p)
        write(p, "same\n", mode=0o644)
    assert_change_is_quiet(fim, fim.root / "same.txt", "same\n", recreate, mode=0o644)


def test_continuous_writes_end_with_the_final_state(fim):
    p = write(fim.root / "growing.log", "")
    d = fim.daemon()
    m = d.mark()
    deadline = time.monotonic() + 1.5
    n = 0
    with open(p, "a") as f:
        while time.monotonic() < deadline:      # never quiet for a settle window
            f.write("line %d\n" % n)
            f.flush()
            n += 1
            time.sleep(SETTLE / 3)
    final = p.read_bytes()
    import hashlib
    want = hashlib.sha256(final).hexdigest()
    d.wait_for(lambda e: e.get("path") == str(p) and e.get("sha256") == want, since=m,
               timeout=15)
    evs = d.matching(about(p), since=m)
    assert len(evs) <= 4, "%d events for one continuous write (%d writes)" % (len(evs), n)
    d.stop()


@pytest.mark.inotify
def test_cp_r_and_rm_rf_of_a_tree(fim):
    src = fim.outside / "pkg"
    files = []
    for i in range(5):
        (src / ("d%d" % i) / "sub").mkdir(parents=True)
        for j in range(4):
            files.append(write(src / ("d%d" % i) / "sub" / ("f%d" % j), "%d%d\n" % (i, j)))
    d = fim.daemon()
    subprocess.run(["cp", "-r", str(src), str(fim.root / "pkg")], check=True)
    copied = [fim.root / "pkg" / f.relative_to(src) for f in files]
    for f in copied:
        d.wait_for(is_event("created", f))
    w_full = inotify_watch_count(d.pid)
    m = d.mark()
    subprocess.run(["rm", "-rf", str(fim.root / "pkg")], check=True)
    for f in copied:
        d.wait_for(is_event("deleted", f), since=m)
    # the 11 directories' watches are released, not leaked
    wait_until(lambda: inotify_watch_count(d.pid) == w_full - 11, timeout=10,
               what="watches to drop from %d to %d (now %d)"
               % (w_full, w_full - 11, inotify_watch_count(d.pid)))
    d.stop()


# --- work done while the daemon could not read (no overflow) -------------------------

def test_nested_dirs_created_while_daemon_stopped_are_fully_reported(fim):
    d = fim.daemon()
    os.kill(d.pid, signal.SIGSTOP)
    try:
        leaf = fim.root / "x" / "y" / "z"
        os.makedirs(leaf)
        files = [write(fim.root / "x" / "a"), write(fim.root / "x" / "y" / "b"),
                 write(leaf / "c")]
    finally:
        os.kill(d.pid, signal.SIGCONT)
    for f in files:
        d.wait_for(is_event("created", f))
    m = d.mark()
    write(leaf / "c", "now watched\n")
    d.wait_for(is_event("modified", leaf / "c"), since=m)
    d.stop()


def test_dir_renamed_then_file_created_inside_at_once(fim):
    (fim.root / "a").mkdir()
    d = fim.daemon()
    for i in range(5):
        old, new = fim.root / ("a" if i == 0 else "r%d" % (i - 1)), fim.root / ("r%d" % i)
        os.rename(old, new)
        write(new / ("f%d" % i), "x\n")
    for i in range(5):
        d.wait_for(is_event("created", fim.root / "r4" / ("f%d" % i)) if i == 4 else
                   (lambda e, i=i: e.get("path", "").endswith("/f%d" % i)
                    and e.get("event") in ("created", "moved")))
    m = d.mark()
    for i in range(5):
        write(fim.root / "r4" / ("f%d" % i), "y\n")
    for i in range(5):
        d.wait_for(is_event("modified", fim.root / "r4" / ("f%d" % i)), since=m)
    d.stop()


def test_file_moved_between_directories(fim):
    (fim.root / "src").mkdir()
    (fim.root / "dst").mkdir()
    a = write(fim.root / "src" / "f.txt")
    d = fim.daemon()
    b = fim.root / "dst" / "f.txt"
    os.rename(a, b)
    e = d.wait_for(is_event("moved", b))
    assert e["from"] == str(a), e
    d.stop()


def test_file_moved_in_and_out_of_the_tree(fim):
    outside_file = write(fim.outside / "incoming.txt", "in\n")
    leaving = write(fim.root / "leaving.txt", "out\n")
    d = fim.daemon()
    inside = fim.root / "incoming.txt"
    os.rename(outside_file, inside)
    os.rename(leaving, fim.outside / "leaving.txt")
    d.wait_for(is_event("created", inside))
    d.wait_for(is_event("deleted", leaving))
    d.stop()


def test_hard_link_in_the_tree_is_created(fim):
    a = write(fim.root / "orig.txt", "data\n")
    d = fim.daemon()
    b = fim.root / "link.txt"
    os.link(a, b)
    d.wait_for(is_event("created", b))
    d.stop()


def test_symlink_loop_and_symlink_to_root_do_not_hang(fim):
    os.symlink(".", fim.root / "self")
    os.symlink("/", fim.root / "slash")
    (fim.root / "d").mkdir()
    os.symlink("..", fim.root / "d" / "up")
    d = fim.daemon()
    d.assert_quiet(lambda e: False, since=d.start_index, control=control_file())
    # the daemon watches only the 2 real dirs (+ maybe the root's parent)
    assert tree_watch_count(d) <= 3, tree_watch_count(d)
    d.stop()
    r = fim.cli("scan", "--no-alert", timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


# --- roots, scan_only, patterns, reload ---------------------------------------------

def test_root_missing_at_start_is_watched_when_it_appears(fim):
    later = fim.base / "later"
    fim.write_config(watch={"paths": "%s %s" % (fim.root, later)})
    d = fim.daemon()
    later.mkdir()
    p = write(later / "f.txt")
    d.wait_for(lambda e: e.get("path") == str(p) and e.get("event") == "created", timeout=90)
    d.stop()


def test_scan_only_paths_get_no_watch_but_are_scanned(fim):
    nfs = fim.base / "nfs"
    (nfs / "a" / "b").mkdir(parents=True)
    f = write(nfs / "a" / "b" / "f.txt", "v1\n")
    fim.write_config(watch={"scan_only": str(nfs)})
    d = fim.daemon()
    n = tree_watch_count(d)
    assert n <= 2, "scan_only dirs must not be watched: %d watches" % n
    m = d.mark()
    write(f, "v2\n")
    d.assert_quiet(lambda e: e.get("detected") == "realtime" and str(nfs) in e.get("path", ""),
                   since=m, control=control_file())
    d.stop()
    r = fim.cli("scan", "--no-alert", "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    assert str(f) in r.stdout


def test_path_pattern_with_double_star_excludes_only_what_it_says(fim):
    fim.write_config(watch={"exclude": "%s/**/cache/**" % fim.root})
    for sub in ("site/cache", "site/cachey", "site/deep/er/cache"):
        (fim.root / sub).mkdir(parents=True)
    d = fim.daemon()
    m = d.mark()
    skip1 = write(fim.root / "site" / "cache" / "x")
    skip2 = write(fim.root / "site" / "deep" / "er" / "cache" / "y")
    keep = write(fim.root / "site" / "cachey" / "z")
    d.wait_for(is_event("created", keep), since=m)
    d.assert_quiet(lambda e: e.get("path") in (str(skip1), str(skip2)), since=m,
                   control=control_file())
    d.stop()
    r = fim.cli("scan", "--no-alert", "--json")
    assert str(skip1) not in r.stdout and str(skip2) not in r.stdout, r.stdout


def add_path_and_hup(fim, d, extra):
    fim.write_config(watch={"paths": "%s %s" % (fim.root, extra)})
    d.hup()
    for i in range(50):
        m = d.mark()
        p = write(extra / ("probe-%d.txt" % i))
        try:
            d.wait_for(is_event("created", p), since=m, timeout=0.5)
            return
        except AssertionError:
            continue
    raise AssertionError("new path not watched after SIGHUP\n" + d.stderr())


def test_sighup_adding_a_path_watches_it(fim):
    extra = fim.base / "extra"
    extra.mkdir()
    d = fim.daemon()
    add_path_and_hup(fim, d, extra)
    d.stop()


def test_sighup_adding_a_path_baselines_it_silently(fim):
    """Like a first start: adding /srv to paths must not page once per file in /srv."""
    extra = fim.base / "extra"
    extra.mkdir()
    pre = [write(extra / ("pre-%d.txt" % i)) for i in range(3)]
    d = fim.daemon()
    add_path_and_hup(fim, d, extra)
    noisy = [e for e in d.events() if e.get("event") == "created"
             and e.get("path") in [str(p) for p in pre] + [str(extra)]]
    assert not noisy, "pre-existing files of a newly added path reported: %s" % noisy
    d.stop()


def test_restart_with_an_added_path_baselines_it_silently(fim):
    extra = fim.base / "extra"
    extra.mkdir()
    pre = write(extra / "pre.txt")
    fim.baseline()
    fim.write_config(watch={"paths": "%s %s" % (fim.root, extra)})
    d = fim.daemon()
    d.assert_quiet(lambda e: e.get("path") in (str(pre), str(extra)), since=d.start_index,
                   control=control_file())
    p = write(extra / "new.txt")
    d.wait_for(is_event("created", p))
    d.stop()


def test_status_json_counts_match_the_kernel(fim):
    for i in range(7):
        (fim.root / ("d%d" % i)).mkdir()
    d = fim.daemon()
    st = json.loads(fim.cli("status", "--json", check=0).stdout)
    kernel = inotify_watch_count(d.pid)
    text = json.dumps(st)
    assert str(kernel) in text, "status does not show the %d watches: %s" % (kernel, st)
    d.stop()


def test_double_star_excluded_subtree_holds_no_watches(fim):
    fim.write_config(watch={"exclude": "%s/**/cache/**" % fim.root})
    for i in range(15):
        (fim.root / "site" / "cache" / ("c%02d" % i) / "deeper").mkdir(parents=True)
    d = fim.daemon()
    n = tree_watch_count(d)
    # tree, site, and at most cache itself (+1 for the root's parent)
    assert n <= 4, "%d watches; the 30 directories under cache/ must get none" % n
    d.stop()


def test_concurrent_scans_while_the_daemon_is_busy(fim):
    files = [write(fim.root / ("f%02d" % i), "v0\n") for i in range(50)]
    d = fim.daemon()
    with churn(files):
        for _ in range(4):
            for args in (("scan", "--no-alert"), ("status", "--json"), ("events", "--json")):
                r = fim.cli(*args, timeout=60)
                assert r.returncode in (0, 1), "%s: %s" % (args, r.stdout[-500:] + r.stderr)
                assert "Traceback" not in r.stderr and "locked" not in r.stderr, r.stderr
    assert d.alive(), d.stderr()
    assert "Traceback" not in d.stderr(), d.stderr()
    d.stop()


def test_exclude_of_a_directory_path_drops_its_whole_subtree(fim):
    fim.write_config(watch={"exclude": "%s/build" % fim.root})
    (fim.root / "build" / "obj").mkdir(parents=True)
    (fim.root / "src").mkdir()
    d = fim.daemon()
    assert tree_watch_count(d) <= 3, tree_watch_count(d)
    m = d.mark()
    write(fim.root / "build" / "obj" / "a.o")
    write(fim.root / "build" / "top.o")
    d.assert_quiet(lambda e: "/build" in e.get("path", ""), since=m, control=control_file())
    d.stop()


def test_single_star_stays_in_one_component(fim):
    fim.write_config(watch={"exclude": "%s/*/tmp" % fim.root})
    for sub in ("a/tmp", "a/b/tmp"):
        (fim.root / sub).mkdir(parents=True)
    d = fim.daemon()
    m = d.mark()
    skip = write(fim.root / "a" / "tmp" / "x")
    keep = write(fim.root / "a" / "b" / "tmp" / "y")
    d.wait_for(is_event("created", keep), since=m)
    d.assert_quiet(lambda e: e.get("path") == str(skip), since=m, control=control_file())
    d.stop()
