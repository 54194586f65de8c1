"""What slips past a settle window: short-lived files, content put back
while a `touch` loop runs, writes that never stop, and the default
exclusions (a probe name that stays, an editor leftover that stays)."""

import hashlib
import os
import time

import pytest

from conftest import control_file, is_event, write


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def about(path):
    path = str(path)
    return lambda e: path in (e.get("path"), e.get("from"))


# --- transient: created and gone within the settle window ---------------------

def test_dropper_written_run_and_deleted_within_50ms_is_one_transient(fim):
    d = fim.daemon()
    m = d.mark()
    p = fim.root / "dropper"
    body = b"#!/bin/sh\necho pwned\n"
    t0 = time.monotonic()
    fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o755)
    os.write(fd, body)
    os.close(fd)
    time.sleep(0.02)                                 # "run"
    os.unlink(p)
    assert time.monotonic() - t0 < 0.05
    e = d.wait_for(is_event("transient", p), since=m)
    assert e["kind"] == "file" and e["captured"] is True, e
    assert e["mode"] == "0755" and e["size"] == len(body), e
    assert e["sha256"] == sha256(body), e
    assert e["detected"] == "realtime" and e["severity"] == "warning", e
    # positive control: a file that stays is "created", not transient
    q = write(fim.root / "stays", "x\n")
    d.wait_for(is_event("created", q), since=m)
    time.sleep(0.3)
    assert len(d.matching(about(p), since=m)) == 1, d.matching(about(p), since=m)
    assert not d.matching(is_event("transient", q), since=m)
    d.stop()


def test_transient_on_a_critical_path_is_critical(fim):
    (fim.root / "critical").mkdir()
    d = fim.daemon()
    p = write(fim.root / "critical" / "job", "* * * * * root sh -c x\n")
    os.unlink(p)
    e = d.wait_for(is_event("transient", p))
    assert e["severity"] == "critical", e
    d.stop()


def test_editor_temp_file_renamed_over_the_real_one_is_not_transient(fim):
    p = write(fim.root / "app.conf", "a\n")
    d = fim.daemon()
    m = d.mark()
    tmp = write(fim.root / "app.conf.tmp123", "b\n")
    os.rename(tmp, p)
    d.wait_for(is_event("modified", p), since=m)
    d.assert_quiet(is_event("transient"), since=m, control=control_file())
    d.stop()


# --- content put back: a touch loop must not defer the comparison -------------

def test_content_changed_and_put_back_under_a_touch_loop_is_reported(fim):
    p = write(fim.root / "passwd", "root:x:0:0\n")
    d = fim.daemon()
    m = d.mark()
    st = os.stat(p)
    write(p, "root:x:0:0\nevil:x:0:0\n")
    end = time.monotonic() + 1.5
    while time.monotonic() < end:                   # keeps IN_ATTRIB coming
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
        time.sleep(0.02)
    write(p, "root:x:0:0\n")                        # put back ...
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    e = d.wait_for(is_event("modified", p), since=m, timeout=5)
    assert e["sha256"] == sha256(b"root:x:0:0\nevil:x:0:0\n"), e
    d.stop()


def test_a_touch_loop_alone_is_still_no_event(fim):
    p = write(fim.root / "quiet.conf", "same\n")
    d = fim.daemon()
    m = d.mark()
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        os.utime(p)
        time.sleep(0.02)
    d.assert_quiet(about(p), since=m, control=control_file())
    d.stop()


@pytest.mark.timeout(60)
def test_nonstop_writes_to_a_critical_file_are_compared_within_2s(fim):
    (fim.root / "critical").mkdir()
    p = write(fim.root / "critical" / "shadow", "0\n")
    d = fim.daemon()
    m = d.mark()
    t0 = time.monotonic()
    seen = None
    i = 0
    while time.monotonic() - t0 < 4.0:
        i += 1
        write(p, "%d\n" % i)
        time.sleep(0.03)
        if seen is None and d.matching(is_event("modified", p), since=m):
            seen = time.monotonic() - t0
    assert seen is not None and seen < 2.6, "first modified after %s s" % seen
    d.stop()


# --- default exclusions never hide a file a service would load ----------------

def test_vim_probe_name_that_stays_is_reported(fim):
    (fim.root / "cron.d").mkdir()
    d = fim.daemon()
    p = write(fim.root / "cron.d" / "4913", "* * * * * root /tmp/x\n")
    e = d.wait_for(is_event("created", p))
    assert e["detected"] == "realtime", e
    d.stop()


def test_vim_probe_name_present_while_down_is_reported_at_start(fim):
    fim.baseline()
    p = write(fim.root / "4913", "ALL ALL=(ALL) NOPASSWD: ALL\n")
    d = fim.daemon()
    e = d.wait_for(is_event("created", p))
    assert e["detected"] == "startup", e
    d.stop()


def _short_grace_daemon(fim):
    """A daemon that looks at editor leftovers every second, with a 2 s grace."""
    fim.write_config(watch={"editor_grace": "2s", "poll_interval": "1s"})
    d = fim.daemon()
    return d, d.mark()


@pytest.mark.timeout(60)
def test_editor_leftover_still_there_after_the_grace_is_reported_once(fim):
    d, m = _short_grace_daemon(fim)
    p = write(fim.root / "sudo-rule~", "x ALL=(ALL) ALL\n")
    e = d.wait_for(is_event("created", p), since=m, timeout=10)
    assert e["leftover"] is True and e["detected"] == "scan", e
    m2 = d.mark()
    write(p, "changed\n")                           # seen again, past the grace again
    time.sleep(3.5)
    d.assert_quiet(about(p), since=m2, control=control_file())
    d.stop()


@pytest.mark.timeout(60)
def test_long_vim_session_costs_no_alert(fim):
    d, m = _short_grace_daemon(fim)
    swap = write(fim.root / ".notes.swp", b"b0VIM 9.0\0" + b"\0" * 100)
    fd = os.open(swap, os.O_RDWR)                   # vim keeps its swap file open
    try:
        time.sleep(4.5)
        d.assert_quiet(about(swap), since=m, control=control_file())
    finally:
        os.close(fd)
    # positive control for the rule itself: closed and old, it is reported
    d.wait_for(is_event("created", swap, leftover=True), since=m, timeout=10)
    d.stop()
