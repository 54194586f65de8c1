#!/usr/bin/env python3
"""CPU of the daemon while another process executes /bin/true as fast as it
can (~1,000 execs/s here) outside the watched tree on the same filesystem:
with fanotify, every execve there queues FAN_OPEN_EXEC records for the exec
cache. Compare with --fimwatch pointing at a copy without the exec cache.
Run as root from a checkout with .venv:

    sudo python3 bench/exec_noise.py [--seconds 10] [--fimwatch-repo DIR]
"""

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import backend_noise as bn  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="/tmp/fw-execnoise")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--fimwatch-repo", help="a directory holding another fimwatch.py")
    a = ap.parse_args()
    if a.fimwatch_repo:
        bn.REPO = a.fimwatch_repo
    for backend in ("inotify", "fanotify"):
        p = bn.start(os.path.join(a.base, backend), backend)
        try:
            c0, t0, n = bn.cpu_seconds(p.pid), time.time(), 0
            while time.time() - t0 < a.seconds:
                subprocess.run(["/bin/true"])
                n += 1
            dt = time.time() - t0
            cpu = bn.cpu_seconds(p.pid) - c0
        finally:
            p.terminate()
            p.wait()
        print("%-8s %6d execs in %.1f s (%4.0f/s): daemon CPU %.2f s = %.1f %% of a core"
              % (backend, n, dt, n / dt, cpu, 100 * cpu / dt))


if __name__ == "__main__":
    main()
