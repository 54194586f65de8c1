#!/usr/bin/env python3
"""Attribution rate of the fanotify backend for short-lived writers: N quick
writes each by sh (`sh -c 'echo x >> f'`), cp, sed -i, python and dpkg
(`dpkg --root=BASE -i` of a one-file package built for that file, into a
private package database), each a new process that exits at once, each to its
own file (in the baseline). Counts
the events whose `process.exe` is the right binary, and the confidence
(live: /proc read in time; cached: the exec cache or an earlier record;
none: pid only). Run as root from a checkout with .venv:

    sudo python3 bench/attribution.py [--n 200] [--base /tmp/fw-attr] [--fimwatch PATH]

--fimwatch runs another copy of fimwatch.py (e.g. an older one, to compare).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from backend_noise import CONF, PYTHON, REPO  # noqa: E402

def dpkg_argv(f):
    """`dpkg -i` of a one-file package that installs f (BASE/tree/NAME): a
    real dpkg process writing the watched file (unpacked as NAME.dpkg-new,
    renamed over NAME). It installs into a private --root=BASE with its own
    empty package database, so the host's dpkg database is not touched."""
    base, name = os.path.dirname(os.path.dirname(f)), os.path.basename(f)
    admin = os.path.join(base, "var", "lib", "dpkg")
    for d in ("updates", "info"):
        os.makedirs(os.path.join(admin, d), exist_ok=True)
    open(os.path.join(admin, "status"), "a").close()
    pkg = os.path.join(base, "pkg", name)
    os.makedirs(os.path.join(pkg, "DEBIAN"), exist_ok=True)
    os.makedirs(os.path.join(pkg, "tree"), exist_ok=True)
    with open(os.path.join(pkg, "DEBIAN", "control"), "w") as c:
        c.write("Package: fwattr-%s\nVersion: 1\nArchitecture: all\nMaintainer: fimwatch "
                "bench <root@localhost>\nDescription: bench/attribution.py\n" % name)
    with open(os.path.join(pkg, "tree", name), "w") as c:
        c.write("dpkg\n")
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Znone", "--build", pkg, pkg + ".deb"],
                   check=True, stdout=subprocess.DEVNULL)
    return ["dpkg", "--root=" + base, "-i", pkg + ".deb"]


WRITERS = {
    # name: (argv for file F, the exe expected)
    "sh": (lambda f: ["sh", "-c", "echo x >> %s" % f], "/bin/sh"),
    "cp": (lambda f: ["cp", "/etc/hostname", f], "/bin/cp"),
    "sed -i": (lambda f: ["sed", "-i", "s/a/b/", f], "/bin/sed"),
    "python": (lambda f: [sys.executable, "-c", "import sys; open(sys.argv[1], 'a').write('x')",
                          f], sys.executable),
    "dpkg": (dpkg_argv, "/usr/bin/dpkg"),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--base", default="/tmp/fw-attr")
    ap.add_argument("--fimwatch", default=os.path.join(REPO, "fimwatch.py"))
    a = ap.parse_args()
    base = a.base
    shutil.rmtree(base, ignore_errors=True)
    tree = os.path.join(base, "tree")
    os.makedirs(tree)
    os.makedirs(os.path.join(base, "etc"), mode=0o700)
    for w in range(len(WRITERS)):
        for i in range(a.n):
            with open(os.path.join(tree, "w%d-%d" % (w, i)), "w") as f:
                f.write("a\n")
    conf = os.path.join(base, "etc", "c.conf")
    with open(conf, "w") as f:
        f.write(CONF.format(base=base, backend="fanotify"))
    os.chmod(conf, 0o600)
    evs = os.path.join(base, "ev.jsonl")
    p = subprocess.Popen([PYTHON if os.path.exists(PYTHON) else sys.executable,
                          a.fimwatch, "--config", conf, "run"], stderr=subprocess.DEVNULL)
    try:
        while not (os.path.exists(evs) and "started" in open(evs).read()):
            time.sleep(0.05)
        time.sleep(0.5)
        t0 = time.monotonic()
        for w, (argv, _) in enumerate(WRITERS.values()):
            for i in range(a.n):
                subprocess.run(argv(os.path.join(tree, "w%d-%d" % (w, i))), check=True,
                               stdout=subprocess.DEVNULL)
        took = time.monotonic() - t0
        want = len(WRITERS) * a.n
        deadline = time.monotonic() + 60
        while True:
            events = [json.loads(line) for line in open(evs)]
            seen = {e["path"]: e for e in events if e.get("event") == "modified"}
            if len(seen) >= want or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        p.terminate()
        p.wait()
    print("%d writes by %d kinds of process in %.1f s; fimwatch: %s"
          % (want, len(WRITERS), took, a.fimwatch))
    print("%-8s %6s %9s %6s %7s %5s %s" % ("writer", "events", "right exe", "rate",
                                           "cached", "none", "wrong (first)"))
    for w, (name, (_, exe)) in enumerate(WRITERS.items()):
        exe = os.path.realpath(exe)
        mine = [seen[p] for p in seen if os.path.basename(p).startswith("w%d-" % w)]
        procs = [e.get("process") or {} for e in mine]
        right = sum(1 for pr in procs if pr.get("exe") == exe)
        wrong = [pr.get("exe") for pr in procs if pr.get("exe") != exe]
        print("%-8s %6d %9d %5.1f%% %7d %5d %s" % (
            name, len(mine), right, 100.0 * right / a.n,
            sum(1 for pr in procs if pr.get("confidence") == "cached"),
            sum(1 for pr in procs if pr.get("confidence") == "none"),
            wrong[:1]))
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
