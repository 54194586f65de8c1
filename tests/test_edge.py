"""Edge cases where inotify-based monitors usually lose changes: events
queued behind a directory rename, swaps, stops and kills inside the settle
window, the watch limit hit at run time, a single file as a watched path,
unknown uids, ambiguous escaped names."""

import os
import signal
import time

import pytest

from conftest import (assert_scan_finds, control_file, flood_queue, inotify_watch_count,
                      is_event, needs_root, write)

FILE_EVENTS = {"created", "modified", "attributes", "deleted", "moved"}


def scan_is_clean(fim):
    r = fim.cli("scan", "--no-alert", "--json", timeout=120)
    assert r.returncode == 0, "baseline out of date, the daemon missed:\n%s\n%s" % (
        r.stdout[:3000], r.stderr[-2000:])


def test_changes_queued_before_a_directory_rename(fim):
    """create a/x and edit a/y, then mv a b, all before the daemon reads a thing."""
    (fim.root / "a").mkdir()
    y = write(fim.root / "a" / "y", "y1\n")
    d = fim.daemon()
    os.kill(d.pid, signal.SIGSTOP)
    try:
        write(fim.root / "a" / "x", "new\n")
        write(y, "y2\n")
        os.rename(fim.root / "a", fim.root / "b")
    finally:
        os.kill(d.pid, signal.SIGCONT)
    d.wait_for(is_event("created", fim.root / "b" / "x"))
    d.wait_for(lambda e: e.get("path") == str(fim.root / "b" / "y")
               and e.get("event") in ("modified", "created"))
    d.assert_quiet(lambda e: e.get("event") == "created"
                   and e.get("path", "").startswith(str(fim.root / "a") + "/"),
                   since=d.start_index, control=control_file())
    d.stop()
    scan_is_clean(fim)


def test_rename_chain_and_swap(fim):
    a = write(fim.root / "a", "AAA\n")
    b = write(fim.root / "b", "BBBB\n")
    (fim.root / "d1").mkdir()
    write(fim.root / "d1" / "f", "f\n")
    d = fim.daemon()
    tmp = fim.root / "swap.tmp"
    os.rename(a, tmp)
    os.rename(b, a)
    os.rename(tmp, b)
    os.rename(fim.root / "d1", fim.root / "d2")
    os.rename(fim.root / "d2", fim.root / "d3")
    time.sleep(0.5)
    m = d.mark()
    write(fim.root / "d3" / "f", "changed\n")
    d.wait_for(is_event("modified", fim.root / "d3" / "f"), since=m)
    d.stop()
    scan_is_clean(fim)


def test_sigterm_inside_the_settle_window_loses_nothing(fim):
    """Changes still settling at SIGTERM are reported by *this* daemon before
    its `stopped` event (the stop-time flush), not left to the next start."""
    p = write(fim.root / "last-second.txt", "v1\n")
    fim.write_config(fimwatch={"settle": "2s"})
    d = fim.daemon()
    m = d.mark()
    write(p, "v2\n")
    q = write(fim.root / "brand-new.txt")
    time.sleep(0.3)                # the daemon has read the events, not yet reported
    preds = (is_event("modified", p, detected="realtime"),
             is_event("created", q, detected="realtime"))
    assert not [e for e in d.events(m) if e.get("event") in FILE_EVENTS], \
        "reported before SIGTERM: the test did not stop inside the settle window"
    d.stop()
    evs = d.events(m)
    before_stop = evs[:next(i for i, e in enumerate(evs) if e.get("event") == "stopped")]
    for pred in preds:
        assert [e for e in before_stop if pred(e)], \
            "change pending at SIGTERM not reported before `stopped`: %s\n%s" % (
                pred.__doc__, d._report(m))
    # ... and recorded, so the next start has nothing left to report
    d2 = fim.daemon()
    d2.assert_quiet(lambda e: e.get("path") in (str(p), str(q)), since=d2.start_index,
                    control=control_file())
    d2.stop()


def test_kill_9_inside_the_settle_window_loses_nothing(fim):
    p = write(fim.root / "last-second.txt", "v1\n")
    fim.write_config(fimwatch={"settle": "2s"})
    d = fim.daemon()
    write(p, "v2\n")
    time.sleep(0.3)
    d.kill()
    d2 = fim.daemon()
    e = d2.wait_for(is_event("modified", p), since=d2.start_index)
    assert e["detected"] == "startup", e
    d2.stop()


@needs_root
@pytest.mark.inotify
@pytest.mark.timeout(240)
def test_watch_limit_hit_at_run_time(fim):
    d = fim.daemon(watch_limit=100000)      # its own user namespace's limit
    d.set_watch_limit(inotify_watch_count(d.pid) + 3)
    new = []
    for i in range(12):
        sub = fim.root / "burst" / ("n%02d" % i)
        os.makedirs(sub)
        new.append(write(sub / "f.txt", "v1\n"))
    e = d.wait_for(is_event("watch_limit"), timeout=30)
    assert "max_user_watches" in str(e), e
    # files in the new dirs are reported even where no watch could be added
    for f in new:
        d.wait_for(is_event("created", f), timeout=30)
    subtrees = e.get("subtrees") or [e.get("path")]
    victim = next(f for f in new if any(str(f).startswith(s + "/") for s in subtrees))
    assert_scan_finds(fim, d, victim)
    assert d.alive(), d.stderr()
    d.stop()


def test_single_file_as_a_watched_path_survives_rename_over_saves(fim):
    p = write(fim.root / "single.conf", "v1\n")
    write(fim.root / "sibling.txt", "not watched\n")
    fim.write_config(watch={"paths": str(p)})
    d = fim.daemon()
    write(p, "v2\n")                                  # in place
    d.wait_for(is_event("modified", p))
    tmp = fim.root / ".single.conf.new"
    write(tmp, "v3\n")
    os.rename(tmp, p)                                 # rename over: a new inode
    d.wait_for(lambda e: is_event("modified", p)(e) and e.get("size") == 3
               and e.get("sha256") and len(d.matching(is_event("modified", p))) >= 2)
    m = d.mark()
    write(p, "v4 in place again\n")                   # still watched after the inode changed
    d.wait_for(is_event("modified", p), since=m)
    m = d.mark()
    write(fim.root / "sibling.txt", "changed\n")
    d.assert_quiet(lambda e: "sibling" in e.get("path", "") or ".single.conf.new" in
                   e.get("path", ""), since=d.start_index,
                   control=lambda root: (write(p, "control %d\n" % time.monotonic_ns()),
                                         is_event("modified", p))[1])
    d.stop()


@needs_root
def test_owner_without_a_name(fim):
    p = write(fim.root / "orphan.txt")
    d = fim.daemon()
    os.chown(p, 54321, 54321)
    e = d.wait_for(is_event("attributes", p))
    assert e["uid"] == 54321 and e["gid"] == 54321, e
    d.stop()


def test_directory_with_non_utf8_name_created_at_run_time(fim):
    d = fim.daemon()
    broot = os.fsencode(str(fim.root))
    bad = broot + b"/NONUTF\xff\xfedir"
    os.mkdir(bad)
    os.mkdir(bad + b"/sub\x80")
    with open(bad + b"/sub\x80/f.txt", "wb") as f:
        f.write(b"one\n")
    e = d.wait_for(lambda e: e.get("event") == "created" and "NONUTF" in e.get("path", "")
                   and e.get("path", "").endswith("f.txt"))
    assert "\\x80" in e["path"].lower() and "\\xff" in e["path"].lower(), e["path"]
    m = d.mark()
    with open(bad + b"/sub\x80/f.txt", "wb") as f:
        f.write(b"two\n")
    d.wait_for(lambda x: x.get("event") == "modified" and x.get("path") == e["path"], since=m)
    os.rename(bad, broot + b"/NONUTF-renamed\xfa")
    m = d.mark()
    with open(broot + b"/NONUTF-renamed\xfa/sub\x80/f.txt", "wb") as f:
        f.write(b"three\n")
    d.wait_for(lambda x: x.get("event") == "modified" and "NONUTF-renamed" in x.get("path", "")
               and x.get("path", "").endswith("f.txt"), since=m)
    d.stop()
    scan_is_clean(fim)


def test_escaped_name_and_raw_byte_name_do_not_collide(fim):
    """b"a\\xff" (4 ASCII chars) and b"a\xff" (a raw byte) are two files; their
    display may look alike, the baseline must keep them apart."""
    broot = os.fsencode(str(fim.root))
    raw = broot + b"/a\xff"
    text = broot + b"/a\\xff"
    for path, data in ((raw, b"raw\n"), (text, b"text\n")):
        with open(path, "wb") as f:
            f.write(data)
    fim.baseline()
    scan_is_clean(fim)
    scan_is_clean(fim)
    with open(text, "wb") as f:
        f.write(b"text changed\n")
    r = fim.cli("scan", "--no-alert", "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    assert len([x for x in r.stdout.splitlines() if x.strip()]) == 1, r.stdout
    scan_is_clean(fim)
    d = fim.daemon()
    d.assert_quiet(lambda e: e.get("event") in FILE_EVENTS and "/a" in e.get("path", ""),
                   since=d.start_index, control=control_file())
    d.stop()


def test_directory_renamed_over_an_empty_watched_directory(fim):
    """The old directory's IN_IGNORED arrives after the new one is watched under
    the same path: it must not drop the new watch."""
    (fim.root / "slot").mkdir()
    src = fim.outside / "incoming"
    (src / "sub").mkdir(parents=True)
    f = write(src / "sub" / "f.txt", "v1\n")
    d = fim.daemon()
    os.rename(src, fim.root / "slot")          # rename over an empty directory
    new = fim.root / "slot" / "sub" / "f.txt"
    d.wait_for(is_event("created", new))
    time.sleep(0.5)
    m = d.mark()
    write(new, "v2\n")
    d.wait_for(is_event("modified", new), since=m)
    m = d.mark()
    g = write(fim.root / "slot" / "g.txt")
    d.wait_for(is_event("created", g), since=m)
    assert not os.path.exists(f)
    d.stop()


def test_directory_recreated_while_the_old_one_is_still_open(fim):
    """rm -rf d; mkdir d while a process still has the old d open."""
    (fim.root / "d").mkdir()
    write(fim.root / "d" / "old.txt")
    d = fim.daemon()
    fd = os.open(fim.root / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.unlink(fim.root / "d" / "old.txt")
        os.rmdir(fim.root / "d")
        os.mkdir(fim.root / "d")
        x = write(fim.root / "d" / "x.txt", "x1\n")
        d.wait_for(is_event("created", x))
        time.sleep(0.5)
    finally:
        os.close(fd)                            # the old inode goes away only now
    time.sleep(0.5)
    m = d.mark()
    write(x, "x2\n")
    d.wait_for(is_event("modified", x), since=m)
    d.stop()


def test_own_state_and_events_file_inside_the_watched_tree_do_not_loop(fim):
    """Someone watches /var and fimwatch logs to /var/log/fimwatch: writing an
    event must not be an event about the events file, forever."""
    state = fim.root / "lib" / "fimwatch"
    log = fim.root / "log" / "fimwatch" / "events.jsonl"
    log.parent.mkdir(parents=True)
    fim.write_config(fimwatch={"state_dir": str(state)}, log={"events_file": str(log)})
    fim.events_file = log
    d = fim.daemon()
    p = write(fim.root / "trigger.txt")
    d.wait_for(is_event("created", p))
    time.sleep(2)
    own = [e for e in d.events() if e.get("event") in FILE_EVENTS
           and (e.get("path", "").startswith(str(state)) or
                e.get("path", "").startswith(str(log.parent)))]
    assert len(own) <= 2, "fimwatch reports its own writes (%d events): %s" % (
        len(own), own[:3])
    assert len(d.events()) < 20, "event loop: %d events" % len(d.events())
    d.stop()


def test_write_through_a_hard_link_from_outside_is_found_by_the_periodic_scan(fim):
    """inotify reports writes only under the name they were made through."""
    p = write(fim.root / "shadow", "root:$6$old\n")
    os.link(p, fim.outside / "innocent")
    fim.write_config(fimwatch={"scan_interval": "3s"})
    d = fim.daemon()
    with open(fim.outside / "innocent", "r+") as f:
        f.write("root:$6$new")
    e = d.wait_for(is_event("modified", p), timeout=20)
    assert e["detected"] in ("scan", "realtime"), e
    d.stop()


@pytest.mark.inotify
@pytest.mark.timeout(240)
def test_overflow_rescan_covers_single_file_paths(fim):
    """A file listed on its own in [watch] paths, changed after the queue overflowed."""
    storm_dir = fim.root / "storm"
    storm_dir.mkdir()
    fill = [write(storm_dir / "fill-a"), write(storm_dir / "fill-b")]
    single = write(fim.root / "passwd", "root:x:0:0\n")
    fim.write_config(watch={"paths": "%s %s" % (storm_dir, single)})
    d = fim.daemon()
    with d.paused():
        flood_queue(*fill)
        for i in range(500):
            write(storm_dir / ("f%03d" % i))
        write(single, "root:x:0:0\nevil:x:0:0\n")
    d.wait_for(is_event("rescan"), timeout=60)
    d.wait_for(is_event("modified", single), timeout=30)
    d.stop()
    scan_is_clean(fim)


@pytest.mark.inotify
@pytest.mark.timeout(240)
def test_overflow_rescan_reports_a_root_deleted_during_the_storm(fim):
    a = fim.root / "a"
    b = fim.root / "b"
    a.mkdir()
    b.mkdir()
    gone = write(b / "f.txt")
    fill = [write(a / "fill-a"), write(a / "fill-b")]
    fim.write_config(watch={"paths": "%s %s" % (a, b)})
    d = fim.daemon()
    with d.paused():
        flood_queue(*fill)
        os.unlink(gone)
        os.rmdir(b)
    d.wait_for(is_event("rescan"), timeout=60)
    d.wait_for(is_event("deleted", gone), timeout=30)
    d.stop()


def test_root_deleted_while_down_is_reported_at_startup_and_by_scan(fim):
    a = fim.root / "a"
    b = fim.root / "b"
    (b / "sub").mkdir(parents=True)
    a.mkdir()
    files = [write(b / "f.txt"), write(b / "sub" / "g.txt")]
    fim.write_config(watch={"paths": "%s %s" % (a, b)})
    fim.baseline()
    import shutil
    shutil.rmtree(b)
    r = fim.cli("scan", "--no-alert", "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    for f in files:
        assert str(f) in r.stdout, r.stdout
    # and the same offline deletion seen by the daemon at start-up
    (b / "sub").mkdir(parents=True)
    files = [write(b / "f.txt"), write(b / "sub" / "g.txt")]
    fim.baseline()
    shutil.rmtree(b)
    d = fim.daemon()
    for f in files:
        d.wait_for(is_event("deleted", f), since=d.start_index)
    d.stop()


@needs_root
@pytest.mark.inotify
@pytest.mark.timeout(240)
def test_unwatched_subtree_is_polled_by_the_daemon(fim):
    for i in range(40):
        (fim.root / ("d%02d" % i)).mkdir()
        write(fim.root / ("d%02d" % i) / "f.txt", "v1\n")
    fim.write_config(watch={"poll_interval": "2s"})
    d = fim.daemon(timeout=40, watch_limit=10)
    e = d.wait_for(is_event("watch_limit"), since=d.start_index, timeout=30)
    subtrees = e.get("subtrees") or [e.get("path")]
    victim = next(p for p in sorted(fim.root.rglob("f.txt"))
                  if any(str(p).startswith(s + "/") for s in subtrees))
    m = d.mark()
    write(victim, "changed while unwatched\n")
    e = d.wait_for(is_event("modified", victim), since=m, timeout=30)
    assert e["detected"] == "scan", e
    d.stop()
