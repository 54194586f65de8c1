"""The package check: a change whose new content matches the package
database is an upgrade (severity info), not an intrusion.

These are in-process unit tests of fimwatch.PackageDB and Engine.emit_change
against a dpkg database laid out in a temp dir (the real /var/lib/dpkg is
never touched). The dpkg lock is a real fcntl lock held by a real second
process, as dpkg holds it.
"""

import hashlib
import os
import subprocess
import sys
import time

import pytest

import fimwatch


def md5(data):
    return hashlib.md5(data).hexdigest()


@pytest.fixture
def dpkg(tmp_path):
    """A dpkg database whose packages 'own' files under tmp_path/root."""
    info = tmp_path / "info"
    info.mkdir()
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    tool = root / "bin" / "tool"
    tool.write_bytes(b"#!/bin/sh\necho packaged\n")
    conf = root / "etc" / "tool.conf"
    conf.write_bytes(b"setting = 1\n")
    rel = str(tool).lstrip("/")
    (info / "tool.md5sums").write_text("%s  %s\n" % (md5(tool.read_bytes()), rel))
    (info / "other:amd64.md5sums").write_text("%s  %s\n" % ("0" * 32, "usr/share/x"))
    status = tmp_path / "status"
    status.write_text("Package: tool\nStatus: install ok installed\nConffiles:\n"
                      " %s %s\n %s/old.conf %s obsolete\n\nPackage: next\n"
                      % (conf, md5(conf.read_bytes()), root / "etc", "1" * 32))
    lock = tmp_path / "lock"
    lock.write_bytes(b"")
    db = fimwatch.PackageDB(info_dir=str(info), lock=str(lock), status=str(status))
    return db, tool, conf, lock


def test_md5sums_file_verified_and_not(dpkg):
    db, tool, _, _ = dpkg
    assert db.check(str(tool)) == {"name": "tool", "manager": "dpkg", "verified": True}
    tool.write_bytes(b"#!/bin/sh\necho trojan\n")
    assert db.check(str(tool)) == {"name": "tool", "manager": "dpkg", "verified": False}


def test_conffile_from_status(dpkg):
    db, _, conf, _ = dpkg
    assert db.check(str(conf))["verified"] is True
    conf.write_bytes(b"setting = 2\n")
    assert db.check(str(conf))["verified"] is False
    assert db.check(str(conf.parent / "old.conf")) is None     # obsolete conffile


def test_unowned_file_is_none(dpkg, tmp_path):
    db = dpkg[0]
    stray = tmp_path / "root" / "bin" / "stray"
    stray.write_bytes(b"x")
    assert db.check(str(stray)) is None


def test_index_reloads_when_dpkg_changes(dpkg, tmp_path):
    db, tool, _, _ = dpkg
    newf = tmp_path / "root" / "bin" / "new"
    newf.write_bytes(b"new\n")
    assert db.check(str(newf)) is None
    time.sleep(0.01)
    (tmp_path / "info" / "new.md5sums").write_text(
        "%s  %s\n" % (md5(b"new\n"), str(newf).lstrip("/")))
    os.utime(tmp_path / "info", ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert db.check(str(newf))["name"] == "new"


def test_a_fifo_is_never_opened_for_md5(dpkg, tmp_path):
    db, tool, _, _ = dpkg
    os.unlink(tool)
    os.mkfifo(tool)
    t0 = time.monotonic()
    assert db.check(str(tool))["verified"] is False
    assert time.monotonic() - t0 < 2


def test_busy_sees_a_lock_held_by_another_process(dpkg):
    db, _, _, lock = dpkg
    assert db.busy() is False
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys, time\n"
         "f = open(sys.argv[1], 'r+')\n"
         "fcntl.lockf(f, fcntl.LOCK_EX)\n"
         "print('locked', flush=True)\n"
         "time.sleep(30)\n", str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert db.busy() is True
    finally:
        holder.kill()
        holder.wait()
    assert db.busy() is False          # and testing never took the lock itself


class _Cfg:
    hostname = "h"

    def severity_for(self, path):
        return "critical"


def _engine(db):
    eng = fimwatch.Engine.__new__(fimwatch.Engine)
    eng.cfg = _Cfg()
    eng.pkgdb = db
    eng.stats = {"changes": 0, "events": 0}
    eng._users, eng._users_at = [], -10.0
    eng.backend = None                   # no watcher: no `process` to add
    got = []
    eng._emit = got.append
    return eng, got


def test_verified_upgrade_is_info_and_tampering_stays_critical(dpkg, tmp_path, monkeypatch):
    db, tool, _, _ = dpkg
    monkeypatch.setattr(fimwatch, "PACKAGE_PREFIXES", (str(tmp_path) + "/",))
    eng, got = _engine(db)
    old = fimwatch.snapshot(str(tool), 1 << 20)
    eng.emit_change("modified", str(tool), "realtime", old, old, ["content"])
    assert got[-1]["severity"] == "info"
    assert got[-1]["package"] == {"name": "tool", "manager": "dpkg", "verified": True}
    tool.write_bytes(b"#!/bin/sh\necho trojan\n")
    new = fimwatch.snapshot(str(tool), 1 << 20)
    eng.emit_change("modified", str(tool), "realtime", old, new, ["content"])
    assert got[-1]["severity"] == "critical"
    assert got[-1]["package"]["verified"] is False
    # a verified file whose mode changed is still an alert: the package says
    # nothing about a setuid bit added after the fact
    eng.emit_change("attributes", str(tool), "realtime", old, new, ["content", "mode"])
    assert got[-1]["severity"] == "critical"


def test_paths_outside_package_prefixes_never_load_the_index(dpkg, tmp_path):
    db, tool, _, _ = dpkg
    eng, got = _engine(db)          # default prefixes: /usr/ /etc/ ...; tmp_path is not one
    rec = fimwatch.snapshot(str(tool), 1 << 20)
    eng.emit_change("modified", str(tool), "realtime", rec, rec, ["content"])
    assert "package" not in got[-1]
    assert db.index is None


def test_file_swapped_after_hashing_is_not_verified(dpkg, tmp_path, monkeypatch):
    """The verdict comes from the bytes whose sha256 is in the event: evil
    content hashed, the packaged bytes put back before the md5 check, the
    evil content back again - never `info`, never verified."""
    db, tool, _, _ = dpkg
    monkeypatch.setattr(fimwatch, "PACKAGE_PREFIXES", (str(tmp_path) + "/",))
    eng, got = _engine(db)
    good = tool.read_bytes()
    old = fimwatch.snapshot(str(tool), 1 << 20)
    tool.write_bytes(b"#!/bin/sh\necho trojan\n")
    evil = fimwatch.snapshot(str(tool), 1 << 20)
    tool.write_bytes(good)                        # the swap between the two reads
    eng.emit_change("modified", str(tool), "realtime", old, evil, ["content"])
    assert got[-1]["sha256"] == evil.sha256
    assert got[-1]["package"]["verified"] is False
    assert got[-1]["severity"] == "critical"
