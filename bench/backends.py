#!/usr/bin/env python3
"""The cost of fimwatch's fanotify backend beside its inotify backend, in one
run (issue 11, item 5). Each figure is taken for `[watch] backend = fanotify`
and `backend = inotify`, alternating rep by rep:

  first-change  100,000 leaf dirs (2 files each, baseline built first): process
                start until a file created in the last directory of a
                scandir-order walk is reported; inotifywait -m -r beside it
                ("Watches established" + its report of the same file).
                Target: fanotify <= 0.2x inotifywait.
  storm         CPU per created file while `gen storm` makes 100,000 files.
  modify        CPU per write at 5,000 writes/s (`gen modify`, 1,000 files).
  noise         daemon CPU while another process writes 1,000 files/s beside
                the tree on the same filesystem (backend_noise.py). Target:
                fanotify < 2 % of a core.
  tar           `tar xf` of /usr/share/doc + /usr/lib/python3 into a watched
                dir: wall time with fimwatch fanotify, inotify and off.
  apt           `apt-get install ./fimwatch-bench-pkg.deb` (a local package
                of 2,000 files under /usr/share/fimwatch-bench-pkg, built
                with dpkg-deb; purged after each run) with /usr watched:
                wall time with fimwatch fanotify, inotify and off.

    sudo python3 bench/backends.py [--reps 2] [BENCHMARK...]

Same harness as bench.py (its venv, ext4 image on loop, Background load
sampler); writes bench/results/backends.md and .json. Root.
"""

import collections
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import backend_noise  # noqa: E402
import bench as B  # noqa: E402

ALL = ["first-change", "storm", "modify", "noise", "tar", "apt"]
BACKENDS = ("fanotify", "inotify")
PKG = "fimwatch-bench-pkg"
PKG_DIR = "/usr/share/" + PKG


def parser():
    p = B.side_parser(__doc__)
    p.add_argument("benchmarks", nargs="*", help="default: all of " + ", ".join(ALL))
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--dirs", type=int, default=100000, help="first-change tree size")
    p.add_argument("--storm-files", type=int, default=100000)
    p.add_argument("--modify-secs", type=int, default=20)
    p.add_argument("--noise-secs", type=float, default=15)
    return p


def per_backend(ctx, reps, fn):
    """{backend: [fn(ctx, backend, rep) for each rep]}, alternating backends."""
    out = {b: [] for b in BACKENDS}
    for rep in range(reps):
        for b in BACKENDS:
            ctx.backend = b
            out[b].append(fn(ctx, b, rep))
    ctx.backend = None
    return out


def bench_first_change(ctx, reps, ndirs):
    root = B.build_tree(ctx.ws, "tree-%d" % ndirs, ndirs, 2)
    probe = B.last_dir(root)
    ctx.fim_state(root)
    bench = "start → change in the last of %dk dirs reported" % (ndirs // 1000)
    data = {k: [] for k in BACKENDS + ("inotifywait",)}
    for rep in range(reps):
        for k in data:
            ctx.backend = k if k in BACKENDS else None
            tool = "fimwatch" if k in BACKENDS else k
            ready, lat, hwm, _, done = B.one_setup(ctx, tool, root, probe, "%s-%d" % (k, rep))
            total = None if ready is None or lat is None else ready + lat
            data[k].append((total, ready, lat, hwm, done))
            B.log("first-change %s rep %d: ready %s, reported %s, total %s"
                  % (k, rep, ready, lat, total))
    ctx.backend = None

    def note(rows, what):
        lat = [r[2] for r in rows if r[2] is not None]
        s = "%s %.2f s, then the change reported after %.0f ms (seen %d/%d); VmHWM %.0f MiB" % (
            what, B.median([r[1] for r in rows if r[1] is not None]) or 0,
            1000 * (B.median(lat) or 0), len(lat), len(rows),
            (B.median([r[3] for r in rows if r[3]]) or 0) / 1024)
        done = [r[4] for r in rows if r[4] is not None]
        return s + ("; start-up comparison of %d files over after %.1f s"
                    % (2 * ndirs, B.median(done)) if done else "")

    inw = [r[0] for r in data["inotifywait"]]
    ctx.res.add(bench, "inotifywait -m -r", inw, "s",
                notes=note(data["inotifywait"], "\"Watches established\" after"))
    for k in BACKENDS:
        fan = k == "fanotify"
        ratio = B.median_ratio([r[0] for r in data[k]], inw)
        ctx.res.add(bench, "fimwatch " + k, [r[0] for r in data[k]], "s", ratio=ratio,
                    target="≤ 0.20× inotifywait" if fan else None,
                    met=(ratio <= 0.2) if fan and ratio is not None else None,
                    notes="ratio: ÷ inotifywait; " + note(data[k], "`started` after"))




def bench_storm_cpu(ctx, reps, nfiles):
    def one(ctx, b, rep):
        return B.one_storm(ctx, "fimwatch", ctx.ws.fs, nfiles, "%s-%d" % (b, rep))

    data = per_backend(ctx, reps, one)
    bench = "CPU per created file, storm of %dk files/100 dirs" % (nfiles // 1000)
    for b, ds in data.items():
        ctx.res.add(bench, "fimwatch " + b, [1000 * d["cpu"] / nfiles for d in ds], "µs",
                    fmt="%.0f", notes="daemon CPU %s s; files seen %s%%; %s files/s reported; "
                    "overflow %d/%d; in baseline afterwards %s%%" % (
                        "/".join("%.1f" % (d["cpu"] / 1000) for d in ds),
                        "/".join("%.0f" % d["pct"] for d in ds),
                        "/".join("%.0f" % d["evps"] for d in ds),
                        sum(d["overflow"] for d in ds), len(ds),
                        "/".join("%.2f" % d["in_base"] for d in ds)))


def bench_modify_cpu(ctx, reps, secs, rate=5000):
    def one(ctx, b, rep):
        return B.fim_under_load(ctx, "modify-%s-%d" % (b, rep), rate, secs)

    data = per_backend(ctx, reps, one)
    bench = "CPU per write at %d writes/s (1,000 files, %d s)" % (rate, secs)
    for b, rs in data.items():
        # run_load's cpu_pct: daemon CPU from the first write until 3 s of quiet after the last
        ctx.res.add(bench, "fimwatch " + b, [r["cpu_pct"] * 10 * secs * 1000 / r["total"]
                                            for r in rs], "µs", fmt="%.0f",
                    notes="CPU %s%% of a core; p99 %s ms; lost %s; overflow %d/%d; "
                    "achieved %s writes/s" % (
                        "/".join("%.0f" % r["cpu_pct"] for r in rs),
                        "/".join("%.0f" % (1000 * r["p99"]) if r["p99"] is not None else "n/a"
                                 for r in rs),
                        "/".join(str(r["lost"]) for r in rs),
                        sum(r["overflow"] for r in rs), len(rs),
                        "/".join("%.0f" % r["achieved"] for r in rs)))


def bench_noise(ctx, reps, secs):
    def one(ctx, b, rep):
        return backend_noise.run(os.path.join(ctx.ws.fs, "noise-%d" % rep), b, secs)

    backend_noise.REPO = os.path.dirname(ctx.args.fimwatch)
    data = per_backend(ctx, reps, one)
    bench = "daemon CPU, 1,000 writes/s outside the tree, same filesystem"
    for b, rs in data.items():
        fan = b == "fanotify"
        vals = [100 * used / dt for _, dt, used in rs]
        ctx.res.add(bench, "fimwatch " + b, vals, "% of a core",
                    target="< 2 %" if fan else None,
                    met=(B.median(vals) < 2) if fan else None,
                    notes="%s writes/s achieved" % "/".join("%.0f" % (n / dt) for n, dt, _ in rs))


def timed_with(ctx, mode, root, cmd, state=None):
    """Run cmd (shell) with fimwatch `mode` (a backend, or "off") watching
    root: -> (wall s of cmd, daemon CPU s from cmd's start until its events
    were written, s from cmd's start until then, its events by kind)."""
    if mode == "off":
        return B.timed(cmd, shell=True), None, None, None
    ctx.backend = mode
    f = ctx.fim(root, state=state)
    f.start()
    try:
        f.wait_ready()
        B.wait_busy_end(f.pid)                    # the start-up comparison is over
        n0, cpu0 = len(f.tail.lines), f.cpu_ms()
        t0 = B.mono()
        wall = B.timed(cmd, shell=True)
        t_last = B.wait_quiet(f, quiet=2.0, use_cpu=True)
        cpu = (f.cpu_ms() - cpu0) / 1000
        kinds = collections.Counter(ev.get("event", "?") for ev in map(parse, f.tail.lines[n0:]))
    finally:
        f.stop()
        ctx.backend = None
    kinds = ", ".join("%s %d" % kv for kv in sorted(kinds.items()))
    return wall, cpu, max(wall, t_last - t0), kinds


def parse(tline):
    try:
        return json.loads(tline[1])
    except ValueError:
        return {}


def three_ways(ctx, bench, reps, run):
    """run(mode, rep) -> timed_with's tuple for off, inotify and fanotify,
    alternating; one row each, fimwatch's against off."""
    modes = ("off",) + BACKENDS[::-1]
    data = {m: [] for m in modes}
    for rep in range(reps):
        for m in modes:
            data[m].append(run(m, rep))
            B.log("%s %s rep %d: %s" % (bench, m, rep, data[m][-1]))
    off = [r[0] for r in data["off"]]
    ctx.res.add(bench, "fimwatch off", off, "s")
    for m in BACKENDS:
        rs = data[m]
        ctx.res.add(bench, "fimwatch " + m, [r[0] for r in rs], "s",
                    ratio=B.median_ratio([r[0] for r in rs], off),
                    notes="ratio: ÷ off; daemon CPU %s s; its last event out %s s after the "
                    "command started; events: %s" % (
                        "/".join("%.1f" % r[1] for r in rs),
                        "/".join("%.1f" % r[2] for r in rs),
                        " / ".join(r[3] or "none" for r in rs)))


def bench_tar(ctx, reps):
    src = ("/usr/share/doc", "/usr/lib/python3")
    tarball = os.path.join(ctx.ws.base, "big.tar")
    B.sh(["tar", "cf", tarball, "--warning=none"] + list(src), stderr=subprocess.DEVNULL,
         check=False)
    files = int(subprocess.run("tar tf %s | grep -vc '/$'" % tarball, shell=True,
                               capture_output=True, text=True).stdout or 0)
    B.sh(["cat", tarball], stdout=subprocess.DEVNULL)  # page cache warm for every run

    def run(mode, rep):
        dest = os.path.join(ctx.ws.fs, "tar-%s-%d" % (mode, rep))
        os.mkdir(dest)
        r = timed_with(ctx, mode, dest, "tar xf %s -C %s" % (tarball, dest))
        shutil.rmtree(dest)
        B.sh(["sync"])
        return r

    three_ways(ctx, "tar xf of %s (%d files, %.0f MB) into a watched dir"
               % (" + ".join(src), files, os.path.getsize(tarball) / 1e6), reps, run)


def build_deb(ws, nfiles=2000, per_dir=50):
    """A local .deb with nfiles small files under PKG_DIR (no scripts, no deps)."""
    root = os.path.join(ws.base, "pkgroot")
    os.makedirs(os.path.join(root, "DEBIAN"))
    with open(os.path.join(root, "DEBIAN", "control"), "w") as f:
        f.write("Package: %s\nVersion: 1.0\nArchitecture: all\nMaintainer: fimwatch bench "
                "<root@localhost>\nDescription: fimwatch benchmark package (bench/backends.py)\n"
                % PKG)
    for i in range(nfiles):
        d = os.path.join(root, PKG_DIR.lstrip("/"), "d%02d" % (i // per_dir))
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "f%04d" % i), "w") as f:
            f.write(("file %d\n" % i) * (1 + i % 200))
    deb = os.path.join(ws.base, PKG + ".deb")
    B.sh(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", root, deb],
         stdout=subprocess.DEVNULL)
    return deb


def bench_apt(ctx, reps):
    if os.path.exists(PKG_DIR) or not subprocess.run(
            ["dpkg", "-s", PKG], capture_output=True).returncode:
        raise B.BenchError("%s or package %s already there: not touching it" % (PKG_DIR, PKG))
    deb = build_deb(ctx.ws)
    apt = ("DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=300 "
           "--no-install-recommends")
    state = ctx.fim_state("/usr")
    purges = []

    def run(mode, rep):
        st = os.path.join(ctx.ws.base, "usr-state-%s-%d" % (mode, rep))
        shutil.copytree(state, st)
        try:
            return timed_with(ctx, mode, "/usr", "%s install %s" % (apt, deb), state=st)
        finally:
            purges.append(B.timed("%s purge %s" % (apt, PKG), shell=True))
            shutil.rmtree(st)

    try:
        three_ways(ctx, "apt-get install ./%s.deb (2,000 files, /usr watched)" % PKG, reps, run)
    finally:
        if os.path.exists(PKG_DIR):
            subprocess.run("%s purge %s" % (apt, PKG), shell=True)
    B.log("apt-get purge took %s s" % " ".join("%.1f" % x for x in purges))


def main():
    args = parser().parse_args()
    bad = [b for b in args.benchmarks if b not in ALL]
    if bad:
        print("backends: unknown benchmark %s (have: %s)" % (", ".join(bad), ", ".join(ALL)),
              file=sys.stderr)
        return 2
    args.peers = ["inotifywait"]
    plan = {"first-change": lambda ctx: bench_first_change(ctx, args.reps, args.dirs),
            "storm": lambda ctx: bench_storm_cpu(ctx, args.reps, args.storm_files),
            "modify": lambda ctx: bench_modify_cpu(ctx, args.reps, args.modify_secs),
            "noise": lambda ctx: bench_noise(ctx, args.reps, args.noise_secs),
            "tar": lambda ctx: bench_tar(ctx, args.reps),
            "apt": lambda ctx: bench_apt(ctx, args.reps)}
    return B.side_run(args, "backends", [(n, plan[n]) for n in args.benchmarks or ALL])


if __name__ == "__main__":
    sys.exit(main())
