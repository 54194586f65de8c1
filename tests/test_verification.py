"""The periodic verification (scan_interval): every file re-read in the
background at most scan_rate bytes per second, what real time missed
reported with detected "scan", and one `verification` summary."""

import mmap
import os
import time

import pytest

from conftest import is_event, own_entries, write


@pytest.mark.timeout(90)
def test_verification_finds_an_mmap_write_and_says_so_in_one_line(fim):
    for i in range(5):
        write(fim.root / ("f%d" % i), "data %d\n" % i)
    p = write(fim.root / "mapped.bin", b"A" * 4096)
    fim.write_config(fimwatch={"scan_interval": "3s"})
    d = fim.daemon()
    m = d.mark()
    fd = os.open(p, os.O_RDWR)
    mm = mmap.mmap(fd, 4096)
    os.close(fd)
    try:
        time.sleep(0.5)
        mm[0:4] = b"BBBB"                     # no inotify event for this
        mm.flush()
        e = d.wait_for(is_event("modified", p), since=m, timeout=20)
        assert e["detected"] == "scan", e
        v = d.wait_for(lambda e: e.get("event") == "verification"
                       and e.get("changes") == 1, since=m, timeout=20)
    finally:
        mm.close()
    n = 6 + own_entries(fim)        # + its own program, config and events file
    assert v["files"] == n and v["detected"] == "scan", v
    assert v["severity"] == "warning", v
    assert v["message"].startswith("verification: %d files, 1 change real time did not see"
                                   % n), v
    # the next round finds nothing new, and says so at info
    v = d.wait_for(lambda e: e.get("event") == "verification" and e.get("changes") == 0,
                   since=m, timeout=20)
    assert v["severity"] == "info", v
    d.stop()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("rate,slow", [("1M", True), ("0", False)])
def test_scan_rate_caps_the_verification_and_real_time_goes_on(fim, rate, slow):
    for i in range(6):
        write(fim.root / ("big%d.bin" % i), os.urandom(512 * 1024))   # 3 MiB
    fim.write_config(fimwatch={"scan_interval": "2s", "scan_rate": rate})
    d = fim.daemon()
    m = d.mark()
    time.sleep(2.5)                           # the verification has started
    p = write(fim.root / "during.txt", "x\n")
    t0 = time.monotonic()
    d.wait_for(is_event("created", p), since=m, timeout=10)
    assert time.monotonic() - t0 < 1.0        # not stuck behind the scan
    v = d.wait_for(is_event("verification"), since=m, timeout=30)
    assert v["bytes"] >= 3 * 1024 * 1024, v
    if slow:
        assert v["seconds"] >= 2.0, v         # 3 MiB at 1 MiB/s (the first slice is free)
    else:
        assert v["seconds"] < 1.5, v          # positive control: uncapped is fast
    d.stop()


def test_scan_rate_limits_in_the_config(fim):
    fim.write_config(fimwatch={"scan_rate": "1K"})
    r = fim.cli("check-config")
    assert r.returncode == 2 and "scan_rate" in r.stderr and "0 (no cap)" in r.stderr, r.stderr
    fim.write_config(fimwatch={"scan_rate": "0"})
    assert fim.cli("check-config").returncode == 0
