#!/usr/bin/env python3
"""The cost of fimwatch's security metadata (issue 10, "done when"): the same
fimwatch, with and without reading xattrs, file capabilities, POSIX ACLs and
inode flags, alternating run by run in one invocation:

  baseline  the first baseline of /usr (`--path`): process start until it is
            built and the daemon's CPU is quiet, and VmHWM.
  modify    daemon CPU while `gen modify` rewrites 1,000 files at 5,000
            writes/s (the ext4 image), p99 write -> event. The daemon's CPU
            at a fixed write rate also depends on how many writes one event
            covers (a slower daemon coalesces more), so:
  snapshot  in process, no daemon: snapshot() of 2,000 small files on the
            image, µs per file, with and without (3 x 25 rounds, alternating).

"Without" is a bench-only launcher: it imports the byte-compiled fimwatch
module and replaces read_meta, meta_of and meta_changes with stubs (no
listxattr/getxattr, no FS_IOC_GETFLAGS ioctl, no open of directories for
them, no comparison) before calling main(). Nothing in fimwatch's config or
environment turns this off; the product is unchanged.

What stays in both: rdev and the link count (st_rdev, st_nlink of the lstat
every file gets anyway) and the ctime checks (st_ctime_ns of the same lstat,
compared with the baseline: no system call), so their cost is not separable
and is not part of the difference.

    sudo python3 bench/meta_cost.py [--reps 3] [--path /usr] [--modify-secs 20]
        [snapshot baseline modify]

Writes bench/results/meta_cost.md and .json. Root.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench as B  # noqa: E402

# Runs in the launcher after `import fimwatch`. The assert makes a rename in
# fimwatch.py fail the bench instead of silently measuring nothing.
NO_META = """\
for _n in ("read_meta", "meta_of", "meta_changes"):
    assert callable(getattr(fimwatch, _n)), _n
fimwatch.read_meta = lambda target, st, fd_ok: ("", "", "", "")
fimwatch.meta_of = lambda path, st, kind, dir_fd=None: ("", "", "", "")
fimwatch.meta_changes = lambda old, new: []
"""
VARIANTS = ("with metadata", "without (patched out)")


def parser():
    p = B.side_parser(__doc__)
    p.add_argument("benchmarks", nargs="*", help="default: snapshot baseline modify")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--path", default="/usr")
    p.add_argument("--modify-secs", type=int, default=20)
    p.add_argument("--rate", type=int, default=5000)
    return p


def alternate(ctx, launchers, reps, fn):
    """{variant: [fn(rep, variant) for each rep]}, ctx.fimwatch = that
    variant's launcher, alternating."""
    out, mine = {v: [] for v in launchers}, ctx.fimwatch
    try:
        for rep in range(reps):
            for v, launcher in launchers.items():
                ctx.fimwatch = launcher
                out[v].append(fn(rep, v))
                B.log("%s rep %d: %s" % (v, rep, out[v][-1]))
    finally:
        ctx.fimwatch = mine
    return out


def bench_baseline(ctx, launchers, reps, path):
    files, size = B.usr_stats(path)
    B.log("warming the page cache: %s" % path)
    B.sh("find %s -type f -print0 | xargs -0 -P2 cat >/dev/null 2>&1" % path, shell=True,
         check=False)
    data = alternate(ctx, launchers, reps, lambda rep, v: B.first_baseline(ctx, path)[:3])
    bench = "first baseline %s (%d files, %.2f GB)" % (path, files, size / 1e9)
    ref = data[VARIANTS[1]]
    for v, rows in data.items():
        hwm = [r[2] / 1024 for r in rows]
        ctx.res.add(bench, "fimwatch " + v, [r[0] for r in rows], "s",
                    ratio=B.median_ratio([r[0] for r in rows], [r[0] for r in ref]),
                    notes="ratio: ÷ without; VmHWM median %.1f MiB (%s); `started` after %s s"
                    % (B.median(hwm), "/".join("%.1f" % h for h in hwm),
                       "/".join("%.2f" % r[1] for r in rows)))


def bench_modify(ctx, launchers, reps, secs, rate):
    data = alternate(ctx, launchers, reps, lambda rep, v: B.fim_under_load(
        ctx, "modify-%d-%d" % (VARIANTS.index(v), rep), rate, secs))
    bench = "daemon CPU at %d writes/s (1,000 files, %d s)" % (rate, secs)
    ref = data[VARIANTS[1]]
    for v, rs in data.items():
        ctx.res.add(bench, "fimwatch " + v, [r["cpu_pct"] for r in rs], "% of a core",
                    fmt="%.0f", ratio=B.median_ratio([r["cpu_pct"] for r in rs],
                                            [r["cpu_pct"] for r in ref]),
                    notes="ratio: ÷ without; p99 %s ms; lost %s; overflow %d/%d; achieved %s/s"
                    % ("/".join("%.0f" % (1000 * r["p99"]) if r["p99"] is not None else "n/a"
                                for r in rs),
                       "/".join(str(r["lost"]) for r in rs),
                       sum(r["overflow"] for r in rs), len(rs),
                       "/".join("%.0f" % r["achieved"] for r in rs)))


def bench_snapshot(ctx, reps, nfiles=2000, rounds=25):
    """In process, no daemon: snapshot() (lstat, open, hash, metadata) of
    nfiles small files on the image, with and without the NO_META stubs,
    alternating; the per-file cost free of the daemon's event coalescing."""
    sys.path.insert(0, os.path.dirname(ctx.args.fimwatch))
    import fimwatch

    d = B.load_dir(ctx, "snapshot", nfiles)
    paths = [os.path.join(d, n) for n in sorted(os.listdir(d))]
    saved = {n: getattr(fimwatch, n) for n in ("read_meta", "meta_of", "meta_changes")}
    data = {v: [] for v in VARIANTS}
    try:
        for _ in range(reps * rounds):
            for v in VARIANTS:
                if v == VARIANTS[1]:
                    exec(NO_META, {"fimwatch": fimwatch})
                t = time.perf_counter()
                for p in paths:
                    fimwatch.snapshot(p, 1 << 30)
                data[v].append(1e6 * (time.perf_counter() - t) / len(paths))
                for n, f in saved.items():
                    setattr(fimwatch, n, f)
    finally:
        for n, f in saved.items():
            setattr(fimwatch, n, f)
    bench = "snapshot() of one small file, in process (%d files x %d)" % (nfiles, reps * rounds)
    for v, vals in data.items():
        ctx.res.add(bench, "fimwatch " + v, vals, "µs", fmt="%.1f",
                    ratio=B.median_ratio(vals, data[VARIANTS[1]]), notes="ratio: ÷ without")


def main():
    args = parser().parse_args()

    def run(ctx, fn):
        nometa = ctx.install_like(args.fimwatch, "fimwatch-nometa", NO_META)
        fn(ctx, {VARIANTS[0]: ctx.fimwatch, VARIANTS[1]: nometa})

    plan = [("snapshot", lambda ctx: bench_snapshot(ctx, args.reps)),
            ("baseline", lambda ctx: run(ctx, lambda c, ls: bench_baseline(
                c, ls, args.reps, args.path))),
            ("modify", lambda ctx: run(ctx, lambda c, ls: bench_modify(
                c, ls, args.reps, args.modify_secs, args.rate)))]
    return B.side_run(args, "meta_cost", [(n, f) for n, f in plan
                                          if not args.benchmarks or n in args.benchmarks])


if __name__ == "__main__":
    sys.exit(main())
