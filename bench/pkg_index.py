#!/usr/bin/env python3
"""The package index's cost (issue 12 target: 1,000 packages load in
<= 0.5 s and <= 15 MiB extra RSS).

    python3 bench/pkg_index.py [--packages 1000] [--files 100] [--real]

Builds a dpkg database in a temp dir (md5sums, .list with the parent
directories, a status with a few conffiles per package), loads
fimwatch.PackageDB over it in a fresh process and prints the load time and
the RSS it added (VmRSS after the load minus before, after gc; median of 3
fresh processes). --real measures the host's /var/lib/dpkg instead
(read only)."""

import argparse
import hashlib
import os
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
db = fimwatch.PackageDB(info_dir=sys.argv[2], lock=sys.argv[3], status=sys.argv[4])
gc.collect()
r0, t0 = rss(), time.perf_counter()
assert db.load()
t1 = time.perf_counter()
gc.collect()
r1 = rss()
probe = sys.argv[5]
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
    ap.add_argument("--real", action="store_true", help="the host's /var/lib/dpkg")
    a = ap.parse_args()
    if a.real:
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
