#!/usr/bin/env python3
"""The package index's cost (issue 12 target: 1,000 packages load in
<= 0.5 s and <= 15 MiB extra RSS).

    python3 bench/pkg_index.py [--packages 1000] [--files 100] [--real]
    python3 bench/pkg_index.py --rpm [--packages 1000] [--files 100] [--keep DIR] [--real]

Builds a dpkg database in a temp dir (md5sums, .list with the parent
directories, a status with a few conffiles per package), loads
fimwatch.PackageDB over it in a fresh process and prints the load time and
the RSS it added (VmRSS after the load minus before, after gc; median of 3
fresh processes). --real measures the host's /var/lib/dpkg instead
(read only).

--rpm: the same for fimwatch.RpmDB over a real rpmdb.sqlite: one spec with
PACKAGES subpackages of FILES files (in FILES/10 owned directories) and a
%config file each, built by the real rpmbuild (uncompressed payload) and
installed with `rpm --dbpath DIR -i --justdb` (Debian package `rpm`; the
build takes ~2.5 min for 1,000 x 100 on 2 cores). --keep DIR keeps the
database there and reuses it on the next run. --rpm --real measures the
host's /var/lib/rpm/rpmdb.sqlite."""

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

CHILD = r"""
import gc, os, sys, time
sys.path.insert(0, sys.argv[1])
import fimwatch
def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
if sys.argv[2] == "--rpm":
    db = fimwatch.RpmDB(sys.argv[3])
else:
    db = fimwatch.PackageDB(info_dir=sys.argv[2], lock=sys.argv[3], status=sys.argv[4])
gc.collect()
r0, t0 = rss(), time.perf_counter()
assert db.load()
t1 = time.perf_counter()
gc.collect()
r1 = rss()
probe = sys.argv[-1]
assert db.lookup(probe) is not None, probe
print(t1 - t0, r1 - r0, len(db.index))
"""


def build(base, packages, files):
    info = os.path.join(base, "info")
    os.makedirs(info)
    status = []
    probe = None
    for p in range(packages):
        name = "pkg%04d" % p
        dirs = ["usr/share/%s/d%02d" % (name, d) for d in range(max(1, files // 10))]
        md5s, lst = [], ["/usr", "/usr/share", "/usr/share/" + name]
        lst += ["/" + d for d in dirs]
        for f in range(files):
            rel = "%s/file-%03d.dat" % (dirs[f % len(dirs)], f)
            md5s.append("%s  %s\n" % (hashlib.md5(rel.encode()).hexdigest(), rel))
            lst.append("/" + rel)
            probe = "/" + rel
        with open(os.path.join(info, name + ".md5sums"), "w") as fh:
            fh.writelines(md5s)
        with open(os.path.join(info, name + ".list"), "w") as fh:
            fh.write("\n".join(lst) + "\n")
        status.append("Package: %s\nStatus: install ok installed\nVersion: 1.%d\n"
                      "Conffiles:\n /etc/%s/a.conf %s\n /etc/%s/b.conf %s\n"
                      % (name, p, name, "a" * 32, name, "b" * 32))
    with open(os.path.join(base, "status"), "w") as fh:
        fh.write("\n".join(status))
    open(os.path.join(base, "lock"), "w").close()
    return info, os.path.join(base, "lock"), os.path.join(base, "status"), probe


RPM_SPEC_HEAD = """Name: pkgbase
Version: 1
Release: 1
Summary: fimwatch bench
License: MIT
BuildArch: noarch
%description
fimwatch bench
%install
cp -a STAGE/. %{buildroot}/
%files
"""


def build_rpmdb(base, packages, files):
    """A real rpmdb.sqlite under base/db (see --rpm); returns its path and a
    packaged path to look up."""
    db = os.path.join(base, "db")
    if os.path.isfile(os.path.join(db, "rpmdb.sqlite")):
        with open(os.path.join(base, "probe")) as fh:
            return os.path.join(db, "rpmdb.sqlite"), fh.read()
    top, stage = os.path.join(base, "top"), os.path.join(base, "stage")
    spec = [RPM_SPEC_HEAD.replace("STAGE", stage)]
    for p in range(packages):
        name = "pkg%04d" % p
        dirs = ["/usr/share/%s/d%02d" % (name, d) for d in range(max(1, files // 10))]
        spec.append("%%package -n %s\nSummary: b\nVersion: 1.%d\n%%description -n %s\nb\n"
                    "%%files -n %s\n%%dir /usr/share/%s\n%%config(noreplace) /etc/%s.conf\n"
                    % (name, p, name, name, name, name))
        os.makedirs(stage + "/etc", exist_ok=True)
        with open("%s/etc/%s.conf" % (stage, name), "w") as fh:
            fh.write("a = 1\n")
        for d in dirs:
            os.makedirs(stage + d)
            spec.append("%%dir %s\n" % d)
        for f in range(files):
            probe = "%s/file-%03d.dat" % (dirs[f % len(dirs)], f)
            with open(stage + probe, "w") as fh:
                fh.write(probe)
            spec.append(probe + "\n")
    os.makedirs(top)
    with open(os.path.join(top, "bench.spec"), "w") as fh:
        fh.write("".join(spec))
    subprocess.run(["rpmbuild", "--define", "_topdir " + top, "--define", "_build_id_links none",
                    "--define", "_binary_payload w0.gzdio", "--define", "__os_install_post %{nil}",
                    "-bb", os.path.join(top, "bench.spec")], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rpms = os.path.join(top, "RPMS", "noarch")
    os.makedirs(db)
    subprocess.run(["rpm", "--dbpath", db, "-i", "--nodeps", "--justdb", "--noscripts"]
                   + [os.path.join(rpms, n) for n in sorted(os.listdir(rpms))
                      if n.startswith("pkg")], check=True, stderr=subprocess.DEVNULL)
    shutil.rmtree(top)
    shutil.rmtree(stage)
    with open(os.path.join(base, "probe"), "w") as fh:
        fh.write(probe)
    return os.path.join(db, "rpmdb.sqlite"), probe


def measure_rpm(a):
    if a.real:
        db = "/var/lib/rpm/rpmdb.sqlite"
        probe = "/usr/bin/rpm"
        label = "host %s" % db
    else:
        label = "rpmdb.sqlite, %d packages x %d files" % (a.packages, a.files)
        if a.keep:
            os.makedirs(a.keep, exist_ok=True)
            db, probe = build_rpmdb(a.keep, a.packages, a.files)
        else:
            with tempfile.TemporaryDirectory() as base:
                db, probe = build_rpmdb(base, a.packages, a.files)
                return label, measure(["--rpm", db, probe])
    return label, measure(["--rpm", db, probe])


def measure(args_list, reps=3):
    out = []
    for _ in range(reps):
        r = subprocess.run([sys.executable, "-c", CHILD, REPO] + args_list,
                           capture_output=True, text=True, check=True)
        t, d, n = r.stdout.split()
        out.append((float(t), int(d), int(n)))
    return (statistics.median(o[0] for o in out), statistics.median(o[1] for o in out),
            out[0][2])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--packages", type=int, default=1000)
    ap.add_argument("--files", type=int, default=100)
    ap.add_argument("--real", action="store_true",
                    help="the host's /var/lib/dpkg (with --rpm: /var/lib/rpm)")
    ap.add_argument("--rpm", action="store_true", help="rpm's sqlite rpmdb (real rpm tool)")
    ap.add_argument("--keep", help="--rpm: build the rpmdb in this directory, or reuse it")
    a = ap.parse_args()
    if a.rpm:
        label, (t, d, n) = measure_rpm(a)
    elif a.real:
        with open("/var/lib/dpkg/info/dpkg.list") as fh:
            probe = fh.read().split()[-1]
        label = "host /var/lib/dpkg (%d .list files)" % sum(
            1 for f in os.listdir("/var/lib/dpkg/info") if f.endswith(".list"))
        t, d, n = measure(["/var/lib/dpkg/info", "/var/lib/dpkg/lock", "/var/lib/dpkg/status",
                           probe])
    else:
        with tempfile.TemporaryDirectory() as base:
            paths = build(base, a.packages, a.files)
            label = "%d packages x %d files" % (a.packages, a.files)
            t, d, n = measure(list(paths))
    print("%s: %d paths, load %.3f s, +%.1f MiB RSS (target <= 0.5 s, <= 15 MiB for 1,000 "
          "packages)" % (label, n, t, d / 2 ** 20))


if __name__ == "__main__":
    main()
