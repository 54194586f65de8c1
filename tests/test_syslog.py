"""The [syslog] sink: a unix datagram socket or UDP host:port; SPEC's line
format `fimwatch[PID]: <severity> <event> <path> key=value ...`; priority =
facility * 8 + severity; control characters escaped."""

import os
import re
import socket
import time

import pytest

from conftest import Daemon, is_event, write

FACILITY = {"authpriv": 10, "local3": 19, "daemon": 3}
SEVERITY = {"critical": 2, "warning": 4, "notice": 5, "info": 6}


def receive(sock, want, timeout=10.0):
    """Datagrams until one contains `want` (bytes); returns that one."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except socket.timeout:
            break
        seen.append(data)
        if want in data:
            return data
    raise AssertionError("no syslog datagram containing %r; got %r" % (want, seen))


def check_line(data, pid, facility, severity, event, path):
    path = str(path)
    text = data.decode("utf-8", "strict")
    m = re.match(r"^<(\d+)>", text)
    assert m, text
    assert int(m.group(1)) == FACILITY[facility] * 8 + SEVERITY[severity], text
    want = "fimwatch[%d]: %s %s %s" % (pid, severity, event, path)
    assert want in text, "%r not in %r" % (want, text)
    assert not any(ord(c) < 0x20 for c in text.rstrip("\n")), repr(text)
    tail = text.split(path, 1)[1]
    assert re.match(r'^( [a-z_0-9.]+=("(?:[^"\\]|\\.)*"|\S+))*\s*$', tail), "not logfmt: %r" % tail


@pytest.fixture
def unix_syslog(tmp_path):
    path = tmp_path / "devlog"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    yield s, str(path)
    s.close()


def test_unix_datagram_syslog(fim, unix_syslog):
    sock, address = unix_syslog
    fim.write_config(syslog={"enabled": "yes", "address": address, "facility": "authpriv",
                             "min_severity": "info"})
    (fim.root / "critical").mkdir()
    d = fim.daemon()
    p = write(fim.root / "critical" / "passwd", "root:x:0:0\n")
    d.wait_for(is_event("created", p))
    check_line(receive(sock, os.fsencode(str(p))), d.pid, "authpriv", "critical", "created", p)
    q = write(fim.root / "plain.txt")
    check_line(receive(sock, os.fsencode(str(q))), d.pid, "authpriv", "warning", "created", q)
    d.stop()


def test_udp_syslog_and_min_severity(fim):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    try:
        fim.write_config(syslog={"enabled": "yes", "address": "127.0.0.1:%d" % port,
                                 "facility": "local3", "min_severity": "warning"})
        (fim.root / "info").mkdir()
        d = fim.daemon()
        quiet = write(fim.root / "info" / "below-min.txt")       # severity info: filtered
        loud = write(fim.root / "loud.txt")                        # warning: sent
        d.wait_for(is_event("created", quiet))
        data = receive(sock, os.fsencode(str(loud)))
        check_line(data, d.pid, "local3", "warning", "created", loud)
        d.stop()
    finally:
        sock.close()


def test_syslog_escapes_control_characters(fim, unix_syslog):
    sock, address = unix_syslog
    fim.write_config(syslog={"enabled": "yes", "address": address})
    d = fim.daemon()
    name = b"SYSLOG-evil\n\x1b[2Jname"
    with open(os.fsencode(str(fim.root)) + b"/" + name, "wb") as f:
        f.write(b"x")
    data = receive(sock, b"SYSLOG-evil")
    text = data.decode("utf-8")
    assert "\x1b" not in text and "\n" not in text.rstrip("\n"), repr(text)
    d.stop()


def test_dead_syslog_socket_does_not_stall_detection(fim, tmp_path):
    fim.write_config(syslog={"enabled": "yes", "address": str(tmp_path / "no-such-socket")})
    d = fim.daemon()
    for i in range(5):
        p = write(fim.root / ("f%d" % i))
        d.wait_for(is_event("created", p))
    d.stop()


def test_events_file_write_errors_do_not_stop_the_daemon(fim, unix_syslog):
    """events_file on a full disk (/dev/full: every write fails with ENOSPC):
    the daemon keeps detecting and still reports through syslog."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    sock, address = unix_syslog
    fim.write_config(syslog={"enabled": "yes", "address": address},
                     log={"events_file": "/dev/full"})
    d = Daemon(fim)
    fim.daemons.append(d)
    d.start(wait=False)
    receive(sock, b"started", timeout=20)
    for i in range(3):
        p = write(fim.root / ("disk-full-%d.txt" % i))
        receive(sock, os.fsencode(str(p)))
    assert d.alive(), d.stderr()
    d.proc.terminate()
    assert d.proc.wait(timeout=20) == 0, d.stderr()


def test_syslog_reconnects_after_the_syslog_daemon_restarts(fim, tmp_path):
    path = str(tmp_path / "devlog2")
    s1 = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s1.bind(path)
    fim.write_config(syslog={"enabled": "yes", "address": path})
    d = fim.daemon()
    p = write(fim.root / "before.txt")
    receive(s1, os.fsencode(str(p)))
    s1.close()
    os.unlink(path)                      # rsyslog / journald restarts
    gap = write(fim.root / "during.txt")
    d.wait_for(is_event("created", gap))
    s2 = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s2.bind(path)
    try:
        deadline = time.monotonic() + 20
        got = None
        i = 0
        while time.monotonic() < deadline and got is None:
            q = write(fim.root / ("after-%d.txt" % i))
            i += 1
            try:
                got = receive(s2, os.fsencode(str(q)), timeout=1.0)
            except AssertionError:
                continue
        assert got, "no syslog message after the socket came back\n" + d.stderr()
    finally:
        s2.close()
    d.stop()
