"""No change unreported, under stress: storms with new dirs and deletions,
kill -9 in the middle of a storm, changes made while the daemon is starting
up, log rotation of the events file, a second instance on the same state."""

import json
import os
import time

import pytest

from conftest import Daemon, churn, control_file, flood_queue, is_event, wait_until, write

FILE_EVENTS = {"created", "modified", "attributes", "deleted", "moved"}


def scan_is_clean(fim):
    r = fim.cli("scan", "--no-alert", "--json", timeout=120)
    assert r.returncode == 0, "baseline out of date, the daemon missed:\n%s\n%s" % (
        r.stdout[:3000], r.stderr[-2000:])


@pytest.mark.inotify
@pytest.mark.timeout(240)
def test_overflow_with_new_dirs_and_deletions(fim):
    victims = [write(fim.root / ("old-%d.txt" % i)) for i in range(5)]
    for i in range(20):
        (fim.root / ("w%02d" % i)).mkdir()
    fill = [write(fim.root / "fill-a"), write(fim.root / "fill-b")]
    d = fim.daemon()
    with d.paused():
        flood_queue(*fill)
        for i in range(20):             # events in watched dirs: these overflow the queue
            for j in range(50):
                write(fim.root / ("w%02d" % i) / ("s%02d" % j))
        for i in range(40):             # new dirs, unknown to the daemon
            sub = fim.root / "new" / ("d%02d" % i)
            os.makedirs(sub)
            for j in range(25):
                write(sub / ("f%02d" % j))
        for v in victims:
            os.unlink(v)
    d.wait_for(is_event("rescan"), timeout=60)
    for v in victims:
        d.wait_for(is_event("deleted", v), timeout=60)
    deep = fim.root / "new" / "d39" / "f24"
    d.wait_for(is_event("created", deep), timeout=60)
    # the directories found by the rescan are watched now
    m = d.mark()
    write(deep, "after the storm\n")
    d.wait_for(is_event("modified", deep, detected="realtime"), since=m, timeout=20)
    d.stop()
    scan_is_clean(fim)


@pytest.mark.timeout(240)
def test_kill_9_in_a_storm_loses_nothing(fim):
    files = [write(fim.root / ("f%03d" % i), "v1\n") for i in range(200)]
    d = fim.daemon()
    with churn(files, "v2 %d\n"):
        time.sleep(1.0)
        d.kill()
    d2 = fim.daemon(timeout=60)
    assert d2.started.get("unclean") is True, d2.started
    d2.assert_quiet(lambda e: False, since=d2.start_index, control=control_file())
    d2.stop()
    scan_is_clean(fim)


@pytest.mark.timeout(240)
def test_changes_during_startup_are_not_lost(fim):
    n = 3000
    for i in range(n):
        if i % 100 == 0:
            (fim.root / ("d%02d" % (i // 100))).mkdir()
        write(fim.root / ("d%02d" % (i // 100)) / ("f%04d" % i), "v1\n")
    fim.baseline()
    changed = []
    d = fim.daemon(wait=False)
    # change files while the daemon compares the tree with the baseline and
    # sets up its watches, until it says it started
    deadline = time.monotonic() + 30
    i = 0
    while time.monotonic() < deadline:
        p = fim.root / ("d%02d" % ((i * 37 % n) // 100)) / ("f%04d" % (i * 37 % n))
        write(p, "v2 %d\n" % i)
        changed.append(p)
        i += 1
        if [e for e in d.events() if e.get("event") == "started"]:
            break
        time.sleep(0.002)
    d.wait_for(is_event("started"))
    d.assert_quiet(lambda e: False, since=d.start_index, control=control_file())
    reported = {e["path"] for e in d.events() if e.get("event") in ("modified", "created")}
    missed = sorted({str(p) for p in changed} - reported)
    assert not missed, "%d of %d files changed during start-up never reported: %s" % (
        len(missed), len(set(changed)), missed[:5])
    d.stop()
    scan_is_clean(fim)


def test_events_file_rotated_then_hup_writes_to_the_new_file(fim):
    d = fim.daemon()
    os.rename(fim.events_file, str(fim.events_file) + ".1")
    d.hup()                                   # what logrotate's postrotate does
    p = write(fim.root / "after-rotation.txt")
    try:
        wait_until(lambda: in_new_events_file(fim, p), what="%s in a new events_file" % p)
    except AssertionError:
        old = open(str(fim.events_file) + ".1").read()
        raise AssertionError("event not in the new events_file after rotation + HUP "
                             "(in the rotated one: %s)\n%s" % (str(p) in old, d.stderr()))
    d.stop()


def in_new_events_file(fim, p):
    return fim.events_file.exists() and str(p) in fim.events_file.read_text()


def test_events_file_rotated_without_hup_is_reopened(fim):
    d = fim.daemon()
    os.rename(fim.events_file, str(fim.events_file) + ".1")
    p = write(fim.root / "after-rotation.txt")
    wait_until(lambda: in_new_events_file(fim, p),
               what="the event in a new %s (not in the rotated file)" % fim.events_file)
    d.stop()


def test_directory_chmod_is_attributes(fim):
    (fim.root / "dir").mkdir(mode=0o755)
    os.chmod(fim.root / "dir", 0o755)
    d = fim.daemon()
    os.chmod(fim.root / "dir", 0o700)
    e = d.wait_for(is_event("attributes", fim.root / "dir"))
    assert e["kind"] == "dir" and e["changes"] == ["mode"], e
    d.stop()


def test_second_instance_on_the_same_state_refuses(fim):
    d = fim.daemon()
    r = fim.cli("run", timeout=20)
    assert r.returncode == 3, "a second daemon on the same state_dir must exit 3 " \
        "(a state condition systemd retries):\n" + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("fimwatch: error:"), r.stderr
    p = write(fim.root / "still-alive.txt")
    d.wait_for(is_event("created", p))
    d.stop()


def test_scan_while_the_daemon_runs_does_not_double_report(fim):
    a = write(fim.root / "a.txt", "1\n")
    d = fim.daemon()
    write(a, "2\n")
    d.wait_for(is_event("modified", a))
    r = fim.cli("scan", "--no-alert", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not [json.loads(x) for x in r.stdout.splitlines() if x.strip()]
    d.stop()


def test_tampering_that_restores_size_and_mtime_is_still_found(fim):
    """An intruder edits a binary while fimwatch is down and puts the old mtime
    back (touch -r). The ctime still moves; a start-up compare that trusts
    size+mtime alone would miss it."""
    p = write(fim.root / "ls", b"\x7fELF original code\n")
    st = os.stat(p)
    fim.baseline()
    time.sleep(0.05)
    with open(p, "r+b") as f:
        f.write(b"\x7fELF backdoor code\n")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(p).st_size == st.st_size and os.stat(p).st_mtime_ns == st.st_mtime_ns
    d = fim.daemon()
    e = d.wait_for(is_event("modified", p), since=d.start_index)
    assert e["detected"] == "startup" and e["changes"] == ["content"], e
    d.stop()
    with open(p, "r+b") as f:
        f.write(b"\x7fELF backdoor 2222\n")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = fim.cli("scan", "--no-alert", "--json")
    assert r.returncode == 1 and str(p) in r.stdout, r.stdout + r.stderr


@pytest.mark.timeout(240)
def test_stop_during_the_startup_comparison_loses_nothing(fim):
    n = 4000
    files = []
    for i in range(n):
        if i % 200 == 0:
            (fim.root / ("d%02d" % (i // 200))).mkdir()
        files.append(write(fim.root / ("d%02d" % (i // 200)) / ("f%04d" % i), "v1\n"))
    fim.baseline()
    for f in files:
        write(f, "v2 changed offline\n")
    d = fim.daemon()
    t0 = time.monotonic()
    d.stop()                                  # possibly in the middle of the comparison
    assert time.monotonic() - t0 < 10, "SIGTERM waited %.1fs" % (time.monotonic() - t0)
    d2 = fim.daemon()
    want = {str(f) for f in files}

    def reported():
        return {e["path"] for e in fim.events() if e.get("event") == "modified"} & want
    deadline = time.monotonic() + 120
    while len(reported()) < n and time.monotonic() < deadline and d2.alive():
        time.sleep(0.2)
    missed = sorted(want - reported())
    assert not missed, "%d offline changes never reported, e.g. %s" % (len(missed), missed[:3])
    d2.stop()
    scan_is_clean(fim)


def test_torn_last_line_of_the_events_file_does_not_swallow_the_next_event(fim):
    """After a crash mid-write the file may end without a newline; the next
    event must still be a line of its own."""
    d = fim.daemon()
    d.kill()
    with open(fim.events_file, "ab") as f:
        f.write(b'{"id": "torn-by-a-crash", "event": "mod')
    p = write(fim.root / "after-crash.txt")
    d2 = Daemon(fim)
    d2.start(wait=False)
    fim.daemons.append(d2)
    deadline = time.monotonic() + 20
    lines = []
    while time.monotonic() < deadline:
        lines = fim.events_file.read_bytes().splitlines()
        good = []
        for raw in lines:
            try:
                good.append(json.loads(raw))
            except ValueError:
                pass
        if any(e.get("path") == str(p) for e in good):
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the event after the torn line is not a line of its own:\n%r"
                             % lines[-3:])
    bad = [raw for raw in lines if raw != b'{"id": "torn-by-a-crash", "event": "mod'
           and not _parses(raw)]
    assert not bad, "events glued to the torn line: %r" % bad
    started = [e for e in map(_parses_to, lines) if e and e.get("event") == "started"]
    assert len(started) == 2 and started[-1].get("unclean") is True, started
    d2.kill()


def _parses_to(raw):
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _parses(raw):
    try:
        json.loads(raw)
        return True
    except ValueError:
        return False
