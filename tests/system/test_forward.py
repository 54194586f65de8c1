"""Events that leave the host (issue 13): fimwatch's syslog lines go through
a real rsyslogd, configured with the README's forwarding snippet exactly as
written there (only target, port and CA file replaced), over TLS to a
receiver on 127.0.0.1 whose certificate (made here with openssl) names the
README's server; every id and sequence of the events file arrives once,
none missing, across a restart of the daemon.

rsyslog is not installed on this host (it could take over the host's
syslog): Debian's packages are fetched once with `apt-get download` into
$FIMWATCH_TEST_CACHE/debs-rsyslog (the only step that reaches the host's
apt mirror, like the container tests' debootstrap) and unpacked with
`dpkg -x` into the test's temp dir. That rsyslogd runs in the foreground
with its own config, its own input socket, work directory and pid file.
"""

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest

from conftest import REPO, is_event, needs_root, wait_until, write

pytestmark = pytest.mark.system      # downloads Debian's rsyslog once

CACHE = Path(os.environ.get("FIMWATCH_TEST_CACHE", "/var/cache/fimwatch-tests"))
RSYSLOG_DEBS = ("rsyslog", "rsyslog-gnutls", "libestr0", "libfastjson4", "liblognorm5")
SERVER_NAME = "logs.example.net"          # the README's central server
SNIPPET_MARK = "<!-- tests/system/test_forward.py runs the block below"


def readme_snippet():
    """The rsyslog block of README.md that follows the marker, as written."""
    text = (REPO / "README.md").read_text()
    at = text.index(SNIPPET_MARK)
    m = re.search(r"```[a-z]*\n(.*?)```", text[at:], re.S)
    assert m, "no code block after the test marker in README.md"
    return m.group(1)


def unpacked_rsyslog(tmp_path):
    """(rsyslogd, its module dir, its library dir) unpacked under tmp_path."""
    cache = CACHE / "debs-rsyslog"
    cache.mkdir(parents=True, exist_ok=True)
    have = {p.name.split("_")[0] for p in cache.glob("*.deb")}
    missing = [p for p in RSYSLOG_DEBS if p not in have]
    if missing:
        r = subprocess.run(["apt-get", "download"] + missing, cwd=str(cache),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=300)
        if r.returncode != 0:
            pytest.skip("apt-get download %s failed: %s" % (" ".join(missing), r.stdout[-500:]))
    root = tmp_path / "rsyslog-root"
    for deb in sorted(cache.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    libdir = next(root.glob("usr/lib/*-linux-gnu"))
    return root / "usr/sbin/rsyslogd", libdir / "rsyslog", libdir


def server_cert(tmp_path):
    """A self-signed certificate for SERVER_NAME: (cert file, key file)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=" + SERVER_NAME, "-addext", "subjectAltName=DNS:" + SERVER_NAME,
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    return cert, key


class Receiver:
    """The central server's stand-in: a TLS listener on 127.0.0.1 that keeps
    every line it is sent (rsyslog's omfwd frames TCP with LF)."""

    def __init__(self, cert, key):
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(str(cert), str(key))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.lines = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn):
        buf = b""
        try:
            conn = self.tls.wrap_socket(conn, server_side=True)
        except (OSError, ssl.SSLError):
            conn.close()
            return
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except (OSError, ssl.SSLError):
                    return
                if not data:
                    return
                buf += data
                *done, buf = buf.split(b"\n")
                with self.lock:
                    self.lines += [x.decode("utf-8", "replace") for x in done]

    def received(self):
        with self.lock:
            return list(self.lines)

    def close(self):
        self.sock.close()


@pytest.fixture
def rsyslog(tmp_path):
    """A running rsyslogd with the README's snippet, and its receiver."""
    rsyslogd, moddir, libdir = unpacked_rsyslog(tmp_path)
    cert, key = server_cert(tmp_path)
    recv = Receiver(cert, key)
    work = tmp_path / "rsyslog-work"
    work.mkdir()
    sock = work / "log"
    snippet = readme_snippet()
    ca = 'DefaultNetstreamDriverCAFile="/etc/ssl/certs/ca-certificates.crt"'
    for placeholder in ('target="%s"' % SERVER_NAME, 'port="6514"', ca):
        assert placeholder in snippet, (placeholder, snippet)
    # only where to connect and whom to trust change: the name checked in
    # the certificate (StreamDriverPermittedPeers) stays the README's
    snippet = snippet.replace('target="%s"' % SERVER_NAME, 'target="127.0.0.1"') \
        .replace('port="6514"', 'port="%d"' % recv.port) \
        .replace(ca, 'DefaultNetstreamDriverCAFile="%s"' % cert)
    conf = tmp_path / "rsyslog.conf"
    conf.write_text('global(workDirectory="%s")\n'
                    'module(load="imuxsock" SysSock.Use="off")\n'
                    'input(type="imuxsock" Socket="%s")\n%s' % (work, sock, snippet))
    env = dict(os.environ, LD_LIBRARY_PATH=str(libdir))
    chk = subprocess.run([str(rsyslogd), "-N1", "-f", str(conf), "-M", str(moddir)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30)
    assert chk.returncode == 0, "rsyslogd -N1 rejects the README snippet:\n" + chk.stdout
    log = open(tmp_path / "rsyslogd.out", "wb")
    proc = subprocess.Popen([str(rsyslogd), "-n", "-f", str(conf), "-M", str(moddir),
                             "-i", str(work / "rsyslogd.pid")],
                            env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    try:
        wait_until(sock.exists, timeout=10, what="rsyslogd's input socket")
        yield sock, recv, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        recv.close()
        shutil.rmtree(work, ignore_errors=True)


@needs_root
@pytest.mark.timeout(180)
def test_events_reach_a_central_server_through_rsyslog_over_tls(fim, rsyslog):
    sock, recv, proc = rsyslog
    fim.write_config(syslog={"enabled": "yes", "address": str(sock), "min_severity": "info"})
    d = fim.daemon()
    a = write(fim.root / "a.txt", "one\n")
    d.wait_for(is_event("created", a))
    write(a, "two\n")
    d.wait_for(is_event("modified", a))
    d.stop()
    d = fim.daemon()                       # a restart: the sequence goes on
    os.unlink(a)
    d.wait_for(is_event("deleted", a), since=d.start_index)
    d.stop()
    local = [(e["id"], e["sequence"]) for e in fim.events()]
    assert [s for _, s in local] == list(range(1, len(local) + 1)), local

    def arrived():
        got = []
        for line in recv.received():
            m = re.search(r'\[fimwatch@32473 [^]]*\bid="([0-9a-f]+)" sequence="(\d+)"', line) \
                or re.search(r"\bid=([0-9a-f]{32}) sequence=(\d+)", line)
            if m:
                got.append((m.group(1), int(m.group(2))))
        return got if len(got) >= len(local) else None
    got = wait_until(arrived, timeout=30,
                     what="%d events at the receiver (have: %s)" % (len(local), recv.received()))
    assert sorted(got, key=lambda x: x[1]) == local, (got, local)
    assert proc.poll() is None, (fim.base / "rsyslogd.out").read_text()
    # the lines are fimwatch's own, forwarded as RFC 5424 with its program name
    assert all(" fimwatch " in line for line in recv.received() if "sequence=" in line)
