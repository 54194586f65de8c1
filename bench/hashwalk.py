"""The hashing floor: a bare Python walk that lstat()s and sha256-hashes
every regular file under ROOT (no database, no bookkeeping).

    python hashwalk.py [--threads N] ROOT

With --threads N (default 1) the walk hands the files to N threads that
hash them (hashlib and file reads release the GIL): the floor for a
fimwatch that hashes in worker threads. Prints "FILES BYTES" when done.
"""

import hashlib
import os
import queue
import stat
import sys
import threading


def digest(path):
    with open(path, "rb", buffering=0) as f:
        if hasattr(hashlib, "file_digest"):  # Python >= 3.11
            return hashlib.file_digest(f, "sha256").hexdigest()
        h = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
        return h.hexdigest()


def walk(top):
    """(path, size) of every regular file under top."""
    stack = [top]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError:
            continue
        with it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
                elif stat.S_ISREG(st.st_mode):
                    yield entry.path, st.st_size


def hash_all(items, counts):
    for path, size in items:
        try:
            digest(path)
        except OSError:
            continue
        counts[0] += 1
        counts[1] += size


def main():
    args = sys.argv[1:]
    threads = 1
    if args[:1] == ["--threads"]:
        threads, args = int(args[1]), args[2:]
    top = args[0]
    if threads <= 1:
        counts = [0, 0]
        hash_all(walk(top), counts)
        print(*counts)
        return
    q = queue.Queue(maxsize=64)

    def items():
        while True:
            got = q.get()
            if got is None:
                return
            yield from got

    per = [[0, 0] for _ in range(threads)]
    workers = [threading.Thread(target=hash_all, args=(items(), c)) for c in per]
    for w in workers:
        w.start()
    batch = []
    for it in walk(top):             # in batches: one queue hand-off per 64 files
        batch.append(it)
        if len(batch) >= 64:
            q.put(batch)
            batch = []
    q.put(batch)
    for _ in workers:
        q.put(None)
    for w in workers:
        w.join()
    print(sum(c[0] for c in per), sum(c[1] for c in per))


if __name__ == "__main__":
    main()
