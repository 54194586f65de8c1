#!/usr/bin/env python3
"""CPU of the daemon while another process writes 1,000 files/s on the same
filesystem but outside the watched tree, inotify vs fanotify (a filesystem
mark sees those writes too). Run as root from a checkout with .venv:

    sudo python3 bench/backend_noise.py [--base /tmp/fw-noise] [--seconds 10]
        [--op write|chmod]

--op chmod changes the mode of the files instead (chmod 644/600 in turn):
each such record outside the trees costs fanotify's set-id check a lstat and
a getxattr (a set-id file anywhere on the filesystem is reported).
"""

import argparse
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = os.path.join(REPO, ".venv", "bin", "python")
CONF = """[fimwatch]
state_dir = {base}/state
hostname = bench
settle = 100ms
scan_interval = 0
[watch]
paths = {base}/tree
backend = {backend}
[syslog]
enabled = no
[log]
events_file = {base}/ev.jsonl
"""


def cpu_seconds(pid):
    f = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def start(base, backend):
    shutil.rmtree(base, ignore_errors=True)
    for d in ("tree", "out"):
        os.makedirs(os.path.join(base, d))
    os.makedirs(os.path.join(base, "etc"), mode=0o700)
    conf = os.path.join(base, "etc", "c.conf")
    with open(conf, "w") as f:
        f.write(CONF.format(base=base, backend=backend))
    os.chmod(conf, 0o600)
    p = subprocess.Popen([PYTHON if os.path.exists(PYTHON) else sys.executable,
                          os.path.join(REPO, "fimwatch.py"), "--config", conf, "run"],
                         stderr=subprocess.DEVNULL)
    evs = os.path.join(base, "ev.jsonl")
    while not (os.path.exists(evs) and "started" in open(evs).read()):
        time.sleep(0.05)
    time.sleep(1)
    return p


def run(base, backend, seconds, rate=1000, op="write"):
    """-> (operations done, seconds taken, daemon CPU seconds); prints them."""
    p = start(os.path.join(base, backend), backend)
    out = os.path.join(base, backend, "out")
    c0, t0, n = cpu_seconds(p.pid), time.time(), 0
    while time.time() - t0 < seconds:
        for _ in range(rate // 10):
            name = "%s/f%d" % (out, n % 500)
            if op == "chmod" and n >= 500:
                os.chmod(name, 0o644 if n % 2 else 0o600)
            else:
                with open(name, "w") as f:
                    f.write("x")
            n += 1
        time.sleep(max(0.0, t0 + n / rate - time.time()))
    dt, used = time.time() - t0, cpu_seconds(p.pid) - c0
    p.terminate()
    p.wait()
    print("%-8s %d %ss outside the tree in %.1fs (%.0f/s): daemon CPU %.2fs = %.1f%% "
          "of a core" % (backend, n, op, dt, n / dt, used, 100 * used / dt))
    return n, dt, used


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="/tmp/fw-noise")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--op", choices=("write", "chmod"), default="write")
    a = ap.parse_args()
    for backend in ("inotify", "fanotify"):
        run(a.base, backend, a.seconds, op=a.op)


if __name__ == "__main__":
    main()
