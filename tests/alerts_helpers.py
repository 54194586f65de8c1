"""Real receivers for the alert tests (tests/test_alerts.py).

* :class:`WebhookServer`: an ``http.server`` on 127.0.0.1 (random port, or a
  fixed one to come back "up" on the same URL) in a thread. It records every
  request (path, headers, exact body, receipt time) and can be told to answer
  slowly or with an error status, or be stopped (connection refused) and
  started again.
* :class:`SMTPReceiver`: aiosmtpd on 127.0.0.1:PORT; records envelope and the
  raw message; ``.parsed()`` gives ``email`` package messages.
* :func:`msmtp_sendmail`: Debian's msmtp as the ``[email] sendmail`` program.
  fimwatch runs ``PROG -oi -t``; msmtp needs ``-C CONF`` to find our SMTP
  receiver, so PROG is a two-line wrapper that execs
  ``/usr/bin/msmtp -C CONF "$@"`` (a real sendmail-compatible MTA client).
* :func:`failing_sendmail`: a sendmail that exits 75 (EX_TEMPFAIL).
* :func:`status_json`, :func:`channel`: ``fimwatch status --json`` helpers.
* ``poll`` is conftest's ``wait_until`` (re-exported for test_alerts).
"""

import email
import email.policy
import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from conftest import wait_until as poll   # one polling loop for the whole suite

MSMTP = "/usr/bin/msmtp"


def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---------------------------------------------------------------------------
# webhook receiver
# ---------------------------------------------------------------------------

class Request:
    def __init__(self, method, path, headers, body, t):
        self.method, self.path, self.headers, self.body, self.t = method, path, headers, body, t
        self.code = None            # the HTTP status we answered

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def __repr__(self):
        return "<%s %s %s %r>" % (self.method, self.path, dict(self.headers),
                                  self.body[:300])


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False


class WebhookServer:
    """A real HTTP receiver. ``status``: HTTP code to answer; ``delay``: seconds
    to sleep before answering; ``fail_first``: answer 503 to that many requests
    first."""

    def __init__(self, port=None):
        self.port = port
        self.requests = []
        self.lock = threading.Lock()
        self.status = 200
        self.delay = 0.0
        self.fail_first = 0
        self.httpd = None
        self.thread = None

    # -- life cycle --
    def start(self):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                t = time.time()
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n)
                req = Request(self.command, self.path, self.headers, body, t)
                with outer.lock:
                    outer.requests.append(req)
                    code = outer.status
                    if outer.fail_first > 0:
                        outer.fail_first -= 1
                        code = 503
                    req.code = code
                    delay = outer.delay
                if delay:
                    time.sleep(delay)
                try:
                    self.send_response(code)
                    self.send_header("Content-Length", "2")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:
                    pass

            do_PUT = do_POST

        self.httpd = _Server(("127.0.0.1", self.port or 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        """Close the listening socket: connections are refused until start()."""
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None

    def url(self, path="/hook"):
        return "http://127.0.0.1:%d%s" % (self.port, path)

    # -- what arrived --
    def received(self, path=None):
        with self.lock:
            return [r for r in self.requests if path is None or r.path == path]

    def bodies(self, path=None):
        return [r.json() for r in self.received(path)]

    def wait(self, pred=lambda r: True, count=1, timeout=15.0, path=None):
        """Wait until `count` requests match pred; returns the matching ones."""
        def ready():
            got = [r for r in self.received(path) if pred(r)]
            return got if len(got) >= count else None
        try:
            return poll(ready, timeout=timeout, what="webhook requests")
        except AssertionError:
            raise AssertionError("timed out after %.0fs waiting for %d webhook request(s); "
                                 "got: %r" % (timeout, count, self.received()))


def body_is(event=None, **fields):
    """Predicate over a json-format webhook Request."""
    def pred(r):
        try:
            b = r.json()
        except ValueError:
            return False
        if event is not None and b.get("event") != event:
            return False
        return all(b.get(k) == v for k, v in fields.items())
    return pred


# ---------------------------------------------------------------------------
# SMTP receiver (aiosmtpd) and sendmail programs
# ---------------------------------------------------------------------------

class Mail:
    def __init__(self, mail_from, rcpt_tos, raw, t):
        self.mail_from, self.rcpt_tos, self.raw, self.t = mail_from, rcpt_tos, raw, t
        self.msg = email.message_from_bytes(raw, policy=email.policy.default)

    def body(self):
        return self.msg.get_body(("plain",)).get_content()

    def __repr__(self):
        return "<Mail to %s subject %r>" % (self.rcpt_tos, self.msg.get("Subject"))


class SMTPReceiver:
    def __init__(self):
        from aiosmtpd.controller import Controller
        self.mails = []
        self.lock = threading.Lock()
        outer = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):
                raw = envelope.original_content or envelope.content
                if isinstance(raw, str):
                    raw = raw.encode("utf-8", "surrogateescape")
                with outer.lock:
                    outer.mails.append(Mail(envelope.mail_from, list(envelope.rcpt_tos), raw,
                                            time.time()))
                return "250 OK"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def stop(self):
        self.controller.stop()

    def received(self):
        with self.lock:
            return list(self.mails)

    def wait(self, pred=lambda m: True, count=1, timeout=15.0):
        def ready():
            got = [m for m in self.received() if pred(m)]
            return got if len(got) >= count else None
        try:
            return poll(ready, timeout=timeout, what="mail")
        except AssertionError:
            raise AssertionError("timed out after %.0fs waiting for %d mail(s); got: %r"
                                 % (timeout, count, self.received()))


def _script(path, text):
    path = Path(path)
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)          # atomic: a running daemon sees old or new, never half
    return path


def msmtp_sendmail(dirpath, smtp_port, name="sendmail", envelope_from="fimwatch@testhost"):
    """Write msmtprc + a wrapper at dirpath/name that execs msmtp with it."""
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    conf = dirpath / "msmtprc"
    conf.write_text("defaults\nsyslog off\n\naccount default\nhost 127.0.0.1\nport %d\n"
                    "from %s\nauth off\ntls off\n" % (smtp_port, envelope_from))
    os.chmod(conf, 0o600)
    return _script(dirpath / name, '#!/bin/sh\nexec %s -C "%s" "$@"\n' % (MSMTP, conf))


def failing_sendmail(path, code=75, message="queue full, try later"):
    """A sendmail that reads the message and fails with `code` (75 = EX_TEMPFAIL)."""
    return _script(path, "#!/bin/sh\ncat >/dev/null\necho 'sendmail: %s' >&2\nexit %d\n"
                   % (message, code))


# ---------------------------------------------------------------------------
# status --json
# ---------------------------------------------------------------------------

def status_json(fim):
    proc = fim.cli("status", "--json")
    assert proc.returncode in (0, 1), "status failed: %s %s" % (proc.stdout, proc.stderr)
    try:
        return json.loads(proc.stdout)
    except ValueError as e:
        raise AssertionError("status --json printed no JSON (%s), exit %s:\n%s\n--- stderr ---\n%s"
                             % (e, proc.returncode, proc.stdout, proc.stderr))


def channel(fim, cid):
    return status_json(fim)["channels"].get(cid) or {}
