"""Mounts are changes: a tmpfs or bind mount over a watched directory, a
file bind-mounted over a watched file, and their unmounts. Needs root (mount
in the host's namespace, under the test's temp tree; undone at teardown)."""

import hashlib
import os
import subprocess

import pytest

from conftest import is_event, needs_root, write

pytestmark = needs_root


@pytest.fixture
def mounts():
    done = []

    def mount(*args):
        target = args[-1]
        subprocess.run(["mount"] + [str(a) for a in args], check=True)
        done.append(str(target))

    def umount(target):
        subprocess.run(["umount", str(target)], check=True)
        done.remove(str(target))

    mount.umount = umount
    yield mount
    for target in reversed(done):
        subprocess.run(["umount", "-l", target])


def test_tmpfs_over_a_watched_directory_is_critical_and_compared(fim, mounts):
    cron = fim.root / "cron.d"
    cron.mkdir()
    job = write(cron / "backup", "0 3 * * * root /usr/local/bin/backup\n")
    d = fim.daemon()
    m = d.mark()
    mounts("-t", "tmpfs", "none", cron)
    e = d.wait_for(is_event("mount", cron), since=m)
    assert e["severity"] == "critical" and e["action"] == "mounted", e
    assert e["fstype"] == "tmpfs", e
    # the baseline's file is no longer what the system sees there
    d.wait_for(is_event("deleted", job), since=m)
    # and the new tree is watched: a file written into the mount is seen
    evil = write(cron / "evil", "* * * * * root sh -c x\n")
    d.wait_for(is_event("created", evil), since=m)
    m = d.mark()
    mounts.umount(cron)
    e = d.wait_for(is_event("mount", cron, action="unmounted"), since=m)
    assert e["severity"] == "critical", e
    d.wait_for(is_event("created", job), since=m)      # visible again
    d.stop()


def test_file_bind_mounted_over_a_watched_file(fim, mounts):
    passwd = write(fim.root / "passwd", "root:x:0:0::/root:/bin/sh\n")
    fake = write(fim.outside / "passwd", "root:x:0:0::/root:/bin/sh\nevil:x:0:0::/:/bin/sh\n")
    d = fim.daemon()
    m = d.mark()
    mounts("--bind", fake, passwd)
    e = d.wait_for(is_event("mount", passwd), since=m)
    assert e["severity"] == "critical", e
    e = d.wait_for(is_event("modified", passwd), since=m)
    assert e["sha256"] == hashlib.sha256(fake.read_bytes()).hexdigest(), e
    d.stop()


def test_mount_elsewhere_is_no_event(fim, mounts):
    d = fim.daemon()
    m = d.mark()
    other = fim.outside / "mnt"
    other.mkdir()
    mounts("-t", "tmpfs", "none", other)
    # positive control: a mount under the tree, made after it, is reported
    sub = fim.root / "sub"
    sub.mkdir()
    mounts("-t", "tmpfs", "none", sub)
    d.wait_for(is_event("mount", sub), since=m)
    assert not d.matching(is_event("mount", other), since=m)
    assert os.path.ismount(other)
    d.stop()
