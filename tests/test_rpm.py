"""The package check on RPM systems: fimwatch.RpmDB reads rpm's sqlite
database (rpmdb.sqlite) with its own header parser.

Every rpmdb here is real: the packages are built by the real `rpmbuild` and
installed by the real `rpm` (Debian's `rpm` package, which tests/run
installs; its database backend is sqlite) with `--dbpath` into a temp dir,
so the host's databases are never touched. The hostile headers are real
headers from such a database, truncated or altered.
"""

import hashlib
import os
import random
import shutil
import sqlite3
import struct
import subprocess
import sys

import pytest

import fimwatch
from conftest import REPO, hold_lock, is_event
from test_transactions import WRAPPER

pytestmark = pytest.mark.skipif(shutil.which("rpmbuild") is None,
                                reason="needs rpm (Debian package `rpm`; tests/run installs it)")

SPEC = """Name: %(name)s
Version: %(version)s
Release: %(release)s
%(epoch)s
Summary: fimwatch test package
License: MIT
BuildArch: noarch
%%description
fimwatch test package
%%install
cp -a %(stage)s/. %%{buildroot}/
%%files
%(files)s
"""


def build_rpm(base, name, files, version="1.0", release="1", epoch=None, config=(),
              dirs=(), algo=None):
    """A real .rpm of `files` {absolute path: bytes}; paths in `config` are
    %config(noreplace), `dirs` are owned directories. algo: rpm's file
    digest algorithm number (default: rpm's, sha256)."""
    top = base / ("rpmbuild-" + name)
    stage = top / "stage"
    for path, data in files.items():
        dst = stage / str(path).lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)
    for d in dirs:
        (stage / str(d).lstrip("/")).mkdir(parents=True, exist_ok=True)
    lines = ["%%dir %s" % d for d in dirs]
    lines += ["%%config(noreplace) %s" % p if p in config else str(p) for p in files]
    spec = top / (name + ".spec")
    spec.write_text(SPEC % {"name": name, "version": version, "release": release,
                            "epoch": "Epoch: %d" % epoch if epoch else "", "stage": stage,
                            "files": "\n".join(lines)})
    argv = ["rpmbuild", "--define", "_topdir %s" % top, "--define", "_build_id_links none"]
    if algo is not None:
        argv += ["--define", "_binary_filedigest_algorithm %d" % algo]
    r = subprocess.run(argv + ["-bb", str(spec)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    out = list((top / "RPMS" / "noarch").glob("*.rpm"))
    assert len(out) == 1, out
    return out[0]


def rpm_install(dbpath, *rpms, justdb=False):
    """rpm -i into the rpmdb at dbpath (files to their paths, under a temp
    dir, unless justdb)."""
    argv = ["rpm", "--dbpath", str(dbpath), "-i", "--nodeps", "--noscripts"]
    r = subprocess.run(argv + (["--justdb"] if justdb else []) + [str(p) for p in rpms],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def sha256(data):
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def rpmsys(tmp_path_factory):
    """An rpmdb of three real packages installed into a temp root:
    hello (a binary and a config file, sha256), libfoo (epoch, md5
    digests) and hello-extras; both hello packages own root/usr/share/hello."""
    base = tmp_path_factory.mktemp("rpm")
    root = base / "root"
    share = root / "usr" / "share" / "hello"
    f = {"hello": root / "usr" / "bin" / "hello", "conf": root / "etc" / "hello" / "hello.conf",
         "lib": root / "usr" / "lib" / "libfoo.so.1", "extra": share / "extra.txt",
         "readme": share / "README"}
    rpms = [
        build_rpm(base, "hello", {f["hello"]: b"#!/bin/sh\necho hello\n",
                                  f["conf"]: b"greeting = hi\n",
                                  f["readme"]: b"hello readme\n"},
                  version="1.2", release="3.fc40", config=(f["conf"],),
                  dirs=(f["conf"].parent, share)),
        build_rpm(base, "libfoo", {f["lib"]: b"\x7fELF libfoo\n"}, version="2.0",
                  release="1", epoch=2, algo=1),
        build_rpm(base, "hello-extras", {f["extra"]: b"extra\n"}, dirs=(share,)),
    ]
    db = base / "db"
    db.mkdir()
    rpm_install(db, *rpms)
    assert (db / "rpmdb.sqlite").is_file(), os.listdir(db)
    return db / "rpmdb.sqlite", f


@pytest.fixture
def rpmdb(rpmsys, tmp_path):
    """A private copy of rpmsys's database (a test may alter it) and its files
    (restored to the package's content)."""
    src, f = rpmsys
    dst = tmp_path / "rpm" / "rpmdb.sqlite"
    dst.parent.mkdir()
    with sqlite3.connect(str(src)) as a, sqlite3.connect(str(dst)) as b:
        a.backup(b)
    b.close()
    (dst.parent / ".rpm.lock").write_bytes(b"")         # as rpm leaves it
    for k, data in (("hello", b"#!/bin/sh\necho hello\n"), ("conf", b"greeting = hi\n"),
                    ("lib", b"\x7fELF libfoo\n"), ("extra", b"extra\n")):
        f[k].write_bytes(data)
    return dst, f


def test_lookup_several_packages_versions_and_shared_dirs(rpmdb):
    path, f = rpmdb
    db = fimwatch.RpmDB(str(path))
    assert db.load()
    assert sorted(db.versions.items()) == [("hello", "1.2-3.fc40"), ("hello-extras", "1.0-1"),
                                           ("libfoo", "2:2.0-1")]
    assert db.lookup(str(f["hello"])) == ("hello", sha256(b"#!/bin/sh\necho hello\n"))
    assert db.lookup(str(f["lib"])) == ("libfoo", hashlib.md5(b"\x7fELF libfoo\n").hexdigest())
    assert db.lookup(str(f["extra"])) == ("hello-extras", sha256(b"extra\n"))
    # a directory both packages own: listed by each, no digest
    owners = db.lookup(str(f["extra"].parent))
    assert sorted(zip(owners[::2], owners[1::2])) == [("hello", None), ("hello-extras", None)]
    assert db.lookup(str(f["hello"].parent / "nothing")) is None
    assert db.lookup(str(f["hello"].parent)) is None      # not %dir: nobody's


def test_sha256_match_and_mismatch(rpmdb):
    path, f = rpmdb
    db = fimwatch.RpmDB(str(path))
    want = {"name": "hello", "manager": "rpm", "version": "1.2-3.fc40", "verified": True,
            "digest": "sha256"}
    assert db.check(str(f["hello"])) == want
    good = sha256(f["hello"].read_bytes())
    assert db.check(str(f["hello"]), good) == want
    assert db.check(str(f["hello"]), "0" * 64)["verified"] is False     # other bytes hashed
    f["hello"].write_bytes(b"#!/bin/sh\necho trojan\n")
    assert db.check(str(f["hello"])) == dict(want, verified=False)
    # md5 digests (an older rpm's) verify too and say which proof it was
    assert db.check(str(f["lib"])) == {"name": "libfoo", "manager": "rpm", "version": "2:2.0-1",
                                       "verified": True, "digest": "md5"}


def test_config_file_edited_is_no_mismatch(rpmdb, monkeypatch):
    path, f = rpmdb
    db = fimwatch.RpmDB(str(path))
    assert db.check(str(f["conf"])) == {"name": "hello", "manager": "rpm",
                                        "version": "1.2-3.fc40", "verified": True,
                                        "digest": "sha256", "config": True}
    f["conf"].write_bytes(b"greeting = hello there\n")
    got = db.check(str(f["conf"]))
    assert got["verified"] is False and got["config"] is True
    # ... and the event says so, at the path's level, not "does not match"
    eng, events = _engine(fimwatch.PackageDB(status=str(path.parent / "no-status"),
                                             rpmdb=str(path)))
    monkeypatch.setattr(fimwatch, "PACKAGE_PREFIXES", (str(f["conf"].parents[2]) + "/",))
    rec = fimwatch.snapshot(str(f["conf"]), 1 << 20)
    eng.emit_change("modified", str(f["conf"]), "realtime", rec, rec, ["content"])
    assert events[-1]["severity"] == "critical"
    assert "config file of package hello, edited" in events[-1]["summary"]
    assert "does not match" not in events[-1]["summary"]


def _engine(db):
    from test_package import _engine as engine
    return engine(db)


def test_dpkg_wins_where_both_exist(rpmdb, tmp_path):
    path, f = rpmdb
    status = tmp_path / "status"
    status.write_text("Package: tool\nStatus: install ok installed\nVersion: 1\n")
    info = tmp_path / "info"
    info.mkdir()
    both = fimwatch.PackageDB(info_dir=str(info), status=str(status), rpmdb=str(path))
    assert both.rpm is None and both.check(str(f["hello"])) is None
    status.write_text("")                                  # no dpkg packages
    rpm = fimwatch.PackageDB(info_dir=str(info), status=str(status), rpmdb=str(path))
    assert rpm.check(str(f["hello"]))["manager"] == "rpm"
    assert rpm.lookup(str(f["hello"]))[0] == "hello"
    none = fimwatch.PackageDB(info_dir=str(info), status=str(status),
                              rpmdb=str(tmp_path / "absent.sqlite"))
    assert none.rpm is None


def test_never_writes_or_locks_the_rpmdb(rpmdb):
    """Read with mode=ro (+immutable while rpm's lock is free): the files are
    unchanged byte for byte, and no -shm/-wal/journal appears."""
    path, f = rpmdb
    before = sorted(os.listdir(path.parent))
    data = path.read_bytes()
    st = os.stat(path)
    db = fimwatch.RpmDB(str(path))
    assert db.check(str(f["hello"]))["verified"] is True
    assert sorted(os.listdir(path.parent)) == before
    assert path.read_bytes() == data and os.stat(path).st_mtime_ns == st.st_mtime_ns


def test_opened_read_only_and_reads_the_write_ahead_log(rpmdb, tmp_path):
    """The connection cannot write. A write rpm committed that is still in
    the WAL (rpm running, or killed before its checkpoint) is read: the
    database is opened `immutable` only while the WAL is empty and rpm's
    lock (held here by a real process, as rpm holds it) is free."""
    path, f = rpmdb
    db = fimwatch.RpmDB(str(path))
    assert db.uri() == "file:%s?mode=ro&immutable=1" % path
    w = sqlite3.connect(str(path), isolation_level=None)
    assert w.execute("PRAGMA journal_mode = WAL").fetchone()[0] == "wal"
    w.execute("PRAGMA wal_autocheckpoint = 0")
    w.execute("INSERT INTO Packages (blob) SELECT blob FROM Packages WHERE hnum = "
              "(SELECT min(hnum) FROM Packages)")          # a second copy: one more owner
    assert os.path.getsize(str(path) + "-wal") > 0
    assert db.uri() == "file:%s?mode=ro" % path
    before = len(db.pkgs) if db.load() else None
    assert before == 4, db.pkgs                              # the WAL's row is read
    w.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert os.path.getsize(str(path) + "-wal") == 0
    holder = hold_lock(db.lock_path, tmp_path, name="dnf")
    try:
        assert fimwatch.lock_held(db.lock_path)
        assert db.uri() == "file:%s?mode=ro" % path
        conn = db._connect()
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            conn.execute("CREATE TABLE x (y)")
        conn.close()
        w.execute("DELETE FROM Packages WHERE hnum = (SELECT max(hnum) FROM Packages)")
        assert db.load() and len(db.pkgs) == 3, db.pkgs
    finally:
        holder.kill()
        holder.wait()
        w.close()


def test_reloads_when_rpm_installs(rpmdb, tmp_path):
    path, f = rpmdb
    db = fimwatch.RpmDB(str(path))
    new = f["hello"].parent / "newtool"
    assert db.check(str(new)) is None
    rpm_install(path.parent, build_rpm(tmp_path, "newtool", {new: b"new\n"}), justdb=True)
    new.write_bytes(b"new\n")
    assert db.check(str(new))["verified"] is True


def _blobs(path):
    with sqlite3.connect(str(path)) as c:
        return dict(c.execute("SELECT hnum, blob FROM Packages"))


def test_truncated_and_hostile_headers(rpmdb, capfd):
    """Every truncation of a real header, and random damage to it, gives a
    header or RpmHeaderError: nothing else, no read past the blob, no hang.
    In the database such a package is skipped with one line on stderr and
    the others are still checked."""
    path, f = rpmdb
    blobs = _blobs(path)
    real = max(blobs.values(), key=len)
    tags = fimwatch.RpmDB.INDEX_TAGS
    for n in range(len(real)):
        with pytest.raises(fimwatch.RpmHeaderError):
            fimwatch.rpm_header(real[:n], tags)
    rnd = random.Random(12)
    for _ in range(3000):
        b = bytearray(real)
        for _ in range(rnd.randint(1, 4)):
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        try:
            fimwatch.rpm_files(fimwatch.rpm_header(bytes(b), tags))
        except fimwatch.RpmHeaderError:
            pass
    il, dl = struct.unpack_from(">II", real)
    name = next(8 + 16 * i for i in range(2, il)
                if struct.unpack_from(">I", real, 8 + 16 * i)[0] == fimwatch.RPMTAG_NAME)
    lying = [
        struct.pack(">II", il, dl + 1000) + real[8:],                   # sizes that lie
        struct.pack(">II", 0x7FFFFFFF, 0) + real[8:],                    # a huge index
        real[:8] + struct.pack(">IIII", fimwatch.RPMTAG_BASENAMES, 8, 0, 0xFFFFFFFF) + real[24:],
        real[:8] + struct.pack(">IIII", fimwatch.RPMTAG_DIRINDEXES, 4, 0, 0x3FFFFFFF) + real[24:],
        real[:8] + struct.pack(">IIII", fimwatch.RPMTAG_NAME, 6, dl + 5, 1) + real[24:],
        b"",
        real[:24] + real[name:name + 16] + real[40:],           # NAME twice (for entry 1)
        None, 10 ** 9, "text",                                            # not blobs
    ]
    for b in lying:
        with pytest.raises(fimwatch.RpmHeaderError):
            fimwatch.rpm_files(fimwatch.rpm_header(b, tags))
    # a dir index past the dirs: parsed, refused by rpm_files
    h = fimwatch.rpm_header(real, tags)
    h[fimwatch.RPMTAG_DIRINDEXES] = (99,) * len(h[fimwatch.RPMTAG_DIRINDEXES])
    with pytest.raises(fimwatch.RpmHeaderError, match="dir index 99"):
        fimwatch.rpm_files(h)
    # in the database: hello's header truncated -> skipped, said once, the rest checked
    hnum = next(k for k, v in blobs.items() if v == real)
    with sqlite3.connect(str(path)) as c:
        c.execute("UPDATE Packages SET blob = ? WHERE hnum = ?", (real[:len(real) // 2], hnum))
    c.close()
    capfd.readouterr()
    db = fimwatch.RpmDB(str(path))
    assert db.check(str(f["hello"])) is None
    assert db.check(str(f["lib"]))["verified"] is True
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and "package #%d skipped: " % hnum in err[0], err
    # an integer where the blob should be (a bytes(n) of it would allocate n bytes)
    with sqlite3.connect(str(path)) as c:
        c.execute("UPDATE Packages SET blob = ? WHERE hnum = ?", (1 << 40, hnum))
    c.close()
    db = fimwatch.RpmDB(str(path))
    assert db.check(str(f["hello"])) is None and db.check(str(f["lib"]))["verified"] is True
    assert "not a blob" in capfd.readouterr().err


def test_a_database_that_is_not_one_is_one_line(tmp_path, capfd):
    bad = tmp_path / "rpmdb.sqlite"
    bad.write_bytes(b"not a database\n" * 100)
    db = fimwatch.RpmDB(str(bad))
    assert db.check("/usr/bin/true") is None
    assert db.check("/usr/bin/false") is None
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and "cannot be read" in err[0], err


def test_daemon_verifies_by_rpm_digest_and_flags_a_trojan(fim, tmp_path):
    """The real daemon on a host with an rpmdb and no dpkg status: a packaged
    binary trojaned is "does not match package hello"; put back to the
    package's content it is verified by sha256 (and still reported: no
    package manager ran)."""
    db = tmp_path / "rpmdb"
    db.mkdir()
    tool = fim.root / "usr" / "bin" / "hello"
    good = b"#!/bin/sh\necho hello\n"
    rpm_install(db, build_rpm(tmp_path, "hello", {tool: good}, version="1.2", release="3"))
    assert tool.read_bytes() == good                       # rpm put it there
    (tmp_path / "nodpkg").mkdir()
    wrapper = tmp_path / "python-wrapper"
    wrapper.write_text("#!/bin/sh\nexec %s %s \"$@\"\n" % (sys.executable, tmp_path / "wrap.py"))
    (tmp_path / "wrap.py").write_text(WRAPPER % {"repo": str(REPO)})
    os.chmod(wrapper, 0o755)
    fim.write_config(severity={"critical": "%s/usr/bin/**" % fim.root},
                     fimwatch={"package_check": "yes"})
    d = fim.daemon(python=str(wrapper), env={
        "FIMTEST_DPKG": str(tmp_path / "nodpkg"), "FIMTEST_ROOT": str(fim.root),
        "FIMTEST_RPMDB": str(db / "rpmdb.sqlite")})
    mark = d.mark()
    tool.write_bytes(b"#!/bin/sh\necho trojan\n")
    ev = d.wait_for(is_event("modified", path=str(tool)), since=mark)
    assert ev["severity"] == "critical"
    assert ev["package"] == {"name": "hello", "manager": "rpm", "version": "1.2-3",
                             "verified": False, "digest": "sha256", "transaction": "none"}
    assert "does not match package hello (no package manager ran)" in ev["summary"], ev
    mark = d.mark()
    tool.write_bytes(good)
    ev = d.wait_for(is_event("modified", path=str(tool)), since=mark)
    assert ev["severity"] == "critical"
    assert ev["package"] == {"name": "hello", "manager": "rpm", "version": "1.2-3",
                             "verified": True, "digest": "sha256", "transaction": "none"}
    assert "matches package hello, but no package manager ran" in ev["summary"], ev
    # rpm (here a process named dnf holding rpm's lock, as dnf does) runs:
    # the change is not said to be outside any transaction, nor is it muted
    holder = hold_lock(db / ".rpm.lock", tmp_path, name="dnf")
    try:
        mark = d.mark()
        tool.write_bytes(b"#!/bin/sh\necho hello again\n")
        ev = d.wait_for(is_event("modified", path=str(tool)), since=mark)
        assert ev["severity"] == "critical"
        assert ev["package"]["transaction"] == "untracked" and not ev["package"]["verified"]
        assert "does not match package hello (rpm was running; its transactions are not " \
            "tracked)" in ev["summary"], ev
    finally:
        holder.kill()
        holder.wait()
