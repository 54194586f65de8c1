"""The floor: the fastest a Python watcher can set up recursive inotify watches.

    python floor.py ROOT OUTFILE [HEARTBEAT_SECS DB]

os.scandir walk + inotify_simple.add_watch per directory, nothing else: no
baseline, no wd->path bookkeeping beyond one list indexed by wd (the kernel
hands wds out in increasing order: 8 bytes a watch, where a dict entry and an
int object cost ~100, fimwatch's WdMap trick), no new-directory handling.
Prints "ready N" on stdout once every directory is watched, then appends one
line per event ("PATH MASK") to OUTFILE until SIGTERM.

With HEARTBEAT_SECS and DB it also wakes every HEARTBEAT_SECS to commit one
row to a WAL SQLite database: the least a daemon does that, like fimwatch,
writes a heartbeat for `status` and for finding its own downtime. The idle
benchmark runs it as the floor of what waking up costs on the machine.
"""

import os
import signal
import sys
import time

from inotify_simple import INotify, flags

MASK = (
    flags.CREATE
    | flags.DELETE
    | flags.MODIFY
    | flags.ATTRIB
    | flags.MOVED_FROM
    | flags.MOVED_TO
    | flags.CLOSE_WRITE
    | flags.DELETE_SELF
    | flags.MOVE_SELF
    | flags.ONLYDIR
    | flags.DONT_FOLLOW
)


def main():
    root, outfile = sys.argv[1], sys.argv[2]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ino = INotify()
    paths = [None]  # wd -> path; wd 0 is never used
    n = 0
    stack = [root]
    while stack:
        d = stack.pop()
        wd = ino.add_watch(d, MASK)
        if wd >= len(paths):
            paths.extend([None] * (wd + 1 - len(paths)))
        n += paths[wd] is None
        paths[wd] = d
        with os.scandir(d) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
    db, every = None, None
    if len(sys.argv) > 4:
        import sqlite3

        every = float(sys.argv[3]) * 1000
        db = sqlite3.connect(sys.argv[4], isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value)")
    print("ready", n, flush=True)
    with open(outfile, "a", buffering=1) as out:
        while True:
            evs = ino.read(timeout=every)
            if db is not None and not evs:
                db.execute("BEGIN IMMEDIATE")
                db.execute("INSERT OR REPLACE INTO meta VALUES ('heartbeat', ?)", (time.time(),))
                db.execute("COMMIT")
            for ev in evs:
                if ev.mask & flags.Q_OVERFLOW:
                    out.write("OVERFLOW\n")
                else:
                    d = paths[ev.wd] if ev.wd < len(paths) else None
                    out.write("%s/%s %d\n" % (d or "?", ev.name, ev.mask))


if __name__ == "__main__":
    main()
