#!/usr/bin/env python3
"""Set-up cost of the two watcher backends on one tree, in one run.

Builds (once) a tree of N directories, then times what each backend needs
before it sees a change anywhere in it: inotify adds one watch per directory;
fanotify marks the filesystem once and records one handle per directory
(name_to_handle_at), the map that turns records into paths. The directory
walk itself (os.scandir, the same for both) is timed separately.

    sudo python3 bench/backend_setup.py [--dirs 20000] [--base /var/tmp/fw-bench]
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fimwatch  # noqa: E402


def build(base, n):
    root = os.path.join(base, "tree%d" % n)
    if os.path.isdir(root):
        return root
    os.makedirs(root)
    for i in range(n - 1):
        os.makedirs(os.path.join(root, "d%03d" % (i // 200), "e%d" % i), exist_ok=True)
    return root


def dirs_of(root):
    out, stack = [], [root]
    while stack:
        d = stack.pop()
        out.append(d)
        with os.scandir(d) as it:
            stack.extend(e.path for e in it if e.is_dir(follow_symlinks=False))
    return out


def run(kind, dirs):
    t0 = time.perf_counter()
    if kind == "inotify":
        b = fimwatch.InotifyBackend(fimwatch.import_inotify())
    else:
        b = fimwatch.FanotifyBackend()
    for d in dirs:
        b.watch(d)
    t = time.perf_counter() - t0
    n = b.count()
    b.close()
    return t, n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dirs", type=int, default=20000)
    ap.add_argument("--base", default="/var/tmp/fw-bench")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    root = build(a.base, a.dirs)
    t0 = time.perf_counter()
    dirs = dirs_of(root)
    walk = time.perf_counter() - t0
    print("tree: %d directories under %s; walk (scandir) %.3f s" % (len(dirs), root, walk))
    res = {"inotify": [], "fanotify": []}
    for _ in range(a.rounds):               # alternate, so drift hits both
        for kind in res:
            res[kind].append(run(kind, dirs))
    for kind, rows in res.items():
        ts = sorted(t for t, _ in rows)
        print("%-8s set-up: median %.3f s, min %.3f s, max %.3f s (%d dirs, %.1f us/dir)"
              % (kind, ts[len(ts) // 2], ts[0], ts[-1], rows[0][1],
                 1e6 * ts[len(ts) // 2] / len(dirs)))
    fi, fa = (sorted(t for t, _ in res[k])[a.rounds // 2] for k in ("inotify", "fanotify"))
    print("fanotify / inotify: %.2fx" % (fa / fi))
    t0 = time.perf_counter()
    b = fimwatch.FanotifyBackend()
    b.watch(root)
    print("fanotify mark alone (one filesystem mark + the root's handle): %.4f s"
          % (time.perf_counter() - t0))
    b.close()


if __name__ == "__main__":
    main()
