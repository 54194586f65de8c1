"""Hostile input: FIFOs, devices, sockets, files vanishing mid-hash, file
names with newlines / control characters / non-UTF-8 bytes / 255 bytes, and
trees deeper than PATH_MAX. Every output stays valid and escaped; the daemon
never blocks or crashes (each test ends with a positive control)."""

import json
import os
import socket
import stat
import threading

import pytest

from conftest import control_file, is_event, needs_root, write

FILE_EVENTS = {"created", "modified", "attributes", "deleted", "moved"}


def assert_no_traceback(d):
    assert "Traceback" not in d.stderr(), d.stderr()


def test_fifo_does_not_block_the_daemon_or_scan(fim):
    os.mkfifo(fim.root / "pre-existing.fifo")        # must not block the baseline build
    d = fim.daemon()
    f = fim.root / "runtime.fifo"
    os.mkfifo(f)
    e = d.wait_for(is_event("created", f))
    assert e["kind"] == "other", e
    assert "sha256" not in e, e
    # nobody ever opens the write end: a reader would hang forever
    d.assert_quiet(lambda e: False, since=d.start_index, control=control_file())
    r = fim.cli("scan", "--no-alert", timeout=30)
    assert r.returncode in (0, 1), r.stderr
    assert "Traceback" not in r.stderr
    p = write(fim.root / "after-scan.txt")
    d.wait_for(is_event("created", p))
    assert_no_traceback(d)
    d.stop()


@needs_root
def test_device_nodes_are_never_read(fim):
    # a /dev/zero clone: reading it to hash it would never end
    os.mknod(fim.root / "pre-zero", stat.S_IFCHR | 0o600, os.makedev(1, 5))
    d = fim.daemon()
    z = fim.root / "zero"
    os.mknod(z, stat.S_IFCHR | 0o666, os.makedev(1, 5))
    e = d.wait_for(is_event("created", z))
    assert e["kind"] == "other" and "sha256" not in e, e
    d.assert_quiet(lambda e: False, since=d.start_index, control=control_file())
    d.stop()
    r = fim.cli("scan", "--no-alert", timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


def test_unix_socket_in_the_tree(fim):
    d = fim.daemon()
    path = fim.root / "app.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(str(path))
        s.listen(1)
        e = d.wait_for(is_event("created", path))
        assert e["kind"] == "other", e
        d.assert_quiet(lambda e: False, since=d.start_index, control=control_file())
    finally:
        s.close()
    d.stop()


def test_files_vanishing_or_changing_mid_hash(fim):
    fim.write_config(fimwatch={"settle": "0"})
    d = fim.daemon()
    blob = b"\0" * (8 << 20)
    stop = threading.Event()

    def churn():
        i = 0
        while not stop.is_set() and i < 40:
            p = fim.root / ("churn-%d.bin" % (i % 3))
            write(p, blob)
            os.truncate(p, 100)
            os.unlink(p)
            i += 1
    t = threading.Thread(target=churn)
    t.start()
    t.join(60)
    stop.set()
    d.assert_quiet(lambda e: False, since=d.start_index, control=control_file())
    assert_no_traceback(d)
    d.stop()


HOSTILE_NAMES = [   # (label, name, an ASCII marker that survives any escaping)
    ("newline", b"HOSTILE-nl\nname.txt", "HOSTILE-nl"),
    ("escape", b"HOSTILE-esc\x1b[31mred\x1b[0m.txt", "HOSTILE-esc"),
    ("controls", b"HOSTILE-ctl\x01\x07\x08\x7f\r.txt", "HOSTILE-ctl"),
    ("non-utf8", b"HOSTILE-bytes\xff\xfe\x80.txt", "HOSTILE-bytes"),
    ("long-255", b"HOSTILE-long" + b"n" * (255 - 12), "HOSTILE-long"),
    ("long-utf8", b"HOSTILE-u" + "\u00e9".encode() * 123, "HOSTILE-u"),
]


def raw_lines(path):
    return path.read_bytes().splitlines()


@pytest.mark.parametrize("label,name,marker", HOSTILE_NAMES, ids=[h[0] for h in HOSTILE_NAMES])
def test_hostile_file_names_are_escaped_never_a_crash(fim, label, name, marker):
    assert len(name) <= 255
    broot = os.fsencode(str(fim.root))
    d = fim.daemon()
    p = broot + b"/" + name
    with open(p, "wb") as f:
        f.write(b"v1\n")
    e = d.wait_for(lambda e: e.get("event") == "created" and marker in e.get("path", ""))
    with open(p, "wb") as f:
        f.write(b"v2\n")
    m2 = d.wait_for(lambda e: e.get("event") == "modified" and marker in e.get("path", ""))
    assert m2["path"] == e["path"], (e, m2)
    if label == "non-utf8":
        assert "\\xff" in e["path"].lower(), "non-UTF-8 byte not \\xNN-escaped: %r" % e["path"]
    for raw in raw_lines(fim.events_file):
        assert not any(c < 0x20 for c in raw), "raw control byte in events_file: %r" % raw
        json.loads(raw.decode("utf-8"))
    os.unlink(p)
    d.wait_for(lambda e: e.get("event") == "deleted" and marker in e.get("path", ""))
    d.assert_quiet(lambda e: False, since=d.start_index, control=control_file())
    assert_no_traceback(d)
    d.stop()

    # the one-shot commands print them escaped, too
    with open(p, "wb") as f:
        f.write(b"offline 1\n")
    r = fim.cli("scan", "--no-alert")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert marker in r.stdout
    assert not any(ch in r.stdout for ch in "\x1b\x07\x01\x7f\r"), repr(r.stdout)
    lines = [x for x in r.stdout.splitlines() if marker in x]
    assert lines and all(x.count(marker) == 1 for x in lines), repr(r.stdout)
    if label == "newline":   # the name's newline must not split the output line
        assert any("name.txt" in x for x in lines), repr(r.stdout)
    with open(p, "wb") as f:
        f.write(b"offline 2\n")
    r = fim.cli("scan", "--no-alert", "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    found = [json.loads(line) for line in r.stdout.splitlines()]
    assert any(marker in x.get("path", "") for x in found), r.stdout
    r = fim.cli("events", "--json")
    assert r.returncode == 0, r.stderr
    for line in r.stdout.splitlines():
        json.loads(line)
    assert marker in r.stdout


def deep_chain(top, total_len, component=200):
    """Create nested dirs under top until the path is about total_len bytes.

    Works past PATH_MAX by walking down with dir_fd. Returns (fd of the
    deepest dir, its path as a string)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    path = str(top)
    i = 0
    while len(path) + component + 1 < total_len:
        name = ("%03d" % i) + "d" * (component - 3)
        os.mkdir(name, dir_fd=fd)
        nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
        path += "/" + name
        i += 1
    return fd, path


def test_deep_tree_near_path_max(fim):
    d = fim.daemon()
    fd, path = deep_chain(fim.root, 4000)
    try:
        assert 3700 < len(path) < 4000
        wfd = os.open("bottom.txt", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
        os.write(wfd, b"deep\n")
        os.close(wfd)
        target = path + "/bottom.txt"
        d.wait_for(is_event("created", target), timeout=20)
        m = d.mark()
        wfd = os.open("bottom.txt", os.O_WRONLY | os.O_TRUNC, dir_fd=fd)
        os.write(wfd, b"deeper\n")
        os.close(wfd)
        d.wait_for(is_event("modified", target), since=m)
    finally:
        os.close(fd)
    assert_no_traceback(d)
    d.stop()


def _write_at(fd, name, data, flags=os.O_CREAT | os.O_WRONLY | os.O_TRUNC):
    wfd = os.open(name, flags, 0o644, dir_fd=fd)
    os.write(wfd, data)
    os.close(wfd)


@pytest.mark.timeout(240)
def test_tree_deeper_than_path_max_is_watched_and_compared(fim):
    """Past PATH_MAX (4096 bytes) the tree is walked, watched and compared
    through directory fds; events carry the full path."""
    fd, path = deep_chain(fim.root, 5000)
    try:
        assert len(os.fsencode(path)) > 4096
        _write_at(fd, "beyond.txt", b"beyond\n")
        d = fim.daemon(timeout=40)           # the baseline walk hashes it
        target = path + "/beyond.txt"
        _write_at(fd, "beyond.txt", b"changed\n")
        e = d.wait_for(is_event("modified", target), timeout=20)
        assert e["changes"] == ["content"] and e["previous"]["size"] == 7, e
        _write_at(fd, "beyond2.txt", b"new\n")
        d.wait_for(is_event("created", path + "/beyond2.txt"))
        # a directory made down there is watched too
        os.mkdir("sub", dir_fd=fd)
        sfd = os.open("sub", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        try:
            _write_at(sfd, "f.txt", b"1\n")
            d.wait_for(is_event("created", path + "/sub/f.txt"))
            m = d.mark()
            _write_at(sfd, "f.txt", b"2\n")
            d.wait_for(is_event("modified", path + "/sub/f.txt"), since=m)
        finally:
            os.close(sfd)
        assert not [e for e in d.events() if e.get("event") == "error"], d.events()
        assert_no_traceback(d)
        d.stop()
        # changed while stopped: found by the start-up comparison, and by scan
        _write_at(fd, "beyond.txt", b"offline\n")
        d = fim.daemon(timeout=40)
        e = d.wait_for(is_event("modified", target), since=d.start_index, timeout=30)
        assert e["detected"] == "startup", e
        d.stop()
        os.unlink("beyond2.txt", dir_fd=fd)
    finally:
        os.close(fd)
    r = fim.cli("scan", "--no-alert", "--json", timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    found = [json.loads(x) for x in r.stdout.splitlines() if x.strip()]
    assert [(e["event"], e["path"]) for e in found] == [("deleted", path + "/beyond2.txt")], found
