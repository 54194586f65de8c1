"""Hashing never stalls the loop (issue 10 item 5, issue 14): big files are
read by worker threads, a file that changes while it is hashed is queued
again and then reported as `changing`, and a baseline built by the workers
keeps the daemon responsive (a change made during the build is reported
once it ends). All against the running daemon on real trees; the big file
lives on a tmpfs mounted in the test's temp dir, so the writer fills memory,
not the shared disk."""

import os
import subprocess
import time

import pytest

from conftest import IS_ROOT, SETTLE, about, is_event, own_entries, write

BIG = 1536 << 20             # bytes: about 1.5 s of hashing on this kind of machine
NOBODY = 65534

# An unprivileged writer (an fd of the file is all it is given: the test's
# temp dir is root's): grow the file to BIG as fast as it can, then rewrite
# it in place without pause, until killed.
WRITER = r"""
import os, sys
fd, size, chunk = int(sys.argv[1]), int(sys.argv[2]), bytes(range(256)) * 4096
n = 0
while True:
    off = 0
    while off < size:
        os.pwrite(fd, chunk[n % 256:] + chunk[:n % 256], off)
        off += len(chunk)
        n += 1
"""


@pytest.fixture
def big_dir(fim):
    """fim.root/critical on a tmpfs, writable by nobody (critical: max_delay 2 s)."""
    d = fim.root / "critical"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%d,mode=0755" % (BIG + (64 << 20)),
                    "fimwatch-test", str(d)], check=True)
    try:
        os.chown(d, NOBODY, NOBODY)
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.mark.skipif(not IS_ROOT, reason="needs root (tmpfs mount, an unprivileged writer)")
@pytest.mark.timeout(240)
def test_a_writer_rewriting_a_big_file_never_delays_other_changes(fim, big_dir):
    fim.write_config(fimwatch={"hash_max_size": "4G"})
    big = big_dir / "grow.bin"
    d = fim.daemon()
    m = d.mark()
    write(big, "")
    os.chown(big, NOBODY, NOBODY)
    fd = os.open(big, os.O_WRONLY)
    writer = subprocess.Popen(["/usr/bin/python3", "-c", WRITER, str(fd), str(BIG)],
                              cwd="/", user=NOBODY, group=NOBODY, extra_groups=[],
                              stdin=subprocess.DEVNULL, pass_fds=(fd,))
    os.close(fd)
    try:
        # Positive control: the writer's file is seen and compared.
        d.wait_for(about(big), since=m, timeout=90)
        late = []
        for i in range(8):
            p = fim.root / ("elsewhere-%d.txt" % i)
            t0 = time.monotonic()
            write(p, "change %d\n" % i)
            d.wait_for(is_event("created", p), since=m, timeout=30)
            late.append(round(time.monotonic() - t0, 2))
            time.sleep(0.45)
        assert writer.poll() is None, "the writer stopped early"
        assert max(late) <= SETTLE + 1.0, \
            "changes elsewhere reported after %s s while a big file was rewritten" % late
        # It never holds still, so it is reported as changing, not hashed forever.
        ev = d.wait_for(lambda e: about(big)(e) and e.get("changing") is True, since=m,
                        timeout=60)
        assert ev["event"] in ("created", "modified"), ev
    finally:
        writer.kill()
        writer.wait()
    d.stop()


def test_a_change_during_the_build_is_reported_once_it_ends(fim):
    # A sparse 4 GiB file keeps a worker hashing for seconds; the victim, in
    # the top directory, is changed once the daemon has read it (its
    # IN_CLOSE_NOWRITE, seen by our own inotify watch) while the build is
    # still going (no `started` yet).
    import inotify_simple
    fim.write_config(fimwatch={"hash_max_size": "8G"})
    victim = write(fim.root / "victim.conf", "before\n")
    (fim.root / "zz").mkdir()
    with open(fim.root / "zz" / "sparse.img", "wb") as f:
        f.truncate(4 << 30)
    ino = inotify_simple.INotify()
    ino.add_watch(str(fim.root), inotify_simple.flags.CLOSE_NOWRITE)
    try:
        d = fim.daemon(wait=False)
        deadline = time.monotonic() + 60
        read = False
        while not read and time.monotonic() < deadline:
            read = any(e.name == "victim.conf" for e in ino.read(timeout=100))
        assert read, "the daemon never read %s" % victim
    finally:
        ino.close()
    write(victim, "changed during the build\n")
    assert not d.matching(is_event("started")), "the build ended before the change"
    started = d.wait_for(is_event("started"), timeout=120)
    assert "baseline built" in started["message"], started
    d.wait_for(lambda e: about(victim)(e) and e["event"] == "modified", timeout=15)
    d.stop()


def test_a_big_first_baseline_has_every_row(fim):
    """A first baseline's rows go to the database in batches, from the loop's
    own looks and from the hashing threads' jobs (files >= 128 KiB): all of
    them must be in when `started` says so -- counted by `started` and
    found by a full scan afterwards (a lost row is a `created` there)."""
    n = 0
    for i in range(12):
        d = fim.root / ("d%02d" % i)
        d.mkdir()
        for j in range(300):
            write(d / ("f%03d" % j), "%d %d\n" % (i, j))
            n += 1
        with open(d / "big.bin", "wb") as f:
            f.write(os.urandom(256 << 10))
        n += 2                                    # big.bin and the directory
    d = fim.daemon()
    started = d.wait_for(is_event("started"))
    # the tree, its root, and fimwatch's own files (the events file may be
    # made after the count)
    assert n + 1 <= started["baseline_entries"] <= n + 1 + own_entries(fim), started
    victim = fim.root / "d05" / "f150"
    write(victim, "changed\n")                    # alive, and the row was there
    e = d.wait_for(about(victim))
    assert e["event"] == "modified", e
    d.stop()
    r = fim.cli("scan", "--no-alert", "--json", timeout=120)
    assert r.returncode == 0, "rows missing from the first baseline:\n%s" % r.stdout[:2000]


def test_a_build_closed_midway_leaves_no_fd_and_no_thread(fim):
    """A baseline's walk closed before its end (the daemon stops, a reload
    drops the root): the files gathered for a hashing job from several
    directories (each directory's fd duplicated for them) are dropped with
    those fds, and what was looked at is recorded.
    In-process on the Engine (the walk stepped by hand: a daemon's fds
    cannot be counted after it exits)."""
    import fimwatch
    for i in range(6):
        d = fim.root / ("d%d" % i)
        d.mkdir()
        write(d / "small", "s%d\n" % i)
        for j in range(2):                      # >= 128 KiB: gathered for a job
            with open(d / ("big%d" % j), "wb") as f:
                f.write(os.urandom(130 << 10))
    cfg = fimwatch.load_config(str(fim.conf), check_perms=False)
    store = fimwatch.Store(cfg.state_dir)
    eng = fimwatch.Engine(cfg, store, lambda ev: None)
    try:
        before = len(os.listdir("/proc/self/fd"))
        walk = eng.walk(str(fim.root), "build", "startup", watch=False)
        for _ in range(4):                      # the root and three directories
            next(walk)
        assert eng._build["items"], "no files waiting for a job: the test tests nothing"
        assert len({it[4] for it in eng._build["items"]}) >= 2
        walk.close()
        assert eng._build is None
        assert len(os.listdir("/proc/self/fd")) == before, os.listdir("/proc/self/fd")
        store.commit()
        assert store.get(str(fim.root / "d0" / "small")) is not None   # looked at: recorded
    finally:
        eng.close()
        store.close()
