"""The watchdog peer: what a Python user would write with the watchdog package.

    python wd_watch.py ROOT OUTFILE

Observer.schedule(recursive=True) + start() (watchdog sets up its inotify
watches synchronously inside start()), then prints "ready" on stdout and
appends "EVENT_TYPE SRC_PATH" per event to OUTFILE until SIGTERM. A queue
overflow (watchdog logs it as a warning) becomes an "OVERFLOW" line.
"""

import logging
import signal
import sys
import threading

from watchdog.events import FileSystemEventHandler
from watchdog.observers.inotify import InotifyObserver


class Writer(FileSystemEventHandler):
    def __init__(self, out):
        self.out = out

    def on_any_event(self, event):
        self.out.write("%s %s\n" % (event.event_type, event.src_path))


class OverflowNote(logging.Handler):
    def __init__(self, out):
        super().__init__(logging.WARNING)
        self.out = out
        self.noted = False

    def emit(self, record):
        # once: watchdog 7.1 can loop on overflows, re-logging each time
        if not self.noted and "overflow" in record.getMessage().lower():
            self.noted = True
            self.out.write("OVERFLOW\n")


def main():
    root, outfile = sys.argv[1], sys.argv[2]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    out = open(outfile, "a", buffering=1)
    logging.getLogger("watchdog").addHandler(OverflowNote(out))
    observer = InotifyObserver()
    observer.schedule(Writer(out), root, recursive=True)
    observer.start()
    print("ready", flush=True)
    while not stop.wait(0.5):
        pass
    observer.stop()
    observer.join(10)
    out.close()


if __name__ == "__main__":
    main()
