"""The hashing floor: a bare single-threaded Python walk that lstat()s and
sha256-hashes every regular file under ROOT (no database, no bookkeeping).

    python hashwalk.py ROOT

Prints "FILES BYTES" when done.
"""

import hashlib
import os
import stat
import sys


def digest(path):
    with open(path, "rb", buffering=0) as f:
        if hasattr(hashlib, "file_digest"):  # Python >= 3.11
            return hashlib.file_digest(f, "sha256").hexdigest()
        h = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
        return h.hexdigest()


def main():
    files = size = 0
    stack = [sys.argv[1]]
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
                    try:
                        digest(entry.path)
                    except OSError:
                        continue
                    files += 1
                    size += st.st_size
    print(files, size)


if __name__ == "__main__":
    main()
