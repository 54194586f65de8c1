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
from conftest import hold_lock


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
    assert db.check(str(tool)) == {"name": "tool", "manager": "dpkg", "verified": True,
                                   "digest": "md5"}
    tool.write_bytes(b"#!/bin/sh\necho trojan\n")
    assert db.check(str(tool)) == {"name": "tool", "manager": "dpkg", "verified": False,
                                   "digest": "md5"}


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
    eng.tx_closing = []
    eng.tx_roots = {}
    eng.pkgtx = None                     # no package transaction watch
    got = []
    eng._emit = got.append
    return eng, got


def test_outside_a_transaction_a_match_is_no_all_clear(dpkg, tmp_path, monkeypatch):
    """No package manager ran: the content matches the package, and the
    event still has its normal severity, saying so (a trojan's cover put
    back looks exactly like this)."""
    db, tool, _, _ = dpkg
    monkeypatch.setattr(fimwatch, "PACKAGE_PREFIXES", (str(tmp_path) + "/",))
    eng, got = _engine(db)
    old = fimwatch.snapshot(str(tool), 1 << 20)
    eng.emit_change("modified", str(tool), "realtime", old, old, ["content"])
    assert got[-1]["severity"] == "critical"
    assert got[-1]["package"] == {"name": "tool", "manager": "dpkg", "verified": True,
                                  "digest": "md5", "transaction": "none"}
    tool.write_bytes(b"#!/bin/sh\necho trojan\n")
    new = fimwatch.snapshot(str(tool), 1 << 20)
    eng.emit_change("modified", str(tool), "realtime", old, new, ["content"])
    assert got[-1]["severity"] == "critical"
    assert got[-1]["package"]["verified"] is False


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


# -- the index: every owner, diversions, directories and symlinks ------------

def test_every_owner_diversions_and_listed_dirs(dpkg, tmp_path):
    """Two packages shipping one path: either's content verifies. A
    diversion moves the diverted package's sum to the new path and the
    original path keeps only the diverting package's. Directories and
    symlinks of info/*.list are known to the index (no checksum)."""
    db, tool, _, _ = dpkg
    info = tmp_path / "info"
    root = tmp_path / "root"
    rel = str(tool).lstrip("/")
    (info / "alt.md5sums").write_text("%s  %s\n" % (md5(b"alt build\n"), rel))
    (info / "alt.list").write_text("%s\n%s\n" % (root / "bin", tool))
    assert db.check(str(tool))["verified"] is True              # tool's own sum
    tool.write_bytes(b"alt build\n")
    assert db.check(str(tool)) == {"name": "alt", "manager": "dpkg", "verified": True,
                                   "digest": "md5"}
    assert db.lookup(str(root / "bin"))[0::2] == ("alt",)        # a listed directory
    # alt diverts tool's file to tool.distrib
    distrib = root / "bin" / "tool.distrib"
    (tmp_path / "diversions").write_text("%s\n%s\nalt\n" % (tool, distrib))
    db.index = None
    assert db.lookup(str(tool))[0::2] == ("alt",)
    distrib.write_bytes(b"#!/bin/sh\necho packaged\n")
    assert db.check(str(distrib)) == {"name": "tool", "manager": "dpkg", "verified": True,
                                      "digest": "md5"}
    tool.write_bytes(b"#!/bin/sh\necho packaged\n")               # tool's content at
    assert db.check(str(tool))["verified"] is False              # the diverted path


def test_status_versions_of_installed_packages_only(dpkg, tmp_path):
    db = dpkg[0]
    (tmp_path / "status").write_text(
        "Package: a\nStatus: install ok installed\nVersion: 1:2.0-1\n\n"
        "Package: gone\nStatus: deinstall ok config-files\nVersion: 1.0\n\n"
        "Package: b\nVersion: 3\nStatus: install ok installed\n")
    db.load()
    assert db.versions == {"a": "1:2.0-1", "b": "3"}


@pytest.mark.parametrize("a, b, sign", [
    ("1.0", "1.0", 0), ("1.0", "1.1", -1), ("1.10", "1.9", 1), ("1.0~rc1", "1.0", -1),
    ("1:0.1", "2.0", 1), ("2.0-1", "2.0-1+deb12u1", -1), ("1.0a", "1.0+", -1),
    ("2.36-9+deb12u4", "2.36-9+deb12u10", -1), ("1.0-1", "1.0-1~bpo1", 1)])
def test_dpkg_version_cmp(a, b, sign):
    r = fimwatch.dpkg_version_cmp(a, b)
    assert (r > 0) - (r < 0) == sign
    r = fimwatch.dpkg_version_cmp(b, a)
    assert (r > 0) - (r < 0) == -sign


# -- transactions: the lock holder ------------------------------------------------

def test_lock_holder_pid_frontend_and_sudo_user(dpkg, tmp_path):
    db, _, _, lock = dpkg
    watch = fimwatch.PackageWatch(db, use_inotify=False)
    assert watch.holder() is None
    holder = hold_lock(lock, tmp_path, env={"SUDO_USER": "alice"})
    try:
        h = watch.holder()
        assert h["pid"] == holder.pid
        assert h["frontend"] == "apt-get"
        assert h["user"] == "alice"
        assert "apt-get" in h["cmdline"]
    finally:
        holder.kill()
        holder.wait()
    assert watch.holder() is None


def test_transaction_from_lock_to_unlock(dpkg, tmp_path):
    """Started when the lock is taken (seen through inotify on the lock's
    directory), ended when it is released: the versions before and after."""
    db, _, _, lock = dpkg
    watch = fimwatch.PackageWatch(db)
    assert watch.fileno() is not None
    assert watch.poll(time.monotonic()) is None and watch.tx is None
    holder = hold_lock(lock, tmp_path, name="unattended-upgrade")
    try:
        deadline = time.monotonic() + 5
        while watch.tx is None and time.monotonic() < deadline:
            watch.poll(time.monotonic())
            time.sleep(0.05)
        assert watch.tx is not None
        assert watch.tx.holder["frontend"] == "unattended-upgrades"
        (tmp_path / "status").write_text(
            "Package: tool\nStatus: install ok installed\nVersion: 2\n")
    finally:
        holder.kill()
        holder.wait()
    ended, deadline = None, time.monotonic() + 5
    while ended is None and time.monotonic() < deadline:
        ended = watch.poll(time.monotonic())
        time.sleep(0.05)
    assert ended is not None and watch.tx is None
    assert ended.after == {"tool": "2"}
    watch.close()


def test_compact_index_reads_md5_from_the_owners_list(tmp_path):
    """One owner per path is kept as a number (the index of a 1,000-package
    system must stay small: bench/pkg_index.py); its md5 comes from that
    package's md5sums file (an arch-qualified name too), also once more
    packages were asked than the small cache holds."""
    info = tmp_path / "info"
    info.mkdir()
    files = {}
    for n in range(12):
        f = tmp_path / ("f%d" % n)
        f.write_bytes(b"content %d\n" % n)
        files[n] = f
        name = "p%d:amd64" % n if n % 2 else "p%d" % n
        (info / (name + ".md5sums")).write_text(
            "%s  %s\n" % (md5(f.read_bytes()), str(f).lstrip("/")))
    (tmp_path / "status").write_text("Package: p0\nStatus: install ok installed\n")
    (tmp_path / "lock").write_bytes(b"")
    db = fimwatch.PackageDB(info_dir=str(info), lock=str(tmp_path / "lock"),
                            status=str(tmp_path / "status"))
    for rnd in range(2):
        for n, f in files.items():
            assert db.check(str(f)) == {"name": "p%d" % n, "manager": "dpkg",
                                        "verified": True, "digest": "md5"}
    assert isinstance(db.index[os.fsencode(files[3])], int)
    files[5].write_bytes(b"trojan\n")
    assert db.check(str(files[5]))["verified"] is False


def build_deb(tmp_path, files, name="tool", version="1:1.0-1", compress="xz"):
    """A real .deb (dpkg-deb) shipping files {absolute path: bytes}, in an
    apt-style archive dir; returns that dir."""
    tree = tmp_path / "debroot"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        "Package: %s\nVersion: %s\nArchitecture: all\nMaintainer: t <t@example.org>\n"
        "Description: test\n" % (name, version))
    for path, data in files.items():
        f = tree / str(path).lstrip("/")
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)
    archives = tmp_path / "archives"
    archives.mkdir()
    deb = archives / ("%s_%s_all.deb" % (name, version.replace(":", "%3a")))
    subprocess.run(["dpkg-deb", "-Z" + compress, "--root-owner-group", "--build", str(tree),
                    str(deb)], check=True, capture_output=True)
    return archives


@pytest.mark.parametrize("compress", ["xz", "gzip"])
def test_sha256_from_the_deb_catches_an_edited_md5sums(dpkg, tmp_path, compress):
    """Where apt kept the .deb, its sha256 is the proof: a trojan whose md5
    was written into the md5sums list is not verified."""
    db, tool, _, _ = dpkg
    good = tool.read_bytes()
    db.archives = str(build_deb(tmp_path, {tool: good}, compress=compress))
    (tmp_path / "status").write_text(
        "Package: tool\nStatus: install ok installed\nVersion: 1:1.0-1\n")
    assert db.check(str(tool)) == {"name": "tool", "manager": "dpkg", "verified": True,
                                   "digest": "sha256"}
    trojan = b"#!/bin/sh\necho trojan\n"
    tool.write_bytes(trojan)
    (tmp_path / "info" / "tool.md5sums").write_text(
        "%s  %s\n" % (md5(trojan), str(tool).lstrip("/")))
    db.index = None                                   # the edit is in place: reload
    got = db.check(str(tool))
    assert got["verified"] is False and got["digest"] == "sha256", got
    assert "may have been edited" in got["mismatch"], got
    os.unlink(os.path.join(db.archives, os.listdir(db.archives)[0]))   # apt clean
    db.deb_sums.clear()
    assert db.check(str(tool)) == {"name": "tool", "manager": "dpkg", "verified": True,
                                   "digest": "md5"}   # no .deb: md5 is all there is


def test_deb_reader_refuses_what_is_not_a_deb(tmp_path):
    junk = tmp_path / "x_1_all.deb"
    junk.write_bytes(b"!<arch>\ngarbage")
    assert fimwatch.deb_member_sha256(str(junk)) == {}
    os.mkfifo(str(tmp_path / "fifo.deb"))
    assert fimwatch.deb_member_sha256(str(tmp_path / "fifo.deb")) == {}    # never blocks
    assert fimwatch.deb_member_sha256(str(tmp_path / "missing.deb")) == {}


def test_an_edited_md5sums_list_makes_the_change_critical(dpkg, tmp_path, monkeypatch):
    """A file at a warning path whose md5 the md5sums list vouches for but
    the .deb's sha256 does not: someone edited dpkg's database: critical."""
    db, tool, _, _ = dpkg
    db.archives = str(build_deb(tmp_path, {tool: tool.read_bytes()}))
    (tmp_path / "status").write_text(
        "Package: tool\nStatus: install ok installed\nVersion: 1:1.0-1\n")
    monkeypatch.setattr(fimwatch, "PACKAGE_PREFIXES", (str(tmp_path) + "/",))
    eng, got = _engine(db)
    monkeypatch.setattr(eng.cfg, "severity_for", lambda path: "warning", raising=False)
    old = fimwatch.snapshot(str(tool), 1 << 20)
    trojan = b"#!/bin/sh\necho trojan\n"
    tool.write_bytes(trojan)
    (tmp_path / "info" / "tool.md5sums").write_text(
        "%s  %s\n" % (md5(trojan), str(tool).lstrip("/")))
    eng.emit_change("modified", str(tool), "realtime", old,
                    fimwatch.snapshot(str(tool), 1 << 20), ["content"])
    assert got[-1]["severity"] == "critical", got[-1]
    assert got[-1]["package"]["verified"] is False and "mismatch" in got[-1]["package"]


POLICY = b"""inotify-tools:
  Installed: 3.22.6.0-4
  Candidate: 3.22.6.0-4
  Version table:
 *** 3.22.6.0-4 500
        500 http://deb.example.org/debian bookworm/main amd64 Packages
        100 /var/lib/dpkg/status
mytool:
  Installed: 2.0
  Candidate: 2.0
  Version table:
 *** 2.0 100
        100 /var/lib/dpkg/status
     1.0 500
        500 http://deb.example.org/debian bookworm/main amd64 Packages
"""


def test_apt_sources_parses_apt_cache_policy():
    """apt-cache's output format, as apt 2.6 prints it (recorded: which
    packages a host's sources have cannot be set up here without network)."""
    def run(argv, **kw):
        assert argv[0] == "apt-cache" and argv[-3:] == ["--", "inotify-tools", "mytool"]
        return subprocess.CompletedProcess(argv, 0, POLICY, b"")
    assert fimwatch.apt_sources(["mytool", "inotify-tools"], run=run) == {
        "inotify-tools": ["http://deb.example.org/debian bookworm/main amd64 Packages",
                          "/var/lib/dpkg/status"],
        "mytool": ["/var/lib/dpkg/status"]}
    assert fimwatch.apt_sources(["x"], run=lambda *a, **k: subprocess.CompletedProcess(
        a, 100, b"", b"E: broken")) is None


@pytest.mark.skipif(not os.path.exists("/usr/bin/apt-cache"), reason="no apt-cache here")
def test_apt_sources_runs_the_real_apt_cache():
    got = fimwatch.apt_sources(["dpkg"])
    assert got is not None and "/var/lib/dpkg/status" in got["dpkg"], got


def test_transaction_flags_downgrade_same_version_rebuild_and_local_deb(tmp_path):
    info = tmp_path / "info"
    info.mkdir()
    for n in ("a", "b", "c", "d"):
        (info / (n + ".md5sums")).write_text("%s  usr/bin/%s\n" % ("1" * 32, n))
    before = fimwatch.md5sums_digests(str(info))
    tx = fimwatch.PackageTx({"frontend": "dpkg"}, 0.0,
                            {"a": "2.0", "b": "1.0", "c": "1.0", "d": "1.0"}, before)
    (info / "b.md5sums").write_text("%s  usr/bin/b\n" % ("2" * 32))    # rebuilt, same version
    tx.after = {"a": "1.0", "b": "1.0", "c": "1.0", "d": "1.0", "e": "3.0"}
    tx.verified.update({"b": 1})
    ev = tx.digest("h", sums_after=fimwatch.md5sums_digests(str(info)),
                   sources={"e": ["/var/lib/dpkg/status"], "a": ["http://x Packages",
                                                              "/var/lib/dpkg/status"]})
    assert ev["severity"] == "warning", ev
    assert ev["flags"] == [
        "downgraded: a 2.0 -> 1.0",
        "reinstalled with different files under the same version: b 1.0",
        "in no configured apt source: e 3.0 (dpkg -i of a local .deb, or its source was removed)"]
    assert "flagged: downgraded: a 2.0 -> 1.0" in ev["message"]
    quiet = fimwatch.PackageTx({"frontend": "apt-get"}, 0.0, {"c": "1.0"}, before)
    quiet.after = {"c": "1.1"}
    ev = quiet.digest("h", sums_after=before, sources={"c": ["http://x Packages"]})
    assert ev["severity"] == "info" and "flags" not in ev, ev


def test_a_scripts_temp_file_gone_before_it_was_read_goes_to_the_digest(
        dpkg, tmp_path_factory, monkeypatch):
    """adduser's /etc/group.PID, made and removed by a maintainer script
    before fimwatch could read it: held by the transaction, listed in its
    digest, not an alert of its own (seen under real apt in a container)."""
    db = dpkg[0]
    etc = str(tmp_path_factory.mktemp("etc")) + "/"      # outside dpkg's dir (tmp_path)
    monkeypatch.setattr(fimwatch, "PACKAGE_PREFIXES", (etc,))
    monkeypatch.setattr(fimwatch, "SCRIPT_PREFIXES", (etc,))
    eng, got = _engine(db)
    eng.probe = fimwatch.re.compile(r"(?!)")
    tx = fimwatch.PackageTx({"frontend": "apt-get"}, 0.0, {})
    p = etc + "group.1074"
    tx.paths[p] = None
    eng.tx_closing = [tx]
    eng.report_transient(p, [0.0, None, 0])
    assert got == [] and tx.scripts == [{"path": p, "event": "transient"}], (got, tx.scripts)
    eng.tx_closing = []                                   # no transaction: an alert
    eng.report_transient(p, [0.0, None, 0])
    assert got and got[-1]["event"] == "transient" and got[-1]["captured"] is False, got


def _tx_engine(db, monkeypatch, prefix):
    """An in-process Engine with one ended apt-get transaction closing, for
    the package prefix `prefix`; (engine, emitted events, transaction)."""
    monkeypatch.setattr(fimwatch, "PACKAGE_PREFIXES", (prefix,))
    eng, got = _engine(db)
    eng.probe = fimwatch.re.compile(r"(?!)")
    tx = fimwatch.PackageTx({"frontend": "apt-get"}, 0.0, {})
    tx.after = {"tool": "1:1.0-1"}                        # tool was installed by it
    eng.tx_closing = [tx]
    return eng, got, tx


def test_dpkg_unpack_temporaries_are_counted_not_reported(dpkg, tmp_path, tmp_path_factory,
                                                          monkeypatch):
    """dpkg unpacks each file as X.dpkg-new beside X (and keeps the old one
    as X.dpkg-tmp) and renames it over: in an upgrade seen under real apt as
    one `transient` per file (60 critical and warning events for 25
    packages). Beside a packaged file they are counted in the digest; any
    other name that came and went is still reported."""
    db = dpkg[0]
    usr = tmp_path_factory.mktemp("usr")               # outside dpkg's dir (tmp_path)
    tool = usr / "tool"
    with open(tmp_path / "info" / "tool.md5sums", "a") as f:
        f.write("%s  %s\n" % ("2" * 32, str(tool).lstrip("/")))
    eng, got, tx = _tx_engine(db, monkeypatch, str(usr) + "/")
    for p in (str(tool) + ".dpkg-new", str(tool) + ".dpkg-tmp",
              str(tool.parent / "stranger.dpkg-new")):
        tx.paths[p] = None
        eng.report_transient(p, [0.0, None, 0])
    assert tx.temporaries == 2, tx.temporaries
    assert [e["path"] for e in got] == [str(tool.parent / "stranger.dpkg-new")], got
    assert tx.digest("h")["files"]["temporaries"] == 2


def test_maintainer_script_copies_outside_the_prefixes_go_to_the_digest(
        dpkg, tmp_path, tmp_path_factory, monkeypatch):
    """nginx's postinst makes /var/www/html and copies its index.html there:
    held by the transaction (not a critical path), a directory made and a
    copy of a file the transaction's packages ship are listed in its digest;
    a file of other content is reported on its own, as without it."""
    db, tool, _, _ = dpkg
    eng, got, tx = _tx_engine(db, monkeypatch, str(tmp_path / "root") + "/")
    www = tmp_path_factory.mktemp("www")
    copy, other, sub = www / "index.html", www / "shell.php", www / "html"
    copy.write_bytes(tool.read_bytes())
    other.write_bytes(b"<?php system($_GET['c']);\n")
    sub.mkdir()
    for p in (sub, copy, other):
        tx.paths[str(p)] = None
        eng.emit_change("created", str(p), "realtime", None,
                        fimwatch.snapshot(str(p), 1 << 20), [])
    assert tx.scripts == [{"path": str(sub), "event": "created"},
                          {"path": str(copy), "event": "created",
                           "copy_of": "%s (tool)" % tool}], tx.scripts
    assert [e["path"] for e in got] == [str(other)], got
    assert "package" not in got[0] and got[0]["severity"] == "critical", got[0]
    assert tx.mismatches == [], tx.mismatches        # reported as it would be anyway


class _NoTxRunning:
    """PackageWatch between transactions, for defer_for_dpkg."""
    tx = None


def test_debs_are_read_ahead_by_the_workers_then_pinned(dpkg, tmp_path, monkeypatch):
    """When a transaction ends, the .debs of the packages owning the files it
    changed are read by the Hasher threads; its held changes are compared
    once they are in (PackageDB.check then finds the sha256s pinned, even if
    the .deb is gone by then), the same proof as reading them on the loop."""
    db, tool, _, _ = dpkg
    db.archives = str(build_deb(tmp_path, {tool: tool.read_bytes()}))
    (tmp_path / "status").write_text(
        "Package: tool\nStatus: install ok installed\nVersion: 1:1.0-1\n")
    eng, got, tx = _tx_engine(db, monkeypatch, str(tmp_path / "root") + "/")
    eng.hasher = fimwatch.Hasher()
    eng.pending, eng.due = {str(tool): [1e9, 0.0, 1e9]}, []
    eng.pkgtx = _NoTxRunning()
    tx.paths[str(tool)] = None
    try:
        eng.read_debs_ahead(tx)
        assert tx.deb_wait == {("tool", "1:1.0-1")}
        # held until the .deb is read: not queued, and the settle queue defers it
        assert eng.due == [] and eng.defer_for_dpkg(str(tool), 5.0, 1.0) is True
        deadline = time.monotonic() + 10
        while tx.deb_wait and time.monotonic() < deadline:
            eng.collect(wait=0.2)
    finally:
        eng.hasher.close()
    assert not tx.deb_wait and eng.defer_for_dpkg(str(tool), 5.0, 1.0) is False
    assert [p for _, p in eng.due] == [str(tool)] and eng.pending[str(tool)][0] < 1e9
    sha = hashlib.sha256(tool.read_bytes()).hexdigest()
    assert db.deb_pinned[("tool", "1:1.0-1")] == {os.fsencode(str(tool)): sha}
    os.unlink(os.path.join(db.archives, os.listdir(db.archives)[0]))   # apt clean meanwhile
    assert db.check(str(tool)) == {"name": "tool", "manager": "dpkg", "verified": True,
                                   "digest": "sha256"}
