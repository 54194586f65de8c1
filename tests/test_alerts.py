"""Alerts that reach a human (issue 3): webhooks, email, digests, pause.

Everything real: the daemon is `fimwatch.py run` (tests/conftest.py), webhooks
go to an http.server on 127.0.0.1 in this process, email goes through Debian's
msmtp (the `[email] sendmail` program, `-oi -t`) into an aiosmtpd SMTP server
on 127.0.0.1 (tests/alerts_helpers.py). Channels use `retry_min = 1s` so that
"down -> up" tests do not wait for the 15 s default backoff.

Timing facts used below (fimwatch.py Channel): a channel waits GATHER = 1 s
after the newest event, sends up to BURST = 3 events singly and more as one
`digest`.
"""

import hashlib
import hmac
import os
import re
import statistics
import sys
import time
import uuid

import pytest

from alerts_helpers import (SMTPReceiver, WebhookServer, body_is, channel, failing_sendmail,
                            free_port, msmtp_sendmail, poll, status_json)
from conftest import is_event, write, write_apart

GATHER = 1.0
FORMATS = ("json", "slack", "mattermost", "discord", "teams", "gotify", "ntfy")
MAIL_TO = "admin@example.test"


@pytest.fixture
def hook():
    srv = WebhookServer().start()
    yield srv
    srv.stop()


@pytest.fixture
def smtp():
    srv = SMTPReceiver()
    yield srv
    srv.stop()


def esc_like_fimwatch(path):
    """The event's form of a path holding these control characters (SPEC: escaped)."""
    return (path.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")
            .replace("\u2028", "\\u2028"))


def webhook_section(url, **kw):
    sect = {"enabled": "yes", "url": url, "format": "json", "min_severity": "warning",
            "timeout": "5s", "retry_min": "1s"}
    sect.update(kw)
    return sect


def email_section(sendmail, **kw):
    sect = {"enabled": "yes", "to": MAIL_TO, "sendmail": str(sendmail),
            "min_severity": "warning", "retry_min": "1s"}
    sect.update(kw)
    return sect


def file_events(d, since=None):
    return [e for e in d.events(since) if e.get("event") in
            ("created", "modified", "attributes", "deleted", "moved")]


def only_files(reqs):
    """json-format requests for file events (drops started/stopped/digest/test)."""
    return [r for r in reqs if r.json().get("event") in
            ("created", "modified", "attributes", "deleted", "moved")]


# ---------------------------------------------------------------------------
# webhooks: formats, signature, event id
# ---------------------------------------------------------------------------

def test_webhook_payload_per_format_and_hmac(fim, hook):
    secret = "s3cr3t-for-hmac"
    over = {"webhook " + f: webhook_section(hook.url("/" + f), format=f) for f in FORMATS}
    over["webhook json"]["secret"] = secret
    fim.write_config(**over)
    target = write(fim.root / "app.conf", "v1\n")
    d = fim.daemon()
    write(target, "v2 changed\n")
    ev = d.wait_for(is_event("modified", target), timeout=10)
    for f in FORMATS:
        hook.wait(path="/" + f, timeout=15)
    time.sleep(GATHER + 0.5)            # anything else queued would have arrived by now
    for f in FORMATS:
        got = hook.received("/" + f)
        assert len(got) == 1, (f, got)
        r = got[0]
        assert r.headers["X-Fimwatch-Event"] == ev["id"], f
        if f == "json":
            assert r.headers["Content-Type"].startswith("application/json")
            body = r.json()
            assert body == {k: v for k, v in ev.items() if not k.startswith("chain_")}, \
                "json body must be the events_file event (less its chain fields)"
            sig = r.headers["X-Fimwatch-Signature"]
            want = hmac.new(secret.encode(), r.body, hashlib.sha256).hexdigest()
            assert sig == "sha256=" + want
        else:
            assert "X-Fimwatch-Signature" not in r.headers, f    # no secret set there
        if f in ("slack", "mattermost", "teams"):
            text = r.json()["text"]
        elif f == "discord":
            text = r.json()["content"]
            assert len(text) <= 2000
        elif f == "gotify":
            b = r.json()
            assert set(b) >= {"title", "message", "priority"}
            assert b["title"] == "[fimwatch] WARNING modified %s on testhost" % target
            assert isinstance(b["priority"], int)
            text = b["message"]
        elif f == "ntfy":
            assert r.headers["Content-Type"].startswith("text/plain")
            assert r.headers["Title"] == "[fimwatch] WARNING modified %s on testhost" % target
            assert r.headers["Priority"] in ("1", "2", "3", "4", "5")
            text = r.body.decode("utf-8")
        if f != "json":
            assert str(target) in text and "modified" in text, (f, text)
            assert "fimwatch accept %s" % target in text, (f, text)


def test_hmac_signature_rejects_tampering(fim, hook):
    """The signature is over the exact body: a receiver recomputing it over a
    re-serialised body, or with another key, must not match."""
    fim.write_config(webhook=webhook_section(hook.url(), secret="k1"))
    d = fim.daemon()
    p = write(fim.root / "x.txt", "x\n")
    d.wait_for(is_event("created", p))
    r = hook.wait(body_is("created", path=str(p)))[0]
    sig = r.headers["X-Fimwatch-Signature"]
    assert sig.startswith("sha256=") and len(sig) == 7 + 64
    assert hmac.compare_digest(sig[7:], hmac.new(b"k1", r.body, hashlib.sha256).hexdigest())
    assert sig[7:] != hmac.new(b"k2", r.body, hashlib.sha256).hexdigest()
    assert sig[7:] != hmac.new(b"k1", r.body + b" ", hashlib.sha256).hexdigest()


def test_webhook_url_userinfo_is_basic_auth(fim, hook):
    """https://user:token@host/... is how ntfy & co. take credentials: they must
    go out as HTTP Basic auth, not break the request."""
    import base64
    fim.write_config(webhook=webhook_section("http://fimuser:pw0rd@127.0.0.1:%d/h" % hook.port))
    proc = fim.cli("test-alert")
    assert "pw0rd" not in proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = hook.wait(path="/h")[0]
    assert r.headers["Authorization"] == "Basic " + base64.b64encode(b"fimuser:pw0rd").decode()


# ---------------------------------------------------------------------------
# webhooks: delivery guarantees
# ---------------------------------------------------------------------------

def wait_attempted(fim, cid, timeout=15.0):
    """Wait until `status --json` shows a failed delivery attempt on channel cid."""
    def failed():
        c = channel(fim, cid)
        return c if c.get("max_attempts", 0) >= 1 and c.get("last_error") else None
    return poll(failed, timeout=timeout, interval=0.3, what="a failed attempt on " + cid)


def test_server_down_then_up_delivers_later_with_same_id(fim):
    srv = WebhookServer(port=free_port())          # not started: connection refused
    fim.write_config(webhook=webhook_section(srv.url()))
    d = fim.daemon()
    p = write(fim.root / "late.txt", "x\n")
    ev = d.wait_for(is_event("created", p))
    c = wait_attempted(fim, "webhook:default")
    assert c["spooled"] >= 1 and c["last_ok"] is None, c
    assert "refused" in c["last_error"].lower(), c
    assert "delivery failed" in d.stderr()
    try:
        srv.start()
        r = srv.wait(body_is("created", path=str(p)), timeout=20)[0]
        assert r.json()["id"] == ev["id"] == r.headers["X-Fimwatch-Event"]
        assert r.json() == {k: v for k, v in ev.items() if not k.startswith("chain_")}
        c = poll(lambda: (lambda c: c if c["spooled"] == 0 else None)(
            channel(fim, "webhook:default")), timeout=10, what="spool drained")
        assert c["last_ok"], c
        assert len(srv.received()) == 1, srv.received()
    finally:
        srv.stop()


@pytest.mark.parametrize("how", ["sigterm", "kill9"])
def test_spooled_alert_survives_restart(fim, how):
    """server down -> daemon stopped (SIGTERM, or kill -9) -> restarted ->
    server up: the alert comes out of the spool with its original id."""
    srv = WebhookServer(port=free_port())
    fim.write_config(webhook=webhook_section(srv.url()))
    d = fim.daemon()
    p = write(fim.root / "spooled.txt", "x\n")
    ev = d.wait_for(is_event("created", p))
    if how == "sigterm":
        wait_attempted(fim, "webhook:default")
        d.stop()
    else:
        # committed to the spool (what status reads) is all kill -9 may rely on
        poll(lambda: channel(fim, "webhook:default").get("spooled", 0) >= 1, timeout=10,
             interval=0.1, what="spooled alert")
        d.kill()
    assert channel(fim, "webhook:default")["spooled"] >= 1
    try:
        srv.start()
        d2 = fim.daemon()
        r = srv.wait(body_is("created", path=str(p)), timeout=20)[0]
        assert r.json()["id"] == ev["id"] == r.headers["X-Fimwatch-Event"]
        poll(lambda: channel(fim, "webhook:default")["spooled"] == 0, timeout=10,
             what="spool drained")
        # not re-detected at start-up as a new event, not sent twice
        assert not d2.matching(is_event(None, p)), d2.events()
        assert len([r for r in srv.received() if r.json().get("path") == str(p)]) == 1
        if how == "kill9":
            assert d2.started.get("unclean") is True
    finally:
        srv.stop()


def test_slow_server_does_not_stall_detection(fim, hook):
    hook.delay = 5.0
    fim.write_config(webhook=webhook_section(hook.url(), timeout="2s"))
    d = fim.daemon()
    p = write(fim.root / "first.txt", "x\n")
    d.wait_for(is_event("created", p))
    hook.wait(timeout=10)                  # the worker is now stuck in a 5 s request
    lat = []
    for i in range(3):
        q = fim.root / ("meanwhile-%d.txt" % i)
        t0 = time.monotonic()
        write(q, "y\n")
        d.wait_for(is_event("created", q), timeout=2.0)
        lat.append(time.monotonic() - t0)
        time.sleep(0.3)
    assert max(lat) < 2.0, lat
    c = wait_attempted(fim, "webhook:default")
    assert "timed out" in c["last_error"], c


def test_secrets_never_shown(fim, hook):
    """URL path/query tokens, userinfo passwords and the HMAC secret never
    appear in check-config, test-alert, status (text and JSON) or the
    daemon's stderr, whatever the failure."""
    tokens = ["PathTok3n1", "QueryTok3n2", "UserInfoPw3", "UserInfoPw4", "HmacS3cret5"]
    hook.status = 500
    dead = free_port()
    fim.write_config(**{
        "webhook path": webhook_section(hook.url("/hooks/PathTok3n1?token=QueryTok3n2"),
                                        secret="HmacS3cret5"),
        "webhook refused": webhook_section("http://127.0.0.1:%d/services/PathTok3n1r" % dead),
        "webhook userinfo": webhook_section("http://fim:UserInfoPw3@127.0.0.1:%d/PathTok3n1u"
                                            % hook.port),
        "webhook noport": webhook_section("http://fim:UserInfoPw4@127.0.0.1/PathTok3n1n"),
    })
    outputs = {}
    proc = fim.cli("check-config")
    assert proc.returncode == 0, proc.stderr
    outputs["check-config"] = proc.stdout + proc.stderr
    proc = fim.cli("test-alert")
    assert proc.returncode == 1
    outputs["test-alert"] = proc.stdout + proc.stderr
    d = fim.daemon()
    p = write(fim.root / "s.txt", "x\n")
    d.wait_for(is_event("created", p))
    for name in ("path", "refused", "userinfo", "noport"):
        wait_attempted(fim, "webhook:" + name)
    outputs["status --json"] = fim.cli("status", "--json").stdout
    outputs["status"] = fim.cli("status").stdout
    d.stop()
    outputs["daemon stderr"] = d.stderr()
    assert "delivery failed" in outputs["daemon stderr"]     # errors were logged...
    leaks = ["%s shows %s" % (where, tok) for where, text in outputs.items()
             for tok in tokens if tok in text]
    assert not leaks, "%s\n\n%s" % (leaks, "\n".join(
        "--- %s ---\n%s" % kv for kv in outputs.items()))


def test_digest_retry_keeps_id_and_stays_one_digest(fim, hook):
    """SPEC: the id is reused on every retry. A burst that fails twice is
    still delivered as one digest, and every attempt carries the same id."""
    hook.fail_first = 2
    fim.write_config(webhook=webhook_section(hook.url()))
    d = fim.daemon()
    paths = [write(fim.root / ("b%d.txt" % i), "x\n") for i in range(6)]
    for p in paths:
        d.wait_for(is_event("created", p))
    ids = {e["id"] for e in file_events(d)}

    def delivered():
        got = set()
        for r in hook.received():
            if r.code == 200:
                b = r.json()
                got |= {e["id"] for e in b["events"]} if b["event"] == "digest" else {b["id"]}
        return ids <= got
    poll(delivered, timeout=30, interval=0.2, what="all 6 events delivered")
    time.sleep(GATHER + 0.5)
    ok = [r for r in hook.received() if r.code == 200]
    attempts = hook.received()
    assert len(ok) == 1 and ok[0].json()["event"] == "digest", ok
    assert ok[0].json()["count"] == 6
    assert len({r.headers["X-Fimwatch-Event"] for r in attempts}) == 1, \
        "digest id changed between retries: %s" % [r.headers["X-Fimwatch-Event"]
                                                  for r in attempts]


def test_alert_latency(fim, hook, capsys):
    """Measured: file change -> webhook receipt (settle = 100ms). Expected
    ~settle + GATHER (1 s). Printed with -s."""
    fim.write_config(webhook=webhook_section(hook.url()))
    d = fim.daemon()
    lat = []
    for i in range(10):
        p = fim.root / ("lat-%d.txt" % i)
        t0 = time.time()
        write(p, "x\n")
        r = hook.wait(body_is("created", path=str(p)), timeout=10)[0]
        lat.append(r.t - t0)
    med = statistics.median(lat)
    with capsys.disabled():
        sys.stdout.write("\nalert latency change->webhook (s): median %.3f min %.3f max %.3f\n"
                         % (med, min(lat), max(lat)))
    assert med < 2.5, lat
    assert len(file_events(d)) == 10


# ---------------------------------------------------------------------------
# email through msmtp into a real SMTP server
# ---------------------------------------------------------------------------

def mail_for(ev):
    return lambda m: m.msg["X-Fimwatch-Event"] == ev["id"]


HEADERS_ALLOWED = {"subject", "from", "to", "date", "message-id", "auto-submitted",
                   "x-fimwatch-event", "x-fimwatch-severity", "content-type",
                   "content-transfer-encoding", "mime-version"}


def test_email_message_through_msmtp(fim, smtp):
    import email.utils
    import re
    sm = msmtp_sendmail(fim.base / "mta", smtp.port)
    fim.write_config(email=email_section(sm),
                     fimwatch={"diff_paths": "%s/**" % fim.root})
    target = write(fim.root / "app.conf", "listen 80\nworkers 4\n")
    d = fim.daemon()
    write(target, "listen 8080\nworkers 4\n")
    ev = d.wait_for(is_event("modified", target))
    m = smtp.wait(mail_for(ev), timeout=15)[0]
    msg = m.msg
    assert m.rcpt_tos == [MAIL_TO]
    assert msg["Subject"] == "[fimwatch] WARNING modified %s on testhost" % target
    assert msg["From"] == "fimwatch@testhost"
    assert msg["To"] == MAIL_TO
    sent = email.utils.parsedate_to_datetime(msg["Date"]).timestamp()
    assert abs(sent - time.time()) < 120
    mid = msg["Message-ID"].strip()          # may be folded onto its own line (legal FWS)
    assert re.match(r"^<[^<>@\s]+@[^<>@\s]+>$", mid), mid
    assert ev["id"][:12] in mid
    assert msg["Auto-Submitted"] == "auto-generated"
    assert not msg.defects
    assert {k.lower() for k in msg.keys()} <= HEADERS_ALLOWED, msg.keys()
    body = m.body()
    assert "before" in body and "after" in body
    assert ev["previous"]["sha256"] in body and ev["sha256"] in body
    assert "-listen 80" in body and "+listen 8080" in body          # the diff
    assert "fimwatch accept %s" % target in body
    # one change, one mail; a clean stop is a warning (issue 13): a second mail
    d.stop()
    subjects = [m.msg["Subject"] for m in smtp.wait(count=2, timeout=15)]
    assert len(subjects) == 2 and subjects[1] == "[fimwatch] WARNING stopped on testhost", \
        subjects


@pytest.mark.parametrize("broken", ["exit75", "missing"])
def test_failing_sendmail_is_reported_and_retried(fim, smtp, broken):
    mta = fim.base / "mta"
    mta.mkdir()
    prog = mta / "sendmail"
    if broken == "exit75":
        failing_sendmail(prog, 75)
        reason = "exited 75"
    else:
        reason = "not found"
    fim.write_config(email=email_section(prog))
    proc = fim.cli("test-alert")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("email")]
    assert line and "FAILED" in line[0] and reason in line[0], proc.stdout
    # the daemon keeps the alert and retries it until sendmail works
    d = fim.daemon()
    p = write(fim.root / "retry-me.txt", "x\n")
    ev = d.wait_for(is_event("created", p))
    c = wait_attempted(fim, "email")
    assert c["spooled"] >= 1 and reason in c["last_error"], c
    assert not smtp.received()
    msmtp_sendmail(mta, smtp.port)             # the MTA is fixed (atomic replace)
    smtp.wait(mail_for(ev), timeout=20)
    poll(lambda: channel(fim, "email")["spooled"] == 0, timeout=10, what="spool drained")
    assert len(smtp.received()) == 1


# ---------------------------------------------------------------------------
# injection: hostile file names
# ---------------------------------------------------------------------------

def test_hostile_names_cannot_inject_headers_or_commands(fim, smtp, hook):
    tag = uuid.uuid4().hex[:8]
    pwned = ["/tmp/fimwatch-pwned-%s-%d" % (tag, i) for i in range(3)]
    # '/' cannot be in a name, so the commands span directories made before start
    shells = [("$(touch ", "%s)" % os.path.basename(pwned[0])),
              ("`touch ", "%s`" % os.path.basename(pwned[1])),
              ("x;touch ", "%s;" % os.path.basename(pwned[2]))]
    for top, _ in shells:
        (fim.root / top / "tmp").mkdir(parents=True)
    sm = msmtp_sendmail(fim.base / "mta", smtp.port)
    fim.write_config(email=email_section(sm),
                     **{"webhook json": webhook_section(hook.url("/json")),
                        "webhook slack": webhook_section(hook.url("/slack"), format="slack")})
    d = fim.daemon()
    names = ["evil\r\nBcc: x@evil.test\r\nX-Injected: yes",
             "Bcc: y@evil.test",
             "subj\nContent-Type: multipart; boundary=x\n\n--x",
             "\u00e9t\u00e9 \u2028 long " + "L" * 180]
    files = [fim.root / n for n in names] + [fim.root / top / "tmp" / leaf
                                              for top, leaf in shells]
    evs = []
    for group in (files[:3], files[3:6], files[6:]):   # <= 3 at a time: single alerts
        for f in group:
            write_apart(f, "x\n")             # one writer each: one change each
        for f in group:
            evs.append(d.wait_for(is_event("created", esc_like_fimwatch(str(f))), timeout=10))
        smtp.wait(lambda m: True, count=len(evs), timeout=15)
    mails = smtp.wait(lambda m: True, count=len(files), timeout=15)
    by_id = {m.msg["X-Fimwatch-Event"]: m for m in mails}
    for ev in evs:
        m = by_id[ev["id"]]
        assert m.rcpt_tos == [MAIL_TO], m.rcpt_tos
        keys = {k.lower() for k in m.msg.keys()}
        assert keys <= HEADERS_ALLOWED, (ev["path"], m.msg.keys())
        head = m.raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
        head.decode("ascii")               # non-ASCII names are RFC 2047-encoded
        for line in head.split(b"\n"):
            bad = (b"bcc:", b"x-injected:", b"content-type: multipart")
            assert not line.lower().startswith(bad), (ev["path"], line)
        subj = m.msg["Subject"]
        assert "\n" not in subj and "\r" not in subj, repr(subj)
        assert subj.startswith("[fimwatch] WARNING created ") and subj.endswith(" on testhost") \
            or subj.endswith("..."), subj
        assert len(subj) <= 200, len(subj)
        assert m.msg.get_content_type() == "text/plain"
        assert not m.msg.defects, m.msg.defects
    for p in pwned:
        assert not os.path.exists(p), "a command in a file name ran: %s exists" % p
    # webhooks: valid JSON carrying the (escaped) path
    got_json = {r.json()["id"]: r.json() for r in hook.wait(count=len(files), path="/json")}
    for ev in evs:
        assert got_json[ev["id"]]["path"] == ev["path"]
    for r in hook.wait(count=len(files), path="/slack"):
        assert isinstance(r.json()["text"], str)


def test_subject_shows_the_event_path(fim, smtp):
    """The subject names the path as the event does (escaped once, not twice)."""
    sm = msmtp_sendmail(fim.base / "mta", smtp.port)
    fim.write_config(email=email_section(sm))
    d = fim.daemon()
    f = write(fim.root / "new\nline", "x\n")
    ev = d.wait_for(is_event("created"))
    assert ev["path"] == str(f).replace("\n", "\\n")
    m = smtp.wait(mail_for(ev))[0]
    assert m.msg["Subject"] == "[fimwatch] WARNING created %s on testhost" % ev["path"]


# ---------------------------------------------------------------------------
# bursts and rate limits
# ---------------------------------------------------------------------------

def is_digest_mail(m):
    """A digest's subject: '[fimwatch] WARNING 500 changes on testhost', or
    with what a deploy's changes say together, '... 500 changes under DIR: ...'."""
    return re.match(r"\[fimwatch\] [A-Z]+ \d+ changes (on testhost|under /)",
                    m.msg["Subject"]) is not None


@pytest.mark.timeout(120)
def test_burst_of_500_is_one_digest_per_channel(fim, hook, smtp, capsys):
    sm = msmtp_sendmail(fim.base / "mta", smtp.port)
    deploy = fim.root / "deploy"
    deploy.mkdir()
    fim.write_config(email=email_section(sm), webhook=webhook_section(hook.url()))
    d = fim.daemon()
    t0 = time.time()
    paths = [write(deploy / ("f%03d.php" % i), "<?php %d;\n" % i) for i in range(500)]
    t_written = time.time() - t0
    # every event still reaches events_file
    d.wait_for(is_event("created"), count=500, timeout=30)
    created = {e["path"] for e in file_events(d) if e["event"] == "created"}
    assert created == {str(p) for p in paths}

    def digested():
        got = [r.json() for r in hook.received() if r.json()["event"] == "digest"]
        return got if sum(b["count"] for b in got) >= 500 else None
    poll(digested, timeout=30, interval=0.2, what="digests covering 500 events")
    t_digest = max(r.t for r in hook.received()) - t0
    poll(lambda: sum(int(m.msg["Subject"].split()[2]) for m in smtp.received()
                     if is_digest_mail(m)) >= 500, timeout=30, what="digest mails")
    # positive control: a later lone change comes through alone, so anything
    # queued from the burst would have been sent before it
    ctrl = write(fim.root / "control.txt", "c\n")
    ctrl_ev = d.wait_for(is_event("created", ctrl))
    hook.wait(body_is("created", path=str(ctrl)), timeout=15)
    smtp.wait(mail_for(ctrl_ev), timeout=15)
    reqs = [r.json() for r in hook.received()]
    reqs = [b for b in reqs if b.get("id") != ctrl_ev["id"]]
    assert all(b["event"] == "digest" for b in reqs), [b["event"] for b in reqs]
    assert 1 <= len(reqs) <= 2 and sum(b["count"] for b in reqs) == 500, \
        [b["count"] for b in reqs]
    big = max(reqs, key=lambda b: b["count"])
    assert big["by_severity"] == {"warning": big["count"]}
    assert big["by_directory"][str(deploy)] == big["count"]
    assert len(big["events"]) == min(50, big["count"])
    assert {e["path"] for e in big["events"]} <= created
    mails = [m for m in smtp.received() if m.msg["X-Fimwatch-Event"] != ctrl_ev["id"]]
    assert all(is_digest_mail(m) for m in mails), mails
    assert 1 <= len(mails) <= 2, mails
    assert sum(int(m.msg["Subject"].split()[2]) for m in mails) == 500
    body = max(mails, key=lambda m: len(m.raw)).body()
    assert str(deploy) in body and "fimwatch accept" in body
    with capsys.disabled():
        sys.stdout.write("\nburst: 500 files written in %.2fs; webhook digests %s (counts %s), "
                         "last digest %.2fs after the first write; mails %d\n"
                         % (t_written, len(reqs), [b["count"] for b in reqs], t_digest,
                            len(mails)))


@pytest.mark.timeout(120)
def test_max_per_hour_sends_the_rest_later_as_one_digest(fim, hook, smtp):
    """max_per_hour = 2: 5 separate changes -> 2 single alerts, the other 3
    held in the spool (status shows them), sent as one digest later (here: on
    a clean stop, which flushes alerts)."""
    sm = msmtp_sendmail(fim.base / "mta", smtp.port)
    fim.write_config(email=email_section(sm, max_per_hour="2"),
                     **{"webhook limited": webhook_section(hook.url("/limited"),
                                                           max_per_hour="2"),
                        "webhook all": webhook_section(hook.url("/all"), max_per_hour="100")})
    d = fim.daemon()
    evs = []
    for i in range(5):
        p = write(fim.root / ("change-%d.txt" % i), "x\n")
        evs.append(d.wait_for(is_event("created", p)))
        # positive control: the unlimited channel delivers each one, singly
        hook.wait(body_is("created", path=str(p)), path="/all", timeout=15)
    ids = [e["id"] for e in evs]
    poll(lambda: channel(fim, "webhook:limited").get("spooled") == 3
         and channel(fim, "email").get("spooled") == 3, timeout=10, interval=0.3,
         what="3 alerts held on each limited channel")
    time.sleep(GATHER + 0.5)
    assert [b["id"] for b in hook.bodies("/limited")] == ids[:2]
    assert [m.msg["X-Fimwatch-Event"] for m in smtp.received()] == ids[:2]
    assert [b["id"] for b in hook.bodies("/all")] == ids
    d.stop()
    later = hook.bodies("/limited")[2:]
    assert len(later) == 1 and later[0]["event"] == "digest", later
    # the 3 held alerts, and the clean stop (a warning since issue 13)
    assert later[0]["count"] == 4
    assert [e["id"] for e in later[0]["events"]][:3] == ids[2:]
    assert later[0]["events"][3]["event"] == "stopped"
    mails = smtp.received()[2:]
    assert len(mails) == 1 and is_digest_mail(mails[0]), mails
    assert channel(fim, "webhook:limited")["spooled"] == 0


# ---------------------------------------------------------------------------
# test-alert
# ---------------------------------------------------------------------------

def test_test_alert_all_ok(fim, hook, smtp):
    sm = msmtp_sendmail(fim.base / "mta", smtp.port)
    fim.write_config(email=email_section(sm), webhook=webhook_section(hook.url("/j")),
                     **{"webhook chat": webhook_section(hook.url("/s"), format="slack")})
    proc = fim.cli("test-alert")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for cid in ("email", "webhook:default", "webhook:chat"):
        line = [ln for ln in proc.stdout.splitlines() if ln.split()[:1] == [cid]]
        assert line and " OK" in line[0] and "FAILED" not in line[0], (cid, proc.stdout)
    b = hook.wait(path="/j")[0].json()
    assert b["event"] == "test" and b["host"] == "testhost"
    assert "test" in hook.wait(path="/s")[0].json()["text"].lower()
    m = smtp.wait()[0]
    assert m.msg["Subject"] == "[fimwatch] INFO test on testhost"
    assert m.rcpt_tos == [MAIL_TO]


def test_test_alert_one_channel_failing(fim, hook, smtp):
    sm = msmtp_sendmail(fim.base / "mta", smtp.port)
    fim.write_config(email=email_section(sm), webhook=webhook_section(hook.url("/j")),
                     **{"webhook dead": webhook_section("http://127.0.0.1:%d/x" % free_port())})
    proc = fim.cli("test-alert")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout.splitlines()
    dead = [ln for ln in out if ln.split()[:1] == ["webhook:dead"]]
    assert dead and "FAILED" in dead[0] and "refused" in dead[0].lower(), proc.stdout
    for cid in ("email", "webhook:default"):
        assert any(ln.split()[:1] == [cid] and " OK" in ln for ln in out), proc.stdout
    hook.wait(path="/j")
    smtp.wait()


# ---------------------------------------------------------------------------
# pause / resume
# ---------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_pause_holds_alerts_across_restart_and_resume_sends_one_digest(fim, hook):
    fim.write_config(webhook=webhook_section(hook.url()))
    d = fim.daemon()
    c0 = write(fim.root / "before.txt", "x\n")
    hook.wait(body_is("created", path=str(c0)))       # the channel works
    proc = fim.cli("pause", "--for", "10m", "--reason", "deploy 42")
    assert proc.returncode == 0, proc.stderr
    st = status_json(fim)
    assert st["paused_until"] and st["pause_reason"] == "deploy 42", st
    paths = []
    for i in range(2):
        p = write(fim.root / ("maint-%d.txt" % i), "x\n")
        d.wait_for(is_event("created", p))           # detected and recorded meanwhile
        paths.append(p)
        time.sleep(0.3)
    poll(lambda: channel(fim, "webhook:default")["spooled"] == 2, timeout=10,
         what="2 held alerts")
    time.sleep(GATHER + 1.0)
    assert len(hook.received()) == 1, hook.received()
    # the pause survives a restart
    d.stop()
    d = fim.daemon()
    assert status_json(fim)["paused_until"]
    p = write(fim.root / "maint-2.txt", "x\n")
    d.wait_for(is_event("created", p))
    paths.append(p)
    poll(lambda: channel(fim, "webhook:default")["spooled"] == 4, timeout=10,
         what="3 held alerts and the stop (a warning)")
    time.sleep(GATHER + 1.0)
    assert len(hook.received()) == 1, hook.received()
    ids = {e["id"] for e in fim.events() if e.get("path") in {str(x) for x in paths}}
    assert len(ids) == 3
    proc = fim.cli("resume")
    assert proc.returncode == 0, proc.stderr
    dig = hook.wait(body_is("digest"), timeout=15)[0].json()
    ctrl = write(fim.root / "after.txt", "x\n")
    hook.wait(body_is("created", path=str(ctrl)), timeout=15)
    bodies = [r.json() for r in hook.received()]
    assert [b["event"] for b in bodies] == ["created", "digest", "created"], bodies
    assert dig["count"] == 4 and {e["id"] for e in dig["events"]
                                  if e["event"] != "stopped"} == ids
    assert "maintenance" in dig.get("reason", "")
    assert status_json(fim)["paused_until"] is None


def test_pause_window_end_sends_the_digest(fim, hook):
    fim.write_config(webhook=webhook_section(hook.url()))
    d = fim.daemon()
    assert fim.cli("pause", "--for", "4s").returncode == 0
    t_end = time.time() + 4
    for i in range(2):
        p = write(fim.root / ("w-%d.txt" % i), "x\n")
        d.wait_for(is_event("created", p))
    dig = hook.wait(timeout=20)[0]
    assert dig.t >= t_end - 0.5, "sent %.1fs before the window ended" % (t_end - dig.t)
    assert dig.json()["event"] == "digest" and dig.json()["count"] == 2
    ctrl = write(fim.root / "after.txt", "x\n")
    hook.wait(body_is("created", path=str(ctrl)), timeout=15)
    assert len(hook.received()) == 2


# ---------------------------------------------------------------------------
# more channel behaviour: severity filter, flush on stop, 7-day expiry, CLI
# ---------------------------------------------------------------------------

def test_min_severity_per_channel_and_status(fim, hook):
    for sub in ("critical", "info"):
        (fim.root / sub).mkdir()
    fim.write_config(**{"webhook crit": webhook_section(hook.url("/crit"),
                                                        min_severity="critical"),
                        "webhook warn": webhook_section(hook.url("/warn")),
                        "webhook all": webhook_section(hook.url("/all"), min_severity="info")})
    d = fim.daemon()
    hook.wait(body_is("started"), path="/all")        # a notice: only "all" takes it
    files = {"info": write_apart(fim.root / "info" / "i.txt"),   # one change each
             "warning": write_apart(fim.root / "w.txt"),
             "critical": write_apart(fim.root / "critical" / "c.txt")}
    for sev, f in files.items():
        d.wait_for(is_event("created", f, severity=sev))
    hook.wait(count=4, path="/all")                    # positive control: all three sent
    hook.wait(count=1, path="/crit")
    hook.wait(count=2, path="/warn")
    time.sleep(GATHER + 0.5)
    assert sorted(b["severity"] for b in hook.bodies("/all")[1:]) == \
        ["critical", "info", "warning"]
    assert [b["severity"] for b in hook.bodies("/crit")] == ["critical"]
    assert sorted(b["severity"] for b in hook.bodies("/warn")) == ["critical", "warning"]
    chans = status_json(fim)["channels"]
    for cid in ("webhook:crit", "webhook:warn", "webhook:all"):
        assert chans[cid]["spooled"] == 0 and chans[cid]["last_ok"], chans
        assert chans[cid]["last_error"] is None, chans


def test_sigterm_flushes_alerts_still_gathering(fim, hook):
    """SPEC: SIGTERM stops cleanly, flushing alerts: a change seen just
    before the stop (inside the 1 s gather window) is delivered before exit."""
    fim.write_config(webhook=webhook_section(hook.url()))
    d = fim.daemon()
    p = write(fim.root / "last-words.txt", "x\n")
    d.wait_for(is_event("created", p))
    d.stop()
    assert [b["path"] for b in hook.bodies() if b["event"] == "created"] == [str(p)]
    assert channel(fim, "webhook:default")["spooled"] == 0


def test_alerts_older_than_7_days_are_dropped_counted_and_reported(fim):
    import sqlite3
    srv = WebhookServer(port=free_port())
    fim.write_config(webhook=webhook_section(srv.url()))
    d = fim.daemon()
    old = write(fim.root / "old.txt", "x\n")
    d.wait_for(is_event("created", old))
    wait_attempted(fim, "webhook:default")
    d.stop()
    # age the spooled alert by 8 days (the daemon is stopped; SQLite file in state_dir)
    db = sqlite3.connect(str(fim.state_dir / "baseline.db"))
    with db:
        n = db.execute("UPDATE spool SET created = created - 8 * 86400").rowcount
    db.close()
    assert n >= 1
    try:
        srv.start()
        d = fim.daemon()
        new = write(fim.root / "new.txt", "x\n")
        d.wait_for(is_event("created", new))
        b = srv.wait(body_is("created", path=str(new)), timeout=15)[0].json()
        assert b.get("dropped") == n, b
        assert not [r for r in srv.bodies() if r.get("path") == str(old)]
        assert channel(fim, "webhook:default")["dropped"] == n
        assert "DROPPED" in fim.cli("status").stdout
        # reported once: the next alert does not repeat it
        again = write(fim.root / "again.txt", "x\n")
        b2 = srv.wait(body_is("created", path=str(again)), timeout=15)[0].json()
        assert "dropped" not in b2
    finally:
        srv.stop()


def test_email_several_recipients(fim, smtp):
    sm = msmtp_sendmail(fim.base / "mta", smtp.port)
    fim.write_config(email=email_section(sm, to="admin@example.test ops@example.test"))
    proc = fim.cli("test-alert")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = smtp.wait()[0]
    assert sorted(m.rcpt_tos) == ["admin@example.test", "ops@example.test"]
    assert m.msg["To"] == "admin@example.test, ops@example.test"


def test_non_ascii_hostname_does_not_break_email(fim, smtp):
    sm = msmtp_sendmail(fim.base / "mta", smtp.port)
    fim.write_config(email=email_section(sm), fimwatch={"hostname": "h\u00f4te"})
    proc = fim.cli("test-alert")
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = smtp.wait()[0]
    assert m.msg["Subject"] == "[fimwatch] INFO test on h\u00f4te"
    head = m.raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
    head.decode("ascii")                   # RFC 2047-encoded, 7-bit headers


@pytest.mark.parametrize("argv", [["pause", "--for", "0"], ["pause", "--for", "8d"],
                                  ["pause", "--for", "soon"], ["pause"]])
def test_pause_rejects_bad_durations(fim, argv):
    proc = fim.cli(*argv)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_max_per_hour_survives_reload(fim, hook):
    """The hourly cap is a promise to the inbox: a SIGHUP (config reload)
    must not hand out a fresh allowance."""
    fim.write_config(**{"webhook limited": webhook_section(hook.url("/limited"),
                                                           max_per_hour="2"),
                        "webhook all": webhook_section(hook.url("/all"), max_per_hour="100")})
    d = fim.daemon()
    paths = []
    for i in range(3):
        if i == 2:
            mark = d.mark()
            d.hup()
            d.wait_for(is_event("started", reload=True), since=mark)
        p = write(fim.root / ("c-%d.txt" % i), "x\n")
        d.wait_for(is_event("created", p))
        hook.wait(body_is("created", path=str(p)), path="/all", timeout=15)   # control
        paths.append(p)
    time.sleep(GATHER + 0.5)
    assert [b["path"] for b in hook.bodies("/limited")] == [str(p) for p in paths[:2]]
    assert channel(fim, "webhook:limited")["spooled"] == 1


def test_stop_is_not_held_up_by_a_hung_receiver(fim, hook):
    hook.delay = 30.0                       # longer than the 10 s default timeout
    fim.write_config(webhook=webhook_section(hook.url(), timeout="10s"))
    d = fim.daemon()
    p = write(fim.root / "x.txt", "x\n")
    ev = d.wait_for(is_event("created", p))
    hook.wait(timeout=10)                   # the worker is inside the request now
    t0 = time.monotonic()
    d.stop(timeout=20)
    took = time.monotonic() - t0
    assert took < 8.0, "stop took %.1fs" % took
    assert "Traceback" not in d.stderr(), d.stderr()
    # not lost: it is delivered (again, same id) after the restart
    hook.delay = 0
    fim.daemon()
    hook.wait(lambda r: r.code == 200 and r.headers["X-Fimwatch-Event"] == ev["id"],
              timeout=20)
