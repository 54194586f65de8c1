#!/usr/bin/env python3
"""Where fimwatch's peak RSS goes: one daemon over one tree, first start
(builds the baseline) and restart (start-up comparison), VmHWM read once the
start-up work has ended (as bench.py's memory benchmark does).

    sudo python3 bench/memprobe.py TREE [--fimwatch fimwatch.py] [--trace]
        [--backend inotify|fanotify] [--keep-state DIR] [--env NAME=VALUE]

Runs the installed layout (module byte-compiled, a launcher imports it), so
the figures are the ones bench.py measures. --trace starts tracemalloc in
the launcher and prints the lines holding the most at the traced peak (its
own overhead inflates VmHWM then: use it for where, not how much). Also
prints /proc/PID/smaps_rollup's split and the empty-watch floor (a tree of
one directory) unless --no-floor. Not part of the test run.
"""

import argparse
import json
import os
import py_compile
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

TRACE = r'''
import tracemalloc, threading, atexit, signal as _sig
tracemalloc.start(1)
_best = [0, None]
def _watch():
    while True:
        cur, peak = tracemalloc.get_traced_memory()
        if cur > _best[0] + (1 << 20):
            _best[0], _best[1] = cur, tracemalloc.take_snapshot()
        time.sleep(0.2)
import time
threading.Thread(target=_watch, daemon=True).start()
def _dump():
    snap = _best[1]
    with open(%(out)r, "w") as f:
        f.write("traced peak %%.1f MiB (snapshot at %%.1f MiB)\n"
                %% (tracemalloc.get_traced_memory()[1] / 2**20, _best[0] / 2**20))
        if snap is None:
            return
        for st in snap.statistics("lineno")[:40]:
            f.write("%%8.1f KiB %%8d  %%s\n" %% (st.size / 1024, st.count, st.traceback[0]))
atexit.register(_dump)
'''


def status(pid, key):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def cpu_ms(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            parts = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(parts[11]) + int(parts[12])) * 1000 // os.sysconf("SC_CLK_TCK")


def rollup(pid):
    out = {}
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                k, _, v = line.partition(":")
                if v.strip().endswith("kB"):
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def wait_quiet(pid, quiet=1.0, limit=900):
    last, t_prev = cpu_ms(pid), time.monotonic()
    last_busy = t_prev
    while time.monotonic() - t_prev < limit:
        time.sleep(0.1)
        cpu, now = cpu_ms(pid), time.monotonic()
        if cpu is None:
            return
        if cpu - last >= 0.1 * (now - t_prev) * 1000:
            last_busy = now
        last, t_prev = cpu, now
        if now - last_busy >= quiet:
            return


def layout(base, script, prelude=""):
    lib = os.path.join(base, "lib")
    os.makedirs(lib, exist_ok=True)
    shutil.copy(script, os.path.join(lib, "fimwatch.py"))
    py_compile.compile(os.path.join(lib, "fimwatch.py"), doraise=True)
    launcher = os.path.join(base, "fimwatch-launch")
    with open(launcher, "w") as f:
        f.write("import sys, time\nsys.path.insert(0, %r)\n%simport fimwatch\n"
                "sys.exit(fimwatch.main())\n" % (lib, prelude))
    return launcher


def run_once(args, base, launcher, tree, state, label, env):
    conf = os.path.join(base, "fimwatch-%s.conf" % label)
    events = os.path.join(base, "events-%s.json" % label)
    with open(conf, "w") as f:
        f.write("[fimwatch]\nstate_dir = %s\nhostname = bench\nsettle = 100ms\n\n"
                "[watch]\npaths = %s\n%s\n[syslog]\nenabled = no\n\n[log]\nevents_file = %s\n"
                % (state, tree, "backend = %s\n" % args.backend if args.backend else "", events))
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, launcher, "--config", conf, "run"],
                            stderr=subprocess.PIPE, env=env)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit("fimwatch exited: %s" % proc.stderr.read().decode()[-2000:])
            try:
                with open(events, "rb") as f:
                    if b'"started"' in f.read():
                        break
            except FileNotFoundError:
                pass
            time.sleep(0.05)
        ready = time.monotonic() - t0
        wait_quiet(proc.pid)
        done = time.monotonic() - t0
        hwm, rss = status(proc.pid, "VmHWM"), status(proc.pid, "VmRSS")
        cpu = cpu_ms(proc.pid)
        roll = rollup(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    print("%-10s VmHWM %6.1f MiB  VmRSS %6.1f MiB  (anon %.1f, file %.1f)  ready %.1f s, "
          "quiet after %.1f s, CPU %.1f s" % (label, hwm / 1024, rss / 1024,
                                              roll.get("Anonymous", 0) / 1024,
                                              (roll.get("Rss", 0) - roll.get("Anonymous", 0))
                                              / 1024, ready, done, cpu / 1000), flush=True)
    return hwm


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("tree")
    ap.add_argument("--fimwatch", default=os.path.join(HERE, "..", "fimwatch.py"))
    ap.add_argument("--backend")
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--no-floor", action="store_true")
    ap.add_argument("--restarts", type=int, default=1)
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE for the daemon")
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix="fimwatch-memprobe.", dir="/var/tmp")
    try:
        env = dict(os.environ)
        for kv in args.env:
            k, _, v = kv.partition("=")
            env[k] = v
        trace_out = os.path.join(base, "trace-%s.txt")
        if not args.no_floor:
            empty = os.path.join(base, "empty")
            os.mkdir(empty)
            run_once(args, base, layout(base, args.fimwatch), empty,
                     os.path.join(base, "state-empty"), "floor", env)
        state = os.path.join(base, "state")
        runs = ["first"] + ["restart%d" % i for i in range(1, args.restarts + 1)]
        for label in runs:
            prelude = TRACE % {"out": trace_out % label} if args.trace else ""
            run_once(args, base, layout(base, args.fimwatch, prelude), args.tree, state,
                     label, env)
            if args.trace:
                with open(trace_out % label) as f:
                    print(f.read())
        print(json.dumps({"base": base}))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
