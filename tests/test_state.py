"""State faults against the real daemon: a full disk under state_dir (and
under the events file), a lost, replaced or corrupt baseline, an interrupted
first baseline. The rule each test keeps: the daemon stays up, says what is
wrong, and every change is reported exactly once, with one id."""

import json
import os
import subprocess
import time
from collections import Counter

import pytest

from conftest import IS_ROOT, control_file, is_event, needs_root, write

FILE_EVENTS = {"created", "modified", "attributes", "deleted", "moved"}


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

class Tmpfs:
    """A small tmpfs mounted on a directory; fill() until ENOSPC, free()."""

    def __init__(self, where, size="2m"):
        self.where = str(where)
        os.makedirs(self.where, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s,mode=0700" % size, "tmpfs",
                        self.where], check=True)
        self.filler = os.path.join(self.where, "filler")

    def fill(self):
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)
        st = os.statvfs(self.where)
        assert st.f_bavail == 0, "tmpfs not full"

    def free(self):
        os.unlink(self.filler)

    def umount(self):
        subprocess.run(["umount", "-l", self.where], check=False)


@pytest.fixture
def tmpfs():
    if not IS_ROOT:
        pytest.skip("needs root to mount a tmpfs")
    mounts = []

    def make(where, size="2m"):
        m = Tmpfs(where, size)
        mounts.append(m)
        return m
    yield make
    for m in reversed(mounts):
        m.umount()


def db_events(fim):
    """Events recorded in the state database (fimwatch events --json)."""
    r = fim.cli("events", "--since", "1d", "--json", check=0)
    return [json.loads(line) for line in r.stdout.splitlines()]


def file_events(evs):
    return [e for e in evs if e.get("event") in FILE_EVENTS]


def assert_once(evs, paths, what):
    """Each path in paths has exactly one file event in evs."""
    seen = Counter(e["path"] for e in file_events(evs))
    ids = Counter(e["id"] for e in evs)
    assert not [i for i, n in ids.items() if n > 1], "%s: an id twice: %s" % (what, ids)
    missing = [p for p in paths if seen[p] == 0]
    twice = [p for p in paths if seen[p] > 1]
    assert not missing and not twice, "%s: missing %s, twice %s" % (what, missing, twice)


# ---------------------------------------------------------------------------
# 2. a full disk never stops the daemon, and loses or doubles nothing
# ---------------------------------------------------------------------------

@needs_root
@pytest.mark.timeout(240)
def test_full_disk_under_state_dir(fim, tmpfs):
    disk = tmpfs(fim.state_dir, "4m")
    d = fim.daemon()
    disk.fill()
    mark = d.mark()
    paths = []
    for i in range(5):
        paths.append(str(write(fim.root / ("full-%d.txt" % i), "new %d\n" % i)))
        time.sleep(0.3)
    for p in paths:
        d.wait_for(is_event("created", p), since=mark)
    d.wait_for(is_event("state_error", severity="warning"), since=mark, timeout=20)
    assert d.alive()
    disk.free()
    d.wait_for(is_event("state_recovered"), since=mark, timeout=90)
    # the events file has each once; the database has each once, with the same ids
    sent = d.events(mark)
    assert_once(sent, paths, "events_file")
    recorded = {e["id"]: e for e in db_events(fim)}
    for e in file_events(sent):
        assert e["id"] in recorded, "event %s not in the database" % e
    assert_once([e for e in recorded.values() if e.get("path") in paths], paths, "database")
    d.stop()
    # The baseline took them too: a restart reports none of them again.
    d2 = fim.daemon()
    d2.assert_quiet(lambda e: e.get("path") in paths, since=d2.start_index,
                    control=control_file())
    assert not d2.started.get("unclean")


@needs_root
@pytest.mark.timeout(240)
def test_full_disk_under_events_file_and_state(fim, tmpfs):
    disk = tmpfs(fim.base / "shared", "4m")
    state, log = fim.base / "shared" / "state", fim.base / "shared" / "log"
    state.mkdir(mode=0o700)
    log.mkdir()
    fim.state_dir, fim.events_file = state, log / "events.jsonl"
    fim.write_config()
    d = fim.daemon()
    disk.fill()
    paths = [str(write(fim.root / ("both-%d.txt" % i), "x" * 300 + "\n")) for i in range(8)]
    time.sleep(2)
    assert d.alive(), d.stderr()
    disk.free()
    for p in paths:
        d.wait_for(is_event("created", p), since=d.start_index, timeout=30)
    d.wait_for(is_event("state_recovered"), since=d.start_index, timeout=90)
    assert_once(d.events(), paths, "events_file")     # read_events: every line is JSON
    assert_once([e for e in db_events(fim) if e.get("path") in paths], paths, "database")
    assert "events_file" in d.stderr()
    d.stop()
