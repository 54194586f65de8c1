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


# ---------------------------------------------------------------------------
# 1. a lost, replaced or broken baseline is loud; the daemon keeps watching
# ---------------------------------------------------------------------------

def lost_event(d, reason):
    ev = d.wait_for(is_event("baseline_lost", severity="critical"), since=d.start_index)
    assert ev["reason"] == reason, ev
    assert "baseline lost or replaced" in ev["message"]
    assert "cannot be verified" in ev["message"]
    return ev


def still_watching(d):
    p = write(d.env.root / ("after-%d.txt" % time.monotonic_ns()))
    d.wait_for(is_event("created", str(p)), since=d.start_index)


def db_files(fim):
    return sorted(p.name for p in fim.state_dir.iterdir() if p.name.startswith("baseline.db"))


def test_a_baseline_row_another_process_commits_is_what_the_daemon_compares_with(fim):
    """The daemon keeps the baseline rows it last read or wrote (Store.get):
    a row that another connection commits meanwhile (the CLI's accept or
    scan, here an edit with sqlite3) must still be what the next change is
    compared with, not the kept copy."""
    import sqlite3
    p = write(fim.root / "kept.txt", "one\n")
    d = fim.daemon()
    mark = d.mark()
    write(p, "two\n")                       # compared and recorded: the row is kept
    d.wait_for(is_event("modified", str(p)), since=mark)
    db = sqlite3.connect(str(fim.state_dir / "baseline.db"), timeout=60)
    with db:
        n = db.execute("UPDATE files SET sha256=? WHERE parent=? AND name=?",
                       ("0" * 64, os.fsencode(str(fim.root)), b"kept.txt")).rowcount
    db.close()
    assert n == 1
    mark = d.mark()
    write(p, "two\n")                       # the same bytes: news only against the new row
    ev = d.wait_for(is_event("modified", str(p)), since=mark)
    assert "content" in ev["changes"] and ev["previous"]["sha256"] == "0" * 64, ev
    d.stop()


def test_rows_waiting_in_the_daemons_connection_are_seen_where_they_matter(tmp_path):
    """The daemon's connection (StateDB) holds a turn's event and baseline
    rows until another statement comes, for one executemany per table: a
    lookup of a waiting row, any other read, and the commit must see them;
    a lookup of another row need not wait for them (a storm looks up every
    new file). Real SQLite in a temp dir; Store's own row cache is emptied
    so the lookups reach the database."""
    import sqlite3
    import fimwatch
    f = tmp_path / "f"
    f.write_text("one\n")
    rec = fimwatch.snapshot(str(f), 1 << 20)
    store = fimwatch.Store(str(tmp_path / "state"))
    store.db = fimwatch.StateDB(store.db)
    a, b, c = (str(tmp_path / n) for n in ("a", "b", "c"))
    store.put(a, rec)
    store._rows.clear()
    assert store.get(a) == rec                      # the waiting row, looked up
    store.put(b, rec._replace(size=7))
    store._rows.clear()
    assert store.get(c) is None                     # another row: b still waits ...
    assert store.get(b) == rec._replace(size=7)     # ... and is seen when asked for
    ev = fimwatch.new_event("h", "modified", "warning", "realtime", a)
    ev["sequence"] = store.next_sequence()
    store.add_event(ev, fimwatch.event_json(ev))
    store.put(c, rec)
    assert store.db.execute("SELECT count(*) FROM events").fetchone()[0] == 1
    store.commit()
    other = sqlite3.connect(str(tmp_path / "state" / "baseline.db"))
    try:
        names = sorted(r[0] for r in other.execute("SELECT name FROM files"))
        assert names == [b"a", b"b", b"c"], names
        assert other.execute("SELECT id FROM events").fetchall() == [(ev["id"],)]
    finally:
        other.close()
        store.close()


def test_first_start_is_not_a_lost_baseline(fim):
    d = fim.daemon()
    assert "baseline_id" in d.started
    d.assert_quiet(lambda e: e["event"] in ("baseline_lost", "baseline_interrupted"),
                   since=0, control=control_file())
    d.stop()
    d2 = fim.daemon()
    d2.assert_quiet(lambda e: e["event"] in ("baseline_lost", "baseline_interrupted"),
                    since=d2.start_index, control=control_file())
    assert d2.started["baseline_id"] == d.started["baseline_id"]


@pytest.mark.parametrize("how", ["deleted", "deleted_with_sidecar"])
def test_deleted_baseline_is_critical(fim, how):
    fim.baseline()
    for p in list(fim.state_dir.iterdir()):
        if p.name.startswith("baseline.db") or (how == "deleted_with_sidecar"
                                                 and p.name.startswith("baseline.")):
            p.unlink()
    write(fim.root / "while-gone.txt", "absorbed\n")
    d = fim.daemon()
    ev = lost_event(d, "missing")
    assert ev["since"].startswith("20")
    still_watching(d)
    d.stop()
    # the fresh baseline is the baseline from now on: no second alarm
    d2 = fim.daemon()
    d2.assert_quiet(is_event("baseline_lost"), since=d2.start_index, control=control_file())


def test_garbage_baseline_is_moved_aside(fim):
    fim.baseline()
    db = fim.state_dir / "baseline.db"
    for p in fim.state_dir.glob("baseline.db-*"):
        p.unlink()
    db.write_bytes(b"this is not a database\n" * 500)
    d = fim.daemon()
    ev = lost_event(d, "corrupt")
    kept = [n for n in db_files(fim) if n.startswith("baseline.db.corrupt-")]
    assert kept and ev["moved_to"].endswith(kept[0])
    assert (fim.state_dir / kept[0]).read_bytes().startswith(b"this is not a database")
    still_watching(d)
    d.stop()


def test_truncated_baseline(fim):
    for i in range(300):
        write(fim.root / ("f%03d" % i), "data %d\n" % i * 50)
    fim.baseline()
    db = fim.state_dir / "baseline.db"
    size = db.stat().st_size
    assert size > 8192
    with open(db, "r+b") as f:
        f.truncate(size // 2)
    d = fim.daemon()
    ev = d.wait_for(is_event("baseline_lost"), since=d.start_index)
    assert ev["reason"] in ("corrupt", "truncated"), ev
    still_watching(d)


def test_schema_broken_baseline(fim):
    fim.baseline()
    import sqlite3
    conn = sqlite3.connect(str(fim.state_dir / "baseline.db"))
    conn.execute("DROP TABLE files")
    conn.commit()
    conn.close()
    d = fim.daemon()
    lost_event(d, "schema")
    still_watching(d)


def test_replaced_baseline(fim, tmp_path):
    fim.baseline()
    # a database that is valid but not ours (e.g. crafted on another machine)
    other = tmp_path / "other-state"
    fim2_conf = fim.sections(fimwatch={"state_dir": str(other)},
                             log={"events_file": str(tmp_path / "other.jsonl")})
    from conftest import render_config
    conf2 = fim.conf_dir / "other.conf"
    conf2.write_text(render_config(fim2_conf))
    os.chmod(conf2, 0o600)
    r = fim.cli("scan", "--no-alert", config=False, env={"FIMWATCH_CONFIG": str(conf2)})
    assert r.returncode in (0, 1), r.stderr
    for p in fim.state_dir.glob("baseline.db*"):
        p.unlink()
    for p in other.glob("baseline.db*"):
        os.rename(p, fim.state_dir / p.name)
    d = fim.daemon()
    lost_event(d, "replaced")
    assert [n for n in db_files(fim) if n.startswith("baseline.db.replaced-")]
    still_watching(d)


# ---------------------------------------------------------------------------
# 3. an interrupted first baseline is known as such
# ---------------------------------------------------------------------------

def test_first_baseline_killed_midway(fim):
    import conftest
    for i in range(40):
        sub = fim.root / ("d%02d" % i)
        sub.mkdir()
        for j in range(150):
            write(sub / ("f%03d" % j), "content %d %d\n" % (i, j) * 20)
    d = conftest.Daemon(fim)
    fim.daemons.append(d)
    d.start(wait=False)
    side = fim.state_dir / "baseline.id"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if json.loads(side.read_text()).get("state") == "building":
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    d.kill()
    d.proc.wait()
    if json.loads(side.read_text()).get("state") != "building":
        pytest.skip("the first baseline finished before the kill")
    d2 = fim.daemon(timeout=60)
    ev = d2.wait_for(is_event("baseline_interrupted", severity="warning"),
                     since=d2.start_index)
    assert "first baseline was interrupted" in ev["message"]
    assert "may already have been changed" in ev["message"]
    still_watching(d2)
    d2.stop()
    d3 = fim.daemon()
    d3.assert_quiet(lambda e: e["event"] in ("baseline_interrupted", "baseline_lost"),
                    since=d3.start_index, control=control_file())
    r = fim.cli("scan", "--no-alert", "--json")
    assert r.returncode == 0, r.stdout[:2000]


# ---------------------------------------------------------------------------
# 4. a watched root swapped for a symlink is critical, never followed
# ---------------------------------------------------------------------------

def test_root_swapped_for_symlink_is_critical_and_not_followed(fim):
    fim.write_config(watch={"paths": "%s %s" % (fim.root, fim.outside)})
    write(fim.root / "a.txt", "real\n")
    fim.baseline()
    evil = fim.base / "evil"
    evil.mkdir()
    write(evil / "planted.txt", "planted\n")
    os.rename(fim.root, fim.base / "real-tree")
    os.symlink(str(evil), str(fim.root))
    d = fim.daemon()
    ev = d.wait_for(is_event("root_swapped", str(fim.root), severity="critical"),
                    since=d.start_index)
    assert "symlink" in ev["message"] and "not followed" in ev["message"], ev
    marker = d.mark()

    def control(_root):
        p = write(fim.outside / ("ctl-%d" % time.monotonic_ns()))
        return is_event("created", str(p))
    write(evil / "later.txt", "written through the link\n")
    d.assert_quiet(lambda e: str(evil) in (e.get("path") or "")
                   or "/planted.txt" in (e.get("path") or "")
                   or "/later.txt" in (e.get("path") or ""),
                   since=0, control=control)
    assert marker <= d.mark()
    d.stop()
    # still not followed (and still loud) at the next start
    d2 = fim.daemon()
    d2.wait_for(is_event("root_swapped", str(fim.root)), since=d2.start_index)
    d2.assert_quiet(lambda e: "planted" in (e.get("path") or ""), since=d2.start_index,
                    control=control)


# ---------------------------------------------------------------------------
# 4b. a watched root on another filesystem between runs is critical
# ---------------------------------------------------------------------------

@needs_root
@pytest.mark.timeout(180)
def test_root_on_another_filesystem_is_critical_and_not_silently_baselined(fim, tmpfs):
    """README "When things go wrong": a watched path with something mounted
    over it between runs is a `critical root_swapped` naming the path and
    both devices, and what the mount holds is reported, never absorbed into
    the baseline without a word. Positive control first: a plain restart on
    the same filesystem says nothing of the kind."""
    write(fim.root / "a.txt", "real\n")
    fim.baseline()
    d0 = fim.daemon()
    d0.assert_quiet(is_event("root_swapped"), since=d0.start_index, control=control_file())
    d0.stop()

    disk = tmpfs(fim.root, "1m")
    planted = write(fim.root / "planted.txt", "planted on the tmpfs\n")
    dev_now = os.stat(fim.root).st_dev
    d = fim.daemon()
    ev = d.wait_for(is_event("root_swapped", str(fim.root), severity="critical"),
                    since=d.start_index)
    assert "different filesystem" in ev["message"], ev
    assert ev["now"]["dev"] == dev_now and ev["was"]["dev"] != dev_now, ev
    # the tmpfs's file is reported (not silently baselined), and so is the
    # file it hides
    created = d.wait_for(is_event("created", str(planted)), since=d.start_index)
    assert created["detected"] == "startup", created
    d.wait_for(is_event("deleted", str(fim.root / "a.txt")), since=d.start_index)
    still_watching(d)
    d.stop()
    disk.umount()


@needs_root
def test_unwritable_state_dir_at_start_exits_3(fim):
    """A state fault at start-up (state_dir immutable: nothing can be created
    or renamed in it) is a one-line error and exit 3, the status the unit
    restarts; never 2 (config error), never a traceback."""
    fim.baseline()
    if subprocess.run(["chattr", "+i", str(fim.state_dir)]).returncode != 0:
        pytest.skip("chattr +i not supported here")
    try:
        r = fim.cli("run", timeout=30)
    finally:
        subprocess.run(["chattr", "-i", str(fim.state_dir)], check=True)
    assert r.returncode == 3, (r.returncode, r.stderr[-2000:])
    assert r.stderr.startswith("fimwatch: error: state_dir %s: " % fim.state_dir), r.stderr
    assert "Traceback" not in r.stderr
    d = fim.daemon()         # repaired: the baseline is still the one it was
    d.assert_quiet(is_event("baseline_lost"), since=d.start_index, control=control_file())


@needs_root
def test_baseline_that_cannot_be_opened_is_a_state_fault_not_a_lost_baseline(fim):
    """A baseline.db we may not open for writing (here immutable) is exit 3,
    retried by systemd; it is neither moved aside nor replaced by a fresh
    baseline, and once repaired the daemon goes on with it, quietly."""
    fim.baseline()
    db = fim.state_dir / "baseline.db"
    if subprocess.run(["chattr", "+i", str(db)]).returncode != 0:
        pytest.skip("chattr +i not supported here")
    try:
        r = fim.cli("run", timeout=30)
    finally:
        subprocess.run(["chattr", "-i", str(db)], check=True)
    assert r.returncode == 3, (r.returncode, r.stderr[-2000:])
    assert "cannot be opened for writing" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not list(fim.state_dir.glob("baseline.db.*-*")), list(fim.state_dir.iterdir())
    d = fim.daemon()
    d.assert_quiet(is_event("baseline_lost"), since=d.start_index, control=control_file())
    d.stop()
