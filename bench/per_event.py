"""Daemon CPU per reported event under the sustained load, for A/B runs of
two versions of fimwatch.py on a busy machine (root, inside bench/.venv:
run it after one `sudo python3 bench/bench.py ...` has created the venv).

    sudo bench/.venv/bin/python bench/per_event.py OLD.py NEW.py [--rounds 2]
        [--secs 12] [--rate 5000] [--backend inotify]

Each round runs every given version once, in turn, the same way as the
`sustained` benchmark (gen modify over 1,000 files; fimwatch as installed;
settle 100 ms), and prints for each run: the events fimwatch reported, its
CPU divided by them (µs per event: a reported event costs the same however
many writes it merged, so this compares versions under different loads
better than CPU % does), CPU %, p50/p99/max latency, losses, and the CPU
other processes used meanwhile.
"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench  # noqa: E402


def one_run(args, fw):
    args.fimwatch = os.path.abspath(fw)
    ws = bench.Workspace(args.workdir, loop=True)
    try:
        ctx = bench.Ctx(args, ws, bench.Results())
        d = os.path.join(ws.fs, "sustained")
        os.mkdir(d)
        for i in range(1000):
            with open(os.path.join(d, "m%04d" % i), "w") as f:
                f.write("init\n")
        t = ctx.fim(d)
        if args.backend:
            with open(t.conf) as f:
                conf = f.read()
            with open(t.conf, "w") as f:
                f.write(conf.replace("[watch]\n", "[watch]\nbackend = %s\n" % args.backend))
        t.start()
        try:
            t.wait_ready()
            n0 = len(t.tail.lines)
            t0 = bench.mono()
            r = bench.run_load(ctx, t, d, 1000, args.rate, args.secs, True)
            nev = len(t.tail.lines) - n0
        finally:
            t.stop()
        per = r["cpu_pct"] * args.secs * 10 * 1000 / max(1, nev)
        print(
            "%s: %d events, %.0f us CPU per event; CPU %.0f%%; p50 %.0f ms, p99 %.0f ms, "
            "max %.0f ms; lost %d/%d; overflow %s; others %s"
            % (
                fw,
                nev,
                per,
                r["cpu_pct"],
                (r["p50"] or 0) * 1000,
                (r["p99"] or 0) * 1000,
                (r["max"] or 0) * 1000,
                r["lost"],
                r["total"],
                r["overflow"],
                bench.BACKGROUND.summary(t0),
            ),
            flush=True,
        )
    finally:
        ws.cleanup()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("versions", nargs="+", help="fimwatch.py files to compare")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--secs", type=int, default=12)
    p.add_argument("--rate", type=int, default=5000)
    p.add_argument("--backend", choices=["inotify", "fanotify"], help="default: auto")
    p.add_argument("--workdir", default="/var/tmp")
    ours = p.parse_args()
    args = bench.build_parser().parse_args(["sustained"])
    args.as_script = False
    args.backend, args.rate, args.secs, args.workdir = (
        ours.backend,
        ours.rate,
        ours.secs,
        ours.workdir,
    )
    bench.BACKGROUND = bench.Background()
    for _ in range(ours.rounds):
        for fw in ours.versions:
            one_run(args, fw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
