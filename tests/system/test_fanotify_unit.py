"""System tests: the fanotify backend under the installed systemd unit.

A booted Debian (tests/system/test_install.py's Container and Box: the same
cached rootfs, the same piped install from 127.0.0.1) with one difference:
systemd-nspawn's own seccomp allow-list refuses fanotify_init,
fanotify_mark and open_by_handle_at to every process in the container -- PID 1 and every service
it starts inherit it, whatever the unit says (seen: a unit with no sandbox
at all gets EPERM there, while a shell entered with nsenter, outside that
filter, gets fanotify). A host has no such filter, so this container is
given those three calls back (`--system-call-filter=`): what is tested is
then fimwatch.service and its fanotify drop-in as on a host, not nspawn.

* the installer puts the drop-in in place ([watch] backend = auto), the unit
  gets CAP_SYS_ADMIN and nothing else more, `status` says fanotify, and a
  write by a named shell is an event whose `process` names that shell;
* `backend = inotify` + the installer again: the drop-in is removed and the
  daemon runs under the unit's tighter set alone (no CAP_SYS_ADMIN).
"""

import re
import time

import pytest

from alerts_helpers import free_port
from test_install import (EXPOSURE_FANOTIFY_MAX, EXPOSURE_MAX, _ct_apt_install, _main_pid,
                          _require, booted_box)

pytestmark = pytest.mark.system

DISTRO = "bookworm"
# What a host allows and nspawn does not (see the docstring).
NSPAWN_HOST_LIKE = ["--system-call-filter=fanotify_init fanotify_mark open_by_handle_at"]
DROPIN = "/etc/systemd/system/fimwatch.service.d/fanotify.conf"
CAP_SYS_ADMIN = 1 << 21
CAP_DAC_READ_SEARCH = 1 << 2


@pytest.fixture(scope="module")
def fbox(tmp_path_factory):
    with booted_box(DISTRO, tmp_path_factory, nspawn_args=NSPAWN_HOST_LIKE) as b:
        # Before the install: in the baseline, so the test's writes are
        # "modified" events of a file fimwatch knows.
        b.ct.sh("mkdir -p /etc/watched && echo one > /etc/watched/f")
        yield b


def _caps(ct, pid, which="CapBnd"):
    status = ct.read("/proc/%d/status" % pid)
    return int(re.search(r"^%s:\s*([0-9a-f]+)" % which, status, re.M).group(1), 16)


def _exposure(ct):
    r = ct.sh("systemd-analyze security --no-pager fimwatch.service", check=False)
    m = re.search(r"Overall exposure level for fimwatch\.service: ([0-9.]+)", r.stdout)
    assert m, r.stdout + r.stderr
    return float(m.group(1))


def _started(ct, since=0):
    return [e for e in ct.events()[since:] if e.get("event") == "started"]


@pytest.mark.timeout(600)
def test_ct_fanotify_under_the_installed_unit(fbox):
    ct = fbox.ct
    r = fbox.pipe_install()
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "backend    fanotify: events name the process" in out, out
    assert ct.exists(DROPIN), out
    ct.wait_for("the started event", lambda: _started(ct), 60)
    pid = _main_pid(fbox)
    # The drop-in adds CAP_SYS_ADMIN and no other capability.
    assert _caps(ct, pid) == CAP_DAC_READ_SEARCH | CAP_SYS_ADMIN, hex(_caps(ct, pid))
    assert _caps(ct, pid, "CapEff") == CAP_DAC_READ_SEARCH | CAP_SYS_ADMIN
    st = ct.sh("fimwatch status", check=False)
    assert st.returncode == 0, st.stdout + st.stderr
    assert "backend:    /etc: fanotify (filesystem mark" in st.stdout, st.stdout
    fbox.notes["fanotify"] = True

    # The exposure, online, by the distro's own systemd: with the drop-in
    # (as installed), and without it (the unit alone).
    with_dropin = _exposure(ct)
    ct.sh("mv %s /root/fanotify.conf.aside && systemctl daemon-reload" % DROPIN)
    try:
        without = _exposure(ct)
    finally:
        ct.sh("mv /root/fanotify.conf.aside %s && systemctl daemon-reload" % DROPIN)
    print("exposure (%s, online): unit alone %s, with the fanotify drop-in %s"
          % (DISTRO, without, with_dropin))
    assert without <= EXPOSURE_MAX, without
    assert without < with_dropin <= EXPOSURE_FANOTIFY_MAX, (without, with_dropin)


@pytest.mark.timeout(180)
def test_ct_named_shell_is_the_events_process(fbox):
    """A write by `sh -c '...'` under the unit: the event's process is that
    shell (its pid, cmdline, user; live), and the daemon is still the same."""
    _require(fbox, "fanotify")
    ct = fbox.ct
    pid = _main_pid(fbox)
    n = len(ct.events())
    script = "echo $$; echo two >> /etc/watched/f; sleep 1"
    r = ct.sh("sh -c '%s' fimwatch-writer" % script)
    shell_pid = int(r.stdout.split()[0])

    def modified():
        return [e for e in ct.events()[n:]
                if e.get("event") == "modified" and e.get("path") == "/etc/watched/f"]
    e = ct.wait_for("the modified event of /etc/watched/f", modified, 30)[0]
    proc = e.get("process")
    assert proc, e
    assert proc["pid"] == shell_pid, proc
    assert proc["comm"] == "sh", proc
    # /proc/PID/exe is not the daemon's to read under the unit (no
    # CAP_SYS_PTRACE): the exe comes from the exec cache (FAN_OPEN_EXEC).
    assert proc["exe"] == ct.sh("readlink -f /bin/sh").stdout.strip(), proc
    assert "echo two >> /etc/watched/f" in proc["cmdline"], proc
    assert proc["uid"] == 0 and proc["user"] == "root", proc
    assert proc["confidence"] == "live", proc
    assert proc["chain"][-1] == "sh", proc
    print("process under the unit: %r" % proc)
    assert _main_pid(fbox) == pid
    # The text channels lead with it too (the journal line names the writer).
    r = ct.sh("journalctl -t fimwatch --no-pager -o cat -n 50", check=False)
    assert any("/etc/watched/f" in ln and "sh" in ln for ln in r.stdout.splitlines()), r.stdout


@pytest.mark.timeout(240)
def test_ct_ssh_then_sudo_names_the_login_user(fbox):
    """alice logs in with ssh (the distro's sshd, key auth, on a free port
    of 127.0.0.1: the container shares the host's network) and runs
    `sudo sh -c '... >> f; sleep 2'`: the event's process is that shell, as
    root, and names alice as the login user (pam_loginuid: no auditd) with
    her session, and the chain shows sshd ... sudo ... sh. (A writer that
    exits at once is named by the exec cache, without the login user.)"""
    _require(fbox, "fanotify")
    ct = fbox.ct
    _ct_apt_install(fbox, "openssh-server sudo")
    # the rootfs masks ssh's units: apt started no sshd on the host's port 22
    assert ct.sh("pgrep -x sshd", check=False).returncode == 1, ct.sh("ps -ef").stdout
    port = free_port()
    ct.sh("id alice >/dev/null 2>&1 || useradd -m -s /bin/sh alice; "
          "echo 'alice ALL=(ALL) NOPASSWD: ALL' > /etc/sudoers.d/alice; "
          "chmod 440 /etc/sudoers.d/alice; rm -f /root/.ssh/id_ed25519*; mkdir -p /root/.ssh; "
          "ssh-keygen -q -t ed25519 -N '' -f /root/.ssh/id_ed25519; "
          "install -d -o alice -m 700 /home/alice/.ssh; "
          "install -o alice -m 600 /root/.ssh/id_ed25519.pub /home/alice/.ssh/authorized_keys; "
          "ssh-keygen -A >/dev/null; mkdir -p /run/sshd")
    ct.sh("systemd-run --unit=fim-sshd /usr/sbin/sshd -D -p %d -o ListenAddress=127.0.0.1" % port)
    try:
        ct.wait_for("sshd listening", lambda: ct.sh(
            "ssh -o BatchMode=yes -o StrictHostKeyChecking=no -p %d alice@127.0.0.1 true"
            % port, check=False).returncode == 0, 30)
        n = len(ct.events())
        ct.sh("ssh -o BatchMode=yes -o StrictHostKeyChecking=no -p %d alice@127.0.0.1 "
              "'sudo sh -c \"echo via-ssh >> /etc/watched/f; sleep 2\"'" % port)

        def modified():
            return [e for e in ct.events()[n:]
                    if e.get("event") == "modified" and e.get("path") == "/etc/watched/f"]
        e = ct.wait_for("the modified event of /etc/watched/f", modified, 30)[0]
    finally:
        ct.sh("systemctl stop fim-sshd; rm -f /etc/sudoers.d/alice", check=False)
    proc = e.get("process") or {}
    print("ssh -> sudo writer: %r" % proc)
    assert proc.get("comm") == "sh" and proc.get("user") == "root", proc
    assert proc.get("login_user") == "alice" and proc.get("session") is not None, proc
    chain = proc.get("chain") or []
    assert "sshd" in chain and "sudo" in chain and chain[-1] == "sh", proc
    assert chain.index("sshd") < chain.index("sudo"), proc


@pytest.mark.timeout(180)
def test_ct_short_lived_writers_are_named(fbox):
    """cp, sed -i and a dropper that writes and exits at once, each run from
    the container's shell: every event names the right exe (the exec cache),
    although each process is gone when the daemon reads its record."""
    _require(fbox, "fanotify")
    ct = fbox.ct
    n = len(ct.events())
    ct.sh("cp /etc/hostname /etc/watched/g; sed -i s/o/0/ /etc/watched/f; "
          "printf '#!/bin/sh\necho evil > /etc/watched/h\n' > /root/dropper; "
          "chmod 755 /root/dropper; /root/dropper")
    want = {"/etc/watched/g": "/usr/bin/cp", "/etc/watched/f": "/usr/bin/sed",
            "/etc/watched/h": ct.sh("readlink -f /bin/sh").stdout.strip()}

    def events():
        got = {e["path"]: e for e in ct.events()[n:] if e.get("path") in want
               and e.get("event") in ("created", "modified")}
        return got if len(got) == len(want) else None
    got = ct.wait_for("events of %s" % " ".join(want), events, 30)
    named = {p: (got[p].get("process") or {}).get("exe") for p in want}
    print("short-lived writers under the unit: %r" % {
        p: got[p].get("process") for p in want})
    assert named == want, (named, [got[p].get("process") for p in want])
    assert got["/etc/watched/h"]["process"].get("script") == "/root/dropper", got
    assert all(got[p]["process"]["confidence"] in ("live", "cached") for p in want)


@pytest.mark.timeout(600)
def test_ct_backend_inotify_runs_under_the_tighter_unit(fbox):
    """`backend = inotify` and the installer again: the drop-in goes, the
    daemon is restarted without CAP_SYS_ADMIN and still reports changes
    (without a process). Then auto again: the drop-in is back."""
    _require(fbox, "fanotify")
    ct = fbox.ct
    ct.sh("sed -i 's/^backend = auto$/backend = inotify/' /etc/fimwatch/fimwatch.conf")
    assert "backend = inotify" in ct.read("/etc/fimwatch/fimwatch.conf")
    n = len(ct.events())
    r = fbox.pipe_install()
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "removing %s" % DROPIN in out, out
    assert not ct.exists(DROPIN)
    ct.wait_for("the restart's started event", lambda: _started(ct, n), 60)
    pid = _main_pid(fbox)
    assert _caps(ct, pid) == CAP_DAC_READ_SEARCH, hex(_caps(ct, pid))
    st = ct.sh("fimwatch status", check=False)
    assert "backend:    /etc: inotify (configured)" in st.stdout, st.stdout
    m = len(ct.events())
    ct.sh("echo three >> /etc/watched/f")

    def modified():
        return [e for e in ct.events()[m:]
                if e.get("event") == "modified" and e.get("path") == "/etc/watched/f"]
    e = ct.wait_for("the modified event under inotify", modified, 30)[0]
    assert "process" not in e, e
    # The installer's removal of its own drop-in is not reported as a change.
    assert not [e for e in ct.events()[n:] if e.get("path", "").startswith(DROPIN)], \
        ct.events()[n:]

    ct.sh("sed -i 's/^backend = inotify$/backend = auto/' /etc/fimwatch/fimwatch.conf")
    n = len(ct.events())
    r = fbox.pipe_install()
    assert r.returncode == 0, r.stdout + r.stderr
    assert ct.exists(DROPIN)
    ct.wait_for("the restart's started event", lambda: _started(ct, n), 60)
    deadline = time.monotonic() + 30
    while True:
        st = ct.sh("fimwatch status", check=False)
        if "backend:    /etc: fanotify (" in st.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert "backend:    /etc: fanotify (" in st.stdout, st.stdout
