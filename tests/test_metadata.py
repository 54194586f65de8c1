"""Security metadata in the baseline (xattrs, file capabilities, POSIX ACLs,
inode flags, device numbers, link count), files over hash_max_size, and the
upgrade of a baseline recorded before these fields existed.

Everything runs against the real daemon on a real temp tree (ext4 or
whatever the tmp dir is on); a test whose filesystem cannot hold what it
needs (user xattrs, ACLs, inode flags) is skipped with the reason.
"""

import errno
import json
import os
import shutil
import sqlite3
import stat
import struct
import subprocess

import pytest

from conftest import about, control_file, event_after, is_event, needs_root, write

FILE_EVENTS = {"created", "modified", "attributes", "deleted", "moved"}
META_COLUMNS = ("xattrs", "capability", "acl", "flags", "rdev", "links")


def changed(path, change, event="attributes"):
    """Predicate: an event on path whose changes hold `change`."""
    path = str(path)
    return lambda e: (e.get("event") == event and e.get("path") == path
                      and change in e.get("changes", []))


def needs_xattr(path, name="user.fimwatch-probe"):
    try:
        os.setxattr(path, name, b"1")
        os.removexattr(path, name)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            pytest.skip("%s: no %s xattrs on this filesystem" % (path, name.split(".")[0]))
        raise


def cap_value(*caps, effective=True):
    """A struct vfs_cap_data (revision 2), what `setcap CAPS+ep` writes."""
    perm = 0
    for c in caps:
        perm |= 1 << c
    return struct.pack("<5I", 0x02000000 | (1 if effective else 0),
                       perm & 0xFFFFFFFF, 0, perm >> 32, 0)


def acl_value(entries):
    """system.posix_acl_access: version 2, then (tag, perm, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, i) for t, p, i in entries)


UNDEF = 0xFFFFFFFF
# u::rw- g::r-- o::r-- : exactly what mode 0644 says
ACL_0644 = [(1, 6, UNDEF), (4, 4, UNDEF), (0x20, 4, UNDEF)]
# the same plus user 4242 read and a mask r--: mode bits stay 0644
ACL_0644_PLUS_USER = [(1, 6, UNDEF), (2, 4, 4242), (4, 4, UNDEF), (0x10, 4, UNDEF),
                      (0x20, 4, UNDEF)]


# --- xattrs and capabilities --------------------------------------------------

@needs_root
def test_file_capability_set_on_a_copied_binary_is_reported(fim):
    p = fim.root / "crit" / "mytrue"
    p.parent.mkdir()
    shutil.copy("/bin/true", p)
    d = fim.daemon()
    m = d.mark()
    os.setxattr(p, "security.capability", cap_value(7))       # setcap cap_setuid+ep
    e = d.wait_for(changed(p, "xattr"), since=m)
    assert e["changes"] == ["xattr"], e
    assert e["capability"] == "cap_setuid=ep", e
    assert e["previous"]["capability"] == "", e
    assert e["severity"] == "warning", e
    # and the setcap binary itself, where installed
    if shutil.which("setcap"):
        m = d.mark()
        subprocess.run(["setcap", "cap_net_raw+ep", str(p)], check=True)
        e = d.wait_for(changed(p, "xattr"), since=m)
        assert e["capability"] == "cap_net_raw=ep", e
        assert e["previous"]["capability"] == "cap_setuid=ep", e
    d.stop()


def test_directory_xattr_set_while_down_is_found_at_startup(fim):
    """The start-up check passes over a directory whose lstat matches its
    row (type, mode, owner, inode) and compares its metadata once it has
    opened it to walk it (Engine._dir_check): an xattr set on it while the
    daemon was down is still reported, and what is in it still compared."""
    sub = fim.root / "conf.d"
    sub.mkdir()
    needs_xattr(sub)
    inner = write(sub / "a.conf", "a\n")
    same = fim.root / "same.d"
    same.mkdir()
    fim.baseline()
    os.setxattr(sub, "user.note", b"set while down")
    write(inner, "b\n")
    d = fim.daemon()
    e = d.wait_for(changed(sub, "xattr"), since=d.start_index, timeout=20)
    assert e["detected"] == "startup" and e["changes"] == ["xattr"], e
    assert list(e["xattrs"]) == ["user.note"] and e["previous"]["xattrs"] == {}, e
    e = d.wait_for(is_event("modified", inner), since=d.start_index, timeout=20)
    assert e["detected"] == "startup", e
    d.wait_for(is_event("verified"), since=d.start_index, timeout=20)
    assert not d.matching(about(same), since=d.start_index)
    d.stop()


def test_user_xattr_set_changed_and_removed(fim):
    p = write(fim.root / "data.txt", "data\n")
    needs_xattr(p)
    d = fim.daemon()
    m = d.mark()
    os.setxattr(p, "user.note", b"one")
    e = d.wait_for(changed(p, "xattr"), since=m)
    assert e["changes"] == ["xattr"], e
    assert list(e["xattrs"]) == ["user.note"], e
    assert e["previous"]["xattrs"] == {}, e
    first = e["xattrs"]["user.note"]

    m = d.mark()
    os.setxattr(p, "user.note", b"two")
    e = d.wait_for(changed(p, "xattr"), since=m)
    assert e["previous"]["xattrs"] == {"user.note": first}, e
    assert e["xattrs"]["user.note"] != first, e

    m = d.mark()
    os.removexattr(p, "user.note")
    e = d.wait_for(changed(p, "xattr"), since=m)
    assert e["xattrs"] == {}, e
    assert "user.note" in e["previous"]["xattrs"], e
    # the same value written again is not a change
    m = d.mark()
    os.setxattr(p, "user.same", b"v")
    d.wait_for(changed(p, "xattr"), since=m)
    m = d.mark()
    os.setxattr(p, "user.same", b"v")
    d.assert_quiet(about(p), since=m, control=control_file())
    d.stop()


def test_event_carries_no_metadata_fields_when_there_is_none(fim):
    d = fim.daemon()
    p = write(fim.root / "plain.txt", "plain\n")
    e = d.wait_for(is_event("created", p))
    for k in META_COLUMNS:
        assert k not in e, e
    d.stop()


# --- ACLs ----------------------------------------------------------------------

@needs_root
def test_acl_edit_that_leaves_the_mode_bits_unchanged_is_reported(fim):
    p = write(fim.root / "secret.conf", "s\n", mode=0o644)
    try:
        os.setxattr(p, "system.posix_acl_access", acl_value(ACL_0644))
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            pytest.skip("no POSIX ACLs on this filesystem")
        raise
    d = fim.daemon()
    m = d.mark()
    os.setxattr(p, "system.posix_acl_access", acl_value(ACL_0644_PLUS_USER))  # setfacl -m u:4242:r
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o644
    e = d.wait_for(changed(p, "acl"), since=m)
    assert e["changes"] == ["acl"], e
    assert "u:4242:r--" in e["acl"], e
    assert "u:4242" not in e["previous"].get("acl", ""), e
    assert e["mode"] == "0644" and e["previous"]["mode"] == "0644", e

    # a default ACL on a directory
    sub = fim.root / "sub"
    sub.mkdir(mode=0o755)
    d.wait_for(is_event("created", sub))
    m = d.mark()
    os.setxattr(sub, "system.posix_acl_default", acl_value(ACL_0644_PLUS_USER))
    e = d.wait_for(changed(sub, "acl"), since=m)
    assert "d:u:4242:r--" in e["acl"], e
    d.stop()


# --- inode flags ----------------------------------------------------------------

def chattr(flag, path):
    r = subprocess.run(["chattr", flag, str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        if "Operation not supported" in r.stderr or "Inappropriate ioctl" in r.stderr:
            pytest.skip("no inode flags on this filesystem: %s" % r.stderr.strip())
        raise AssertionError(r.stderr)


@needs_root
@pytest.mark.skipif(not shutil.which("chattr"), reason="chattr (e2fsprogs) not installed")
def test_chattr_immutable_and_append_only_are_reported(fim):
    """chattr makes no inotify event (FS_IOC_SETFLAGS does not call fsnotify),
    so it is seen by the start-up check and by scans (its ctime moved)."""
    p = write(fim.root / "tool", "#!/bin/sh\n")
    log = write(fim.root / "app.log", "line\n")
    chattr("+i", p)
    chattr("-i", p)
    fim.baseline()
    try:
        chattr("+i", p)
        chattr("+a", log)
        r = fim.cli("scan", "--quick", "--no-alert", "--json")
        assert r.returncode == 1, r
        evs = [json.loads(x) for x in r.stdout.splitlines()]
        by = {e["path"]: e for e in evs}
        assert by[str(p)]["changes"] == ["flags"], evs
        assert by[str(p)]["flags"] == "i" and by[str(p)]["previous"]["flags"] == "", evs
        assert by[str(log)]["flags"] == "a", evs
        # the scan recorded it: nothing new at the next start
        d = fim.daemon()
        m = d.start_index
        chattr("-i", p)
        d.assert_quiet(lambda e: e.get("detected") == "startup" and about(p)(e), since=m,
                       control=control_file())
        d.stop()
        # removed while the daemon was down: the start-up check reports it
        d = fim.daemon()
        e = d.wait_for(changed(p, "flags"), since=d.start_index, timeout=20)
        assert e["detected"] == "startup" and e["flags"] == "" and e["previous"]["flags"] == "i"
        d.stop()
    finally:
        subprocess.run(["chattr", "-i", "-a", str(p), str(log)], capture_output=True)


# --- device numbers --------------------------------------------------------------

@needs_root
def test_device_node_swapped_for_another_with_the_same_mode(fim):
    dev = fim.root / "null"
    os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.chmod(dev, 0o666)
    d = fim.daemon()
    m = d.mark()
    tmp = fim.root / ".null.new"
    os.mknod(tmp, stat.S_IFCHR | 0o666, os.makedev(1, 5))     # /dev/zero's numbers
    os.chmod(tmp, 0o666)
    os.rename(tmp, dev)
    e = d.wait_for(changed(dev, "rdev"), since=m)
    assert e["changes"] == ["rdev"], e
    assert e["rdev"] == "1:5" and e["previous"]["rdev"] == "1:3", e
    assert e["kind"] == "other", e
    d.stop()


# --- hard links ---------------------------------------------------------------

def test_new_hard_link_is_reported(fim):
    p = fim.root / "passwd"
    link = fim.root / "copy"
    d, _, e = event_after(fim, p, "root:x:0:0\n", lambda p: os.link(p, link),
                          is_event("created", link))
    assert e["links"] == 2, e
    d.stop()
    # The original's count went up too; inotify says nothing about it (no
    # event reaches the directory watch), the next start-up check does.
    d = fim.daemon()
    e = d.wait_for(changed(p, "links"), since=d.start_index, timeout=20)
    assert e["links"] == 2 and e["previous"]["links"] == 1, e
    assert e["detected"] == "startup" and e["changes"] == ["links"], e
    d.stop()


def test_hard_link_made_outside_the_tree_is_caught_by_a_scan(fim):
    p = write(fim.root / "shadow", "root:*:1:::\n")
    fim.baseline()
    os.link(p, fim.outside / "stash")
    r = fim.cli("scan", "--quick", "--no-alert", "--json")
    assert r.returncode == 1, r
    assert '"links"' in r.stdout and str(p) in r.stdout, r.stdout
    assert '"previous": {' in r.stdout
    r = fim.cli("scan", "--quick", "--no-alert", "--json")
    assert r.returncode == 0, r.stdout          # recorded: not reported twice


# --- files over hash_max_size -------------------------------------------------

def rewrite_same_size_keep_mtime(p, data):
    st = os.stat(p)
    with open(p, "r+b") as f:
        f.write(data)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    st2 = os.stat(p)
    assert (st2.st_size, st2.st_mtime_ns, st2.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)


def test_big_file_rewritten_in_place_with_mtime_restored_is_reported(fim):
    fim.write_config(fimwatch={"hash_max_size": "4K"})
    p = write(fim.root / "big.img", b"A" * 8192)
    d = fim.daemon()
    m = d.mark()
    rewrite_same_size_keep_mtime(p, b"B" * 8192)
    e = d.wait_for(is_event("modified", p), since=m)
    assert e["changes"] == ["content"] and e["hash_skipped"] is True, e
    assert "sha256" not in e, e
    d.stop()

    # while the daemon is down: the start-up check
    rewrite_same_size_keep_mtime(p, b"C" * 8192)
    d = fim.daemon()
    e = d.wait_for(is_event("modified", p), since=d.start_index, timeout=20)
    assert e["detected"] == "startup" and e["changes"] == ["content"], e
    d.stop()

    # scan --quick
    rewrite_same_size_keep_mtime(p, b"D" * 8192)
    r = fim.cli("scan", "--quick", "--no-alert", "--json")
    assert r.returncode == 1 and str(p) in r.stdout and '"content"' in r.stdout, r


def test_big_file_chmod_is_a_mode_change_not_content(fim):
    fim.write_config(fimwatch={"hash_max_size": "4K"})
    p = write(fim.root / "big.img", b"A" * 8192, mode=0o644)
    d = fim.daemon()
    m = d.mark()
    os.chmod(p, 0o600)
    e = d.wait_for(is_event("attributes", p), since=m)
    assert e["changes"] == ["mode"], e
    d.stop()


# --- upgrade of an old baseline ---------------------------------------------------

def downgrade_to_old_schema(state_dir):
    """The files table as fimwatch 2026-11 wrote it: without the new columns."""
    db = sqlite3.connect(str(state_dir / "baseline.db"))
    for c in META_COLUMNS:
        db.execute("ALTER TABLE files DROP COLUMN %s" % c)
    db.commit()
    db.close()


@needs_root
def test_old_baseline_upgrades_silently_with_one_notice(fim):
    # metadata an old baseline never recorded: all of it must stay silent
    tool = fim.root / "tool"
    shutil.copy("/bin/true", tool)
    os.setxattr(tool, "security.capability", cap_value(7))
    p = write(fim.root / "data.txt", "data\n")
    needs_xattr(p)
    os.setxattr(p, "user.note", b"x")
    os.link(p, fim.root / "data-link")
    big = write(fim.root / "big.img", b"A" * 8192)
    fim.write_config(fimwatch={"hash_max_size": "4K"})
    fim.baseline()
    downgrade_to_old_schema(fim.state_dir)

    d = fim.daemon()
    notice = d.wait_for(is_event("baseline_upgraded"), since=d.start_index)
    assert notice["severity"] == "notice", notice
    assert set(notice["fields"]) == set(META_COLUMNS), notice
    d.assert_quiet(lambda e: e.get("event") in FILE_EVENTS
                   and not e.get("path", "").startswith(str(fim.root / "control")),
                   since=d.start_index, control=control_file())
    assert len(d.matching(is_event("baseline_upgraded"), since=d.start_index)) == 1
    # a real change after the upgrade is reported
    m = d.mark()
    os.setxattr(p, "user.note", b"y")
    e = d.wait_for(changed(p, "xattr"), since=m)
    assert "user.note" in e["previous"]["xattrs"], e
    d.stop()

    # the new fields were filled: no second notice, and a change made while
    # down to a field the old baseline lacked is reported at start-up
    os.removexattr(tool, "security.capability")
    d = fim.daemon()
    e = d.wait_for(changed(tool, "xattr"), since=d.start_index, timeout=20)
    assert e["detected"] == "startup" and e["previous"]["capability"] == "cap_setuid=ep", e
    assert not d.matching(is_event("baseline_upgraded"), since=d.start_index)
    d.stop()
    assert big.exists()
