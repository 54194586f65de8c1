"""Package transactions end to end: the real daemon (`fimwatch run`, real
inotify) against a dpkg database laid out in a temp dir, the lock held by a
real second process named like apt-get.

fimwatch's dpkg paths are module constants; the daemon is started through a
small wrapper interpreter (fim.daemon(python=...)) that points them, and
PACKAGE_PREFIXES, at the temp dirs and then runs fimwatch.main, so the real
/var/lib/dpkg is never read.
"""

import hashlib
import os
import sys
import time

import pytest

import fimwatch

from conftest import REPO, hold_lock, is_event

WRAPPER = '''import os, re, sys
sys.path.insert(0, %(repo)r)
import fimwatch
d, root = os.environ["FIMTEST_DPKG"], os.environ["FIMTEST_ROOT"]
fimwatch.DPKG_INFO, fimwatch.DPKG_STATUS = d + "/info", d + "/status"
fimwatch.DPKG_LOCK = d + "/lock"
fimwatch.RPMDB = os.environ.get("FIMTEST_RPMDB", d + "/no-rpmdb")
fimwatch.PACKAGE_PREFIXES = (root + "/",)
fimwatch.SCRIPT_PREFIXES = (root + "/etc/",)
fimwatch.GENERATED.append((re.compile(re.escape(root) + "/etc/ld.so.cache"), "ldconfig"))
sys.exit(fimwatch.main(sys.argv[2:]))
'''


def md5(data):
    return hashlib.md5(data).hexdigest()


class FakeDpkg:
    def __init__(self, base, root):
        self.dir = base / "dpkg"
        self.info = self.dir / "info"
        self.info.mkdir(parents=True)
        self.root = root
        self.versions = {}
        (self.dir / "lock").write_bytes(b"")
        (self.dir / "lock-frontend").write_bytes(b"")
        self.write_status()

    def rel(self, path):
        return str(path).lstrip("/")

    def ship(self, pkg, version, files, dirs=()):
        """Package pkg at version ships files {path: bytes} (written too)."""
        for d in dirs:
            os.makedirs(d, exist_ok=True)
        lines = []
        for path, data in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            lines.append("%s  %s\n" % (md5(data), self.rel(path)))
        (self.info / (pkg + ".md5sums")).write_text("".join(lines))
        (self.info / (pkg + ".list")).write_text(
            "".join("%s\n" % p for p in list(dirs) + list(files)))
        self.versions[pkg] = version
        self.write_status()

    def write_status(self):
        tmp = self.dir / "status-new"
        tmp.write_text("".join("Package: %s\nStatus: install ok installed\nVersion: %s\n\n"
                               % kv for kv in sorted(self.versions.items())))
        os.replace(tmp, self.dir / "status")

    def hold(self, tmp_path, name="apt-get", env=None):
        p = hold_lock(self.dir / "lock-frontend", tmp_path, name, env)
        time.sleep(0.5)                 # the daemon looks at the lock at once (inotify)
        return p


@pytest.fixture
def pkgd(fim, tmp_path):
    return _package_daemon(fim, tmp_path)


@pytest.fixture
def pkgd_db(fim, tmp_path):
    """pkgd, with dpkg's own directory watched too (as /var/lib/dpkg can be)."""
    return _package_daemon(fim, tmp_path, watch_db=True)


@pytest.fixture
def pkgd_www(fim, tmp_path):
    """pkgd, with a path outside the package prefixes watched that does not
    exist yet (as /var/www on a server before its web server is installed)."""
    # inotify: the maintainer script's writes are the test's own, which
    # fanotify would name as no child of the transaction (see below).
    return _package_daemon(fim, tmp_path, extra=fim.outside / "www", backend="inotify")


def _package_daemon(fim, tmp_path, watch_db=False, extra=None, backend=None):
    wrapper = tmp_path / "python-wrapper"
    wrapper.write_text("#!/bin/sh\nexec %s %s \"$@\"\n" % (sys.executable, tmp_path / "wrap.py"))
    (tmp_path / "wrap.py").write_text(WRAPPER % {"repo": str(REPO)})
    os.chmod(wrapper, 0o755)
    dpkg = FakeDpkg(tmp_path, fim.root)
    (fim.root / "usr" / "bin").mkdir(parents=True)
    (fim.root / "etc").mkdir()
    tool = fim.root / "usr" / "bin" / "tool"
    dpkg.ship("tool", "1.0-1", {tool: b"tool 1\n"})
    (fim.root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    fim.write_config(severity={"critical": "%s/usr/bin/** %s/etc/passwd" % (fim.root, fim.root)},
                     fimwatch={"diff_paths": "%s/etc/**" % fim.root, "package_check": "yes"},
                     watch=dict({"paths": " ".join(str(p) for p in (
                         fim.root, dpkg.dir if watch_db else None, extra) if p)},
                         **({"backend": backend} if backend else {})))
    env = {"FIMTEST_DPKG": str(dpkg.dir), "FIMTEST_ROOT": str(fim.root)}
    d = fim.daemon(python=str(wrapper), env=env)
    return d, dpkg, tool


def _per_file(evs):
    return [e for e in evs if e["event"] in ("created", "modified", "attributes", "deleted",
                                             "moved")]


def test_upgrade_install_and_scripts_make_one_quiet_digest(pkgd, fim, tmp_path):
    d, dpkg, tool = pkgd
    mark = d.mark()
    holder = dpkg.hold(tmp_path, env={"SUDO_USER": "alice"})
    try:
        dpkg.ship("tool", "1.1-1", {tool: b"tool 2\n"})                        # upgrade
        lib = fim.root / "usr" / "lib" / "libnew"
        dpkg.ship("libnew", "3.0", {lib / "libnew.so": b"\x7fELF new\n"},
                   dirs=[lib.parent, lib])       # dpkg lists the parents too
        (fim.root / "etc" / "ld.so.cache").write_bytes(b"cache\n")           # trigger
        with open(fim.root / "etc" / "passwd", "a") as f:                   # adduser
            f.write("_newd:x:101:101::/nonexistent:/usr/sbin/nologin\n")
        time.sleep(0.5)
        assert not _per_file(d.events(mark)), "held while the transaction runs"
    finally:
        holder.kill()
        holder.wait()
    dig = d.wait_for(is_event("transaction"), since=mark, timeout=15)
    # notice, not info: a maintainer script changed a critical path (listed,
    # by user name; notice reaches syslog and the events file, never a page)
    assert dig["severity"] == "notice", (dig["mismatches"], dig["message"])
    assert dig["process"]["frontend"] == "apt-get"
    assert dig["process"]["user"] == "alice"
    assert dig["process"]["pid"] == holder.pid
    assert dig["packages"] == {"installed": ["libnew 3.0"], "upgraded": ["tool 1.0-1 -> 1.1-1"]}
    assert dig["verified"] == {"libnew": 3, "tool": 1}      # usr/lib, libnew/, libnew.so
    assert dig["generated"] == [{"path": "%s/etc/ld.so.cache" % fim.root, "by": "ldconfig"}]
    assert dig["scripts"] == [{"path": "%s/etc/passwd" % fim.root, "event": "modified",
                               "added": ["_newd"]}]
    assert dig["files"]["mismatches"] == 0
    # which proof: no .deb in an apt archive here, so md5 (tool, libnew.so;
    # the two directories are listed, not hashed)
    assert (dig["files"]["md5"], dig["files"]["sha256"]) == (2, 0), dig["files"]
    assert dig["message"].startswith("apt-get (by alice via sudo) installed 1 package and "
                                     "upgraded 1 package: 4 files verified, 1 generated, "
                                     "1 by maintainer scripts, 0 mismatches"), dig["message"]
    time.sleep(0.3)
    assert not _per_file(d.events(mark)), "no per-file event for a verified transaction"


def test_trojan_during_a_transaction_is_critical(pkgd, fim, tmp_path):
    d, dpkg, tool = pkgd
    mark = d.mark()
    holder = dpkg.hold(tmp_path)
    try:
        dpkg.ship("tool", "1.1-1", {tool: b"tool 2\n"})
        tool.write_bytes(b"tool 2 with a backdoor\n")           # not what tool ships
        (fim.root / "usr" / "bin" / "evil").write_bytes(b"evil\n")   # no package's
    finally:
        holder.kill()
        holder.wait()
    dig = d.wait_for(is_event("transaction"), since=mark, timeout=15)
    assert dig["severity"] == "critical"
    assert sorted(m["path"] for m in dig["mismatches"]) == [
        "%s/usr/bin/evil" % fim.root, str(tool)]
    time.sleep(0.5)
    per = {e["path"]: e for e in _per_file(d.events(mark))}
    assert per[str(tool)]["severity"] == "critical"
    assert per[str(tool)]["package"]["verified"] is False
    assert per[str(tool)]["package"]["transaction"] == dig["transaction"]
    assert "does not match package tool" in per[str(tool)]["message"]
    evil = per["%s/usr/bin/evil" % fim.root]
    assert evil["severity"] == "critical" and "matches no package" in evil["message"]


def test_package_content_put_back_outside_a_transaction_still_alerts(pkgd, fim):
    d, dpkg, tool = pkgd
    mark = d.mark()
    tool.write_bytes(b"tool 1\n".replace(b"1", b"1"))   # same bytes: not an event
    tool.write_bytes(b"trojan\n")
    d.wait_for(is_event("modified", path=str(tool)), since=mark)
    mark = d.mark()
    tool.write_bytes(b"tool 1\n")                       # what the package ships
    ev = d.wait_for(is_event("modified", path=str(tool)), since=mark)
    assert ev["severity"] == "critical"
    assert ev["package"] == {"name": "tool", "manager": "dpkg", "verified": True,
                             "digest": "md5", "transaction": "none"}
    assert not d.matching(is_event("transaction"), since=mark)


def test_dpkg_records_held_in_a_transaction_critical_outside(pkgd_db, fim, tmp_path):
    """dpkg's records (status, info/*) change in every transaction: held and
    counted in its digest. Edited while no package manager runs (an md5sums
    line made to match a trojan, status rewritten) they are critical; the
    rest of dpkg's directory keeps the path's level."""
    d, dpkg, tool = pkgd_db
    mark = d.mark()
    holder = dpkg.hold(tmp_path)
    try:
        dpkg.ship("tool", "1.1-1", {tool: b"tool 2\n"})      # md5sums, list, status
    finally:
        holder.kill()
        holder.wait()
    dig = d.wait_for(is_event("transaction"), since=mark, timeout=15)
    assert dig["severity"] == "info" and dig["files"]["records"] >= 2, dig["files"]
    assert dig["message"].endswith(" dpkg records, 0 mismatches"), dig["message"]
    time.sleep(0.3)
    assert not _per_file(d.events(mark)), "a transaction's records are in its digest"

    time.sleep(fimwatch.TX_RECORD_GRACE)     # dpkg's last writes are not edits by hand
    mark = d.mark()
    md5sums = dpkg.info / "tool.md5sums"
    md5sums.write_text("%s  %s\n" % (md5(b"trojan\n"), dpkg.rel(tool)))
    ev = d.wait_for(is_event("modified", path=str(md5sums)), since=mark)
    assert ev["severity"] == "critical", ev
    assert ev["summary"] == "dpkg database edited outside a package transaction: " \
        "info/tool.md5sums", ev
    assert ev["package"] == {"name": "tool", "manager": "dpkg", "verified": False,
                             "transaction": "none"}
    with open(dpkg.dir / "status", "a") as f:
        f.write("\n")
    ev = d.wait_for(is_event("modified", path=str(dpkg.dir / "status")), since=mark)
    assert ev["severity"] == "critical" and ev["summary"].startswith("dpkg database edited "), ev
    (dpkg.dir / "available").write_text("Package: x\n")      # not a record
    ev = d.wait_for(is_event("created", path=str(dpkg.dir / "available")), since=mark)
    assert ev["severity"] == "warning" and "summary" not in ev, ev


def test_a_watched_path_a_maintainer_script_makes_is_in_the_digest(pkgd_www, fim, tmp_path):
    """nginx's postinst makes /var/www/html (a watched path that did not
    exist) and copies its index.html there: looked at when the transaction
    ends, the directories and the copy of a file its packages ship are
    listed in its digest as the maintainer scripts'; a file of other content
    made there meanwhile is reported on its own, as it would be without it."""
    d, dpkg, tool = pkgd_www
    www = fim.outside / "www"
    page, shipped = b"<h1>welcome</h1>\n", fim.root / "usr" / "share" / "web" / "index.html"
    mark = d.mark()
    holder = dpkg.hold(tmp_path)
    try:
        dpkg.ship("web", "1.0", {shipped: page}, dirs=[shipped.parent.parent, shipped.parent])
        (www / "html").mkdir(parents=True)
        (www / "html" / "index.html").write_bytes(page)
        (www / "html" / "shell.php").write_bytes(b"<?php system($_GET['c']);\n")
        time.sleep(fimwatch.ROOT_RETRY_EVERY + 0.5)     # looked for while it runs
        assert not _per_file(d.events(mark)), "held while the transaction runs"
    finally:
        holder.kill()
        holder.wait()
    dig = d.wait_for(is_event("transaction"), since=mark, timeout=15)
    assert {s["path"]: s.get("copy_of") for s in dig["scripts"]} == {
        str(www): None, str(www / "html"): None,
        str(www / "html" / "index.html"): "%s (web)" % shipped}, dig["scripts"]
    assert dig["severity"] == "info" and dig["files"]["mismatches"] == 0, dig["message"]
    ev = d.wait_for(is_event("created", path=str(www / "html" / "shell.php")), since=mark)
    assert ev["severity"] == "warning" and "package" not in ev, ev
    time.sleep(0.3)
    assert [e["path"] for e in _per_file(d.events(mark))] == [str(www / "html" / "shell.php")]


def test_a_writer_that_is_no_child_of_the_transaction_is_not_held(fim, tmp_path):
    """fanotify names the writer: a file dropped outside the package prefixes
    while apt runs, by a live process that is not apt's child (a web
    server's worker), is reported while the transaction still runs, with its
    writer, not held until it ends (which can take many minutes)."""
    www = fim.outside / "www"
    www.mkdir()
    d, dpkg, tool = _package_daemon(fim, tmp_path, extra=www, backend="fanotify")
    mark = d.mark()
    holder = dpkg.hold(tmp_path)
    try:
        shell = www / "shell.php"
        shell.write_bytes(b"<?php system($_GET['c']);\n")
        ev = d.wait_for(is_event("created", path=str(shell)), since=mark, timeout=10)
        assert ev["process"]["pid"] == os.getpid(), ev
        assert holder.poll() is None, "reported only after the transaction ended"
    finally:
        holder.kill()
        holder.wait()
