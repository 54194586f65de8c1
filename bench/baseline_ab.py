#!/usr/bin/env python3
"""A/B cost of a change to what fimwatch records per file: the first baseline
of a tree (default /usr) and a `scan --quick` of it, old commit vs checkout,
alternating run by run in one invocation.

    sudo .venv/bin/python bench/baseline_ab.py [--old REV] [--path /usr] [--reps 3]

Each run: `run` on an empty state_dir until its `started` event (the first
baseline is built before `started`), VmHWM read then, SIGTERM; then
`scan --quick --no-alert` on that baseline (the re-verify path: nothing
changed, so every file's hash and metadata come from the baseline). The page
cache is warmed once first. Needs root (fimwatch refuses a config not owned
by root) and inotify_simple in the interpreter that runs this script.
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def vmhwm(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return None


def one(script, path, work):
    state = tempfile.mkdtemp(dir=work)
    events = os.path.join(state, "events.jsonl")
    conf = os.path.join(state, "fimwatch.conf")
    with open(conf, "w") as f:
        f.write("[fimwatch]\nstate_dir = %s\nhostname = bench\n[watch]\npaths = %s\n"
                "[syslog]\nenabled = no\n[log]\nevents_file = %s\n" % (state, path, events))
    os.chmod(conf, 0o600)
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, script, "--config", conf, "run"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        if os.path.exists(events) and '"started"' in open(events).read():
            break
        if p.poll() is not None:
            raise SystemExit("%s exited %s" % (script, p.returncode))
        time.sleep(0.02)
    build = time.monotonic() - t0
    hwm = vmhwm(p.pid)
    p.send_signal(signal.SIGTERM)
    p.wait()
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, script, "--config", conf, "scan", "--quick",
                        "--no-alert"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True)
    quick = time.monotonic() - t0
    if r.returncode not in (0, 1):
        raise SystemExit("scan failed: %s" % r.stderr)
    shutil.rmtree(state)
    return build, hwm, quick


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", default="HEAD~1", help="git revision of the 'before' fimwatch.py")
    ap.add_argument("--path", default="/usr")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workdir", default="/var/tmp")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="fimwatch-ab-", dir=a.workdir)
    try:
        old = os.path.join(work, "fimwatch_old.py")
        with open(old, "wb") as f:
            f.write(subprocess.run(["git", "-C", REPO, "show", a.old + ":fimwatch.py"],
                                   check=True, stdout=subprocess.PIPE).stdout)
        scripts = {"old " + a.old: old, "new (checkout)": os.path.join(REPO, "fimwatch.py")}
        subprocess.run("find %s -type f -print0 | xargs -0 -P2 cat >/dev/null 2>&1" % a.path,
                       shell=True)
        res = {k: [] for k in scripts}
        for rep in range(a.reps):
            for name, script in scripts.items():
                b, h, q = one(script, a.path, work)
                res[name].append((b, h, q))
                print("rep %d %-16s first baseline %.2f s  VmHWM %d KiB  scan --quick %.2f s"
                      % (rep + 1, name, b, h, q), flush=True)
        print()
        print("| %s | first baseline (median, s) | VmHWM (median, MiB) | scan --quick (median, s) |"
              % a.path)
        print("|---|---|---|---|")
        for name, rows in res.items():
            print("| %s | %.2f | %.1f | %.2f |" % (
                name, statistics.median(r[0] for r in rows),
                statistics.median(r[1] for r in rows) / 1024,
                statistics.median(r[2] for r in rows)))
        print(json.dumps(res))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
