#!/usr/bin/env python3
"""fimwatch - real-time file integrity monitoring for small teams.

usage: fimwatch [--config PATH] COMMAND [options]

commands:
  run            the daemon, in the foreground (what the systemd unit runs)
  scan           compare the filesystem with the baseline once, report, record
  accept [PATH]  take the current state of PATHs into the baseline, no alert
  status         is the daemon running, watches, baseline, recent events
  test-alert     send one test alert through every configured channel
  check-config   validate the config and print the effective settings
  pause/resume   maintenance window: changes are summarised when it ends
  events         recent events from the state database
  verify-log     check the events file's hash chain: intact, or the first
                 line removed, edited or reordered (exit 1)

The config is --config PATH, else $FIMWATCH_CONFIG, else
/etc/fimwatch/fimwatch.conf.

exit codes:
  0  success (scan: no changes; status: running; test-alert: all delivered)
  1  scan: changes found; status: not running; test-alert: a channel failed;
     verify-log: the events file was tampered with
  2  usage or config error, missing dependency or privilege (one line on stderr)
  3  state error: the state directory or database cannot be used (the daemon
     itself reports such faults and keeps watching; systemd restarts on 3)

Map of this file (`grep -n '^# [A-Z]' fimwatch.py` lists these banners):
  Constants, Exceptions, Small helpers, Patterns and exclusions, Config
  File state          Rec (one baseline entry), snapshot(), compare()
  Baseline store      Store: every SQL statement (baseline, events, meta, spool)
  State safety        StateDB (writes held on a full disk), StateGuard (lost state)
  Context for events  logged-in users, PackageDB, diffs
  Meaning             facts() of account databases, sudoers, sshd_config,
                      authorized_keys, cron, units; summarize() says in words
                      what a change means ("user eviltest (uid 1001) added")
  Package transactions  PackageWatch (dpkg's lock), PackageTx -> `transaction`
  The event           new_event(): a plain dict, never changed once emitted
  Pipeline 1 of 3     watcher backends: InotifyBackend, FanotifyBackend (the
                      writer's pid), MixedBackend -> Engine calls; the mount table
  Pipeline 2 of 3     Engine: walks, settle queue, compare, apply -> events
  Pipeline 3 of 3     alert sinks: events file, syslog; messages for humans;
                      channels (spool, email, webhooks) behind the Dispatcher
  Daemon loop         Daemon.loop: poll -> read -> Engine.tick -> timers
  Commands, Main

An event's way: Daemon.loop -> Engine.read_events -> backend.read ->
Engine.changed/moved/... -> Engine.touch (the settle queue) -> Engine.tick ->
flush_due (defer_for_dpkg: held while a package transaction runs) -> flush
(a settled rename: try_move) -> flush_path -> visit
(snapshot) -> apply (compare; _report adds the diff) -> emit_change (users,
package, meaning) -> Dispatcher.emit (sequence, stored, spooled for the
channels) -> Store.commit_turn -> Dispatcher.after_commit (syslog, journal,
events file, written at Dispatcher.flush) -> Channel worker -> email or
webhook. Two shortcuts: a directory rename is reported at once
(moved -> dir_renamed -> emit_change), and background walks (start-up
comparison, rescans, scheduled scans) go tick -> walk -> visit directly.
State safety wraps the Store's connection (StateDB) and checks the database
before it is opened (StateGuard); every other SQL statement is a Store method.
"""

__version__ = "0.1.0"

import argparse
import array
import configparser
import contextlib
import datetime
import errno
import fcntl
import hashlib
import heapq
import hmac
import itertools
import json
import os
import re
import select
import signal
import socket
import sqlite3
import stat
import struct
import subprocess
import sys
import threading
import time
import types
import collections
from collections import deque

# urllib.request (which loads ssl) and email are imported where they are used:
# together they would add ~8 MB to the resident size of every daemon, also of
# the many that never send an email or a webhook. So are urllib.parse,
# difflib and random (~0.7 MB): only webhooks, diffs and retries need them,
# and uuid (uuid5 of digests and journal ids; event ids are event_id()).

# ---------------------------------------------------------------------------
# Constants: every path and binary the program touches
# ---------------------------------------------------------------------------

DEFAULT_CONFIG = "/etc/fimwatch/fimwatch.conf"
DEFAULT_STATE_DIR = "/var/lib/fimwatch"
LIBDIR = "/usr/local/lib/fimwatch"          # private copy of inotify_simple
LAUNCHER = "/usr/local/sbin/fimwatch"       # install.sh's launcher
UNIT_DIR = "/etc/systemd/system"
UNITS = ("fimwatch.service", "fimwatch-failure@.service", "fimwatch-sendmail.socket",
         "fimwatch-sendmail@.service", "fimwatch.service.d")   # .d: the drop-ins
SYSCTL_CONF = "/etc/sysctl.d/60-fimwatch.conf"
SENDMAIL = "/usr/sbin/sendmail"
DEV_LOG = "/dev/log"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
SD_ID = "fimwatch@32473"   # RFC 5424 SD-ID; 32473 is the documentation PEN (RFC 5612)
UTMP = "/var/run/utmp"
DPKG_INFO = "/var/lib/dpkg/info"
DPKG_LOCK = "/var/lib/dpkg/lock"
DPKG_STATUS = "/var/lib/dpkg/status"
APT_ARCHIVES = "/var/cache/apt/archives"   # where apt keeps the .debs it installed
DEB_SHA_MAX = 16 << 20     # a bigger .deb is not unpacked in the loop (~2 s): md5 only
RPMDB = "/var/lib/rpm/rpmdb.sqlite"  # rpm >= 4.16's database (read only, never locked)
RPM_LOCK_NAME = ".rpm.lock"          # beside it, held (fcntl) by rpm, dnf, yum
PROC_LOCKS = "/proc/locks"           # lock holders, read without opening the lock
INOTIFY_SYSCTL = "/proc/sys/fs/inotify"
MOUNTINFO = "/proc/self/mountinfo"   # poll(2) says POLLPRI when the mount table changes
DB_NAME = "baseline.db"
BASELINE_ID = "baseline.id"      # the baseline's identity, kept outside it
LOCK_NAME = "fimwatch.lock"
MACHINE_ID = "/etc/machine-id"
INSTALL_ID = "install.id"        # in state_dir: made by install.sh (or the first start)
UPGRADE_MARK = "upgrading"       # in state_dir: install.sh's "this stop is an upgrade"

EXIT_OK, EXIT_CHANGES, EXIT_ERROR = 0, 1, 2
EXIT_STATE = 3       # state, disk or database: never RestartPreventExitStatus

SEVERITIES = ("info", "notice", "warning", "critical")
SEV_RANK = {s: i for i, s in enumerate(SEVERITIES)}
SYSLOG_PRI = {"info": 6, "notice": 5, "warning": 4, "critical": 2}
FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5,
    "lpr": 6, "news": 7, "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11,
    **{"local%d" % i: 16 + i for i in range(8)},
}

# inotify(7) flags; inotify_simple has them too, but we need them before import.
IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF, IN_UNMOUNT = 0x400, 0x800, 0x2000
IN_Q_OVERFLOW, IN_IGNORED, IN_ISDIR = 0x4000, 0x8000, 0x40000000
IN_ONLYDIR, IN_DONT_FOLLOW, IN_EXCL_UNLINK = 0x01000000, 0x02000000, 0x04000000
WATCH_MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO
              | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF
              | IN_ONLYDIR | IN_DONT_FOLLOW | IN_EXCL_UNLINK)

M_ARENA_MAX = -8                # mallopt(3): the most malloc arenas (one_malloc_arena)
M_MMAP_THRESHOLD = -3           # mallopt(3): blocks this big or more are mmap()ed
MMAP_THRESHOLD = 128 << 10      # glibc's initial value, kept (one_malloc_arena)
DRAIN_READ = 64 << 10           # bytes of notifications read at a time (drain)
HASH_CHUNK = 1 << 20
HASH_SMALL = 64 << 10             # a file up to this size is hashed from one read
HASH_WORKERS = 2                 # threads that hash (hashlib and readv release the GIL)
OFFLOAD_MIN_SIZE = 4 << 20       # a file this big is hashed by a worker, not the loop
CHANGING_RETRIES = 1             # re-queues of a file changed while hashed, then reported
BUILD_OFFLOAD_MIN = 128 << 10    # building: a file this big is hashed by a worker
BUILD_BATCH_FILES = 8            # ... in jobs of this many files
BUILD_BATCH_BYTES = 16 << 20     # ... or of this many bytes
APPEND_WINDOW = 64 << 10         # [watch] append_only: head and tail bytes re-read per append
CRITICAL_MAX_DELAY = 2.0         # no change on a critical path waits longer to be compared
CAPTURE_PER_WINDOW = 256         # new paths snapshotted at first sight per CAPTURE_WINDOW
CAPTURE_WINDOW = 0.1             # s (a budget per time, not per turn: turns are short)
CAPTURE_MAX_SIZE = 1 << 20       # ... hashed up to this size (larger: metadata only)
LEFTOVERS_MAX = 10000            # editor leftovers tracked at once
PROBE_NAMES = ("4913",)          # exclusions silent only when gone within settle
EDITOR_NAMES = ("*.swp", "*.swx", "*~", ".#*")   # silent while an edit is plausible
CAPTURE_PER_PATH = 8             # snapshots of one new path while it is being written
PATH_MAX = 4096
SPOOL_MAX_AGE = 7 * 86400
HEARTBEAT_EVERY = 30.0
POLL_UNWATCHED_EVERY = 60.0      # periodic scan of subtrees that got no watch
ROOT_RETRY_EVERY = 2.0           # a deleted watched root is looked for this often
DIFF_MAX_LINES = 200
TURN_MIN = 0.01                  # s between the starts of two main-loop turns, at least
FLUSH_SLICE = 0.02               # s of settled comparisons per turn, then commit and read
MEMO_KEEP = 2048                 # paths whose severity / watch decision is remembered

# where package managers install files; only these are checked against them.
PACKAGE_PREFIXES = ("/usr/", "/etc/", "/bin/", "/sbin/", "/lib/", "/lib32/", "/lib64/",
                    "/libx32/", "/boot/", "/opt/")
DEFAULT_NO_DIFF = "/etc/shadow /etc/gshadow /etc/ssh/*_key **/*.key **/*.pem"

# ---------------------------------------------------------------------------
# Exceptions
# ---------------------------------------------------------------------------


class FimwatchError(Exception):
    """The root of fimwatch's own exceptions: an error the user can act on.
    Raised to main(), it is printed as one line and the exit code is
    exit_code (2: usage, config, missing dependency or privilege)."""
    exit_code = EXIT_ERROR


class ConfigError(FimwatchError):
    """The config (or a command-line value) is wrong: `FILE:LINE: [section] key: ...`."""


class DeliveryError(FimwatchError):
    """An alert could not be delivered; the spool retries it. Never reaches main()."""


class StateError(FimwatchError):
    """state_dir or the database cannot be used: not the user's typo, so not
    exit 2 (systemd keeps restarting on this one)."""
    exit_code = EXIT_STATE


# ---------------------------------------------------------------------------
# Small helpers: escaping, time, units
# ---------------------------------------------------------------------------

_ESC_TABLE = {0x5C: "\\\\", 0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}


def esc(s):
    """Printable, single-line form of an untrusted string (a file name).

    Bytes that are not UTF-8 (surrogate-escaped by os.fsdecode) become \\xNN,
    control characters \\xNN (\\n, \\r, \\t), bidi and line-separator characters
    \\uNNNN, and a backslash is doubled so the escaping cannot be forged."""
    if s.isprintable() and "\\" not in s:
        return s
    out = []
    for ch in s:
        o = ord(ch)
        if o in _ESC_TABLE:
            out.append(_ESC_TABLE[o])
        elif 0xDC80 <= o <= 0xDCFF:          # an undecodable byte
            out.append("\\x%02x" % (o - 0xDC00))
        elif o < 0x20 or 0x7F <= o <= 0x9F:
            out.append("\\x%02x" % o)
        elif not ch.isprintable() and ch != " ":
            out.append("\\u%04x" % o if o <= 0xFFFF else "\\U%08x" % o)
        else:
            out.append(ch)
    return "".join(out)


# (whole second, its text without the Z) last formatted by iso_ms, iso_s
_ISO_SEC = [(None, ""), (None, "")]


def _iso_parts(t, slot):
    """(YYYY-MM-DDTHH:MM:SS, microseconds) of Unix time t, as fromtimestamp
    rounds it; formatted by hand (strftime costs four times as much), the
    whole second once per second: this runs for every event."""
    sec = int(t // 1)
    us = round((t - sec) * 1e6)
    if us >= 1000000:
        sec, us = sec + 1, us - 1000000
    last, text = _ISO_SEC[slot]
    if sec != last:
        d = datetime.datetime.fromtimestamp(sec, datetime.timezone.utc)
        text = "%04d-%02d-%02dT%02d:%02d:%02d" % (d.year, d.month, d.day, d.hour, d.minute,
                                                  d.second)
        _ISO_SEC[slot] = (sec, text)
    return text, us


def iso_ms(t):
    text, us = _iso_parts(t, 0)
    return "%s.%03dZ" % (text, us // 1000)


def iso_s(t):
    return _iso_parts(t, 1)[0] + "Z"


_ID_POOL = bytearray()
_ID_LOCK = threading.Lock()
os.register_at_fork(after_in_child=_ID_POOL.clear)


def event_id():
    """event_id(), from random bytes drawn 4 KiB at a time (one
    getrandom per 256 ids, not one per event)."""
    with _ID_LOCK:
        if not _ID_POOL:
            _ID_POOL.extend(os.urandom(4096))
        b = _ID_POOL[-16:]
        del _ID_POOL[-16:]
    b[6] = b[6] & 0x0F | 0x40           # version 4
    b[8] = b[8] & 0x3F | 0x80           # RFC 4122 variant
    return b.hex()


_DUR_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$", re.I)
DURATION_MAX = 3650 * 86400         # ten years; beyond, time arithmetic overflows
_DUR_MULT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text):
    """'500ms', '30s', '5m', '24h', '7d' (a bare number is seconds) -> seconds,
    at most DURATION_MAX (a typo of many digits must not mean 'never')."""
    m = _DUR_RE.match(text or "")
    if not m:
        raise ValueError("not a duration: %r (use e.g. 500ms, 30s, 5m, 24h, 7d)" % text)
    sec = float(m.group(1)) * _DUR_MULT[(m.group(2) or "s").lower()]
    if sec > DURATION_MAX:
        raise ValueError("too long: %r (at most %dd)" % (text, DURATION_MAX // 86400))
    return sec


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.I)


def parse_size(text):
    """'512K', '64M', '1G' (a bare number is bytes) -> bytes."""
    m = _SIZE_RE.match(text or "")
    if not m:
        raise ValueError("not a size: %r (use e.g. 512K, 64M, 1G)" % text)
    return int(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ")


def parse_bool(text):
    t = (text or "").strip().lower()
    if t in ("yes", "true", "on", "1"):
        return True
    if t in ("no", "false", "off", "0"):
        return False
    raise ValueError("not a yes/no value: %r" % text)


def fmt_duration(sec):
    """Human form of a number of seconds: 45s, 12m, 3h 5m, 2d 4h."""
    sec = int(sec)
    if sec < 60:
        return "%ds" % sec
    if sec < 3600:
        return "%dm" % (sec // 60)
    if sec < 86400:
        return "%dh %dm" % (sec // 3600, sec % 3600 // 60)
    return "%dd %dh" % (sec // 86400, sec % 86400 // 3600)


def redact_url(url):
    """A URL with its credentials, path and query hidden (they often hold tokens)."""
    import urllib.parse
    try:
        p = urllib.parse.urlsplit(url)
        host = p.hostname or "?"
        if p.port:
            host += ":%d" % p.port
        return "%s://%s/…" % (p.scheme, host)
    except ValueError:
        return "<url>"


def fqdn():
    name = socket.gethostname()
    try:
        full = socket.getfqdn(name)
        if full and "localhost" not in full:
            return full
    except OSError:
        pass
    return name


def _tty():
    return sys.stderr.isatty()


# ---------------------------------------------------------------------------
# Patterns and exclusions
# ---------------------------------------------------------------------------


def _glob_to_re(pat):
    """Translate one glob to a regex body: '*' and '?' stay inside one path
    component, '**' crosses components ('a/**/b' also matches 'a/b')."""
    i, n, out = 0, len(pat), []
    while i < n:
        c = pat[i]
        if c == "*":
            if pat.startswith("**", i):
                i += 2
                if i < n and pat[i] == "/":
                    out.append("(?:.*/)?")
                    i += 1
                else:
                    out.append(".*")
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pat.find("]", i + 2 if pat[i + 1:i + 2] in ("!", "]") else i + 1)
            if j < 0:
                raise ValueError("unclosed '[' in pattern %r" % pat)
            body = pat[i + 1:j]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\").replace("[", "\\[") + "]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _glob_escape(path):
    return re.sub(r"([*?\[])", r"[\1]", path)


class PatternSet:
    """A list of SPEC patterns compiled into two regexes: base-name patterns
    (no '/') and whole-path patterns."""

    def __init__(self, patterns):
        self.patterns = list(patterns)
        base, full, dirbase = [], [], []
        for p in self.patterns:
            if p.endswith("/") and "/" not in p[:-1]:
                # 'node_modules/': a directory name anywhere (as in .gitignore)
                dirbase.append(_glob_to_re(p[:-1]))
            elif "/" in p:
                if not (p.startswith("/") or p.startswith("**")):
                    raise ValueError("pattern %r has a '/' but is not absolute "
                                     "(start it with / or **)" % p)
                full.append(_glob_to_re(p))
            else:
                base.append(_glob_to_re(p))
        self._base = re.compile("(?:%s)\\Z" % "|".join(base), re.S) if base else None
        self._full = re.compile("(?:%s)\\Z" % "|".join(full), re.S) if full else None
        self._dirbase = re.compile("(?:%s)\\Z" % "|".join(dirbase), re.S) if dirbase else None

    def __bool__(self):
        return bool(self.patterns)

    @staticmethod
    def files_filter(*sets):
        """(full, base): two regexes, full for a file's path and base for its
        name, one of which matches every file (not a directory) that
        match(path) of any of sets matches: a walk's two C calls for the
        usual "none of them", before the exact checks (half their cost)."""
        out = []
        for part in ("_full", "_base"):
            pats = [getattr(x, part).pattern for x in sets if getattr(x, part) is not None]
            try:
                out.append(re.compile("|".join(pats) if pats else "(?!)", re.S))
            except re.error:
                out.append(re.compile("", re.S))    # matches all: the exact checks decide
        return tuple(out)

    def match(self, path, is_dir=False, dirs_by_name=True):
        if self._base is not None and (dirs_by_name or not is_dir) \
                and self._base.match(path, path.rfind("/") + 1):
            return True
        if is_dir and self._dirbase is not None \
                and self._dirbase.match(path, path.rfind("/") + 1):
            return True
        if self._full is not None:
            if self._full.match(path):
                return True
            # 'dir/**' also covers the directory itself, so it gets no watch.
            if is_dir and self._full.match(path + "/"):
                return True
        return False


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------

# The config schema, one key a line: section, key, type, default (the rest of
# the line; "-" for empty). Types: str, secret, path, pathorempty, paths,
# patterns, duration, size, bool, int, severity, facility, choice:a|b.
# Range limits are in LIMITS below. [webhook NAME] sections use "webhook".
_SCHEMA_TABLE = """
fimwatch  state_dir      path         %(state_dir)s
fimwatch  hostname       str          -
fimwatch  settle         duration     500ms
fimwatch  hash_max_size  size         256M
fimwatch  scan_interval  duration     24h
fimwatch  scan_rate      size         20M
fimwatch  no_diff        patterns     %(no_diff)s
fimwatch  diff_max_size  size         32K
fimwatch  diff_paths     patterns     /etc/** /var/www/** /var/spool/cron/** /usr/local/etc/**
fimwatch  package_check  bool         yes
fimwatch  heartbeat      duration     5m
watch     paths          paths        %(paths)s
watch     exclude        patterns     *.swp *.swx *~ .#* 4913 /etc/mtab /var/www/**/cache/**
watch     scan_only      paths        -
watch     poll_interval  duration     1m
watch     editor_grace   duration     24h
watch     backend        choice:auto|fanotify|inotify  auto
watch     append_only    patterns     /var/log/auth.log /var/log/wtmp /var/log/btmp
severity  critical       patterns     %(critical)s
severity  warning        patterns     -
severity  notice         patterns     -
severity  info           patterns     -
syslog    enabled        bool         yes
syslog    address        str          %(dev_log)s
syslog    facility       facility     authpriv
syslog    min_severity   severity     info
syslog    format         choice:rfc3164|rfc5424  rfc3164
journal   enabled        bool         no
journal   socket         path         %(journal)s
journal   min_severity   severity     info
email     enabled        bool         no
email     min_severity   severity     warning
email     retry_min      duration     15s
email     to             str          root
email     from           str          -
email     sendmail       path         %(sendmail)s
email     max_per_hour   int          12
webhook   enabled        bool         no
webhook   min_severity   severity     warning
webhook   retry_min      duration     15s
webhook   url            secret       -
webhook   format         choice:json|ecs|slack|discord|teams|mattermost|ntfy|gotify  json
webhook   secret         secret       -
webhook   timeout        duration     10s
webhook   max_per_hour   int          60
log       events_file    pathorempty  /var/log/fimwatch/events.jsonl
log       format         choice:fimwatch|ecs  fimwatch
""" % {"state_dir": DEFAULT_STATE_DIR, "no_diff": DEFAULT_NO_DIFF, "dev_log": DEV_LOG,
       "journal": JOURNAL_SOCKET, "sendmail": SENDMAIL,
       "paths": "/etc /usr/bin /usr/sbin /usr/local/bin /usr/local/sbin /var/www",
       "critical": "/etc/passwd /etc/shadow /etc/group /etc/gshadow /etc/sudoers "
                   "/etc/sudoers.d/** /etc/ssh/** /etc/pam.d/** /etc/systemd/system/** "
                   "/etc/cron*/** /etc/ld.so.preload /usr/bin/** /usr/sbin/** "
                   "/usr/local/bin/** /usr/local/sbin/**"}


def _schema(table):
    """section -> key -> (type, default), in the table's order."""
    out = {}
    for line in table.strip().splitlines():
        sect, key, typ, default = line.split(None, 3)
        out.setdefault(sect, {})[key] = (typ, "" if default == "-" else default)
    return out


SCHEMA = _schema(_SCHEMA_TABLE)


class Config:
    """The effective settings: cfg.get(section, key); webhooks in cfg.webhooks."""

    def __init__(self, path, values, lines, webhooks):
        self.path = path
        self.values = values            # {(section, key): value}
        self.lines = lines              # {(section, key): lineno}
        self.webhooks = webhooks        # [(name, {key: value})]
        g = lambda k: values[("fimwatch", k)]  # noqa: E731
        self.state_dir = g("state_dir")
        self.hostname = g("hostname") or fqdn()
        self.settle = g("settle")
        self.hash_max_size = g("hash_max_size")
        self.scan_interval = g("scan_interval")
        self.scan_rate = g("scan_rate")
        self.no_diff = g("no_diff")
        self.diff_max_size = g("diff_max_size")
        self.diff_paths = g("diff_paths")
        self.package_check = g("package_check")
        self.heartbeat = g("heartbeat")
        self.paths = values[("watch", "paths")]
        self.exclude = values[("watch", "exclude")]
        self.scan_only = values[("watch", "scan_only")]
        self.poll_interval = values[("watch", "poll_interval")]
        self.editor_grace = values[("watch", "editor_grace")]
        self.append_only = values[("watch", "append_only")]
        self.events_file = values[("log", "events_file")]
        self.own_files = own_files(path, self.events_file)
        self._own = PatternSet([_glob_escape(p) for p in self.own_files]
                               + [_glob_escape(p) + "/**" for p in self.own_files])
        # Severity: first matching level in file order wins; default warning.
        order = sorted(SCHEMA["severity"], key=lambda k: lines.get(("severity", k), 1 << 30))
        self.severity_rules = [(k, values[("severity", k)]) for k in order
                               if values[("severity", k)]]
        self._severity = {}             # path -> level: see severity_for

    def get(self, section, key):
        return self.values[(section, key)]

    def is_own(self, path):
        """One of fimwatch's own files (own_files), or inside one of its directories."""
        return self._own.match(path)

    def severity_for(self, path):
        # Asked several times per change (settle limit, event, transaction
        # hold): the rules are fixed for this Config, so the answer is kept.
        memo = self._severity
        sev = memo.get(path)
        if sev is None:
            sev = self._severity_of(path)
            if len(memo) >= MEMO_KEEP:
                memo.clear()
            memo[path] = sev
        return sev

    def _severity_of(self, path):
        if self._own.match(path):
            return "critical"            # tampering with the monitor itself
        for level, pats in self.severity_rules:
            if pats.match(path):
                return level
        return "warning"

    def resolved_roots(self):
        """[(configured, watched)]: a configured path that is a symlink is
        resolved once (on merged-/usr systems /bin is a link to usr/bin);
        symlinks inside the trees are never followed."""
        out = []
        no_follow = getattr(self, "no_follow", ())
        for p in self.paths:
            r = os.path.realpath(p) if os.path.islink(p) and p not in no_follow else p
            out.append((p, r))
        return out

    def extra_roots(self):
        """Watched whatever [watch] paths says: fimwatch's own files, and the
        append_only paths that name one file (no wildcard)."""
        return [p for p in self.own_files + self.append_only.patterns
                if not any(c in p for c in "*?[")
                and not any(within(p, r) for r in self.paths)]

    def all_roots(self):
        return list(self.paths) + [p for p in self.scan_only if p not in self.paths]


def own_files(config_path, events_file):
    """fimwatch's own files, watched at critical whatever [watch] paths and
    [severity] say: the program (and LIBDIR, with its byte-compiled copy and
    inotify_simple), the launcher, the config, the units and their drop-in
    directory, the sysctl drop-in, and the events file (append-only). The
    state_dir is not among them: the daemon writes it all the time; a lost or
    replaced baseline is a baseline_lost event instead."""
    prog = os.path.realpath(os.path.abspath(__file__))
    conf = os.path.abspath(config_path)
    out = [LIBDIR, LAUNCHER, conf, os.path.realpath(conf), SYSCTL_CONF]
    out += [UNIT_DIR + "/" + u for u in UNITS]
    if not prog.startswith(LIBDIR + "/"):
        out.append(prog)                 # run from a checkout
    if events_file:
        out.append(events_file)
    return [_convert_path(p) for i, p in enumerate(out) if p not in out[:i]]


# range limits of numeric keys: (section, key) -> (lowest, highest); "webhook"
# stands for every [webhook NAME] section. ZERO_IS_OFF keys also take 0.
LIMITS = {
    ("fimwatch", "settle"): (0.0, 60.0),
    ("fimwatch", "scan_interval"): (1.0, DURATION_MAX),
    ("fimwatch", "scan_rate"): (64 << 10, 1 << 40),
    ("fimwatch", "heartbeat"): (1.0, DURATION_MAX),
    ("fimwatch", "hash_max_size"): (1, 1 << 50),
    ("watch", "poll_interval"): (1.0, 7 * 86400),
    ("watch", "editor_grace"): (1.0, 365 * 86400),
    ("email", "retry_min"): (0.1, 3600),
    ("email", "max_per_hour"): (1, 100000),
    ("webhook", "timeout"): (0.5, 300),
    ("webhook", "retry_min"): (0.1, 3600),
    ("webhook", "max_per_hour"): (1, 100000),
}


def _convert_path(raw):
    if not raw.startswith("/"):
        raise ValueError("must be an absolute path, got %r" % raw)
    return "/" + os.path.normpath(raw).lstrip("/")     # '//x' is '/x'


def within(p, top):
    """p is top itself or a path below it ("/a/bc" is not below "/a/b")."""
    if top == "/":
        return p.startswith("/")
    return p == top or p.startswith(top + "/")


def _convert_paths(raw):
    out = []
    for p in raw.split():
        if not p.startswith("/"):
            raise ValueError("paths must be absolute, got %r" % p)
        p = _convert_path(p)
        if p == "/":
            raise ValueError("watching / is not supported; list the directories")
        if p not in out:
            out.append(p)
    return out


def _convert_int(raw):
    if not re.match(r"^\d+$", raw):
        raise ValueError("not a whole number: %r" % raw)
    return int(raw)


def _convert_word(words, what):
    def conv(raw):
        if raw.lower() not in words:
            raise ValueError("not %s: %r (one of %s)" % (what, raw, ", ".join(words)))
        return raw.lower()
    return conv


_CONVERTERS = {
    "str": str, "secret": str,
    "path": _convert_path,
    "pathorempty": lambda raw: _convert_path(raw) if raw else "",
    "paths": _convert_paths,
    "patterns": lambda raw: PatternSet(raw.split()),
    "duration": parse_duration,
    "size": parse_size,
    "bool": parse_bool,
    "int": _convert_int,
    "severity": _convert_word(SEVERITIES, "a severity"),
    "facility": _convert_word(list(FACILITIES), "a syslog facility"),
}


def _convert(typ, raw):
    """The value of a config string of type typ; ValueError says what is wrong."""
    raw = raw.strip()
    if typ.startswith("choice:"):
        return _convert_word(typ[7:].split("|"), "a choice")(raw)
    return _CONVERTERS[typ](raw)


# keys whose 0 means off, and what 0 means for each
ZERO_IS_OFF = {"scan_interval": "never", "heartbeat": "off", "scan_rate": "no cap"}


def _check_limit(sect, key, v):
    lim = LIMITS.get(("webhook" if sect.startswith("webhook") else sect, key))
    if lim is None or lim[0] <= v <= lim[1] or (key in ZERO_IS_OFF and v == 0):
        return
    typ = SCHEMA["webhook" if sect.startswith("webhook") else sect][key][0]
    lo, hi = (_show(typ, x) for x in lim)
    if key in ZERO_IS_OFF:
        raise ValueError("0 (%s) or between %s and %s" % (ZERO_IS_OFF[key], lo, hi))
    raise ValueError("must be at least %s" % lo if lim[1] >= 1 << 40 else
                     "must be between %s and %s" % (lo, hi))


def _line_map(text):
    """(section, key) -> line number, and section -> line number: configparser
    keeps no line numbers, and an error without one is hard to act on."""
    keys, sections, sect = {}, {}, None
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s[0] in "#;":
            continue
        if s.startswith("[") and "]" in s:
            sect = s[1:s.index("]")].strip()
            sections.setdefault(sect, n)
        elif sect is not None and not line[:1].isspace():
            m = re.match(r"\s*([^=:]+?)\s*[=:]", line)
            if m:
                keys.setdefault((sect, m.group(1).strip().lower()), n)
    return keys, sections


def check_config_perms(path):
    """Like sshd's StrictModes: as root, refuse a config that others can change."""
    if os.geteuid() != 0:
        return
    # The link (if any), the directory it is in, the real file and its
    # directory: whoever can change any of them can change the config.
    ap = os.path.abspath(path)
    real = os.path.realpath(ap)
    checks = [(ap, True), (os.path.dirname(ap), False)]
    if real != ap:
        checks += [(real, False), (os.path.dirname(real), False)]
    for p, is_link in checks:
        st = os.lstat(p) if is_link else os.stat(p)
        if st.st_uid != 0 or (st.st_mode & 0o022 and not stat.S_ISLNK(st.st_mode)):
            if stat.S_ISDIR(st.st_mode):
                fix = "keep the config in a directory only root can write, such as " \
                      "/etc/fimwatch" if st.st_mode & 0o1000 or st.st_uid != 0 else \
                      "chmod go-w %s" % p
            else:
                fix = ("chown root %s; " % p if st.st_uid else "") + "chmod go-w %s" % p
            raise ConfigError("%s: %s is %s and mode %04o; it must be owned by root and not "
                              "writable by group or others (%s)"
                              % (path, p, "owned by uid %d" % st.st_uid if st.st_uid else
                                 "owned by root", stat.S_IMODE(st.st_mode), fix))


class _ConfigFile:
    """One config file being read: where each key is, and the one way to say
    what is wrong with it: `FILE:LINE: [section] key: message`."""

    def __init__(self, path, text):
        self.path = path
        self.keys, self.sections = _line_map(text)

    def error(self, sect=None, key=None, message="", line=None):
        if line is None:
            line = self.keys.get((sect, key)) if key else self.sections.get(sect)
        where = "%s:%s" % (self.path, line or "?")
        if sect is None:
            return ConfigError("%s: %s" % (where, message))
        return ConfigError("%s: [%s]%s: %s" % (where, sect, " " + key if key else "", message))

    def value(self, sect, key, typ, raw):
        try:
            v = _convert(typ, raw)
            _check_limit(sect, key, v)
            return v
        except ValueError as e:
            raise self.error(sect, key, str(e))


def _read_config(path, check_perms):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError("%s: config file not found (pass --config PATH or set "
                          "FIMWATCH_CONFIG; an example is fimwatch.conf.example)" % path)
    except OSError as e:
        raise ConfigError("%s: cannot read config: %s" % (path, e.strerror))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("%s: not UTF-8 text (byte %d)" % (path, e.start))
    if check_perms:
        check_config_perms(path)
    return text


def _parse_ini(cf, text):
    cp = configparser.ConfigParser(interpolation=None, strict=True,
                                   comment_prefixes=("#", ";"),
                                   inline_comment_prefixes=("#", ";"),
                                   empty_lines_in_values=False,
                                   default_section="\x00none")
    try:
        cp.read_string(text, source=cf.path)
    except configparser.DuplicateOptionError as e:
        raise cf.error(e.section, e.option, "key given twice", line=e.lineno)
    except configparser.DuplicateSectionError as e:
        raise cf.error(e.section, None, "section given twice", line=e.lineno)
    except configparser.MissingSectionHeaderError as e:
        raise cf.error(None, None, "text before the first [section]", line=e.lineno)
    except configparser.ParsingError as e:
        lineno, line = e.errors[0] if e.errors else ("?", "")
        raise cf.error(None, None, "cannot parse %s: expected `key = value`, an indented "
                       "continuation line, or `[section]`"
                       % esc(str(line).strip().strip("'\"").rstrip("\\n"))[:60], line=lineno)
    return cp


_WEBHOOK_RE = re.compile(r"^webhook(?:\s+([A-Za-z0-9_.-]+))?$")


def _check_names(cf, cp):
    """Every section and key is one the SCHEMA knows."""
    for sect in cp.sections():
        base = "webhook" if _WEBHOOK_RE.match(sect) else sect
        if base not in SCHEMA:
            if sect.startswith("webhook"):
                raise cf.error(sect, None, "a webhook name may use letters, digits, _ . -")
            raise cf.error(sect, None, "unknown section (known: %s)" % ", ".join(SCHEMA))
        for key in cp[sect]:
            if key not in SCHEMA[base]:
                raise cf.error(sect, key, "unknown key (known: %s)" % ", ".join(SCHEMA[base]))


def _section_values(cf, cp, sect, base):
    """{key: value} of one section, defaults filled in."""
    out = {}
    for key, (typ, default) in SCHEMA[base].items():
        raw = cp.get(sect, key, fallback=None) if cp.has_section(sect) else None
        out[key] = cf.value(sect, key, typ, default if raw is None else raw)
    return out


def _webhooks(cf, cp):
    hooks = []
    for sect in cp.sections():
        m = _WEBHOOK_RE.match(sect)
        if not m:
            continue
        hook = _section_values(cf, cp, sect, "webhook")
        if hook["enabled"]:
            import urllib.parse
            u = urllib.parse.urlsplit(hook["url"])
            if u.scheme not in ("http", "https") or not u.hostname:
                raise cf.error(sect, "url", "must be an http:// or https:// URL",
                               line=cf.keys.get((sect, "url"), cf.sections.get(sect)))
        hooks.append((m.group(1) or "default", hook))
    return hooks


def _check_whole(cf, values):
    """Rules that involve more than one key, or the filesystem."""
    sd = values[("fimwatch", "state_dir")]
    if os.path.exists(sd) and not os.path.isdir(sd):
        raise cf.error("fimwatch", "state_dir", "%s exists and is not a directory" % sd)
    if sd == "/" or sd.startswith(("/proc/", "/sys/", "/dev/")):
        raise cf.error("fimwatch", "state_dir", "%s is not a place for files" % sd)
    if not values[("watch", "paths")] and not values[("watch", "scan_only")]:
        raise cf.error("watch", "paths", "nothing to watch")
    for key in ("paths", "scan_only"):
        for p in values[("watch", key)]:
            if within(p, sd):
                # its own database, never watched: the path would be silently empty
                raise cf.error("watch", key, "%s is inside state_dir %s, which fimwatch never "
                               "watches (its own database); move one of them" % (p, sd))
    for p in values[("watch", "append_only")].patterns:
        if not p.startswith("/"):
            raise cf.error("watch", "append_only", "%r is not an absolute path or pattern "
                           "(e.g. /var/log/auth.log or /var/log/*.log)" % p)
        if os.path.isdir(p) and not os.path.islink(p):
            raise cf.error("watch", "append_only", "%s is a directory; name the log files "
                           "(e.g. %s/*.log)" % (p, p.rstrip("/")))
    if values[("email", "enabled")] and not values[("email", "to")]:
        raise cf.error("email", "to", "empty")
    for key in ("to", "from"):
        if any(c in values[("email", key)] for c in "\r\n\0"):
            raise cf.error("email", key, "contains a control character")


def load_config(path, check_perms=True):
    """Read and strictly validate the config; ConfigError names file, line, key."""
    text = _read_config(path, check_perms)
    cf = _ConfigFile(path, text)
    cp = _parse_ini(cf, text)
    _check_names(cf, cp)
    values = {}
    for sect in SCHEMA:
        if sect != "webhook":
            values.update(((sect, k), v) for k, v in _section_values(cf, cp, sect, sect).items())
    webhooks = _webhooks(cf, cp)
    _check_whole(cf, values)
    return Config(path, values, cf.keys, webhooks)


# ---------------------------------------------------------------------------
# File state: lstat + sha256, never following, never blocking
# ---------------------------------------------------------------------------

# One baseline entry: what lstat (and, for files, sha256) saw of a path. A new
# field is added here, in SCHEMA_SQL's files table and in snapshot().
#   kind      file, dir, symlink, other
#   mode      permission bits (S_IMODE)
#   uid, gid
#   size      0 for directories (their size is noise)
#   mtime_ns, ctime_ns   0 for directories
#   ino
#   sha256    None: not a file, unreadable, or over hash_max_size
#   target    a symlink's target
#   skipped   1 over hash_max_size, 2 unreadable even as root
# Security metadata (read_meta). None: not known -- an entry from before
# these fields existed, or a filesystem that could not say; compare() never
# reports a change against None.
#   xattrs      JSON {name: sha256[:16] of value}; "" none
#   capability  security.capability decoded ("cap_setuid=ep"); "" none
#   acl         POSIX ACLs, access then default ("u:1000:r--,..."); "" none
#   flags       inode flags as lsattr letters ("ia"); "" none
#   rdev        device number of a char/block device node
#   links       hard-link count of a regular file
# (collections.namedtuple, not typing.NamedTuple: typing costs the daemon
# ~0.5 MB of memory for nothing it uses at run time.)
Rec = collections.namedtuple(
    "Rec", "kind mode uid gid size mtime_ns ctime_ns ino sha256 target skipped "
           "xattrs capability acl flags rdev links", defaults=(None,) * 6)


FIELDS = Rec._fields
_new_rec = tuple.__new__           # Rec from a full tuple of its fields, unchecked


def kind_of(st_mode):
    if stat.S_ISREG(st_mode):
        return "file"
    if stat.S_ISDIR(st_mode):
        return "dir"
    if stat.S_ISLNK(st_mode):
        return "symlink"
    return "other"


_O_HASH = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_O_NOATIME = getattr(os, "O_NOATIME", 0)
_hash_buf = threading.local()


# -- security metadata: xattrs, file capabilities, POSIX ACLs, inode flags --

_ACL_NAMES = ("system.posix_acl_access", "system.posix_acl_default")
_CAP_NAME = "security.capability"
_CAP_NAMES = (
    "chown dac_override dac_read_search fowner fsetid kill setgid setuid setpcap "
    "linux_immutable net_bind_service net_broadcast net_admin net_raw ipc_lock ipc_owner "
    "sys_module sys_rawio sys_chroot sys_ptrace sys_pacct sys_admin sys_boot sys_nice "
    "sys_resource sys_time sys_tty_config mknod lease audit_write audit_control setfcap "
    "mac_override mac_admin syslog wake_alarm block_suspend audit_read perfmon bpf "
    "checkpoint_restore").split()
# the ioctl FS_IOC_GETFLAGS = _IOR('f', 1, long); the kernel writes an int.
FS_IOC_GETFLAGS = 0x80006601 | (struct.calcsize("l") << 16)
# the inode flags an admin sets with chattr (lsattr letters). Flags the
# filesystem sets by itself (extents, htree index, inline data) are left out:
# they are not news.
_FLAG_LETTERS = ((0x1, "s"), (0x2, "u"), (0x8, "S"), (0x10000, "D"), (0x10, "i"),
                 (0x20, "a"), (0x40, "d"), (0x80, "A"), (0x4, "c"), (0x400, "m"),
                 (0x4000, "j"), (0x8000, "t"), (0x20000, "T"), (0x800000, "C"),
                 (0x2000000, "x"), (0x20000000, "P"), (0x40000000, "F"), (0x100000, "V"))
# filesystems (st_dev) that said they have no xattrs or no inode flags at
# all: not asked again, so a walk over procfs-like or FUSE trees costs no
# extra syscalls per file.
_FLAG_TEXT = {}          # raw inode flags -> their letters (_read_flags)
_NO_XATTR_DEV = set()
_NO_FLAGS_DEV = set()
_UNSUPPORTED = (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS, errno.EINVAL)


def cap_text(v):
    """security.capability (struct vfs_cap_data, v1-v3) as 'cap_a,cap_b=eip'."""
    if len(v) < 12:
        return "sha256:" + hashlib.sha256(v).hexdigest()[:16]
    magic = struct.unpack_from("<I", v)[0]
    words = struct.unpack_from("<%dI" % ((min(len(v), 20) - 4) // 4), v, 4)
    perm = words[0] | ((words[2] << 32) if len(words) > 2 else 0)
    inh = words[1] | ((words[3] << 32) if len(words) > 3 else 0)
    eff = "e" if magic & 1 else ""
    groups = {}
    for n in range(64):
        bit = 1 << n
        fl = eff + ("i" if inh & bit else "") + ("p" if perm & bit else "")
        if perm & bit or inh & bit:
            name = "cap_" + _CAP_NAMES[n] if n < len(_CAP_NAMES) else "cap_%d" % n
            groups.setdefault(fl, []).append(name)
    text = " ".join("%s=%s" % (",".join(names), fl) for fl, names in sorted(groups.items()))
    if magic >> 24 == 3 and len(v) >= 24:
        rootid = struct.unpack_from("<I", v, 20)[0]
        if rootid:
            text += " rootid=%d" % rootid
    return text or "="


def acl_text(v, prefix=""):
    """A system.posix_acl_* value as getfacl's short form 'u::rw-,u:1000:r--,...'."""
    if len(v) < 4 or (len(v) - 4) % 8:
        return prefix + "sha256:" + hashlib.sha256(v).hexdigest()[:16]
    out = []
    for off in range(4, len(v), 8):
        tag, perm, qid = struct.unpack_from("<HHI", v, off)
        t = {1: "u", 2: "u", 4: "g", 8: "g", 0x10: "m", 0x20: "o"}.get(tag, "?%d" % tag)
        out.append("%s%s:%s:%s%s%s" % (prefix, t, qid if tag in (2, 8) else "",
                                      "r" if perm & 4 else "-", "w" if perm & 2 else "-",
                                      "x" if perm & 1 else "-"))
    return ",".join(out)


def read_meta(target, st, fd_ok):
    """(xattrs, capability, acl, flags) of one inode; see Rec. target is an
    open fd (fd_ok: inode flags can be read too) or a path, which is never
    followed. Never raises: what cannot be read is None (unknown)."""
    xattrs, cap, acl = _read_xattrs(target, st.st_dev)
    flags = _read_flags(target, st.st_dev) if fd_ok else None
    return xattrs, cap, acl, flags


def _read_xattrs(target, dev):
    """(xattrs, capability, acl): '' for none, None when they cannot be read."""
    if dev in _NO_XATTR_DEV:
        return "", "", ""
    nofollow = isinstance(target, int)      # an fd: follow_symlinks must be True
    try:
        names = os.listxattr(target, follow_symlinks=nofollow)
    except OSError as e:
        if e.errno in _UNSUPPORTED:
            _NO_XATTR_DEV.add(dev)
            return "", "", ""
        return None, None, None
    if not names:
        return "", "", ""
    d, acls, cap = {}, [], ""
    for name in sorted(names):
        try:
            v = os.getxattr(target, name, follow_symlinks=nofollow)
        except OSError:
            continue                     # removed meanwhile
        if name == _CAP_NAME:
            cap = cap_text(v)
        elif name in _ACL_NAMES:
            acls.append(acl_text(v, "d:" if name.endswith("default") else ""))
        else:
            d[name] = hashlib.sha256(v).hexdigest()[:16]
    return (json.dumps(d, sort_keys=True, separators=(",", ":")) if d else "", cap,
            ",".join(acls))


def _read_flags(fd, dev):
    """chattr letters of an open inode, or None where the filesystem has none."""
    if dev in _NO_FLAGS_DEV:
        return None
    try:
        raw = struct.unpack_from("=I", fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(8)))[0]
    except OSError as e:
        if e.errno in _UNSUPPORTED:
            _NO_FLAGS_DEV.add(dev)
        return None
    letters = _FLAG_TEXT.get(raw)
    if letters is None:
        letters = "".join(c for bit, c in _FLAG_LETTERS if raw & bit)
        if len(_FLAG_TEXT) < 256:            # a few combinations on a real system
            _FLAG_TEXT[raw] = letters
    return letters


def meta_of(path, st, kind, dir_fd=None):
    """read_meta for a path (a name in dir_fd). Files and directories are
    opened (O_NOFOLLOW, O_NONBLOCK, checked to be the inode st saw) so the
    inode flags can be read too; device nodes are never opened (an open can
    have side effects), nor symlinks: their xattrs are read without following."""
    if kind in ("file", "dir"):
        try:
            fd = os.open(path, _O_HASH, dir_fd=dir_fd)
        except OSError:
            return None, None, None, None
        try:
            fst = os.fstat(fd)
            if (fst.st_ino, fst.st_dev) != (st.st_ino, st.st_dev):
                return None, None, None, None
            return read_meta(fd, fst, True)
        finally:
            os.close(fd)
    if dir_fd is not None:
        # os.listxattr takes no dir_fd: name the entry through the open
        # directory, so a directory swapped above it cannot redirect us.
        if not os.path.isdir("/proc/self/fd"):
            return None, None, None, None
        path = "/proc/self/fd/%d/%s" % (dir_fd, path)
    return read_meta(path, st, False)


# -- paths deeper than PATH_MAX: reached one directory at a time --

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def is_deep(path):
    """Too long for a path-based system call (ENAMETOOLONG)."""
    return len(path) >= PATH_MAX // 4 and len(os.fsencode(path)) >= PATH_MAX


def open_deep(path, flags=_O_DIR):
    """os.open(path, flags) for an absolute path of any length. Past PATH_MAX
    the directories below the longest prefix the kernel takes are opened one
    at a time through their parent's fd, none followed if a symlink (the
    walk's own rule: a directory swapped for a symlink never leads out)."""
    b = os.fsencode(path)
    if len(b) < PATH_MAX:
        return os.open(path, flags)
    cut = b.rindex(b"/", 0, PATH_MAX - 1)
    fd = os.open(b[:cut] or b"/", _O_DIR)
    try:
        parts = [c for c in b[cut + 1:].split(b"/") if c]
        for c in parts[:-1]:
            nfd = os.open(c, _O_DIR, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return os.open(parts[-1], flags, dir_fd=fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def deep_parent(path):
    """(fd of path's directory, path's name) for a path past PATH_MAX, for
    the dir_fd= form of a system call; the fd is closed afterwards."""
    d, name = path.rsplit("/", 1)
    fd = open_deep(d)
    try:
        yield fd, name
    finally:
        os.close(fd)


def lstat_deep(path):
    """os.lstat for a path of any length."""
    if not is_deep(path):
        return os.lstat(path)
    with deep_parent(path) as (fd, name):
        return os.lstat(name, dir_fd=fd)


def _is_dir_deep(path):
    try:
        return stat.S_ISDIR(os.stat(path).st_mode) if not is_deep(path) else \
            stat.S_ISDIR(lstat_deep(path).st_mode)
    except OSError:
        return False


def lexists_deep(path):
    try:
        lstat_deep(path)
    except OSError:
        return False
    return True


def hash_file(path, st, keep=0, dir_fd=None, meta=None):
    """sha256 of the regular file that lstat saw as st. Opens with O_NOFOLLOW
    and O_NONBLOCK, so a symlink swapped in or a FIFO is never followed or
    waited on, and checks with fstat that it is still the same regular file.
    Returns (hexdigest, fstat result, data) or (None, None, None) if it
    vanished or changed kind; data is the content when the file is at most
    keep bytes, else None. With a list as meta, read_meta() of the open file
    is appended to it. Raises OSError for other failures (e.g. EACCES)."""
    try:
        try:
            fd = os.open(path, _O_HASH | _O_NOATIME, dir_fd=dir_fd)
        except PermissionError:
            # O_NOATIME needs ownership or CAP_FOWNER
            fd = os.open(path, _O_HASH, dir_fd=dir_fd)
    except (FileNotFoundError, NotADirectoryError):
        return None, None, None
    except OSError as e:
        if e.errno == errno.ELOOP:               # became a symlink under us
            return None, None, None
        raise
    try:
        fst = os.fstat(fd)
        if not stat.S_ISREG(fst.st_mode) or fst.st_ino != st.st_ino:
            return None, None, None
        if meta is not None:
            meta.append(read_meta(fd, fst, True))
        left = max(st.st_size, 0)
        if fst.st_size <= keep:
            data = os.read(fd, keep + 1)
            if len(data) <= keep:
                return hashlib.sha256(data).hexdigest(), fst, data
            h = hashlib.sha256(data)
            left -= len(data)
        else:
            h = hashlib.sha256()
        if left <= HASH_SMALL:
            # A small file (most of a tree): one read (none when empty), no
            # per-thread buffer (HASH_CHUNK of resident memory each) for it.
            if left:
                h.update(os.read(fd, left))
            return h.hexdigest(), (st if fst.st_size > st.st_size else fst), None
        buf = getattr(_hash_buf, "buf", None)
        if buf is None:
            # The Hasher threads read big files all day; the loop's thread
            # mostly our own program and config at start, so HASH_SMALL
            # (1/16 of HASH_CHUNK) of resident memory for a few more reads.
            buf = _hash_buf.buf = bytearray(
                HASH_CHUNK if threading.current_thread() is not threading.main_thread()
                else HASH_SMALL)
        mv, chunk = memoryview(buf), len(buf)
        # Never past the size lstat saw: a file that grows as fast as we read
        # must not hold the loop. Its writes queue it again, and a later look
        # hashes what it is then (or skips it once over hash_max_size).
        while left > 0:
            n = os.readv(fd, [mv[:min(chunk, left)]])
            if not n:
                break
            h.update(mv[:n])
            left -= n
        # Grown since lstat: what was hashed is what lstat saw, so record that
        # (its older size and times make the next look hash it again).
        return h.hexdigest(), (st if fst.st_size > st.st_size else fst), None
    finally:
        os.close(fd)


def snapshot(path, max_size, old=None, trust=False, st=None, keep=0, out=None, dir_fd=None,
             name=None):
    """Current state of path as a Rec, or None if it does not exist.

    trust=True reuses the baseline hash when size, mtime, ctime and inode are
    all unchanged (ctime cannot be set from user space); scans that must
    re-read every byte pass trust=False. With keep > 0 and a list as out, the
    content of a file of at most keep bytes is appended to out. With dir_fd,
    name is looked up in that directory (a walk's open directory) instead of
    following path.

    The security metadata (read_meta) comes through the fd hash_file opens;
    with trust, from the baseline when inode and ctime are unchanged (every
    xattr, ACL, chattr or link change moves ctime)."""
    if dir_fd is None and is_deep(path):
        # past PATH_MAX: through the directory's fd, reached one level at a time
        try:
            with deep_parent(path) as (pfd, base):
                return snapshot(path, max_size, old, trust, st, keep, out, pfd, base)
        except (FileNotFoundError, NotADirectoryError):
            return None
    if dir_fd is not None:
        path = name
    for _ in range(3):
        if st is None:
            try:
                st = os.lstat(path, dir_fd=dir_fd)
            except (FileNotFoundError, NotADirectoryError):
                return None
        kind = kind_of(st.st_mode)
        meta = []
        if (trust and old is not None and old.kind == kind and kind != "dir"
                and old.xattrs is not None and old.ino == st.st_ino
                and old.ctime_ns == st.st_ctime_ns):
            meta.append((old.xattrs, old.capability, old.acl, old.flags))
        sha = target = None
        skipped = 0
        if kind == "file":
            got = _file_content(path, st, max_size, old, trust, keep, out, dir_fd, meta)
            if got is None:
                st = None                        # replaced while we looked: look again
                continue
            sha, st, skipped = got
        elif kind == "symlink":
            try:
                target = os.readlink(path, dir_fd=dir_fd)
            except OSError:
                st = None
                continue
        if not meta:
            meta.append(meta_of(path, st, kind, dir_fd))
        return _make_rec(kind, st, sha, target, skipped, meta[0])
    return None


def _file_content(path, st, max_size, old, trust, keep, out, dir_fd, meta):
    """(sha256 or None, stat, skipped) of a regular file; None when it was
    replaced while we looked. meta: an empty list gets the metadata read
    through the hashing fd."""
    if st.st_size > max_size:
        return None, st, 1
    if (trust and old is not None and old.kind == "file" and old.sha256 is not None
            and old.size == st.st_size and old.mtime_ns == st.st_mtime_ns
            and old.ctime_ns == st.st_ctime_ns and old.ino == st.st_ino):
        return old.sha256, st, 0
    try:
        sha, fst, data = hash_file(path, st, keep, dir_fd, meta if not meta else None)
    except OSError:
        # Unreadable even as root (FUSE, root-squashed NFS): keep the
        # metadata and say so; skipped=2 marks it.
        return None, st, 2
    if sha is None:
        return None
    if data is not None and out is not None:
        out.append(data)
    return sha, fst, 0


def _make_rec(kind, st, sha, target, skipped, meta):
    isdir = kind == "dir"
    mode = st.st_mode
    xattrs, cap, acl, flags = meta
    # Positional, in Rec's field order (keywords cost twice as much per file).
    return _new_rec(Rec, (kind, stat.S_IMODE(mode), st.st_uid, st.st_gid,
                          0 if isdir else st.st_size,      # a directory's size is noise
                          0 if isdir else st.st_mtime_ns,
                          0 if isdir else st.st_ctime_ns,
                          st.st_ino, sha, target, skipped, xattrs, cap, acl, flags,
                          st.st_rdev if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else None,
                          st.st_nlink if kind == "file" else None))


# An append-only file at the last look ([watch] append_only), in memory: its
# inode, its size, the sha256 state of its bytes so far (extended by the bytes
# appended since, never re-read), and sha256 of its first and last
# APPEND_WINDOW bytes (read again at the next append).
Growth = collections.namedtuple("Growth", "dev ino size h head tail")


def _hash_range(fd, h, start, end):
    """Feed bytes [start, end) of fd to h; False if the file ended first."""
    while start < end:
        b = os.pread(fd, min(HASH_CHUNK, end - start), start)
        if not b:
            return False
        h.update(b)
        start += len(b)
    return True


def _window(fd, start, end):
    h = hashlib.sha256()
    return h.hexdigest() if _hash_range(fd, h, start, end) else None


def check_growth(fd, fst, old_size, old_sha, known):
    """Did the append-only file open as fd (fstat fst) only grow since it had
    old_size bytes with sha256 old_sha? Returns (True, Growth now) or
    (False, None): bytes already written were changed. With known (the
    Growth of the last look, same inode and size) only the head and tail
    windows of the old bytes are read again, and the new bytes once: an
    append to a 1 GB log costs reading what was appended plus 128 KiB. An
    edit in the middle of a growing file is found by the next full read (a
    restart, the periodic verification). Without known, the old bytes are
    read once and compared with old_sha (None: over hash_max_size, not
    compared)."""
    size, w = fst.st_size, APPEND_WINDOW
    if known is not None and (known.dev, known.ino, known.size) == \
            (fst.st_dev, fst.st_ino, old_size):
        if (_window(fd, 0, min(old_size, w)) != known.head
                or _window(fd, max(0, old_size - w), old_size) != known.tail):
            return False, None
        h = known.h.copy()
    else:
        h = hashlib.sha256()
        if not _hash_range(fd, h, 0, old_size) or \
                (old_sha is not None and h.hexdigest() != old_sha):
            return False, None
    if not _hash_range(fd, h, old_size, size):
        return False, None
    return True, Growth(fst.st_dev, fst.st_ino, size, h, _window(fd, 0, min(size, w)),
                        _window(fd, max(0, size - w), size))


def rotated_to(path, ino):
    """The name logrotate gave the inode that was path (path.1, path-DATE,
    path.0 in the same directory), or None."""
    d, base = os.path.split(path)
    try:
        names = os.listdir(d)
    except OSError:
        return None
    for n in names:
        if n.startswith((base + ".", base + "-")):
            try:
                if os.lstat(os.path.join(d, n)).st_ino == ino:
                    return os.path.join(d, n)
            except OSError:
                pass
    return None


_OWNERSHIP = (("mode", "mode"), ("uid", "owner"), ("gid", "group"))


def compare(old, new):
    """(event, changes) between two Recs, or None if nothing an admin would care
    about changed (an mtime-only touch, an identical rewrite)."""
    if old is None or new is None:
        return None if old is new else ("created", []) if old is None else ("deleted", [])
    if old.kind != new.kind:
        changes = ["type"]
    else:
        changes = _content_changes(old, new)
    changes += [name for field, name in _OWNERSHIP if getattr(old, field) != getattr(new, field)]
    if old.kind == new.kind:
        changes += meta_changes(old, new)
        if (new.kind == "file" and (old.skipped or new.skipped) and not changes
                and old.ctime_ns != new.ctime_ns):
            # Not hashed (over hash_max_size): a ctime that moved with no
            # other change to explain it is a write whose mtime was put back.
            changes.append("content")
    if not changes:
        return None
    return ("modified" if "content" in changes else "attributes"), changes


def _content_changes(old, new):
    """['content'] or ['target'] when what two Recs of one kind hold differs.
    A file not hashed (over hash_max_size, unreadable) is compared on size,
    mtime and inode instead."""
    if new.kind == "symlink":
        return ["target"] if old.target != new.target else []
    if new.kind != "file":
        return []
    if not (old.skipped or new.skipped):
        return ["content"] if old.sha256 != new.sha256 else []
    same = (old.size, old.mtime_ns, old.ino, old.skipped) == \
        (new.size, new.mtime_ns, new.ino, new.skipped)
    return [] if same else ["content"]


def meta_changes(old, new):
    """The `changes` names of the security metadata that differs between two
    Recs of the same kind; a field unknown on either side (None) is not
    compared, so a baseline from before these fields never alerts on them."""
    out = []
    for names, change in ((("xattrs", "capability"), "xattr"), (("acl",), "acl"),
                          (("flags",), "flags"), (("rdev",), "rdev"), (("links",), "links")):
        for n in names:
            a, b = getattr(old, n), getattr(new, n)
            if a is not None and b is not None and a != b:
                out.append(change)
                break
    return out


# ---------------------------------------------------------------------------
# Baseline store (SQLite in state_dir)
# ---------------------------------------------------------------------------

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS files (
    parent BLOB NOT NULL, name BLOB NOT NULL, kind TEXT, mode INT, uid INT,
    gid INT, size INT, mtime_ns INT, ctime_ns INT, ino INT, sha256 TEXT,
    target TEXT, skipped INT, xattrs TEXT, capability TEXT, acl TEXT, flags TEXT,
    rdev INT, links INT, PRIMARY KEY (parent, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS content (path BLOB PRIMARY KEY, data BLOB) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, t REAL NOT NULL,
    severity TEXT, event TEXT, path TEXT, json TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_t ON events(t);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS spool (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, channel TEXT NOT NULL, created REAL NOT NULL,
    next_try REAL NOT NULL, attempts INT NOT NULL DEFAULT 0, last_error TEXT,
    payload TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS spool_channel ON spool(channel, next_try);
"""

SPOOL_BATCH = 5000
SpoolRow = collections.namedtuple("SpoolRow", "seq created attempts payload")

# columns added to the files table after its first release, added to an
# existing database by Store._upgrade_files_table().
FILES_ADDED_COLUMNS = (("xattrs", "TEXT"), ("capability", "TEXT"), ("acl", "TEXT"),
                       ("flags", "TEXT"), ("rdev", "INT"), ("links", "INT"))
UPGRADE_META = "baseline_upgraded"       # meta key: the columns added, until announced


def upgrade_notice(store, host):
    """The one `notice` event after Store._upgrade_files_table() on a baseline with
    entries, or None. Clears the flag (the caller commits)."""
    cols = store.meta(UPGRADE_META)
    if not cols:
        return None
    store.set_meta(UPGRADE_META, "")
    return new_event(host, "baseline_upgraded", "notice", "startup", "",
                     fields=cols.split(","),
                     message="baseline upgraded: the new fields (%s) are filled in silently "
                             "from the current state of the watched files by this start-up "
                             "check; changes to them are reported from then on"
                             % cols.replace(",", ", "))


_REC_COLS = ", ".join(Rec._fields)
_GET_FILE = "SELECT %s FROM files WHERE parent=? AND name=?" % _REC_COLS
_PUT_FILE = "INSERT OR REPLACE INTO files (parent, name, %s) VALUES (%s)" % (
    _REC_COLS, ",".join("?" * (2 + len(Rec._fields))))
# Store.keys_in: a row snapshot(trust=True) rebuilds unchanged from an lstat
# with the same type, mode, owner, size, times, inode and link count (?1:
# hash_max_size), or a directory's with its metadata; Store.children_slow:
# the other rows.
_TRUSTED = ("ifnull(xattrs IS NOT NULL AND (kind IN ('symlink', 'dir') OR kind='file' AND"
            " sha256 IS NOT NULL AND skipped=0 AND links IS NOT NULL AND size<=?1), 0)")
_KEYS_IN = ("SELECT name, CASE WHEN %s THEN (CASE kind WHEN 'file' THEN %d WHEN 'dir' THEN %d"
            " ELSE %d END) + mode ELSE -1 END, uid, gid, size, mtime_ns, ctime_ns, ino,"
            " ifnull(links, 1), %s FROM files WHERE parent=?2"
            % (_TRUSTED, stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK,
               ", ".join("CASE kind WHEN 'dir' THEN %s END" % c
                         for c in ("xattrs", "capability", "acl", "flags"))))
_SLOW_IN = "SELECT name, %s FROM files WHERE parent=?2 AND NOT %s" % (_REC_COLS, _TRUSTED)
# KeysReader: _KEYS_IN's rows of a range of parents, in (parent, name) order,
# the parent last (a row's key[1:13] as keys_in's).
_KEYS_FROM = _KEYS_IN.replace(" FROM files WHERE parent=?2",
                              ", parent FROM files WHERE parent>=?2 AND parent<?3"
                              " ORDER BY parent, name")
_ADD_EVENT = "INSERT INTO events (seq, id, t, severity, event, path, json) VALUES (?,?,?,?,?,?,?)"
EVENTS_KEEP = 200000
# A transaction is split after this many row writes (Store._w): StateDB keeps
# a transaction's writes in memory until its commit (to replay them after a
# full disk), so this bounds that memory (~0.3 MB) while a baseline is built.
TX_SPLIT = 1000
# SQLite's page cache per connection, KiB (its default is 2,000; 1,024
# until 0.2 cost 0.5 MiB more at 50,000 directories for no measured speed):
# walks read the B-tree in order, the rest is in the OS page cache.
SQLITE_CACHE_KIB = 512
# Store.get's cache of baseline rows (see Store.get), entries.
ROW_CACHE = 1024
_MISS = object()


def _split(path):
    b = os.fsencode(path)
    i = b.rfind(b"/")
    return (b[:i] or b"/"), b[i + 1:]


def _join(parent, name):
    return os.fsdecode(parent + name if parent == b"/" else parent + b"/" + name)


def _desc_range(path):
    b = os.fsencode(path)
    return b, b + b"/", b + b"0"          # '0' is the byte after '/'


def ensure_state_dir(state_dir):
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        st = os.stat(state_dir)
        if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(state_dir, 0o700)
    except OSError as e:
        raise StateError("state_dir %s: %s" % (state_dir, e.strerror))


class Store:
    """The baseline, the event log, the alert spool and small key/value state,
    all in one SQLite database (WAL: a crash loses at most the last batch and
    never corrupts it). Writes are batched: call commit() after a batch."""

    def __init__(self, state_dir, create=True):
        if create:
            ensure_state_dir(state_dir)
        self.path = os.path.join(state_dir, DB_NAME)
        if not create and not os.path.exists(self.path):
            raise FimwatchError("no baseline in %s yet (run `fimwatch scan` or start the "
                                "daemon first)" % state_dir)
        old_umask = os.umask(0o077)
        try:
            self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None,
                                      check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA cache_size=-%d" % SQLITE_CACHE_KIB)
            self.db.executescript(SCHEMA_SQL)
            self._upgrade_files_table()
        except sqlite3.Error as e:
            raise StateError("baseline database %s: %s" % (self.path, e))
        finally:
            os.umask(old_umask)
        self.lock = threading.RLock()
        self.on_commit = []            # called after each commit (wakes alert workers)
        self._seq_hint = 0             # the last event sequence this connection drew
        self._tx = False
        self._seq_read = False         # next_sequence read the counter in this transaction
        self._writes = 0
        self._rows = {}                # path -> Rec or None: see get()
        self._version = None           # PRAGMA data_version when _rows was checked

    # -- transactions --
    def _w(self, n=1):
        if not self._tx:
            self.db.execute("BEGIN IMMEDIATE")
            self._tx = True
            self._seq_read = False
        self._writes += n
        if self._writes >= TX_SPLIT:
            self.commit()
            trim_heap()
            self.db.execute("BEGIN IMMEDIATE")
            self._tx = True

    def commit(self):
        self._commit_quiet()
        for cb in self.on_commit:
            cb()

    def _commit_quiet(self):
        with self.lock:
            if self._tx:
                self.db.execute("COMMIT")
                self._tx = False
                self._writes = 0

    def close(self):
        self.commit()
        self.db.close()

    def _upgrade_files_table(self):
        """Add the missing FILES_ADDED_COLUMNS to an older baseline. Their values
        stay NULL (unknown: compare() ignores them) until the next walk fills
        them in silently; a baseline that had entries is flagged in meta so the
        daemon says once that it was upgraded (upgrade_notice)."""
        have = {r[1] for r in self.db.execute("PRAGMA table_info(files)")}
        missing = [(n, t) for n, t in FILES_ADDED_COLUMNS if n not in have]
        if not missing:
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for n, t in missing:
                self.db.execute("ALTER TABLE files ADD COLUMN %s %s" % (n, t))
            if self.db.execute("SELECT 1 FROM files LIMIT 1").fetchone():
                self.db.execute("INSERT OR REPLACE INTO meta VALUES (?,?)",
                                (UPGRADE_META, ",".join(n for n, _ in missing)))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    # -- commit points, named after the rule each one keeps --
    def commit_turn(self):
        """End of a main-loop turn or of a slice of a walk: the turn's events
        and the baseline rows they explain become durable together. Engine.apply
        writes each event row before its baseline row, so a crash (or the
        TX_SPLIT-write split in _w) can repeat a change at the next start,
        never lose it."""
        self.commit()

    def commit_delivered(self):
        """An alert leaves the spool only once it was delivered: a crash
        before this sends it again (same event id), never drops it."""
        self.commit()

    # -- baseline --
    def get(self, path):
        """The baseline row of path (a Rec), or None. The last ROW_CACHE rows
        read or written here are kept, so a path's first sight in the settle
        queue (Engine.capture) and its comparison read the row once: put and
        delete write through, the tree operations empty it, and so do another
        process's commits (refresh(), each loop turn) and a failing StateDB
        (its reads show what was committed, not what waits)."""
        rows = self._rows
        if rows and getattr(self.db, "error", None) is not None:
            rows.clear()                   # a rolled-back write may be among them
        rec = rows.get(path, _MISS)
        if rec is not _MISS:
            return rec
        with self.lock:
            row = self.db.execute(_GET_FILE, _split(path)).fetchone()
            rec = Rec(*row) if row else None
            self._remember(path, rec)
        return rec

    def _remember(self, path, rec):
        rows = self._rows
        if getattr(self.db, "error", None) is not None:
            rows.clear()
            return
        if len(rows) >= ROW_CACHE:
            del rows[next(iter(rows))]
        rows[path] = rec

    def refresh(self):
        """Forget the cached rows if another connection committed since the
        last call (the CLI's accept or scan while the daemon runs)."""
        with self.lock:
            v = self.db.execute("PRAGMA data_version").fetchone()[0]
            if v != self._version:
                self._version = v
                self._rows.clear()

    def children(self, dirpath):
        """{name (str): Rec} of the baseline entries directly in dirpath."""
        with self.lock:
            rows = self.db.execute("SELECT name, %s FROM files WHERE parent=?" % _REC_COLS,
                                   (os.fsencode(dirpath),)).fetchall()
        return {os.fsdecode(r[0]): Rec(*r[1:]) for r in rows}

    def keys_in(self, dirpath, max_size):
        """{name (str): (name (bytes), st_mode, uid, gid, size, mtime_ns, ctime_ns,
        ino, links, and for a directory its xattrs, capability, acl, flags)} of
        the baseline entries directly in dirpath, for the quick walk's one
        comparison per entry with its lstat (Engine._walk_quick). st_mode is
        -1 (never an lstat's) for a row that snapshot(trust=True) would not
        rebuild from an unchanged lstat alone (with a directory's metadata):
        a device or other kind, a file not hashed (or over max_size now), one
        with unknown metadata or link count (from before those columns). A
        symlink's links is 1: its link count is not recorded."""
        with self.lock:
            rows = self.db.execute(_KEYS_IN, (max_size, os.fsencode(dirpath))).fetchall()
        dec = os.fsdecode
        return {dec(r[0]): r for r in rows}

    def keys_reader(self, top, max_size):
        """A KeysReader over the rows below top (a directory path)."""
        return KeysReader(self, top, max_size)

    def children_slow(self, dirpath, max_size):
        """children() of the rows keys_in() gives st_mode -1."""
        with self.lock:
            rows = self.db.execute(_SLOW_IN, (max_size, os.fsencode(dirpath))).fetchall()
        return {os.fsdecode(r[0]): Rec(*r[1:]) for r in rows}

    def put(self, path, rec):
        with self.lock:
            self._w()
            self.db.execute(_PUT_FILE, _split(path) + rec)
            self._remember(path, rec)

    @staticmethod
    def file_row(path, rec):
        """The files-table row of put_many() for path's Rec; builds no query,
        so a Hasher thread makes the rows of the files it read."""
        return _split(path) + rec

    def put_many(self, rows):
        """put() for [file_row()] in one statement (a baseline being built)."""
        with self.lock:
            self._rows.clear()
            self._w(len(rows))
            self.db.executemany(_PUT_FILE, rows)

    def has_under(self, path):
        """Whether the baseline has path or anything below it."""
        b, lo, hi = _desc_range(path)
        with self.lock:
            return self.db.execute(
                "SELECT 1 FROM files WHERE parent=? OR (parent>=? AND parent<?) LIMIT 1",
                (b, lo, hi)).fetchone() is not None or self.get(path) is not None

    def delete(self, path):
        with self.lock:
            self._w()
            self.db.execute("DELETE FROM files WHERE parent=? AND name=?", _split(path))
            self.db.execute("DELETE FROM content WHERE path=?", (os.fsencode(path),))
            self._remember(path, None)

    def descendants(self, path):
        """[(path, Rec)] below path (not path itself), parents before children."""
        b, lo, hi = _desc_range(path)
        with self.lock:
            rows = self.db.execute(
                "SELECT parent, name, %s FROM files WHERE parent=? OR (parent>=? AND parent<?)"
                " ORDER BY parent, name" % _REC_COLS, (b, lo, hi)).fetchall()
        return [(_join(r[0], r[1]), Rec(*r[2:])) for r in rows]

    def delete_tree(self, path):
        b, lo, hi = _desc_range(path)
        with self.lock:
            self._rows.clear()
            self._w()
            self.db.execute("DELETE FROM files WHERE parent=? OR (parent>=? AND parent<?)",
                            (b, lo, hi))
            self.db.execute("DELETE FROM content WHERE path>=? AND path<?", (lo, hi))
        self.delete(path)

    def rename_tree(self, src, dst):
        """Move src and everything below it to dst in the baseline."""
        rec = self.get(src)
        items = self.descendants(src)
        b, lo, hi = _desc_range(src)
        with self.lock:
            texts = self.db.execute("SELECT path, data FROM content WHERE path=? OR "
                                    "(path>=? AND path<?)", (b, lo, hi)).fetchall()
        self.delete_tree(src)
        db = os.fsencode(dst)
        for pth, data in texts:
            with self.lock:
                self._w()
                self.db.execute("INSERT OR REPLACE INTO content VALUES (?,?)",
                                (db + pth[len(b):], data))
        if rec is not None:
            self.put(dst, rec)
        n = len(src)
        for p, r in items:
            self.put(dst + p[n:], r)

    def count(self):
        with self.lock:
            return self.db.execute("SELECT count(*) FROM files").fetchone()[0]

    # -- stored text for diffs --
    def get_content(self, path):
        with self.lock:
            row = self.db.execute("SELECT data FROM content WHERE path=?",
                                  (os.fsencode(path),)).fetchone()
        return row[0] if row else None

    def put_content(self, path, data):
        with self.lock:
            self._w()
            if data is None:
                self.db.execute("DELETE FROM content WHERE path=?", (os.fsencode(path),))
            else:
                self.db.execute("INSERT OR REPLACE INTO content VALUES (?,?)",
                                (os.fsencode(path), data))

    # -- facts for summaries (see "Meaning"), kept in the content table under
    # "facts:PATH", a key no path can have --
    def get_facts(self, path):
        data = self.get_content("facts:" + path)
        return None if data is None else data.decode("utf-8", "replace").split("\n") \
            if data else []

    def put_facts(self, path, lines):
        self.put_content("facts:" + path, None if lines is None else
                         "\n".join(lines).encode("utf-8", "surrogateescape"))

    # -- key/value --
    def meta(self, key, default=None):
        with self.lock:
            row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key, value):
        with self.lock:
            self._w()
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?,?)", (key, str(value)))

    # -- events --
    def next_sequence(self):
        """The next event `sequence` of this host: the events table's own
        autoincrement counter (never reset by pruning), read inside the write
        transaction, so every process that writes events (the daemon, scan,
        pause) draws from one gap-free series. While StateDB holds writes in
        memory the reads lag behind them: _seq_hint remembers what we drew."""
        with self.lock:
            self._w()
            if not self._seq_read:
                # once per transaction: no other process can draw until it ends
                row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name='events'") \
                    .fetchone()
                self._seq_hint = max(int(row[0]) if row else 0, self._seq_hint)
                self._seq_read = True
            self._seq_hint += 1
            return self._seq_hint

    def seed_sequence(self, n):
        """After a lost baseline: go on from the last sequence the events file
        shows, so a receiver never sees a sequence number twice."""
        with self.lock:
            self._seq_hint = max(self._seq_hint, n or 0)

    def last_sequence(self):
        with self.lock:
            row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name='events'") \
                .fetchone()
        return max(int(row[0]) if row else 0, self._seq_hint)

    def add_event(self, ev, line):
        """The event row; its `sequence` (see next_sequence) is the row's seq."""
        with self.lock:
            self._w()
            self.db.execute(_ADD_EVENT,
                            (ev.get("sequence"), ev["id"], event_epoch(ev), ev["severity"],
                             ev["event"], ev.get("path", ""), line))

    def prune_events(self):
        with self.lock:
            self._w()
            self.db.execute("DELETE FROM events WHERE seq <= (SELECT max(seq) FROM events) - ?",
                            (EVENTS_KEEP,))

    def chain_locked(self, key, fn):
        """fn(head) -> new head, run holding the database's write lock, so
        that processes appending to one events file (the daemon, scan, pause)
        take turns and each continues the chain where the last one stopped
        (also across a logrotate: the head is here, not in the file). head
        is (lines, sha256 hex of the last line) or None. The open transaction
        is committed first (its events were already handed to the sinks)."""
        with self.lock:
            self._commit_quiet()
            self._w()
            head = self.chain_head(key)
            new = fn(head)
            if new is not None and new != head:
                self.set_meta(key, "%d %s" % new)
            self._commit_quiet()

    def chain_head(self, key):
        raw = self.meta(key)
        if not raw or " " not in raw:
            return None
        n, h = raw.split(" ", 1)
        return int(n), h

    def events_since(self, t):
        with self.lock:
            return [r[0] for r in self.db.execute(
                "SELECT json FROM events WHERE t>=? ORDER BY seq", (t,))]

    def events_after(self, sequence, limit):
        """The stored lines of the events after `sequence`, oldest first."""
        with self.lock:
            return [r[0] for r in self.db.execute(
                "SELECT json FROM events WHERE seq>? ORDER BY seq LIMIT ?", (sequence, limit))]

    def events_by_severity(self, since):
        with self.lock:
            return dict(self.db.execute("SELECT severity, count(*) FROM events WHERE t>=? "
                                        "GROUP BY severity", (since,)).fetchall())

    # -- alert spool: one row per event and channel, deleted once delivered --
    def spool_add(self, channel, payload, now):
        with self.lock:
            self._w()
            self.db.execute("INSERT INTO spool (channel, created, next_try, payload) "
                            "VALUES (?,?,?,?)", (channel, now, now, payload))

    def spool_due(self, channel, now, limit=SPOOL_BATCH):
        """([SpoolRow] due now, the next later next_try or None). A next_try
        beyond any backoff means the clock was set back: due now."""
        with self.lock:
            self.commit()
            rows = self.db.execute(
                "SELECT seq, created, attempts, payload FROM spool WHERE channel=? AND "
                "(next_try<=? OR next_try>?) ORDER BY seq LIMIT ?",
                (channel, now, now + 3600 * 1.25, limit)).fetchall()
            nxt = self.db.execute("SELECT min(next_try) FROM spool WHERE channel=? AND "
                                  "next_try>?", (channel, now)).fetchone()[0]
        return [SpoolRow(*r) for r in rows], nxt

    def spool_count_due(self, channel, now):
        with self.lock:
            return self.db.execute("SELECT count(*) FROM spool WHERE channel=? AND next_try<=?",
                                   (channel, now)).fetchone()[0]

    def spool_done(self, seqs):
        with self.lock:
            self._w()
            self.db.executemany("DELETE FROM spool WHERE seq=?", [(s,) for s in seqs])

    def spool_retry(self, seqs, attempts, next_try, error):
        with self.lock:
            self._w()
            self.db.executemany("UPDATE spool SET attempts=?, next_try=?, last_error=? "
                                "WHERE seq=?", [(attempts, next_try, error, s) for s in seqs])

    def spool_expire(self, channel, before):
        """Delete the rows of channel created before `before`; their number."""
        with self.lock:
            n = self.db.execute("SELECT count(*) FROM spool WHERE channel=? AND created<?",
                                (channel, before)).fetchone()[0]
            if n:
                self._w()
                self.db.execute("DELETE FROM spool WHERE channel=? AND created<?",
                                (channel, before))
        return n

    def spool_summary(self, channel):
        """(rows, oldest created or None, most attempts) of one channel."""
        with self.lock:
            return self.db.execute("SELECT count(*), min(created), max(attempts) FROM spool "
                                   "WHERE channel=?", (channel,)).fetchone()

    def spool_channels(self):
        with self.lock:
            return [r[0] for r in self.db.execute("SELECT DISTINCT channel FROM spool")]


# ---------------------------------------------------------------------------
# State safety: writes held while the disk is full, lost or broken baselines
# ---------------------------------------------------------------------------


class _NoRows:
    """What a write returns while the database takes none."""
    rowcount = 0
    lastrowid = None

    def fetchone(self):
        return None

    def fetchall(self):
        return []

    def __iter__(self):
        return iter(())


_VERBS = {}          # SQL text -> its first word, upper case (StateDB.execute)
_BATCHED = frozenset((_PUT_FILE, _ADD_EVENT))    # see StateDB.execute


class KeysReader:
    """Store.keys_in() for the directories of one walk, read as ONE ordered
    scan of the files table instead of a query per directory: walk() visits
    its directories in the byte order of their paths (a heap on
    os.fsencode(path)), and the table's (parent, name) key sorts its BLOBs in
    that same order (memcmp, then length), so the rows of each directory
    come next, after those of directories the walk skipped (excluded,
    vanished, another root), which are passed over.

    It reads through a connection of its own: a statement of the daemon's
    connection must not step over rows that connection writes meanwhile.
    Its rows are a snapshot as of the last (re)start of the scan, taken
    again every RESTART_DIRS directories (so a long walk holds no old read
    transaction, which would stop WAL checkpoints), and they are trusted
    only to say "unchanged": an entry whose lstat matches its row here could
    not match a later row (ctime, inode); everything else is compared with
    the rows of the daemon's connection (Engine._walk_quick). Should this
    connection fail (a database SQLite cannot read now), the walk goes on
    with Store.keys_in()."""
    RESTART_DIRS = 1024
    SKIP_SEEK = 256              # rows passed over before seeking instead

    def __init__(self, store, top, max_size):
        self.store, self.max_size = store, max_size
        self.db = self.cur = self.it = self.row = None
        self.dirs = 0
        top = os.fsencode(top)
        # Every parent at or below top: top itself, then top + "/" ...; "0"
        # follows "/" ("/" itself: every path).
        self.hi = top + b"0" if top != b"/" else b"0"
        try:
            self.db = sqlite3.connect(store.path, timeout=60, isolation_level=None,
                                      check_same_thread=False)
            self.db.execute("PRAGMA query_only=1")
            self.db.execute("PRAGMA cache_size=-64")     # one pass in order: no reuse
            self._seek(top)
        except sqlite3.Error:
            self.close()

    def _seek(self, parent):
        if self.cur is not None:
            self.cur.close()             # ends its read transaction
        self.cur = self.db.execute(_KEYS_FROM, (self.max_size, parent, self.hi))
        self.it = iter(self.cur)
        self.row = next(self.it, None)
        self.dirs = 0

    def keys_in(self, parent):
        """keys_in() of the directory whose path is the bytes parent; each
        call's parent sorts after the previous one's."""
        if self.db is not None:
            try:
                return self._keys_in(parent)
            except sqlite3.Error:
                self.close()
        return self.store.keys_in(os.fsdecode(parent), self.max_size)

    def _keys_in(self, parent):
        self.dirs += 1
        if self.dirs >= self.RESTART_DIRS:
            self._seek(parent)
        row, it, skipped = self.row, self.it, 0
        while row is not None and row[13] < parent:
            skipped += 1
            if skipped >= self.SKIP_SEEK:
                self._seek(parent)
                row, it = self.row, self.it
                break
            row = next(it, None)
        out = {}
        enc, errors = _FS_ENCODING         # os.fsdecode's, without its checks
        while row is not None and row[13] == parent:
            name = row[0]
            out[name.decode(enc, errors) if name.__class__ is bytes else name] = row
            row = next(it, None)
        self.row = row
        return out

    def close(self):
        if self.db is not None:
            try:
                if self.cur is not None:
                    self.cur.close()
                self.db.close()
            except sqlite3.Error:
                pass
            self.db = self.cur = self.it = None


class StateDB:
    """The daemon's connection to baseline.db, in place of the sqlite3 one:
    a full disk, an I/O error, a read-only or locked or broken database never
    stops the watch. The writes of a transaction that cannot be committed are
    kept in memory, in order (an event with the id it was already sent with),
    and replayed in one transaction when the database takes writes again,
    retried with backoff: every event is recorded exactly once. Until then
    reads see the last committed state. notes() says what to report."""
    RETRY_MIN, RETRY_MAX = 1.0, 60.0
    _READS = ("SELECT", "PRAGMA", "WITH", "EXPLAIN")

    def __init__(self, conn):
        self.conn = conn
        self.ops = []             # (sql, params, many) since BEGIN
        self.backlog = []         # writes not yet committed (only while failing)
        self.error = None         # the fault while failing, else None
        self.failing_since = None
        self.delay = self.RETRY_MIN
        self.next_try = 0.0
        self.attempts = 0
        self._notes = deque()
        self._batch = {}          # sql in _BATCHED -> [params] not yet executed
        self._batch_keys = set()  # (parent, name) of the _PUT_FILE rows among them

    # sqlite3.Connection's surface as Store (and the spool code) use it
    def execute(self, sql, params=()):
        if sql in _BATCHED and self.error is None:
            # A change writes an event row and a baseline row: they wait
            # here and go in one executemany per table when any other
            # statement comes (a read, the commit), so nothing reads around
            # them and the transaction holds the same rows.
            rows = self._batch.get(sql)
            if rows is None:
                rows = self._batch[sql] = []
            rows.append(params)
            if sql == _PUT_FILE:
                self._batch_keys.add(params[:2])
            return _NoRows()
        # A baseline row is looked up without them unless it is among them
        # (a storm's new files are each looked up while others' rows wait).
        if self._batch and not (sql is _GET_FILE and params not in self._batch_keys):
            self._flush_batch()
        verb = _VERBS.get(sql)
        if verb is None:                 # the statements are a few constants
            verb = sql.lstrip()[:8].upper()
            if len(_VERBS) < 256:
                _VERBS[sql] = verb
        if verb.startswith("INSERT"):    # the busiest: events and baseline rows
            return self._write(sql, params, False)
        if verb.startswith("BEGIN"):
            self.ops = []
            if self.error is None:
                try:
                    return self.conn.execute(sql)
                except sqlite3.Error as e:
                    self._fault(e)
            return _NoRows()
        if verb.startswith(("COMMIT", "END")):
            ops, self.ops = self.ops, []
            if self.error is None:
                try:
                    return self.conn.execute(sql)
                except sqlite3.Error as e:
                    self._rollback()
                    self.backlog.extend(ops)
                    self._fault(e)
                    return _NoRows()
            self.backlog.extend(ops)
            self.retry()
            return _NoRows()
        if verb.startswith(self._READS):
            return self.conn.execute(sql, params)
        return self._write(sql, params, False)

    def executemany(self, sql, seq):
        if self._batch:
            self._flush_batch()
        return self._write(sql, list(seq), True)

    def executescript(self, script):
        if self._batch:
            self._flush_batch()
        return self.conn.executescript(script)

    def close(self):
        if self._batch:
            self._flush_batch()
        self.conn.close()

    def _flush_batch(self):
        batch, self._batch = self._batch, {}
        self._batch_keys = set()
        for sql, rows in batch.items():
            try:
                self._write(sql, rows, True)
            except (sqlite3.IntegrityError, sqlite3.ProgrammingError,
                    sqlite3.InterfaceError) as e:
                # A bug, not the disk: said, and the other rows still go in.
                sys.stderr.write("fimwatch: baseline database: %s\n" % esc(str(e))[:300])
                for params in rows:
                    try:
                        self._write(sql, params, False)
                    except (sqlite3.IntegrityError, sqlite3.ProgrammingError,
                            sqlite3.InterfaceError):
                        pass

    def __getattr__(self, name):
        return getattr(self.conn, name)

    def _write(self, sql, params, many):
        self.ops.append((sql, params, many))
        if self.error is not None:
            return _NoRows()
        try:
            return (self.conn.executemany if many else self.conn.execute)(sql, params)
        except (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError):
            self.ops.pop()
            raise
        except sqlite3.Error as e:
            # The statements before it in this transaction are undone with it:
            # all of them wait for the replay.
            self._rollback()
            self.backlog.extend(self.ops)
            self.ops = []
            self._fault(e)
            return _NoRows()

    def _rollback(self):
        try:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def _fault(self, e):
        now = time.monotonic()
        if self.error is None:
            self.failing_since = time.time()
            self.delay = self.RETRY_MIN
            self._notes.append(("fault", str(e)))
        self.error = str(e)
        self.next_try = now + self.delay

    def failing(self):
        return self.error is not None

    def retry(self, force=False):
        """Replay what waits, if its time has come; True when all is recorded."""
        if self.error is None:
            return True
        now = time.monotonic()
        if not force and now < self.next_try:
            return False
        self.attempts += 1
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            for sql, params, many in self.backlog:
                (self.conn.executemany if many else self.conn.execute)(sql, params)
            self.conn.execute("COMMIT")
        except sqlite3.Error as e:
            self._rollback()
            self.error = str(e)
            self.delay = min(self.delay * 2, self.RETRY_MAX)
            self.next_try = now + self.delay
            return False
        self._notes.append(("recovered", len(self.backlog), self.failing_since))
        self.backlog = []
        self.error = self.failing_since = None
        self.delay = self.RETRY_MIN
        return True

    def notes(self):
        out = list(self._notes)
        self._notes.clear()
        return out


class StateGuard:
    """Tells a first install from a lost, replaced or broken baseline, and a
    finished first baseline from an interrupted one.

    The database holds a random id (meta db_id); state_dir/baseline.id (written
    atomically) holds the same id, whether the first baseline was finished,
    and when the daemon was last seen watching. The `started` events in the
    events file carry the id too: a second witness when baseline.id is gone
    with the database. A corrupt or replaced database is moved aside
    (baseline.db.corrupt-TIME, .replaced-TIME), never deleted."""
    SEEN_EVERY = 30.0
    _CORE = {"files": {"parent", "name", "kind", "mode", "uid", "gid", "size", "sha256"},
             "meta": {"key", "value"}, "events": {"seq", "id", "t", "json"},
             "spool": {"seq", "channel", "payload"}, "content": {"path", "data"}}

    def __init__(self, state_dir, events_file=None):
        self.dir = state_dir
        self.db = os.path.join(state_dir, DB_NAME)
        self.side = os.path.join(state_dir, BASELINE_ID)
        self.events_file = events_file
        self.info = None
        self._seen = 0.0
        self._lock = threading.Lock()     # seen() also runs on alert threads' commits

    # -- the sidecar --
    def read(self):
        try:
            with open(self.side, encoding="utf-8") as f:
                info = json.load(f)
            return info if isinstance(info, dict) and info.get("id") else None
        except (OSError, ValueError):
            return None

    def write(self, **changes):
        with self._lock:
            self._write(changes)

    def _write(self, changes):
        info = dict(self.info or {})
        info.update(changes)
        tmp = self.side + ".tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, (json.dumps(info, sort_keys=True) + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.side)
            self.info = info
        except OSError as e:              # a full disk: the next try is at the next beat
            self.info = info
            sys.stderr.write("fimwatch: %s: %s\n" % (self.side, e.strerror or e))

    def witness(self):
        """(baseline_id, time) of the last event in the events file that names
        the baseline, or (None, time of the last event), or (None, None)."""
        data = read_tail(self.events_file, 1 << 20) if self.events_file else None
        if data is None:             # none, or not a regular file (a FIFO, /dev/full)
            return None, None
        last_t = None
        for raw in reversed(data.splitlines()):
            try:
                ev = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(ev, dict):
                continue
            ours = ev.get("fimwatch") if isinstance(ev.get("fimwatch"), dict) else ev
            last_t = last_t or ev.get("time") or ev.get("@timestamp")    # [log] format = ecs
            if ours.get("baseline_id"):
                return ours["baseline_id"], last_t
        return None, last_t

    # -- the database, before the daemon opens it --
    def _check_openable(self):
        """A database we may not open (permissions, an immutable file) is a
        state fault, retried with exit 3, never "damaged": it is not moved
        aside for that, and no fresh baseline replaces it."""
        for flags in (os.O_RDONLY, os.O_RDWR):
            try:
                os.close(os.open(self.db, flags | os.O_CLOEXEC | os.O_NONBLOCK))
            except OSError as e:
                raise StateError("baseline database %s cannot be opened%s: %s (fix its "
                                 "permissions; it is kept as it is)"
                                 % (self.db, " for writing" if flags else "", e.strerror))

    def _probe(self):
        """meta of an intact database, or raises sqlite3.DatabaseError/ValueError."""
        conn = sqlite3.connect(self.db, timeout=60)
        try:
            tables = {r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type='table'")}
            for table, cols in self._CORE.items():
                if table not in tables:
                    raise ValueError("table %s is missing" % table)
                have = {r[1] for r in conn.execute("PRAGMA table_info(%s)" % table)}
                if not cols <= have:
                    raise ValueError("table %s lacks %s" % (table, ", ".join(sorted(cols - have))))
            bad = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
            if bad != "ok":
                raise sqlite3.DatabaseError(bad)
            return dict(conn.execute("SELECT key, value FROM meta WHERE key IN "
                                     "('db_id', 'built', 'build_started', 'heartbeat')"))
        finally:
            conn.close()

    def _move_aside(self, why):
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dest = "%s.%s-%s" % (self.db, why, stamp)
        moved = None
        for suffix in ("", "-wal", "-shm", "-journal"):
            try:
                os.rename(self.db + suffix, dest + suffix)
                moved = moved or dest + suffix
            except FileNotFoundError:
                pass
        return moved

    def examine(self):
        """Before Store(): [(severity, event, fields)] to report once the
        daemon can; a broken or foreign database is moved aside first."""
        side = self.read()
        self.info = side
        wit_id, wit_t = (None, None) if side else self.witness()
        size = os.path.getsize(self.db) if os.path.exists(self.db) else -1
        meta, reason, detail = None, None, ""
        if size > 0:
            self._check_openable()
            try:
                meta = self._probe()
            except (sqlite3.DatabaseError, ValueError) as e:
                reason, detail = ("corrupt" if isinstance(e, sqlite3.DatabaseError)
                                  else "schema"), str(e)
        elif side or wit_id:
            reason = "missing" if size < 0 else "truncated"
        if meta is not None:
            known = side["id"] if side else wit_id
            if known and meta.get("db_id") != known:
                reason, detail = "replaced", "its id is %s, not %s" % (
                    meta.get("db_id") or "absent", known)
            elif side and side.get("state") == "built" and not meta.get("built"):
                reason, detail = "replaced", "it has no finished baseline"
        out = []
        built = (side or {}).get("state") == "built" or bool(wit_id)
        since = (side or {}).get("seen") or (side or {}).get("built")
        since = iso_s(float(since)) if since else (wit_t or "the last start")
        if reason and built:
            moved = self._move_aside(
                {"missing": "lost", "truncated": "lost", "schema": "corrupt"}.get(reason, reason))
            out.append(("critical", "baseline_lost", dict(
                reason=reason, detail=esc(detail), moved_to=esc(moved or ""), since=since,
                message="baseline lost or replaced (%s%s): changes since %s cannot be "
                        "verified; a fresh baseline is built now%s" % (
                            reason, ": " + esc(detail) if detail else "", since,
                            "; the old database is kept as %s" % esc(moved) if moved else ""))))
            self.info = None
        elif reason or (meta is not None and not meta.get("built")
                        and (side or meta.get("build_started"))):
            started = (meta or {}).get("build_started") or (side or {}).get("created")
            t = iso_s(float(started)) if started else since
            if reason:
                self._move_aside("corrupt" if reason != "missing" else "lost")
                self.info = None
            out.append(("warning", "baseline_interrupted", dict(
                since=t, reason=reason or "unfinished",
                message="first baseline was interrupted; files baselined after %s may "
                        "already have been changed; building it again" % t)))
        elif side is None and size < 0:
            for suffix in ("-wal", "-shm"):       # not from a database we know
                if os.path.exists(self.db + suffix):
                    self._move_aside("stale")
                    break
        return out

    # -- the database, open --
    def adopt(self, store, rebuild=False):
        """After Store(): give the database its id, write baseline.id."""
        now = time.time()
        db_id = store.meta("db_id")
        if db_id is None:
            db_id = event_id()
            store.set_meta("db_id", db_id)
        if store.meta("built") is None and (rebuild or store.meta("build_started") is None):
            store.set_meta("build_started", now)
        store.commit()
        info = self.info if self.info and self.info.get("id") == db_id else {
            "id": db_id, "created": now}
        self.info = info
        self.write(id=db_id, state="built" if store.meta("built") else "building", seen=now)
        return db_id

    def built(self, store):
        self.write(state="built", built=float(store.meta("built") or time.time()),
                   seen=time.time())

    def seen(self, force=False):
        """On commits (rate-limited) and at stop: when we last watched."""
        now = time.monotonic()
        if self.info and (force or now - self._seen >= self.SEEN_EVERY):
            self._seen = now
            self.write(seen=time.time())


def root_identity(path):
    """What a configured path is, for telling a swapped root: its kind, the
    symlink's target, the filesystem (st_dev) and inode of what it leads to."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    ident = {"kind": kind_of(st.st_mode)}
    if stat.S_ISLNK(st.st_mode):
        ident["target"] = os.path.realpath(path)
        try:
            st = os.stat(path)
        except OSError:
            return ident
    ident["dev"], ident["ino"] = st.st_dev, st.st_ino
    return ident


def check_root_swaps(cfg, store):
    """[(path, was, now)]: configured paths that became a symlink (or point
    elsewhere) or sit on another filesystem since they were baselined. A root
    swapped for a symlink is not followed (cfg.no_follow): the baseline keeps
    what was there and the symlink itself is compared with it."""
    out, no_follow = [], set()
    for p in cfg.all_roots():
        now = root_identity(p)
        key = "rootid:" + esc(p)
        raw = store.meta(key)
        if now is None:
            continue
        if raw is None:
            store.set_meta(key, json.dumps(now, sort_keys=True))
            continue
        try:
            was = json.loads(raw)
        except ValueError:
            was = {}
        link_now, link_was = now["kind"] == "symlink", was.get("kind") == "symlink"
        if link_now and (not link_was or now.get("target") != was.get("target")):
            no_follow.add(p)
            out.append((p, was, now))
        elif (not link_now and not link_was and was.get("dev") is not None
              and now.get("dev") != was.get("dev") and now.get("ino") != was.get("ino")):
            # dev and inode both: a device renumbered at boot keeps the inode
            out.append((p, was, now))
            store.set_meta(key, json.dumps(now, sort_keys=True))
        elif link_was and not link_now:
            store.set_meta(key, json.dumps(now, sort_keys=True))
    store.commit()
    cfg.no_follow = no_follow
    return out


# ---------------------------------------------------------------------------
# Context for events: who is logged in, which package owns a file, the diff
# ---------------------------------------------------------------------------

_UTMP_FMT = "<h2xi32s4s32s256shhiii16s20s"      # struct utmp, glibc x86-64/aarch64
_UTMP_SIZE = struct.calcsize(_UTMP_FMT)


def login_users(utmp=UTMP):
    """['alice@pts/0 from 192.0.2.7', ...] for the login sessions in utmp."""
    out = []
    try:
        with open(utmp, "rb") as f:
            data = f.read(_UTMP_SIZE * 512)
    except OSError:
        return out
    for off in range(0, len(data) - _UTMP_SIZE + 1, _UTMP_SIZE):
        rec = struct.unpack_from(_UTMP_FMT, data, off)
        if rec[0] != 7:                              # USER_PROCESS
            continue
        dec = lambda b: esc(b.split(b"\0", 1)[0].decode("utf-8", "replace"))  # noqa: E731
        s = "%s@%s" % (dec(rec[4]), dec(rec[2]))
        if rec[5].strip(b"\0"):
            s += " from " + dec(rec[5])
        if s not in out:
            out.append(s)
    return out


class PackageDB:
    """Which dpkg packages own a path, and does the file match one of them.
    Loaded on first use and again when dpkg's database changes; dropped after
    a few idle minutes so it costs no memory between upgrades.

    lookup(path): a flat tuple (package, md5, package, md5, ...), every
    owner of the path: md5sums lists, conffiles from status, and the
    directories and symlinks of info/*.list (md5 None). A diversion moves
    the diverted package's entry to the path it was diverted to; the
    original path keeps only the diverting package (none for a local one).
    versions: package -> the version status says is installed.

    The index is kept small (a 1,000-package system lists ~110,000 paths):
    a path with one owner maps to an int, the owner's number in self.pkgs
    (its md5 is read from that package's md5sums file when asked, with a
    small cache), or to ~number for a listed directory or symlink; only
    paths with several owners, conffiles and diversions hold a tuple, where
    an md5 of FROM_MD5SUMS means "the owner's md5sums file says"."""

    IDLE_DROP = 300
    FROM_MD5SUMS = True
    MD5_CACHE = 8

    def __init__(self, info_dir=None, lock=None, status=None, archives=None, rpmdb=None):
        self.info_dir = info_dir or DPKG_INFO
        self.archives = archives or APT_ARCHIVES
        self.deb_sums = collections.OrderedDict()   # (pkg, version) -> {path: sha256}
        self.deb_pinned = {}        # the same, read ahead for an ending transaction
        self.lock_path = lock or DPKG_LOCK
        self.status_path = status or DPKG_STATUS
        base = os.path.dirname(self.info_dir)
        self.base = base
        self.diversions_path = os.path.join(base, "diversions")
        self.alternatives_dir = os.path.join(base, "alternatives")
        self.frontend_path = os.path.join(os.path.dirname(self.lock_path), "lock-frontend")
        self.index, self.loaded_mtime, self.used = None, None, 0
        self.versions = {}
        self.pkgs, self.md5sums_file, self.numbers = [], {}, {}
        self.md5_cache = collections.OrderedDict()
        self.rpm = RpmDB.on_rpm_system(rpmdb or RPMDB, self.status_path)

    def available(self):
        return os.path.isdir(self.info_dir)

    def _mtime(self):
        total = 0
        for p in (self.info_dir, self.status_path, self.diversions_path):
            try:
                total += os.stat(p).st_mtime_ns
            except FileNotFoundError:
                if p != self.diversions_path:
                    return None
            except OSError:
                return None
        return total

    def load(self):
        """The index as dpkg's database is now (read again if it changed)."""
        if self.rpm is not None:
            return self.rpm.load()
        mtime = self._mtime()
        if mtime is None:
            return False
        if self.index is not None and mtime == self.loaded_mtime:
            return True
        try:
            names = os.listdir(self.info_dir)
        except OSError:
            return False
        index = {}
        self.pkgs, self.md5sums_file, self.numbers = [], {}, {}
        self.md5_cache.clear()
        for fn in names:
            if fn.endswith(".md5sums"):
                self._read_md5sums(fn, index)
        self.versions = self._read_status(index)
        for fn in names:
            if fn.endswith(".list"):
                self._read_list(fn, index)
        self._apply_diversions(index)
        self.index, self.loaded_mtime = index, mtime
        return True

    _load = load

    def _number(self, pkg):
        k = self.numbers.get(pkg)
        if k is None:
            k = self.numbers[pkg] = len(self.pkgs)
            self.pkgs.append(pkg)
        return k

    def _owners(self, v):
        """An index value as the flat (package, md5-or-marker, ...) tuple."""
        if isinstance(v, tuple):
            return v
        if v < 0:
            return (self.pkgs[~v], None)
        return (self.pkgs[v], self.FROM_MD5SUMS)

    def _add(self, index, path, pkg, md5):
        cur = index.get(path)
        index[path] = (pkg, md5) if cur is None else self._owners(cur) + (pkg, md5)

    def _md5sums(self, fn):
        """(md5 bytes, absolute path bytes) of each line of info/fn; nothing
        more once it cannot be read."""
        try:
            with open(os.path.join(self.info_dir, fn), "rb") as f:
                for line in f:
                    md5, _, rel = line.rstrip(b"\n").partition(b"  ")
                    if rel:
                        yield md5, b"/" + rel
        except OSError:
            return

    def _read_md5sums(self, fn, index):
        pkg = fn[:-8].split(":", 1)[0]
        k = self._number(pkg)
        self.md5sums_file.setdefault(pkg, []).append(fn)
        for _, path in self._md5sums(fn):
            cur = index.get(path)
            index[path] = k if cur is None else self._owners(cur) + (pkg, self.FROM_MD5SUMS)

    def _read_list(self, fn, index):
        """Directories and symlinks: listed, with no checksum to verify."""
        neg = ~self._number(fn[:-5].split(":", 1)[0])
        try:
            with open(os.path.join(self.info_dir, fn), "rb") as f:
                for line in f:
                    path = line.rstrip(b"\n")
                    if path.startswith(b"/") and path not in index:
                        index[path] = neg
        except OSError:
            pass

    def _md5_of(self, pkg, path):
        """The md5 pkg's md5sums file gives for path (bytes), or None."""
        sums = self.md5_cache.get(pkg)
        if sums is None:
            sums = {path: md5.decode("ascii", "replace")
                    for fn in self.md5sums_file.get(pkg, ()) for md5, path in self._md5sums(fn)}
            self.md5_cache[pkg] = sums
            while len(self.md5_cache) > self.MD5_CACHE:
                self.md5_cache.popitem(last=False)
        self.md5_cache.move_to_end(pkg)
        return sums.get(path)

    def _read_status(self, index):
        """Conffiles (files under /etc are mostly conffiles: their md5 is in
        status, not in the md5sums lists) and the installed versions."""
        versions, cur = {}, {"pkg": None, "ver": None, "ok": False, "conf": False}
        try:
            with open(self.status_path, "rb") as f:
                for line in f:
                    self._status_line(line, cur, versions, index)
        except OSError:
            pass
        return versions

    def _status_line(self, line, cur, versions, index):
        if cur["conf"] and line.startswith(b" /"):
            parts = line.split()
            if len(parts) >= 2 and b"obsolete" not in parts[2:]:
                self._add(index, parts[0], cur["pkg"], parts[1].decode("ascii", "replace"))
            return
        cur["conf"] = line.startswith(b"Conffiles:")
        key, _, val = line.partition(b": ")
        val = val.strip().decode("utf-8", "replace")
        if key == b"Package":
            cur.update(pkg=val, ver=None, ok=False)
        elif key == b"Version":
            cur["ver"] = val
        elif key == b"Status":
            cur["ok"] = val.split()[-1:] not in (["not-installed"], ["config-files"])
        if cur["ok"] and cur["ver"] and key in (b"Version", b"Status"):
            versions[cur["pkg"]] = cur["ver"]

    def _apply_diversions(self, index):
        """dpkg-divert: the diverted package's file lives at the new path."""
        try:
            with open(self.diversions_path, "rb") as f:
                lines = f.read().split(b"\n")
        except OSError:
            return
        for i in range(0, len(lines) - 2, 3):
            orig, to, by = lines[i:i + 3]
            by = by.decode("utf-8", "replace")
            owners = self._owners(index[orig]) if orig in index else ()
            pairs = [owners[j:j + 2] for j in range(0, len(owners), 2)]
            # the md5sums files name the original path: resolve it now
            moved = tuple(x for pr in pairs if pr[0] != by
                          for x in (pr[0], self._md5_of(pr[0], orig)
                                    if pr[1] is self.FROM_MD5SUMS else pr[1]))
            kept = tuple(x for pr in pairs if pr[0] == by for x in pr)
            if moved:
                index[to] = moved + index.get(to, ())
            if kept:
                index[orig] = kept
            else:
                index.pop(orig, None)

    def lookup(self, path, resolve=True):
        """The owners of path as a flat (package, md5, ...) tuple, or None.
        resolve=False: an md5 its owner's md5sums file has is FROM_MD5SUMS
        (not read)."""
        if self.rpm is not None:
            return self.rpm.lookup(path)
        if not self.load():
            return None
        self.used = time.monotonic()
        b = os.fsencode(path)
        key = b
        hit = self.index.get(b)
        if hit is None:
            key = usr_alias(b)
            hit = self.index.get(key)
        if hit is None:
            return None
        hit = self._owners(hit)
        if not resolve or self.FROM_MD5SUMS not in hit[1::2]:
            return hit
        return tuple(x for i in range(0, len(hit), 2)
                     for x in (hit[i], self._md5_of(hit[i], key)
                               if hit[i + 1] is self.FROM_MD5SUMS else hit[i + 1]))

    def busy(self):
        """Is dpkg running?"""
        return lock_held(self.lock_path)

    def check(self, path, sha256=None):
        """{'name', 'manager', 'verified', 'digest'} or None if no package
        owns path. Verified if the content matches any owner's md5 (the name
        is then that owner's).

        With sha256 (what goes into the event and the baseline), md5 and
        sha256 come from one read and the file is verified only if that read
        has that sha256: a file swapped after it was hashed is not passed as
        the package's on the strength of other bytes."""
        if self.rpm is not None:
            return self.rpm.check(path, sha256)
        hit = self.lookup(path)
        if hit is None:
            return None
        sums = {hit[i + 1]: hit[i] for i in range(len(hit) - 2, -1, -2) if hit[i + 1]}
        res = {"name": hit[0], "manager": "dpkg", "verified": False, "digest": "md5"}
        md5, sha = _md5_sha256(path)
        if md5 is None or not (sha256 is None or sha == sha256) or md5 not in sums:
            return res
        res["name"], res["verified"] = sums[md5], True
        # An md5sums file is easy to edit to match a trojan: where apt kept
        # the .deb, the package's own sha256 decides.
        shipped = self.deb_sha256(res["name"], path)
        if shipped is not None:
            res["digest"] = "sha256"
            if shipped != sha:
                res["verified"] = False
                res["mismatch"] = ("md5 matches the md5sums list but not the sha256 in %s's "
                                   ".deb: the list may have been edited" % res["name"])
        return res

    def deb_sha256(self, pkg, path):
        """The sha256 of path in the installed version's .deb in apt's
        archive cache, or None (no .deb, too big, unreadable, or compressed
        with what this Python cannot read, e.g. zstd before 3.14)."""
        ver = self.versions.get(pkg)
        if not ver:
            return None
        key = (pkg, ver)
        sums = self.deb_pinned.get(key, self.deb_sums.get(key))
        if sums is None:
            sums = self.deb_sums[key] = self._read_deb(pkg, ver)
            while len(self.deb_sums) > self.MD5_CACHE:
                self.deb_sums.popitem(last=False)
        b = os.fsencode(path)
        return sums.get(b) or sums.get(usr_alias(b))

    def _read_deb(self, pkg, ver):
        prefix = "%s_%s_" % (pkg, ver.replace(":", "%3a"))
        try:
            names = [n for n in os.listdir(self.archives)
                     if n.startswith(prefix) and n.endswith(".deb")]
        except OSError:
            return {}
        for n in names:
            sums = deb_member_sha256(os.path.join(self.archives, n))
            if sums:
                return sums
        return {}

    def maybe_drop(self):
        if self.rpm is not None:
            self.rpm.maybe_drop()
        if self.index is not None and time.monotonic() - self.used > self.IDLE_DROP:
            self.index = self.loaded_mtime = None
            self.pkgs, self.md5sums_file, self.numbers = [], {}, {}
            self.md5_cache.clear()


def lock_held(path):
    """Does a process hold an fcntl lock on path (dpkg's, rpm's)? Tested with
    F_GETLK, which never takes the lock (taking it, even briefly, could make
    a concurrent apt or rpm run fail)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        req = struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0)
        res = fcntl.fcntl(fd, fcntl.F_GETLK, req)
        return struct.unpack("hhqqi4x", res)[0] != fcntl.F_UNLCK
    except OSError:
        return False
    finally:
        os.close(fd)


def usr_alias(b):
    """The other name of path b (bytes) on a merged-/usr system: /usr/bin/x
    for /bin/x and back (dpkg lists whichever name the package ships)."""
    return b[4:] if b.startswith(b"/usr/") else b"/usr" + b


class _Slice:
    """A read-only window of `size` bytes of a file object (an ar member)."""

    def __init__(self, f, size):
        self.f, self.left = f, size

    def read(self, n=-1):
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        return data


def deb_member_sha256(deb):
    """{b"/path": sha256 hex} of every regular file in a .deb's data.tar
    (ar archive; gz, xz or bz2, and zst where Python's tarfile can), or {}:
    not a regular file, over DEB_SHA_MAX, not a .deb, or unreadable."""
    import tarfile
    try:
        fd = os.open(deb, _O_HASH)
    except OSError:
        return {}
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > DEB_SHA_MAX or f.read(8) != b"!<arch>\n":
            return {}
        while True:
            hdr = f.read(60)
            if len(hdr) < 60:
                return {}
            name, size = hdr[:16].strip().rstrip(b"/"), int(hdr[48:58] or 0)
            if name.startswith(b"data.tar"):
                break
            f.seek(size + (size & 1), 1)
        sums = {}
        try:
            with tarfile.open(fileobj=_Slice(f, size), mode="r|*") as tar:
                for m in tar:
                    if not m.isreg():
                        continue
                    h = hashlib.sha256()
                    src = tar.extractfile(m)
                    for chunk in iter(lambda: src.read(HASH_CHUNK), b""):
                        h.update(chunk)
                    name = m.name[2:] if m.name.startswith("./") else m.name
                    sums[os.fsencode("/" + name.lstrip("/"))] = h.hexdigest()
        except (tarfile.TarError, OSError, EOFError, ValueError):
            return {}
        return sums


def _md5_sha256(path):
    """(md5, sha256) hex of a regular file from one read; (None, None) if it
    cannot be read or is not a regular file."""
    sums = file_digests(path, ("md5", "sha256"))
    return sums.get("md5"), sums.get("sha256")


def file_digests(path, algos):
    """{algorithm: hex} for each hashlib name in algos, from one read of a
    regular file; {} if it cannot be read or is not a regular file (a FIFO
    is never opened for it)."""
    hs = {a: hashlib.new(a, usedforsecurity=False) for a in algos}
    try:
        fd = os.open(path, _O_HASH)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return {}
            while True:
                chunk = os.read(fd, HASH_CHUNK)
                if not chunk:
                    break
                for h in hs.values():
                    h.update(chunk)
        finally:
            os.close(fd)
    except OSError:
        return {}
    return {a: h.hexdigest() for a, h in hs.items()}


# rpm's header format (rpmtag.h, header.c): a blob in the rpmdb's Packages
# table is a big-endian count of index entries and of data bytes, the
# entries (tag, type, offset, count: 16 bytes each), then the data.
RPMTAG_NAME, RPMTAG_VERSION, RPMTAG_RELEASE, RPMTAG_EPOCH = 1000, 1001, 1002, 1003
RPMTAG_FILEDIGESTS, RPMTAG_FILEFLAGS = 1035, 1037
RPMTAG_DIRINDEXES, RPMTAG_BASENAMES, RPMTAG_DIRNAMES = 1116, 1117, 1118
RPMTAG_FILEDIGESTALGO = 5011
RPMFILE_CONFIG = 1 << 0
RPM_DIGEST_ALGOS = {1: "md5", 2: "sha1", 8: "sha256", 9: "sha384", 10: "sha512",
                    11: "sha224"}             # PGPHASHALGO_*; no FILEDIGESTALGO = md5
_RPM_INTS = {1: "B", 2: "B", 3: "H", 4: "I", 5: "Q"}     # CHAR INT8 INT16 INT32 INT64
_RPM_STRINGS = (6, 8, 9)                      # STRING STRING_ARRAY I18NSTRING
RPM_HEADER_INDEX_MAX = 0xFFFF                 # rpm's own limits (header.c)
RPM_HEADER_DATA_MAX = 256 << 20


class RpmHeaderError(ValueError):
    """A header blob that cannot be read: truncated, or lying about its size."""


def rpm_header(blob, want):
    """{tag: value} of the tags in `want` in one header blob: a list of bytes
    for string types, a tuple of ints for integer types. Every offset and
    count is checked against the blob: RpmHeaderError, never a read past it."""
    if not isinstance(blob, bytes):      # sqlite: any column can hold any type
        raise RpmHeaderError("a %s, not a blob" % type(blob).__name__)
    if len(blob) < 8:
        raise RpmHeaderError("%d bytes, too short for a header" % len(blob))
    il, dl = struct.unpack_from(">II", blob)
    start = 8 + 16 * il
    if il > RPM_HEADER_INDEX_MAX or dl > RPM_HEADER_DATA_MAX or start + dl != len(blob):
        raise RpmHeaderError("%d index entries and %d data bytes do not fit its %d bytes"
                             % (il, dl, len(blob)))
    out = {}
    for i in range(il):
        tag, typ, off, cnt = struct.unpack_from(">IIII", blob, 8 + 16 * i)
        if tag not in want:
            continue
        if tag in out:                   # and each one copy of the data at most
            raise RpmHeaderError("tag %d twice" % tag)
        if typ in _RPM_INTS:
            fmt = ">%d%s" % (cnt, _RPM_INTS[typ])
            if off + struct.calcsize(">" + _RPM_INTS[typ]) * cnt > dl:
                raise RpmHeaderError("tag %d: %d values at %d run past the data" % (tag, cnt, off))
            out[tag] = struct.unpack_from(fmt, blob, start + off)
        elif typ in _RPM_STRINGS:
            parts = blob[start + off:start + dl].split(b"\0", cnt) if off < dl else []
            if cnt == 0 or len(parts) <= cnt:
                raise RpmHeaderError("tag %d: %d strings at %d run past the data"
                                     % (tag, cnt, off))
            out[tag] = parts[:cnt]
        else:
            raise RpmHeaderError("tag %d has type %d, not the one rpm writes" % (tag, typ))
    return out


def rpm_files(h):
    """[(path bytes, digest hex or None, flags)] of the files a parsed header
    (rpm_header) lists, with its digest algorithm's hashlib name. A directory,
    symlink or %ghost file has no digest."""
    bases, dirs = h.get(RPMTAG_BASENAMES, []), h.get(RPMTAG_DIRNAMES, [])
    idx = h.get(RPMTAG_DIRINDEXES, ())
    digests = h.get(RPMTAG_FILEDIGESTS)
    flags = h.get(RPMTAG_FILEFLAGS, (0,) * len(bases))
    if len(idx) != len(bases) or len(flags) != len(bases) or \
            (digests is not None and len(digests) != len(bases)):
        raise RpmHeaderError("file lists of different lengths (%d names, %d dir indexes)"
                             % (len(bases), len(idx)))
    if idx and max(idx) >= len(dirs):
        raise RpmHeaderError("a dir index %d past its %d dirs" % (max(idx), len(dirs)))
    algo = RPM_DIGEST_ALGOS.get((h.get(RPMTAG_FILEDIGESTALGO) or (1,))[0])
    if digests is None or algo is None:
        digests = [b""] * len(bases)        # an algorithm hashlib lacks: listed only
    return [(dirs[d] + b, dg.decode("ascii", "replace") or None, f)
            for d, b, dg, f in zip(idx, bases, digests, flags)], algo or "md5"


class RpmDB:
    """Which rpm packages own a path and does the file match one, from rpm's
    sqlite database (rpm >= 4.16: Fedora 33+, RHEL 9 and its rebuilds; the
    Berkeley DB of older RHEL and SUSE's ndb are not read).

    Opened read only (`mode=ro`; `immutable` too while rpm's lock is free
    and the write-ahead log is empty, so SQLite takes no lock either): never
    rpm's lock, never a write. The index maps a path to the number of its
    owner (~number for a directory, symlink or %ghost: listed, no digest), a
    tuple of those for several owners; the digests are read from the
    owner's header when a path is checked (a few headers cached), which keeps
    the index as small as the dpkg one. A header that cannot be parsed skips
    that package with one line on stderr."""

    IDLE_DROP = PackageDB.IDLE_DROP
    CACHE = PackageDB.MD5_CACHE
    INDEX_TAGS = {RPMTAG_NAME, RPMTAG_VERSION, RPMTAG_RELEASE, RPMTAG_EPOCH, RPMTAG_BASENAMES,
                  RPMTAG_DIRNAMES, RPMTAG_DIRINDEXES, RPMTAG_FILEDIGESTS, RPMTAG_FILEFLAGS,
                  RPMTAG_FILEDIGESTALGO}

    def __init__(self, path=RPMDB, lock=None):
        self.path = path
        self.lock_path = lock or os.path.join(os.path.dirname(path), RPM_LOCK_NAME)
        self.index, self.loaded_mtime, self.used = None, None, 0
        self.pkgs = []                    # number -> (hnum, name, version-release)
        self.versions = {}
        self.files_cache = collections.OrderedDict()    # number -> ({path: (digest, flags)}, algo)
        self.said = set()                 # one-line errors already written

    @classmethod
    def on_rpm_system(cls, path, dpkg_status):
        """An RpmDB if this is an RPM system, else None. dpkg wins where both
        exist: Debian ships rpm as a tool (its database is then not the
        system's), an RPM distribution has no non-empty dpkg status."""
        try:
            if os.path.getsize(dpkg_status) > 0:
                return None
        except OSError:
            pass
        return cls(path) if os.path.isfile(path) else None

    def _say(self, msg):
        if msg not in self.said:
            self.said.add(msg)
            sys.stderr.write("fimwatch: rpmdb %s: %s\n" % (esc(self.path), esc(msg)))

    def _mtime(self):
        total = 0
        for p in (self.path, self.path + "-wal"):
            try:
                total += os.stat(p).st_mtime_ns
            except FileNotFoundError:
                if p == self.path:
                    return None
            except OSError:
                return None
        return total

    def uri(self):
        """Read only; immutable (no SQLite lock, the WAL not read) only while
        rpm's lock is free and the WAL is empty (all of it checkpointed)."""
        try:
            wal = os.path.getsize(self.path + "-wal")
        except OSError:
            wal = 0
        quiet = wal == 0 and not lock_held(self.lock_path)
        return "file:%s?mode=ro%s" % (self.path.replace("%", "%25").replace("?", "%3f")
                                      .replace("#", "%23"), "&immutable=1" if quiet else "")

    def _connect(self):
        db = sqlite3.connect(self.uri(), uri=True, timeout=2)
        db.text_factory = bytes
        return db

    def _rows(self, sql, args=()):
        db = None
        try:
            db = self._connect()
            yield from db.execute(sql, args)
        except sqlite3.Error as e:
            self._say("cannot be read (%s): no rpm package check until it changes" % e)
        finally:
            if db is not None:
                db.close()

    def load(self):
        """The index as rpm's database is now (read again if it changed)."""
        mtime = self._mtime()
        if mtime is None:
            return False
        if self.index is not None and mtime == self.loaded_mtime:
            return True
        index, self.pkgs, self.versions = {}, [], {}
        self.files_cache.clear()
        for hnum, blob in self._rows("SELECT hnum, blob FROM Packages"):
            try:
                self._index_package(index, hnum, rpm_header(blob, self.INDEX_TAGS))
            except RpmHeaderError as e:
                self._say("package #%s skipped: %s" % (hnum, e))
        self.index, self.loaded_mtime = index, mtime
        return True

    def _index_package(self, index, hnum, h):
        name = esc((h.get(RPMTAG_NAME) or [b"?"])[0].decode("utf-8", "replace"))
        files, _ = rpm_files(h)
        evr = b"%s-%s" % ((h.get(RPMTAG_VERSION) or [b"?"])[0],
                          (h.get(RPMTAG_RELEASE) or [b"?"])[0])
        if h.get(RPMTAG_EPOCH):
            evr = b"%d:%s" % (h[RPMTAG_EPOCH][0], evr)
        k = len(self.pkgs)
        self.pkgs.append((hnum, name, esc(evr.decode("utf-8", "replace"))))
        self.versions[name] = self.pkgs[k][2]
        for path, digest, _ in files:
            v = k if digest else ~k
            cur = index.get(path)
            if cur is None:
                index[path] = v
            elif v not in (cur if isinstance(cur, tuple) else (cur,)):
                index[path] = (cur if isinstance(cur, tuple) else (cur,)) + (v,)

    def _files(self, k):
        """({path: (digest, flags)}, algorithm) of package number k, cached."""
        hit = self.files_cache.get(k)
        if hit is None:
            hit = ({}, "md5")
            for (blob,) in self._rows("SELECT blob FROM Packages WHERE hnum = ?",
                                      (self.pkgs[k][0],)):
                try:
                    files, algo = rpm_files(rpm_header(blob, self.INDEX_TAGS))
                except RpmHeaderError:
                    break                 # said when the index was loaded
                hit = ({p: (d, f) for p, d, f in files}, algo)
            self.files_cache[k] = hit
            while len(self.files_cache) > self.CACHE:
                self.files_cache.popitem(last=False)
        self.files_cache.move_to_end(k)
        return hit

    def owners(self, path):
        """[(package number, digest or None, flags, algorithm)] of path, or []."""
        if not self.load():
            return []
        self.used = time.monotonic()
        b = os.fsencode(path)
        v = self.index.get(b)
        if v is None:
            b = usr_alias(b)
            v = self.index.get(b)
        out = []
        for n in (() if v is None else v if isinstance(v, tuple) else (v,)):
            k = ~n if n < 0 else n
            files, algo = self._files(k) if n >= 0 else ({}, None)
            digest, flags = files.get(b, (None, 0))
            out.append((k, digest, flags, algo))
        return out

    def lookup(self, path):
        """The owners of path as a flat (package, digest, ...) tuple, or None."""
        return tuple(x for k, digest, _, _ in self.owners(path)
                     for x in (self.pkgs[k][1], digest)) or None

    def check(self, path, sha256=None):
        """PackageDB.check for rpm: verified if the content matches any
        owner's digest (sha256 on current rpm: "digest": "sha256"), from the
        one read whose sha256 is `sha256` when given. A config file
        (%config) that differs is not a mismatch: it says "config": true."""
        owners = self.owners(path)
        if not owners:
            return None
        k, _, flags, algo = owners[0]
        res = {"name": self.pkgs[k][1], "manager": "rpm", "version": self.pkgs[k][2],
               "verified": False, "digest": algo or "none"}
        if lock_held(self.lock_path):     # rpm, dnf or yum runs: not "none"
            res["transaction"] = "untracked"
        algos = {a for _, d, _, a in owners if d}
        sums = file_digests(path, algos | {"sha256"}) if algos else {}
        if sums and (sha256 is None or sums["sha256"] == sha256):
            for k2, digest, flags2, algo2 in owners:
                if digest and sums[algo2] == digest.lower():
                    res.update(name=self.pkgs[k2][1], version=self.pkgs[k2][2],
                               verified=True, digest=algo2)
                    return dict(res, config=True) if flags2 & RPMFILE_CONFIG else res
        return dict(res, config=True) if flags & RPMFILE_CONFIG else res

    def maybe_drop(self):
        if self.index is not None and time.monotonic() - self.used > self.IDLE_DROP:
            self.index = self.loaded_mtime = None
            self.pkgs, self.versions = [], {}
            self.files_cache.clear()


_SECRET_RE = re.compile(r"(?i)((?:pass(?:word|wd|phrase)?|secret|token|api[_-]?key|"
                        r"credentials?|private[_-]?key|auth[_-]?key)\w*[\"']?\s*[:=]\s*)\S.*")


def unified_diff(old, new, path):
    """A unified diff of two small texts, or None if either is not text or
    holds a private key. Values of password=/secret:/token= style lines are
    replaced by [redacted]: alerts travel by email and chat."""
    if old is None or new is None or b"\0" in old or b"\0" in new:
        return None
    if b"PRIVATE KEY-----" in old or b"PRIVATE KEY-----" in new:
        return None
    a = old.decode("utf-8", "replace").splitlines(keepends=True)
    b = new.decode("utf-8", "replace").splitlines(keepends=True)
    import difflib
    lines = list(difflib.unified_diff(a, b, "a" + path, "b" + path, n=2))
    if len(lines) > DIFF_MAX_LINES:
        lines = lines[:DIFF_MAX_LINES] + ["... (%d more lines)\n" % (len(lines) - DIFF_MAX_LINES)]
    # Escape control characters line by line but keep the newlines.
    lines = [_SECRET_RE.sub(r"\1[redacted]", ln) for ln in lines]
    return "".join("\t".join(esc(part) for part in ln.rstrip("\n").split("\t")) + "\n"
                   for ln in lines) or None


# ---------------------------------------------------------------------------
# Meaning: what a change to the files attackers touch first says, in words
# ---------------------------------------------------------------------------
# facts(kind, data) turns a file's bytes into "facts": short lines without
# any secret (a shadow hash becomes a digest of it, a key its fingerprint),
# which the Store keeps per path. summarize() compares the old and the new
# facts and says what changed ("user eviltest (uid 1001) added"). All pure
# functions; what does not parse gives no summary, and the alert shows the
# diff as before, never nothing.

MEANING_MAX = 1 << 20                # files larger than this are not parsed
ACCOUNT_DBS = ("passwd", "shadow", "group", "gshadow", "subuid", "subgid")
_LINE_FILES = ("ld.so.preload", "hosts", "resolv.conf", "nsswitch.conf", "hosts.allow",
               "hosts.deny")
_UNIT_SUFFIXES = (".service", ".timer", ".socket", ".path", ".mount")
# the backups and leftovers tools write beside the file they change (.tmp:
# visudo -f X edits X.tmp, then renames it over X)
BACKUP_SUFFIXES = ("-", ".lock", ".dpkg-old", ".dpkg-dist", ".dpkg-new", ".dpkg-bak",
                   ".ucf-old", ".ucf-dist", ".ucf-new", ".bak", ".old", ".tmp")
_SUMMARY_MAX = 5                     # phrases in one summary, then "(+N more)"


def meaning_kind(path):
    """Which parser reads path ('passwd', 'sudoers', 'cron', ...), or None."""
    d, base = os.path.split(path)
    parent = os.path.basename(d)
    if parent == "pam.d" or base in _LINE_FILES:
        return "lines"
    if base in ACCOUNT_DBS and "bin" not in parent:
        return base
    if base == "sudoers" or parent == "sudoers.d":
        return "sudoers"
    if base == "sshd_config" or parent == "sshd_config.d":
        return "sshd"
    if base in ("authorized_keys", "authorized_keys2"):
        return "keys"
    if base == "crontab" or parent == "cron.d":
        return "cron"
    if parent == "crontabs" or d.endswith("/spool/cron"):
        return "usercron"
    if base.endswith(_UNIT_SUFFIXES) and "/systemd/" in path:
        return "unit"
    return None


_ACCOUNT_TEMP_RE = re.compile(r"^(%s)(?:\.\d+|\+)$" % "|".join(ACCOUNT_DBS))


def backup_base(path):
    """The path a tool's backup belongs to ('/etc/passwd' for '/etc/passwd-'),
    or None if path does not look like such a backup. shadow-utils' own
    temporary names count too: passwd.PID (the lock's link) and passwd+."""
    for suf in BACKUP_SUFFIXES:
        if path.endswith(suf) and len(os.path.basename(path)) > len(suf):
            return path[:-len(suf)]
    d, name = os.path.split(path)
    m = _ACCOUNT_TEMP_RE.match(name)
    return os.path.join(d, m.group(1)) if m else None


def _clean(s, limit=160, redact=True):
    """A fact or phrase fit for a summary: escaped, secrets redacted, capped."""
    s = esc(" ".join(s.split()))
    s = _SECRET_RE.sub(r"\1[redacted]", s) if redact else s
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _logical_lines(text, comment="#", keep=()):
    """Non-empty lines without comments, backslash continuations joined."""
    out, cur = [], ""
    for ln in text.splitlines():
        if ln.endswith("\\"):
            cur += ln[:-1] + " "
            continue
        ln, cur = cur + ln, ""
        s = ln.strip()
        if s.startswith(comment) and not s.startswith(keep):
            continue
        if s:
            out.append(s)
    return out


def _shadow_state(field):
    if field == "":
        return "empty"
    if field.startswith("!"):
        return "locked"
    if field in ("*", "x"):
        return "none"
    return "set"


def _colon_facts(kind, text):
    """Account databases: one fact per entry, never a password hash (shadow's
    becomes its state and a short digest that only tells 'changed')."""
    out = []
    for ln in text.splitlines():
        f = ln.split(":")
        if not ln or ln.startswith("#") or len(f) < 3:
            continue
        if kind == "passwd" and len(f) >= 7:
            out.append(":".join([f[0], f[2], f[3], f[5], f[6]]))
        elif kind in ("shadow", "gshadow"):
            dig = hashlib.sha256(b"fimwatch-meaning\0" + f[1].encode()).hexdigest()[:16]
            extra = (":" + f[2] + ":" + ",".join(sorted(filter(None, f[3].split(","))))
                     if kind == "gshadow" and len(f) >= 4 else "")
            out.append("%s:%s:%s%s" % (f[0], _shadow_state(f[1]), dig, extra))
        elif kind == "group" and len(f) >= 4:
            out.append("%s:%s:%s" % (f[0], f[2], ",".join(sorted(filter(None, f[3].split(","))))))
        elif kind in ("subuid", "subgid"):
            out.append(":".join(f[:3]))
    return out


_KEY_TYPE_RE = re.compile(r"(?:ssh-(?:rsa|dss|ed25519)|ecdsa-sha2-nistp\d+|"
                          r"sk-(?:ssh-ed25519|ecdsa-sha2-nistp256)@openssh\.com)"
                          r"(?:-cert-v01@openssh\.com)?$")


def key_fingerprint(blob_b64):
    """'SHA256:...' as `ssh-keygen -lf` prints it, or None if not base64."""
    import base64
    import binascii
    try:
        blob = base64.b64decode(blob_b64, validate=True)
    except (binascii.Error, ValueError):
        return None
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _key_facts(text):
    """authorized_keys: 'type fingerprint comment' per key (options ignored)."""
    out = []
    for ln in _logical_lines(text):
        toks = ln.split()
        for i, t in enumerate(toks[:-1]):
            if _KEY_TYPE_RE.match(t):
                fp = key_fingerprint(toks[i + 1])
                if fp:
                    out.append(" ".join([t, fp] + toks[i + 2:]).strip())
                break
    return out


def _sshd_facts(text):
    """sshd_config: 'Keyword value' per directive; inside a Match block the
    block's condition comes first ('Match User bob: Keyword value')."""
    out, ctx = [], ""
    for ln in _logical_lines(text):
        key, _, val = ln.partition(" ")
        if "=" in key:
            key, _, val = ln.partition("=")
        if key.lower() == "match":
            ctx = "Match %s: " % " ".join(val.split())
            continue
        out.append("%s%s %s" % (ctx, key.strip(), " ".join(val.strip(" =").split())))
    return out


def _unit_facts(text):
    """Unit files: '[Section] Key=value' per setting."""
    out, sect = [], ""
    for ln in _logical_lines(text, keep=()):
        if ln.startswith(";"):
            continue
        if ln.startswith("[") and ln.endswith("]"):
            sect = ln
        elif "=" in ln:
            k, _, v = ln.partition("=")
            out.append(_clean("%s %s=%s" % (sect, k.strip(), v.strip())))
    return out


def facts(kind, data):
    """The facts of a file's bytes for summarize(), or None (not text)."""
    if kind is None or data is None or b"\0" in data or len(data) > MEANING_MAX:
        return None
    text = data.decode("utf-8", "replace")
    if kind in ACCOUNT_DBS:
        return _colon_facts(kind, text)
    if kind == "keys":
        return _key_facts(text)
    if kind == "sshd":
        return _sshd_facts(text)
    if kind == "unit":
        return _unit_facts(text)
    if kind == "sudoers":
        # No secrets in sudoers, and "NOPASSWD:" must not read as one.
        return [_clean(ln, redact=False)
                for ln in _logical_lines(text, keep=("#include", "#includedir"))]
    return [_clean(ln) for ln in _logical_lines(text)]


def _by_name(lines):
    """{first colon field: the other fields} of account facts."""
    return {ln.split(":", 1)[0]: ln.split(":")[1:] for ln in lines}


def _passwd_phrases(old, new):
    o, n = _by_name(old), _by_name(new)
    out = []
    for name in n:
        uid, _gid, home, shell = n[name][:4]
        was = o.get(name)
        if was is None:
            out.append(("uid 0 account %s added" % name, True) if uid == "0" and
                       name != "root" else ("user %s (uid %s) added" % (name, uid), False))
            continue
        if was[0] != uid:
            out.append(("uid of %s changed %s → %s" % (name, was[0], uid), uid == "0"))
        if was[3] != shell:
            out.append(("login shell of %s changed %s → %s" % (name, was[3], shell), False))
        if was[2] != home:
            out.append(("home of %s changed %s → %s" % (name, was[2], home), False))
    out += [("user %s removed" % name, False) for name in o if name not in n]
    return out


_SHADOW_NEWS = {"locked": "account %s locked", "none": "password of %s removed (no login "
                "by password)", "empty": "password of %s emptied: login WITHOUT a password",
                "set": "password of %s set"}


def _shadow_phrases(kind, old, new):
    o, n = _by_name(old), _by_name(new)
    out = []
    for name, f in n.items():
        was = o.get(name)
        if was is None:
            out.append(("%s entry for %s added" % (kind, name), f[0] == "empty"))
        elif was[0] != f[0]:
            out.append((_SHADOW_NEWS[f[0]] % name, f[0] == "empty"))
        elif was[1] != f[1] and f[0] == "set":
            out.append(("password of %s changed" % name, False))
        if kind == "gshadow" and was is not None and len(f) > 3 and len(was) > 3:
            out += _member_phrases(name, was[3], f[3])
    out += [("%s entry for %s removed" % (kind, name), False) for name in o if name not in n]
    return out


def _member_phrases(group, old, new):
    o, n = set(filter(None, old.split(","))), set(filter(None, new.split(",")))
    return [("%s added to group %s" % (u, group), False) for u in sorted(n - o)] + \
        [("%s removed from group %s" % (u, group), False) for u in sorted(o - n)]


def _group_phrases(old, new):
    o, n = _by_name(old), _by_name(new)
    out = []
    for name, f in n.items():
        was = o.get(name)
        if was is None:
            out.append(("group %s (gid %s) added" % (name, f[0]), False))
            out += [("%s added to group %s" % (u, name), False) for u in f[1].split(",") if u]
            continue
        if was[0] != f[0]:
            out.append(("gid of group %s changed %s → %s" % (name, was[0], f[0]), False))
        out += _member_phrases(name, was[1], f[1])
    out += [("group %s removed" % name, False) for name in o if name not in n]
    return out


def _sub_phrases(kind, old, new):
    what = "uids" if kind == "subuid" else "gids"
    out = []
    for ln in new:
        if ln not in old:
            f = ln.split(":") + ["", ""]
            try:
                rng = "%s-%d" % (f[1], int(f[1]) + int(f[2]) - 1)
            except ValueError:
                rng = "%s+%s" % (f[1], f[2])
            out.append(("subordinate %s %s given to %s" % (what, rng, f[0]), False))
    out += [("subordinate %s of %s removed" % (what, ln.split(":")[0]), False)
            for ln in old if ln not in new]
    return out


def _sshd_phrases(old, new):
    def first(lines):
        d = {}
        for ln in lines:
            ctx, sep, rest = ln.partition(": ") if ln.startswith("Match ") else ("", "", ln)
            k, _, v = rest.partition(" ")
            d.setdefault((ctx + sep + k).lower(), (ctx + sep + k, v))   # the first value wins
        return d
    o, n = first(old), first(new)
    out = []
    for lk, (k, v) in n.items():
        was = o.get(lk)
        if was is None or was[1] != v:
            out.append(("%s %s → %s" % (k, was[1] if was else "(unset)", v), False))
    out += [("%s %s → (unset)" % (k, v), False) for lk, (k, v) in o.items() if lk not in n]
    return out


def _added_removed(old, new, what):
    out = [("%s added: %s" % (what, ln), False) for ln in new if ln not in old]
    return out + [("%s removed: %s" % (what, ln), False) for ln in old if ln not in new]


def _cron_phrases(kind, ev, old, new):
    """'cron job added: */5 * * * * as root: /tmp/x' per job line."""
    owner = os.path.basename(ev.get("path") or "") if kind == "usercron" else None
    out = []
    for ln, verb in [(x, "added") for x in new if x not in old] + \
            [(x, "removed") for x in old if x not in new]:
        f = ln.split()
        if re.match(r"^[A-Za-z_]\w*\s*=", ln):
            out.append(("cron variable %s: %s" % (verb, ln), False))
            continue
        n = 1 if ln.startswith("@") else 5
        user = owner or (f[n] if len(f) > n else "?")
        cmd = " ".join(f[n + (0 if owner else 1):])
        out.append(("cron job %s: %s as %s: %s" % (verb, " ".join(f[:n]), user, cmd), False))
    return out


def _unit_phrases(ev, old, new):
    name = os.path.basename(ev.get("path") or "")
    if not old and ev.get("event") == "created":
        keys = [ln.split(" ", 1)[1] for ln in new if ln.split(" ", 1)[1].startswith(
            ("ExecStart=", "User=", "WantedBy="))]
        return [("unit %s added%s" % (name, ": " + ", ".join(keys) if keys else ""), False)]
    return _added_removed(old, new, "unit %s: setting" % name)


def _sudoers_phrases(old, new):
    out = []
    for ph, crit in _added_removed(old, new, "sudoers rule"):
        if ph.startswith("sudoers rule added") and re.search(r"NOPASSWD|!authenticate", ph):
            ph, crit = ph + " (NOPASSWD: no password asked)", True
        out.append((ph, crit))
    return out


def _meta_phrases(ev):
    """What the metadata says: setuid/setgid, capabilities, a new executable,
    a unit enabled (a symlink in a .wants directory)."""
    path, prev = ev.get("path") or "", ev.get("previous") or {}
    d = os.path.dirname(path)
    if ev.get("kind") == "symlink" and d.endswith((".wants", ".requires")):
        what = "enabled" if ev.get("event") == "created" else \
            "disabled" if ev.get("event") == "deleted" else None
        if what:
            return [("unit %s %s (%s)" % (os.path.basename(path), what, os.path.basename(d)),
                     False)]
    if ev.get("kind") != "file" or ev.get("event") == "deleted":
        return []
    mode, pmode = int(ev.get("mode") or "0", 8), int(prev.get("mode") or "0", 8)
    new_bits = mode & ~pmode if ev.get("event") != "created" else mode
    out = []
    if new_bits & 0o4000:
        root = ev.get("uid") == 0
        out.append(("new setuid-%s binary" % ("root" if root else ev.get("owner", "?"))
                    if ev.get("event") == "created" else
                    "setuid bit set (runs as %s)" % ev.get("owner", "?"), root))
    elif new_bits & 0o2000 and not mode & 0o040000:
        out.append(("setgid bit set (runs as group %s)" % ev.get("group", "?"), False))
    if ev.get("capability") and ev.get("capability") != prev.get("capability"):
        # Said, but at the path's level: capabilities are set by packages
        # (ping, mtr) more often than setuid bits are.
        out.append(("file capabilities set: %s" % ev["capability"], False))
    if not out and ev.get("event") == "created" and mode & 0o111:
        out.append(("new executable", False))
    return _package_phrases(ev) + out


def _package_phrases(ev):
    """A packaged file changed while no package manager ran, or while rpm
    ran, whose transactions are not tracked (the `package` field emit_change
    adds): matching the package is said, not an all-clear."""
    pkg = ev.get("package") or {}
    why = {"none": "no package manager ran",
           "untracked": "rpm was running; its transactions are not tracked"}.get(
               pkg.get("transaction"))
    if why is None or not pkg.get("name"):
        return []
    if pkg.get("verified"):
        return [("matches package %s, but %s" % (pkg["name"], why), False)]
    if pkg.get("config"):      # a config file is there to be edited: no mismatch
        return [("config file of package %s, edited (differs from the package's; %s)"
                 % (pkg["name"], why), False)]
    return [("does not match package %s (%s)" % (pkg["name"], why), False)]


def _text_phrases(kind, ev, old, new):
    if kind == "passwd":
        return _passwd_phrases(old, new)
    if kind in ("shadow", "gshadow"):
        return _shadow_phrases(kind, old, new)
    if kind == "group":
        return _group_phrases(old, new)
    if kind in ("subuid", "subgid"):
        return _sub_phrases(kind, old, new)
    if kind == "sshd":
        return _sshd_phrases(old, new)
    if kind == "keys":
        return _added_removed(old, new, "SSH key")
    if kind in ("cron", "usercron"):
        return _cron_phrases(kind, ev, old, new)
    if kind == "unit":
        return _unit_phrases(ev, old, new)
    if kind == "sudoers":
        return _sudoers_phrases(old, new)
    return _added_removed(old, new, "line")


def summarize(ev, kind=None, old=None, new=None):
    """(summary, critical) of a change event: what it means in words, or
    (None, False). old/new: facts() of the file before and after (None:
    unknown, then only the metadata speaks)."""
    phrases = _meta_phrases(ev)
    if ev.get("event") == "created" and old is None:
        old = []
    if ev.get("event") == "deleted" and new is None and old is not None:
        new = []
    if kind and old is not None and new is not None:
        phrases = _text_phrases(kind, ev, old, new) + phrases
    elif kind is None and ev.get("event") == "created" and ev.get("kind") == "file" and \
            os.path.basename(os.path.dirname(ev.get("path", ""))).startswith("cron."):
        phrases.insert(0, ("new %s job" % os.path.basename(os.path.dirname(ev["path"])),
                           False))
    return join_phrases([p for p, _ in phrases]), any(c for _, c in phrases)


def join_phrases(phrases):
    """'a; b; c (+2 more)' from distinct phrases, or None for none."""
    seen = []
    for p in phrases:
        p = _clean(p, 200, redact=False)    # facts are redacted where secrets may be
        if p and p not in seen:
            seen.append(p)
    if not seen:
        return None
    more = len(seen) - _SUMMARY_MAX
    return "; ".join(seen[:_SUMMARY_MAX]) + (" (+%d more)" % more if more > 0 else "")


def add_summary(ev, kind=None, old=None, new=None):
    """Set ev's `summary` (and raise it to critical where the change calls
    for it: a uid 0 account, NOPASSWD, a setuid-root binary). Called once,
    before the event is emitted."""
    if kind is None and ev.get("event") == "modified" and ev.get("kind") == "file" \
            and "package" not in ev and not ev.get("capability") \
            and ev.get("mode") == (ev.get("previous") or {}).get("mode"):
        return      # the most common change says nothing more (see _meta_phrases)
    try:
        text, critical = summarize(ev, kind, old, new)
    except (ValueError, IndexError, KeyError, TypeError):
        return                        # a parse failure: the diff speaks, as before
    if text:
        ev["summary"] = text
        if critical:
            ev["severity"] = "critical"


_SECONDARY_RE = re.compile(r"^(shadow|gshadow) entry for |^subordinate ")


def combined_summary(events):
    """One summary for changes made together: the phrases of every event,
    the account database first, without repeats; an entry in shadow or the
    subordinate ids only when nothing else is said."""
    order = {k: i for i, k in enumerate(("passwd", "group") + ACCOUNT_DBS)}
    ranked = sorted((e for e in events if e.get("summary")),
                    key=lambda e: order.get(os.path.basename(e.get("path") or ""), 99))
    phrases = [p for e in ranked
               for p in re.sub(r" \(\+\d+ more\)$", "", e["summary"]).split("; ")]
    main = [p for p in phrases if not _SECONDARY_RE.match(p)]
    return join_phrases(main or phrases) or tree_summary(events)


def tree_summary(events, least=4):
    """'154 changes under /var/www/html/site: 154 created' for changes with
    nothing else to say (a deploy) under one directory, or None."""
    paths = [e.get("path") for e in events]
    if len(paths) < least or not all(paths):
        return None
    top = os.path.commonpath(paths)
    if top in ("/", "") or any(e.get("path") == top and e.get("kind") != "dir"
                               for e in events):
        return None                # unrelated paths, or changes of one file
    counts = collections.Counter(e.get("event") for e in events)
    return "%d changes under %s: %s" % (len(events), top, ", ".join(
        "%d %s" % (n, what) for what, n in counts.most_common()))


# ---------------------------------------------------------------------------
# Package transactions: one dpkg run, lock to unlock, summed up in one event
#
# A transaction is the time a process holds dpkg's lock-frontend or lock
# (apt holds lock-frontend for its whole run and lets dpkg take lock; a bare
# `dpkg -i` takes both). The holder's pid comes from /proc/locks, read
# without opening the lock files: opening them would wake our own watch, and
# taking a lock, even briefly, could make apt fail. A small inotify instance
# of its own (PackageWatch) watches dpkg's directory (a lock file opened or
# closed, status replaced) and info/ (md5sums landing): any of these makes
# the locks be looked at in that loop turn; while a transaction runs they are
# also looked at every second, in case a close went unseen. Without
# inotify_simple they are looked at every 5 s.
#
# Changes under the package prefixes first seen while a transaction runs are
# held (Engine.defer_for_dpkg) until it ends, then verified against dpkg's
# database as it is then (PackageTx.take): what a package ships, what a
# maintainer script or trigger is known to generate, and what matches no
# package. One `transaction` event sums them up; only mismatches are also
# reported one by one, at their normal severity. Elsewhere in the watched
# paths a change that is not critical there is held too (Engine.tx_holds),
# and a watched path that appears is walked when the transaction ends: a
# directory made or a copy of a shipped file is a maintainer script's
# (PackageTx.take_outside), anything else is reported as without it.
# ---------------------------------------------------------------------------

TX_CHECK_EVERY = 1.0         # locks looked at this often while a transaction runs
TX_SUSPECT_FOR = 3.0         # ... and every 0.25 s this long after a lock file was opened
TX_POLL_EVERY = 5.0          # ... and this often without inotify
TX_MAX_HOLD = 1800.0         # no change waits longer for its transaction to end
TX_LIST_MAX = 200            # paths listed per kind in the digest
TX_RECORD_GRACE = 5.0        # a dpkg record changed this soon after one ended is not "by hand"
FRONTENDS = {"apt": "apt", "apt-get": "apt-get", "aptitude": "aptitude",
             "unattended-upgr": "unattended-upgrades",
             "unattended-upgrade": "unattended-upgrades",
             "packagekitd": "PackageKit", "synaptic": "synaptic", "dpkg": "dpkg"}
# Files no package lists that a maintainer script or trigger writes.
GENERATED = [(re.compile(_glob_to_re(g) + r"\Z"), why) for g, why in (
    ("/etc/ld.so.cache", "ldconfig"),
    ("/etc/ssl/certs/*", "update-ca-certificates"),
    ("/etc/ca-certificates.conf", "update-ca-certificates"),
    ("/boot/initrd.img-*", "update-initramfs"),
    ("/usr/share/info/dir", "install-info"),
    ("/usr/lib/locale/locale-archive", "locale-gen"),
    ("/usr/share/mime/**", "update-mime-database"),
    ("**/icon-theme.cache", "gtk-update-icon-cache"),
    ("**/gschemas.compiled", "glib-compile-schemas"),
    ("**/giomodule.cache", "gio-querymodules"),
    ("**/*.dpkg-old", "dpkg (conffile kept)"),
    ("**/*.dpkg-dist", "dpkg (conffile kept)"),
    ("**/*.dpkg-bak", "dpkg (conffile kept)"),
)]
# Unowned changes here are a maintainer script's (adduser, systemctl enable...):
# listed in the digest; anywhere else under the package prefixes they are
# files that match no package.
SCRIPT_PREFIXES = ("/etc/",)
# dpkg's own records (in its directory, and info/* there): only dpkg writes
# them, holding its lock. Changed while no transaction runs they are an edit
# by hand, the cover a trojan needs (an md5sums line made to match it, a
# status or diversion rewritten): critical. The rest of dpkg's directory
# (status-old, available, triggers/, alternatives/) is the path's own level.
DPKG_RECORDS = ("status", "diversions", "statoverride")


def lock_holders(paths, proc_locks=PROC_LOCKS):
    """{path: pid} for those of paths a process holds a POSIX or OFD lock on
    (pid None for an OFD lock); None if /proc/locks cannot be read."""
    want = {}
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue
        want[st.st_ino] = (p, st.st_dev)
    try:
        with open(proc_locks) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    exact, loose = {}, {}
    for ln in lines:
        parts = ln.split()
        if len(parts) < 6 or parts[1] == "->":          # "->": a waiter, not a holder
            continue
        try:
            maj, mnr, ino = parts[5].split(":")
            hit, pid = want.get(int(ino)), int(parts[4])
            dev = os.makedev(int(maj, 16), int(mnr, 16))
        except ValueError:
            continue
        if hit is not None:
            # overlayfs and btrfs subvolumes show another device than stat()
            (exact if dev == hit[1] else loose).setdefault(hit[0], pid if pid > 0 else None)
    loose.update(exact)
    return loose


def lock_holder_info(pid):
    """What can be read of the process holding dpkg's lock: pid, frontend,
    cmdline, user (SUDO_USER), login_user (loginuid)."""
    d = {"pid": pid, "frontend": "unknown"}
    if pid is None:
        return d
    try:
        comm = _proc_read(pid, "comm", 64).strip().decode("utf-8", "replace")
        argv = [a.decode("utf-8", "replace") for a in _proc_read(pid, "cmdline").split(b"\0")
                if a]
    except OSError:
        return d
    name = comm
    if comm.startswith("python") and len(argv) > 1:
        name = os.path.basename(argv[1])
    d["frontend"] = FRONTENDS.get(name, esc(name))
    d["cmdline"] = esc(" ".join(argv))[:300]
    try:
        env = dict(x.partition(b"=")[::2]
                   for x in _proc_read(pid, "environ", 1 << 20).split(b"\0") if x)
        if env.get(b"SUDO_USER"):
            d["user"] = esc(env[b"SUDO_USER"].decode("utf-8", "replace"))
    except OSError:
        pass
    try:
        uid = int(_proc_read(pid, "loginuid", 32))
        if uid != 0xFFFFFFFF:
            d["login_user"] = user_name(uid)
    except (OSError, ValueError):
        pass
    return d


def _ver_order(c):
    if c == "":
        return 0
    if c == "~":
        return -1
    return ord(c) if c.isalpha() else ord(c) + 256


def _ver_part_cmp(a, b):
    """dpkg's verrevcmp: non-digits by _ver_order, digit runs as numbers."""
    i = j = 0
    while i < len(a) or j < len(b):
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ac = _ver_order(a[i] if i < len(a) and not a[i].isdigit() else "")
            bc = _ver_order(b[j] if j < len(b) and not b[j].isdigit() else "")
            if ac != bc:
                return ac - bc
            i, j = i + 1, j + 1
        i2, j2 = i, j
        while i2 < len(a) and a[i2].isdigit():
            i2 += 1
        while j2 < len(b) and b[j2].isdigit():
            j2 += 1
        x, y = int(a[i:i2] or 0), int(b[j:j2] or 0)
        if x != y:
            return x - y
        i, j = i2, j2
    return 0


def dpkg_version_cmp(a, b):
    """<0, 0, >0 as Debian version a sorts before, with, after b."""
    def split(v):
        epoch, _, rest = v.partition(":") if ":" in v else ("0", "", v)
        up, _, rev = rest.rpartition("-") if "-" in rest else (rest, "", "")
        return int(epoch) if epoch.isdigit() else 0, up, rev
    ea, ua, ra = split(a)
    eb, ub, rb = split(b)
    return (ea - eb) or _ver_part_cmp(ua, ub) or _ver_part_cmp(ra, rb)


def generated_by(p, kind, new, db):
    """Which maintainer script or trigger writes p, or None."""
    for rx, why in GENERATED:
        if rx.match(p):
            return why
    base = os.path.basename(p)
    d = os.path.dirname(p)
    if base == "__pycache__" and kind == "dir":
        return "py3compile"
    if os.path.basename(d) == "__pycache__" and base.endswith(".pyc") and \
            os.path.exists(os.path.join(os.path.dirname(d), base.split(".", 1)[0] + ".py")):
        return "py3compile"
    target = new.target if new is not None and kind == "symlink" else None
    if target is None:
        return None
    if d == "/etc/alternatives":
        try:
            with open(os.path.join(db.alternatives_dir, base), "rb") as f:
                choices = f.read().split(b"\n")
        except OSError:
            return None
        return "update-alternatives" if os.fsencode(target) in choices else None
    if (d.startswith("/etc/systemd/system/") and d.endswith((".wants", ".requires"))) or \
            re.match(r"/etc/rc[0-6S]\.d\Z", d):
        full = target if target.startswith("/") else os.path.normpath(os.path.join(d, target))
        if db.lookup(full) is not None:
            return "deb-systemd-helper" if d.startswith("/etc/systemd/") else "update-rc.d"
    return None


def package_managed(p, db):
    """Does a package manager write p: the package prefixes, or dpkg's own
    directory (where a transaction's changes are held for its digest)?"""
    return p.startswith(PACKAGE_PREFIXES) or p.startswith(db.base + "/")


def dpkg_record(p, db):
    """Is p one of dpkg's records (DPKG_RECORDS, info/*)?"""
    if not p.startswith(db.base.rstrip("/") + "/"):
        return False                     # asked for every change: most are elsewhere
    d, base = os.path.split(p)
    return d == db.info_dir or (d == db.base and base in DPKG_RECORDS)


def mark_record_edit(ev, p, db):
    """A dpkg record changed outside a package transaction: critical, and
    the summary says so first (the package the record is of, if any)."""
    rel = os.path.relpath(p, db.base)
    name = os.path.basename(p).split(".", 1)[0].split(":", 1)[0] \
        if os.path.dirname(p) == db.info_dir else None
    what = {"created": "added", "deleted": "removed"}.get(ev["event"], "edited")
    phrase = "dpkg database %s outside a package transaction: %s" % (what, esc(rel))
    ev["severity"] = "critical"
    ev["summary"] = phrase + ("; " + ev["summary"] if ev.get("summary") else "")
    ev["package"] = {"name": esc(name) if name else None, "manager": "dpkg",
                     "verified": False, "transaction": "none"}


def _added_names(diff):
    """The user or group names a diff of /etc/passwd or /etc/group adds."""
    out = []
    for ln in (diff or "").splitlines():
        if ln.startswith("+") and not ln.startswith("+++") and ":" in ln:
            out.append(ln[1:].split(":", 1)[0])
    return out


def md5sums_digests(info_dir):
    """{package: sha256 of its md5sums list(s)}: what each installed package
    says its files are, to tell a same-version reinstall that changed them.
    (~9 MB for 700 packages, read once when a transaction starts.)"""
    out = {}
    try:
        names = sorted(n for n in os.listdir(info_dir) if n.endswith(".md5sums"))
    except OSError:
        return out
    for n in names:
        pkg = n[:-8].split(":", 1)[0]
        h = hashlib.sha256(out.get(pkg, "").encode())
        try:
            with open(os.path.join(info_dir, n), "rb") as f:
                h.update(f.read())
        except OSError:
            continue
        out[pkg] = h.hexdigest()
    return out


_POLICY_VERSION_RE = re.compile(r"^ (\*\*\*| {3}) (\S+) -?\d+$")
_POLICY_SOURCE_RE = re.compile(r"^ {8}-?\d+ (.+)$")


def apt_sources(names, run=subprocess.run, tmpdir=None):
    """{package: [sources of its installed version]} from `apt-cache policy`
    ("/var/lib/dpkg/status" alone: no configured apt source has it), or None
    when apt-cache cannot say (missing, failed, over 20 s). tmpdir: where apt
    may write its temp files (it checks each InRelease's signature through
    one): under the unit /tmp is read-only, and apt-cache failed there."""
    if not names:
        return {}
    try:
        # no pkgcache.bin written (the unit's /var is read-only): built in memory
        r = run(["apt-cache", "-o", "Dir::Cache::pkgcache=", "-o", "Dir::Cache::srcpkgcache=",
                 "policy", "--"] + sorted(names), capture_output=True, timeout=20,
                env=dict({"LC_ALL": "C", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"},
                         **({"TMPDIR": tmpdir} if tmpdir else {})),
                stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    out, pkg, mine = {}, None, False
    for line in r.stdout.decode("utf-8", "replace").splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            pkg, mine = line[:-1].split(":", 1)[0], False
            continue
        m = _POLICY_VERSION_RE.match(line)
        if m:
            mine = m.group(1) == "***"
            if mine:
                out[pkg] = []
            continue
        m = _POLICY_SOURCE_RE.match(line)
        if m and mine and pkg is not None:
            out[pkg].append(m.group(1).strip())
    return out


class PackageTx:
    """One package transaction: who ran it, and what each change it made
    proved to be once it ended (take)."""

    def __init__(self, holder, now, versions, sums=None):
        self.id = event_id()[:12]
        self.holder = holder
        self.sums_before = sums or {}       # md5sums_digests() when it started
        self.started, self.start_mono, self.ended = time.time(), now, None
        self.before, self.after = dict(versions), {}
        self.paths = {}               # path -> its owners when first held (lookup)
        self.verified = collections.Counter()        # package -> files
        self.proof = collections.Counter()           # "sha256"/"md5" -> files verified so
        self.removed = collections.Counter()
        self.generated, self.scripts, self.mismatches = [], [], []
        self.records = 0              # dpkg's own files it rewrote (status, info/*)
        self.deb_wait = set()         # (package, version): .deb still being read ahead
        self.temporaries = 0          # dpkg's unpack files (X.dpkg-new, X.dpkg-tmp), gone
        self._shipped = None          # md5 -> "path (package)" of its packages' files
        self.walks = 0                # walks of watched paths it made, not done yet

    def take(self, db, p, ev, new, changes):
        """Classify one change of this transaction; True if the digest holds
        it, False if it is a mismatch to report on its own (ev is amended)."""
        event, kind = ev["event"], ev.get("kind")
        if p.startswith(db.base + "/"):
            self.records += 1
            return True
        if not p.startswith(PACKAGE_PREFIXES):
            return self.take_outside(db, p, ev, new)
        if event == "transient" and p.endswith((".dpkg-new", ".dpkg-tmp")) and \
                db.lookup(p[:-9]) is not None:
            self.temporaries += 1            # unpacked beside a packaged file, renamed over it
            return True
        owners = db.lookup(p)
        why = None
        if event == "deleted":
            if owners is None:
                self.removed[(self.paths.get(p) or ("?",))[0]] += 1
                return True
            why = "a file of package %s is gone" % owners[0]
        elif owners is not None and kind in ("dir", "symlink"):
            self.verified[owners[0]] += 1
            return True
        elif owners is not None:
            pkg = db.check(p, new.sha256 or "")
            if pkg["verified"] and set(changes) <= {"content"}:
                self.verified[pkg["name"]] += 1
                self.proof[pkg["digest"]] += 1
                return True
            why = ("does not match package %s" % pkg["name"]) if pkg["verified"] is False \
                else "%s changed; the package database records no %s" % (
                    "/".join(changes), "/".join(changes))
            if pkg.get("mismatch"):           # the md5sums list lies: tampering
                why, ev["severity"] = pkg["mismatch"], "critical"
            ev["package"] = dict(pkg, transaction=self.id)
        else:
            gen = generated_by(p, kind, new, db)
            if gen is not None:
                self.generated.append({"path": ev["path"], "by": gen})
                return True
            if p.startswith(SCRIPT_PREFIXES):
                item = {"path": ev["path"], "event": event}
                if p.endswith(("/etc/passwd", "/etc/group")) and ev.get("diff"):
                    item["added"] = _added_names(ev["diff"])
                self.scripts.append(item)
                return True
            why = "matches no package"
            ev["package"] = {"name": None, "manager": "dpkg", "verified": False,
                             "transaction": self.id}
        ev["message"] = "%s during package transaction %s: %s" % (event, self.id, why)
        self.mismatches.append({"path": ev["path"], "event": event, "reason": why,
                                "severity": ev["severity"]})
        return False

    def take_outside(self, db, p, ev, new):
        """A change outside the package prefixes held for this transaction
        (Engine.tx_holds): a directory made, or a copy of a file one of its
        packages ships (nginx's postinst copies its index.html into
        /var/www/html), is a maintainer script's, listed; anything else is
        reported as it would have been without the transaction (False)."""
        event, kind = ev["event"], ev.get("kind")
        item = {"path": ev["path"], "event": event}
        if kind == "dir" and event == "created":
            self.scripts.append(item)
            return True
        if kind != "file" or event not in ("created", "modified") or new is None or \
                not new.sha256:
            return False
        md5, sha = _md5_sha256(p)
        src = self.shipped(db).get(md5) if sha == new.sha256 else None
        if src is None:
            return False
        item["copy_of"] = src
        self.scripts.append(item)
        return True

    def shipped(self, db):
        """{md5: "path (package)"} of the files this transaction's packages
        ship (their md5sums lists), read once."""
        if self._shipped is None and db.load():
            self._shipped = {}
            for name in self.changed_packages():
                for fn in db.md5sums_file.get(name, ()):
                    for md5, path in db._md5sums(fn):
                        self._shipped.setdefault(md5.decode("ascii", "replace"), "%s (%s)" % (
                            esc(os.fsdecode(path)), name))
        return self._shipped or {}

    def package_changes(self):
        """{installed, upgraded, downgraded, reinstalled, removed: [names]}"""
        out = {k: [] for k in ("installed", "upgraded", "downgraded", "reinstalled", "removed")}
        for name, ver in sorted(self.after.items()):
            old = self.before.get(name)
            if old is None:
                out["installed"].append("%s %s" % (name, ver))
            elif old != ver:
                key = "upgraded" if dpkg_version_cmp(ver, old) > 0 else "downgraded"
                out[key].append("%s %s -> %s" % (name, old, ver))
            elif self.verified.get(name):
                out["reinstalled"].append("%s %s" % (name, ver))
        out["removed"] = ["%s %s" % (n, v) for n, v in sorted(self.before.items())
                          if n not in self.after]
        return {k: v for k, v in out.items() if v}

    def summary(self, pkgs):
        h = self.holder
        who = h.get("frontend", "unknown")
        if h.get("user"):
            who += " (by %s via sudo)" % h["user"]
        elif h.get("login_user"):
            who += " (by %s)" % h["login_user"]
        done = ["%s %d package%s" % (k, len(v), "" if len(v) == 1 else "s")
                for k, v in pkgs.items()] or ["changed no package"]
        files = "%d file%s verified" % (sum(self.verified.values()),
                                        "" if sum(self.verified.values()) == 1 else "s")
        for n, what in ((len(self.generated), "generated"),
                        (len(self.scripts), "by maintainer scripts"),
                        (sum(self.removed.values()), "removed"),
                        (self.records, "dpkg records"),
                        (self.temporaries, "dpkg temporaries")):
            if n:
                files += ", %d %s" % (n, what)
        return "%s %s: %s, %d mismatch%s" % (
            who, " and ".join(done), files, len(self.mismatches),
            "" if len(self.mismatches) == 1 else "es")

    def changed_packages(self):
        """Names of the packages this transaction installed, upgraded,
        downgraded or reinstalled (a file of theirs verified)."""
        return sorted(n for n, v in self.after.items()
                      if self.before.get(n) != v or n in self.verified)

    def flags(self, pkgs, sums_after, sources):
        """What a person should look at even when every file verified: a
        downgrade, a same-version reinstall whose files differ (a package
        rebuilt under an old version number), a version that no configured
        apt source has (dpkg -i of a local .deb, or a source since removed)."""
        out = ["downgraded: %s" % d for d in pkgs.get("downgraded", ())]
        for name, ver in sorted(self.after.items()):
            if self.before.get(name) == ver and name in self.sums_before and \
                    sums_after.get(name) not in (None, self.sums_before[name]):
                out.append("reinstalled with different files under the same version: %s %s"
                           % (name, ver))
        if sources is None:
            return out
        for name in self.changed_packages():
            src = sources.get(name)
            if src is not None and all(x.startswith("/var/lib/dpkg/status") for x in src):
                out.append("in no configured apt source: %s %s (dpkg -i of a local .deb, "
                           "or its source was removed)" % (name, self.after[name]))
        return out

    def digest(self, host, critical_paths=(), sums_after=None, sources=None):
        """The `transaction` event: info when everything verified (syslog and
        the events file only); the worst mismatch's severity, at least
        warning, when something did not, or when something is flagged
        (flags()); notice when maintainer scripts changed a critical path
        (listed, never paging)."""
        pkgs = self.package_changes()
        flags = self.flags(pkgs, sums_after or {}, sources)
        sev = "info"
        if self.mismatches:
            sev = max(["warning"] + [m["severity"] for m in self.mismatches],
                      key=SEV_RANK.get)
        elif flags:
            sev = "warning"
        elif any(s["path"] in critical_paths for s in self.scripts):
            sev = "notice"
        ev = new_event(host, "transaction", sev, "realtime", "", transaction=self.id,
                       manager="dpkg", process=self.holder,
                       started=iso_ms(self.started),
                       duration=round(max(0.0, (self.ended or self.start_mono)
                                          - self.start_mono), 1),
                       packages=pkgs,
                       files={"verified": sum(self.verified.values()),
                              "sha256": self.proof["sha256"], "md5": self.proof["md5"],
                              "generated": len(self.generated),
                              "scripts": len(self.scripts),
                              "removed": sum(self.removed.values()),
                              "records": self.records,
                              "temporaries": self.temporaries,
                              "mismatches": len(self.mismatches)},
                       verified=dict(sorted(self.verified.items())),
                       mismatches=self.mismatches[:TX_LIST_MAX],
                       generated=self.generated[:TX_LIST_MAX],
                       scripts=self.scripts[:TX_LIST_MAX],
                       message=self.summary(pkgs))
        if flags:
            ev["flags"] = flags[:TX_LIST_MAX]
            ev["message"] += "; flagged: " + "; ".join(flags[:3])
        return ev


class PackageWatch:
    """Is a package transaction running: dpkg's locks, looked at when its
    directory says so (see the banner above)."""

    def __init__(self, db, use_inotify=True, proc_locks=PROC_LOCKS):
        self.db, self.proc_locks = db, proc_locks
        self.locks = (db.frontend_path, db.lock_path)
        self.tx = None
        self.ended_at = float("-inf")   # monotonic time the last transaction ended
        self.ino = None
        self.check_at, self.suspect_until, self.ignore_until = 0.0, 0.0, 0.0
        if use_inotify:
            try:
                self.ino = import_inotify().INotify()
                mask = 0x20 | IN_CLOSE_WRITE | 0x10 | IN_MOVED_TO | IN_CREATE | IN_DELETE
                self.ino.add_watch(os.path.dirname(db.lock_path), mask)
                self.ino.add_watch(db.info_dir, IN_CLOSE_WRITE | IN_MOVED_TO | IN_DELETE)
            except (FimwatchError, OSError):
                self.close()

    def fileno(self):
        return self.ino.fileno() if self.ino is not None else None

    def close(self):
        if self.ino is not None:
            self.ino.close()
            self.ino = None

    def next_check(self, now):
        if self.ino is None:
            return self.check_at
        if self.tx is not None or now < self.suspect_until:
            return self.check_at
        return None

    def _drain(self, now):
        if self.ino is None:
            return
        names = {os.path.basename(p) for p in self.locks}
        events = self.ino.read(timeout=0)
        if now < self.ignore_until:
            return
        for e in events:
            self.check_at = now           # something happened there: look now
            if e.name in names:
                self.suspect_until = now + TX_SUSPECT_FOR

    def holder(self):
        """process_info of the lock holder (lock-frontend first), or None."""
        held = lock_holders(self.locks, self.proc_locks)
        if held is None:                      # no /proc/locks: F_GETLK, no pid
            # busy() opens the lock: its own events are not a reason to look again
            self.ignore_until = time.monotonic() + 0.2
            return {"pid": None, "frontend": "unknown"} if self.db.busy() else None
        for p in self.locks:
            if p in held:
                return lock_holder_info(held[p])
        return None

    def poll(self, now):
        """Look at the locks if due: the transaction that ended, or None."""
        self._drain(now)
        if now < self.check_at:
            return None
        h = self.holder()
        if h is not None:
            every = TX_CHECK_EVERY
        elif self.ino is not None and now < self.suspect_until:
            every = 0.25
        else:
            every = TX_POLL_EVERY
        self.check_at = now + every
        if h is not None and self.tx is None:
            self.db.load()
            self.tx = PackageTx(h, now, self.db.versions, md5sums_digests(self.db.info_dir))
        elif h is None and self.tx is not None:
            tx, self.tx = self.tx, None
            tx.ended = self.ended_at = now
            self.db.load()
            tx.after = dict(self.db.versions)
            return tx
        return None


# ---------------------------------------------------------------------------
# The event
# ---------------------------------------------------------------------------


def new_event(host, event, severity, detected="realtime", path="", **fields):
    """A new event: a plain dict of the SPEC's fields, never changed once
    emitted (sinks that need more make a copy)."""
    ev = {"id": event_id(), "time": iso_ms(time.time()), "host": host, "event": event,
          "severity": severity, "detected": detected, "path": path}
    ev.update(fields)
    return ev


_EPOCH_SEC = (None, 0)       # (the time field's whole second, as epoch): see event_epoch


def event_epoch(ev):
    """The event's time as a Unix timestamp (from its 'time' field)."""
    s = ev.get("time") or ""
    last, sec = _EPOCH_SEC
    try:
        if s[:19] != last:             # the whole second parsed once per second
            sec = int(datetime.datetime(int(s[0:4]), int(s[5:7]), int(s[8:10]), int(s[11:13]),
                                        int(s[14:16]), int(s[17:19]),
                                        tzinfo=datetime.timezone.utc).timestamp())
            globals()["_EPOCH_SEC"] = (s[:19], sec)
        return (sec * 1000000 + int(s[20:23] or 0) * 1000) / 1e6    # as timedelta computes it
    except ValueError:
        return time.time()


def rec_fields(rec, prefix_mtime=True, changes=()):
    """The event fields of a Rec. The security metadata appears only when
    there is some (a capability, an ACL, flags, a device number, more than
    one link), or when `changes` names it, so `previous` shows both sides."""
    d = {"size": rec.size, "mode": "%04o" % rec.mode, "uid": rec.uid, "owner": user_name(rec.uid),
         "gid": rec.gid, "group": group_name(rec.gid)}
    meta_fields(d, rec, changes)
    if rec.kind == "file":
        if rec.sha256:
            d["sha256"] = rec.sha256
        if rec.skipped == 1:
            d["hash_skipped"] = True
        elif rec.skipped == 2:
            d["unreadable"] = True
        if prefix_mtime and rec.mtime_ns:
            d["mtime"] = iso_s(rec.mtime_ns / 1e9)
    elif rec.kind == "symlink":
        d["target"] = esc(rec.target or "")
    if rec.kind == "dir":
        del d["size"]
    return d


def meta_fields(d, rec, changes=()):
    xa = "xattr" in changes
    if rec.xattrs is not None and (rec.xattrs or xa):
        d["xattrs"] = json.loads(rec.xattrs) if rec.xattrs else {}
    if rec.capability is not None and (rec.capability or xa):
        d["capability"] = rec.capability
    for k in ("acl", "flags"):
        v = getattr(rec, k)
        if v is not None and (v or k in changes):
            d[k] = v
    if rec.rdev is not None:
        d["rdev"] = "%d:%d" % (os.major(rec.rdev), os.minor(rec.rdev))
    if rec.links is not None and (rec.links > 1 or "links" in changes):
        d["links"] = rec.links


_names = {}


def _id_name(db, num):
    """The name of a uid (db 'pwd') or gid ('grp'), cached; the number if none."""
    k = (db, num)
    if k not in _names:
        try:
            mod = __import__(db)
            ent = mod.getpwuid(num).pw_name if db == "pwd" else mod.getgrgid(num).gr_name
            _names[k] = esc(ent)
        except (KeyError, ImportError):
            _names[k] = str(num)
    return _names[k]


def user_name(uid):
    return _id_name("pwd", uid)


def group_name(gid):
    return _id_name("grp", gid)


def change_list(ev):
    """ev's `changes` as a list of names; before 0.2 the verified, rescan and
    accepted events stored a count there (now `changes_found`)."""
    c = ev.get("changes")
    return [str(x) for x in c] if isinstance(c, (list, tuple)) else []




# One encoder, not one per event; an event is a tree of plain dicts and lists
# built here, never a cycle, so the encoder need not look for one.
_EVENT_JSON = json.JSONEncoder(ensure_ascii=False, separators=(", ", ": "),
                               check_circular=False)


# ... and its C half made once: JSONEncoder.encode builds it again per call.
_C_EVENT_JSON = json.encoder.c_make_encoder and json.encoder.c_make_encoder(
    None, _EVENT_JSON.default, json.encoder.encode_basestring, None, ": ", ", ",
    False, False, True)


def event_json(ev):
    if _C_EVENT_JSON:
        return "".join(_C_EVENT_JSON(ev, 0))
    return _EVENT_JSON.encode(ev)


# ---------------------------------------------------------------------------
# Pipeline 1 of 3: watcher backends (kernel notifications -> Engine calls)
# ---------------------------------------------------------------------------


def import_inotify():
    """inotify_simple, from the installer's private copy if there is one.

    It imports ctypes.util for find_library("c") alone, and that imports
    shutil, tempfile, random, bz2, lzma and zlib: ~1.1 MB of resident
    memory the daemon never uses. So while it is imported, ctypes.util is
    a stand-in whose find_library imports the real one (should this or
    another copy of inotify_simple call it), and its libc is ours."""
    if os.path.isdir(LIBDIR) and LIBDIR not in sys.path:
        sys.path.insert(0, LIBDIR)
    stand_in = None
    if "inotify_simple" not in sys.modules and "ctypes.util" not in sys.modules:
        try:
            ctypes, libc = _libc()
        except OSError:
            pass
        else:
            stand_in = types.ModuleType("ctypes.util")
            stand_in.find_library = _real_find_library
            sys.modules["ctypes.util"] = stand_in
    try:
        import inotify_simple
    except ImportError:
        raise FimwatchError("the Python module inotify_simple is missing: install fimwatch "
                            "with install.sh, or from a checkout: python3 -m venv venv && "
                            "venv/bin/pip install inotify_simple && venv/bin/python "
                            "fimwatch.py ...")
    finally:
        if stand_in is not None:
            if sys.modules.get("ctypes.util") is stand_in:
                del sys.modules["ctypes.util"]
            if getattr(ctypes, "util", None) is stand_in:
                del ctypes.util
    if stand_in is not None and getattr(inotify_simple, "_libc", 0) is None:
        inotify_simple._libc = libc
    return inotify_simple


def _real_find_library(name):
    """ctypes.util.find_library, imported when first called (import_inotify)."""
    if getattr(sys.modules.get("ctypes.util"), "find_library", None) is _real_find_library:
        del sys.modules["ctypes.util"]
    import ctypes.util
    return ctypes.util.find_library(name)


def read_sysctl(name, base=INOTIFY_SYSCTL):
    try:
        with open(os.path.join(base, name)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def watch_limit():
    """The inotify watch limit in force for us: fs.inotify.max_user_watches,
    or the user namespace's own user.max_inotify_watches when that is lower
    (a container's limit is the smaller of the two)."""
    limits = [v for v in (read_sysctl("max_user_watches"),
                          read_sysctl("max_inotify_watches", "/proc/sys/user"))
              if v is not None]
    return min(limits) if limits else None


# a backend turns the kernel's raw notifications into a few backend-neutral
# calls on the Engine, which owns everything after that (settle queue,
# comparison, events). inotify is the one backend today; a fanotify backend
# implements the same calls:
#
#   eng.changed(path, is_dir)   something at path changed: queue it (settle)
#   eng.dir_created(path)       a directory appeared (created or moved in)
#   eng.moved(src, dst, is_dir) a rename inside the watched trees
#   eng.moved_out(path, is_dir) an entry left the trees (an unpaired rename)
#   eng.dir_gone(d)             a watched directory itself was deleted or moved
#   eng.watch_lost(d)           the kernel dropped a watch (deleted, unmounted)
#   eng.overflow()              notifications were lost: rescan
#   eng.wanted(path, is_dir)    False: ignore this entry (excluded, filtered)
#
# and offers the Engine: fileno(), read(eng), watch(d) (raises OSError,
# errno ENOSPC at the limit), unwatch_tree(top), unwatch(d), rename(src, dst),
# watching(d), prune_gone(), count(), close().


def drain(fd, handle, limit=200000):
    """Read a non-blocking notification fd until it is empty, or until limit
    records were handled (the rest of the loop must breathe); handle(data)
    takes one read's bytes and returns how many records they held."""
    n = 0
    while n <= limit:
        try:
            # Below MMAP_THRESHOLD: a bigger read would mmap() and unmap its
            # buffer every time, and fault in every page the kernel writes.
            data = os.read(fd, DRAIN_READ)
        except BlockingIOError:
            break
        except InterruptedError:
            continue
        if not data:
            break
        n += handle(data)
    return n


def end_of_read(backend, eng, n, waiting):
    """After a backend's read: a MOVED_FROM whose MOVED_TO may be in the next
    read waits one turn (its path was queued, so that turn comes within
    settle); after that it was a move out of the trees."""
    if waiting and n:
        backend.from_reads += 1
        if backend.from_reads > 1:
            backend._finish_moves(eng)
    else:
        backend._finish_moves(eng)


class WdMap:
    """wd -> directory path, the dict interface the inotify backend uses, in
    a list indexed by wd: 8 bytes a watch instead of a dict entry and an int
    object (~100 bytes). The kernel hands out wds in increasing order, so the
    start-up walk's are dense; a wd far past the list's end (after much
    churn) goes to a dict instead, so the list never grows without bound,
    and trailing holes are trimmed."""
    GAP = 64                         # at most this many holes added at the end

    def __init__(self):
        self.paths = [None]          # wd 0 is never used
        self.extra = {}
        self.n = 0

    def __len__(self):
        return self.n

    def get(self, wd, default=None):
        paths = self.paths
        p = paths[wd] if wd < len(paths) else self.extra.get(wd)
        return default if p is None else p

    def __setitem__(self, wd, path):
        paths = self.paths
        if wd < len(paths):
            if paths[wd] is None:
                self.n += 1
            paths[wd] = path
        elif wd - len(paths) <= self.GAP:
            paths.extend([None] * (wd - len(paths)))
            paths.append(path)
            self.n += 1
        else:
            if wd not in self.extra:
                self.n += 1
            self.extra[wd] = path

    def __delitem__(self, wd):
        paths = self.paths
        if wd < len(paths) and paths[wd] is not None:
            paths[wd] = None
            while len(paths) > 1 and paths[-1] is None:
                paths.pop()
        elif wd in self.extra:
            del self.extra[wd]
        else:
            raise KeyError(wd)
        self.n -= 1

    def items(self):
        """[(wd, path)], a copy: the caller may change the map meanwhile."""
        out = [(wd, p) for wd, p in enumerate(self.paths) if p is not None]
        return out + list(self.extra.items())

    def values(self):
        return [p for _, p in self.items()]


class InotifyBackend:
    """inotify(7): one watch per directory, the wd -> path map, and the
    pairing of MOVED_FROM with MOVED_TO (same cookie: a rename inside the
    trees; a MOVED_FROM with no partner in this read or the next: the entry
    left the trees). IN_Q_OVERFLOW means records were lost."""
    name = "inotify"

    def __init__(self, ino_mod):
        self.ino = ino_mod.INotify(nonblocking=True)
        self.parse = ino_mod.parse_events
        self.wd2path = WdMap()
        self.last_from = None        # (cookie, path, isdir) of an unpaired MOVED_FROM
        self.from_reads = 0

    def fileno(self):
        return self.ino.fileno()

    def close(self):
        try:
            self.ino.close()
        except OSError:
            pass

    def count(self):
        return len(self.wd2path)

    def watch(self, d):
        """Add (or refresh) the watch on directory d; OSError on failure."""
        if is_deep(d):
            # past PATH_MAX: watch the directory we opened (O_NOFOLLOW, one
            # level at a time) through its /proc/self/fd link, which must be
            # followed to reach it
            fd = open_deep(d)
            try:
                wd = self.ino.add_watch("/proc/self/fd/%d" % fd, WATCH_MASK & ~IN_DONT_FOLLOW)
            finally:
                os.close(fd)
        else:
            wd = self.ino.add_watch(d, WATCH_MASK)
        if self.wd2path.get(wd) != d:
            self.wd2path[wd] = d

    def _rm(self, wd):
        del self.wd2path[wd]
        try:
            self.ino.rm_watch(wd)
        except OSError:
            pass

    def unwatch(self, d):
        for wd in [wd for wd, p in self.wd2path.items() if p == d]:
            self._rm(wd)

    def unwatch_tree(self, top):
        pre = top + "/"
        for wd in [wd for wd, p in self.wd2path.items() if p == top or p.startswith(pre)]:
            self._rm(wd)

    def rename(self, src, dst):
        pre, n = src + "/", len(src)
        for wd, p in self.wd2path.items():
            if p == src or p.startswith(pre):
                self.wd2path[wd] = dst + p[n:]

    def watching(self, d):
        return d in self.wd2path.values()

    def writer(self, path):
        return None                      # inotify does not say who

    def peek_writer(self, path):
        return None

    def learn(self, root, wanted):
        return False                     # a watch per directory: walk first

    def learned(self, root):
        pass

    def prune_gone(self):
        """Drop the watches of directories that no longer exist (after a rescan)."""
        for wd in [wd for wd, p in self.wd2path.items() if not _is_dir_deep(p)]:
            self._rm(wd)

    def read(self, eng):
        """Drain the inotify queue into eng; returns the number of records."""
        n = drain(self.ino.fileno(), lambda data: self._records(eng, data))
        end_of_read(self, eng, n, self.last_from is not None)
        return n

    def _records(self, eng, data):
        evs = self.parse(data)
        for ev in evs:
            try:
                self._one(eng, *ev)
            except Exception as e:   # one bad name must not end the watching
                eng.internal_error("event %r" % (ev,), e)
        return len(evs)

    def _finish_moves(self, eng):
        lf, self.last_from = self.last_from, None
        if lf is not None:
            eng.moved_out(lf[1], lf[2])

    def _one(self, eng, wd, mask, cookie, name):
        if mask & IN_Q_OVERFLOW:
            self._finish_moves(eng)
            eng.overflow()
            return
        d = self.wd2path.get(wd)
        if d is None:
            return
        if mask & IN_IGNORED:
            # We drop our own wds from the map before removing them, so this
            # is the kernel's doing: the directory was deleted, or unmounted.
            del self.wd2path[wd]
            eng.watch_lost(d)
            return
        if self.last_from is not None and not (mask & IN_MOVED_TO
                                               and cookie == self.last_from[0]):
            self._finish_moves(eng)
        if mask & (IN_DELETE_SELF | IN_MOVE_SELF):
            eng.dir_gone(d)
            return
        if not name:                     # the directory itself (e.g. chmod)
            eng.changed(d, True)
            return
        p = d + "/" + name if d != "/" else "/" + name
        isdir = bool(mask & IN_ISDIR)
        if not eng.wanted(p, isdir):
            return
        if mask & IN_MOVED_FROM:
            self.last_from = (cookie, p, isdir)
            self.from_reads = 0
            eng.changed(p, isdir)
        elif mask & IN_MOVED_TO:
            self._moved_to(eng, p, isdir, cookie)
        else:                            # the directory first, then what is in it
            eng.changed(p, isdir, mask & ~IN_ISDIR == IN_ATTRIB)
            if isdir and mask & IN_CREATE:
                eng.dir_created(p)

    def _moved_to(self, eng, p, isdir, cookie):
        lf = self.last_from
        if lf is not None and lf[0] == cookie:
            self.last_from = None
            eng.moved(lf[1], p, isdir and lf[2])
            return
        eng.changed(p, isdir)
        if isdir:                        # a tree moved in from outside
            eng.dir_created(p)


# ---------------------------------------------------------------------------
# Pipeline 1 of 3, continued: fanotify, one mark per filesystem, the writer's pid
# ---------------------------------------------------------------------------
#
# fanotify_init(FAN_REPORT_DFID_NAME | FAN_REPORT_FID) (Linux >= 5.9) reports
# each change as (fsid, handle of the directory, name), plus the handle of the
# object itself; FAN_MARK_FILESYSTEM sees the whole filesystem with one mark.
# the backend keeps a handle -> directory map of the watched trees only (seeded
# by watch(d) during the walks, rewritten on renames), so a record whose
# directory is not in the map is outside the roots and dropped after one dict
# lookup. The record's pid is the writer: /proc is read at once, since it may
# be about to exit. FAN_REPORT_TARGET_FID (5.17) adds the moved object's handle
# to MOVED_FROM/MOVED_TO, which pairs a rename exactly; before 5.17 (Debian 11)
# a rename is reported as a delete and a create (or a dir tree as new).
#
# Who wrote, when the writer is gone before /proc is read (`echo > f`, cp, a
# dropper): the mark also asks for FAN_OPEN_EXEC, so every execve of a binary
# on a marked filesystem queues a record (pid, directory handle, name) ahead of
# that process's writes. The backend keeps the last one per pid (the exec
# cache) and names the exe from it when /proc cannot: the process has exited,
# or /proc/PID/exe is not ours to read (under the unit: no CAP_SYS_PTRACE). A
# directory handle outside the watched trees (/usr/bin when only /etc is
# watched) is turned into a path with open_by_handle_at, once per handle.

FAN_CLOEXEC, FAN_NONBLOCK = 0x1, 0x2
FAN_REPORT_FID, FAN_REPORT_DIR_FID, FAN_REPORT_NAME = 0x200, 0x400, 0x800
FAN_REPORT_TARGET_FID = 0x1000
FAN_MARK_ADD, FAN_MARK_FILESYSTEM = 0x1, 0x100
FAN_Q_OVERFLOW, FAN_ONDIR, FAN_EVENT_ON_CHILD = 0x4000, 0x40000000, 0x08000000
FAN_OPEN_EXEC = 0x1000
EXEC_PAIR = 0.5              # s: a script's exec record and its interpreter's
FAN_CHANGES = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO
               | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF)   # inotify's bits
FAN_MASK = FAN_CHANGES | FAN_OPEN_EXEC | FAN_ONDIR | FAN_EVENT_ON_CHILD
SETID_MASK = IN_ATTRIB | IN_MOVED_TO      # outside the trees: looked at for set-id
FAN_INFO_FID, FAN_INFO_DFID_NAME = 1, 2
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
OVERLAYFS_MAGIC = 0x794C7630
PROC = "/proc"
_FAN_META = struct.Struct("=IBBHQii")      # struct fanotify_event_metadata
_FAN_INFO = struct.Struct("=BBH8sIi")      # info header, fsid, file_handle head
_U32 = struct.Struct("=I")
NOISE_DELAY = 0.02               # s; see FanotifyBackend.read
NOISE_BUSY = (40, 0.25)          # more records than this of other files within s: busy

_libc_cache = []


def _libc():
    """libc through ctypes, loaded on first use (ctypes adds ~0.3 MB of memory
    that an inotify-only daemon does not need)."""
    if not _libc_cache:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
        libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64,
                                       ctypes.c_int, ctypes.c_char_p]
        libc.name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p,
                                           ctypes.c_void_p, ctypes.c_int]
        libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        _libc_cache.append((ctypes, libc))
    return _libc_cache[0]


def one_malloc_arena(environ=os.environ):
    """glibc gives every thread that allocates an arena of its own (the
    Hasher's, the channels'), and what one frees the others never reuse:
    ~1 MB of resident memory at 50,000 directories. Our threads allocate
    under the GIL anyway, so one arena costs no contention. Done before any
    thread starts; MALLOC_ARENA_MAX in the environment (an admin's choice)
    wins; no-op without glibc's mallopt. True when the limit was set."""
    fixed_mmap_threshold(environ)
    if "MALLOC_ARENA_MAX" in environ:
        return False
    try:
        return _libc()[1].mallopt(M_ARENA_MAX, 1) == 1
    except (OSError, AttributeError):
        return False


def fixed_mmap_threshold(environ=os.environ):
    """glibc mmap()s a block of 128 KiB or more, and when one is freed it
    raises that threshold to its size (up to 32 MB): after DirTree's tables
    or a big read were freed, every later array, table and read of up to
    that size came from the heap, which a freed one leaves full of holes
    (~1 MiB of resident memory at 50,000 directories). Fixing the threshold
    at its initial 128 KiB (which also stops the trim threshold following
    it) gives such blocks back on free; reads of up to HASH_SMALL stay on
    the heap. MALLOC_MMAP_THRESHOLD_ in the environment wins. True when
    set."""
    if "MALLOC_MMAP_THRESHOLD_" in environ:
        return False
    try:
        return _libc()[1].mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    except (OSError, AttributeError):
        return False


def trim_heap():
    """malloc_trim(0): gives the kernel back the free pages in the heap.
    A walk or a baseline build frees as much as it allocates (rows, stat
    results, reads), and what is freed between live blocks stays resident:
    trimmed once per TX_SPLIT row writes and once per 1,000 directories
    walked (~0.6 MiB less at the end of a first start over 50,000
    directories, ~0.5 at a restart; a trim of the daemon's few MB of heap
    costs microseconds, a thousand directories about 0.1 s). No-op without
    glibc."""
    try:
        _libc()[1].malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _oserror(ctypes, what):
    e = ctypes.get_errno()
    return OSError(e, "%s: %s" % (what, os.strerror(e)))


def fanotify_open(target_fid=True):
    """A notification group in DFID_NAME + FID mode (+ TARGET_FID where the
    kernel has it, unless target_fid=False: 5.10's mode); returns (fd, flags).
    OSError when refused."""
    ctypes, libc = _libc()
    base = FAN_REPORT_FID | FAN_REPORT_DIR_FID | FAN_REPORT_NAME | FAN_CLOEXEC | FAN_NONBLOCK
    for flags in (base | FAN_REPORT_TARGET_FID, base)[0 if target_fid else 1:]:
        fd = libc.fanotify_init(flags, os.O_RDONLY | os.O_CLOEXEC | os.O_LARGEFILE)
        if fd >= 0:
            return fd, flags
        if ctypes.get_errno() != errno.EINVAL:
            break
    raise _oserror(ctypes, "fanotify_init")


def fanotify_mark_fs(fd, path):
    ctypes, libc = _libc()
    if libc.fanotify_mark(fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, FAN_MASK, AT_FDCWD,
                          os.fsencode(path)) != 0:
        raise _oserror(ctypes, "fanotify_mark")


def fsid_of(path):
    """The filesystem id as fanotify reports it (statfs f_fsid, two ints)."""
    return struct.pack("=Q", os.statvfs(path).f_fsid & 0xFFFFFFFFFFFFFFFF)


_handle_bufs = []


def dir_handle(path):
    """(mount id, struct file_handle of path): with the fsid in front, the
    key fanotify's records carry. One syscall; the buffers are reused (a walk
    calls this for every directory)."""
    ctypes, libc = _libc()
    if not _handle_bufs:
        mid = ctypes.c_int()
        _handle_bufs.extend((ctypes.create_string_buffer(8 + 128), mid, ctypes.byref(mid)))
    buf, mid, mid_ref = _handle_bufs
    struct.pack_into("=Ii", buf, 0, 128, 0)
    if is_deep(path):
        # past PATH_MAX: the handle of the directory opened one level at a time
        fd = open_deep(path)
        try:
            failed = libc.name_to_handle_at(fd, b"", buf, mid_ref, AT_EMPTY_PATH)
        finally:
            os.close(fd)
    else:
        failed = libc.name_to_handle_at(AT_FDCWD, os.fsencode(path), buf, mid_ref, 0)
    if failed:
        raise _oserror(ctypes, "name_to_handle_at")
    raw = buf.raw
    return mid.value, raw[:8 + struct.unpack_from("=I", raw, 0)[0]]


def path_of_handle(mount_fd, handle):
    """The path of a directory from its struct file_handle (the bytes after the
    fsid in a record), or None: open_by_handle_at (CAP_DAC_READ_SEARCH) on
    mount_fd's filesystem, O_PATH (nothing is read), then the fd's link."""
    ctypes, libc = _libc()
    fd = libc.open_by_handle_at(mount_fd, handle, os.O_PATH | os.O_CLOEXEC)
    if fd < 0:
        return None
    try:
        path = os.readlink("/proc/self/fd/%d" % fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    if not path.startswith("/") or path.endswith(" (deleted)"):
        return None
    return path


def _is_script(path):
    """Does the regular file at path start with #!? (Never follows a final
    symlink, never blocks: O_NONBLOCK.)"""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) and os.read(fd, 2) == b"#!"
    except OSError:
        return False
    finally:
        os.close(fd)


def _mount_top(d):
    """The top directory of d's filesystem (as mounted above d), or None."""
    try:
        dev = os.lstat(d).st_dev if d else None
        while dev is not None and d != "/":
            up = os.path.dirname(d)
            if os.lstat(up).st_dev != dev:
                break
            d = up
    except OSError:
        return None
    return d if dev is not None else None


def _refusal(e):
    """Why fanotify cannot be used, from the errno of init or mark."""
    if e.errno == errno.EPERM:
        return "not permitted: " + _eperm_cause()
    if e.errno == errno.EINVAL:
        return "kernel %s lacks FAN_REPORT_DFID_NAME/FAN_MARK_FILESYSTEM (needs 5.9)" \
            % os.uname().release
    if e.errno in (errno.EXDEV, errno.EOPNOTSUPP, errno.ENODEV, errno.ESTALE):
        return "the filesystem refuses a fanotify mark with file handles (%s)" % e.strerror
    if e.errno == errno.ENOSYS:
        return "kernel without fanotify"
    return e.strerror or str(e)


CAP_SYS_ADMIN = 21
FANOTIFY_DROPIN = "/etc/systemd/system/fimwatch.service.d/fanotify.conf"   # install.sh's


def _eperm_cause(proc=PROC):
    """Which of the three things that refuse fanotify_init with EPERM it is,
    from /proc/self: a user namespace, no CAP_SYS_ADMIN, or (with the
    capability) a seccomp filter -- the unit's, or a container runtime's
    (systemd-nspawn's and Docker's default filters refuse fanotify_init for
    every process in the container, services included)."""
    try:
        with open(proc + "/self/uid_map") as f:
            own_ns = f.read().split() != ["0", "0", "4294967295"]
        with open(proc + "/self/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        has_cap = int(status["CapEff"], 16) >> CAP_SYS_ADMIN & 1
        seccomp = status.get("Seccomp", "0").strip() != "0"
    except (OSError, KeyError, ValueError):
        return "no CAP_SYS_ADMIN in the initial user namespace, or a system-call filter"
    if own_ns:
        return ("in a user namespace (a container's, or the unit's PrivateUsers=): fanotify "
                "needs CAP_SYS_ADMIN in the initial user namespace")
    if not has_cap:
        return ("no CAP_SYS_ADMIN (under systemd: the unit's drop-in %s grants it; install.sh "
                "installs it unless [watch] backend = inotify)" % FANOTIFY_DROPIN)
    if seccomp:
        return ("CAP_SYS_ADMIN is there, so a seccomp system-call filter refuses it: the "
                "unit's SystemCallFilter= (the drop-in %s lets fanotify_init and fanotify_mark "
                "through) or a container's (systemd-nspawn and Docker refuse fanotify_init "
                "unless told otherwise)" % FANOTIFY_DROPIN)
    return "refused with CAP_SYS_ADMIN and no seccomp filter (a security module's policy?)"


def choose_backends(roots, want, probe_fd=None):
    """[(root, backend, reason)] for each watched root: `want` is the config's
    [watch] backend. auto: fanotify where the kernel, our capabilities and the
    root's filesystem take a mark, inotify otherwise (with the reason)."""
    if want == "inotify":
        return [(r, "inotify", "configured") for r in roots]
    fd, why = probe_fd, None
    if fd is None:
        try:
            fd = fanotify_open()[0]
        except OSError as e:
            why = "fanotify_init refused: " + _refusal(e)
    out = []
    try:
        for r in roots:
            out.append((r,) + _probe_root(fd, r, why))
    finally:
        if probe_fd is None and fd is not None:
            os.close(fd)
    return out


def _probe_root(fd, root, why):
    if why is None:
        path = root
        while not os.path.isdir(path) and path != "/":
            path = os.path.dirname(path)       # a file root, or one not there yet
        try:
            if _fs_type(path) == OVERLAYFS_MAGIC:
                why = "overlayfs: a filesystem mark there misses writes to the layers below"
            else:
                fanotify_mark_fs(fd, path)
                dir_handle(path)
                return ("fanotify", "filesystem mark, writer named")
        except OSError as e:
            why = "cannot mark %s: %s" % (esc(path), _refusal(e))
    return ("inotify", why)


def _fs_type(path):
    """statfs f_type (Python's statvfs has no f_type): ctypes statfs."""
    ctypes, libc = _libc()
    buf = ctypes.create_string_buffer(256)
    if libc.statfs(os.fsencode(path), buf) != 0:
        raise _oserror(ctypes, "statfs")
    return struct.unpack_from("=q", buf.raw, 0)[0]


def _proc_read(pid, name, limit=4096):
    with open("%s/%d/%s" % (PROC, pid, name), "rb") as f:
        return f.read(limit)


def _proc_status(pid):
    """(ppid, real uid, comm) from /proc/PID/status."""
    ppid, uid, comm = 0, None, ""
    for line in _proc_read(pid, "status", 2048).split(b"\n"):
        k, _, v = line.partition(b":")
        if k == b"PPid":
            ppid = int(v)
        elif k == b"Uid":
            uid = int(v.split()[0])
        elif k == b"Name":
            comm = v.strip().decode("utf-8", "replace")
    return ppid, uid, comm


def _proc_stat_fields(pid):
    """(b"PID (name", [the fields after the name]) of /proc/PID/stat."""
    fd = os.open("%s/%d/stat" % (PROC, pid), os.O_RDONLY)
    try:
        raw = os.read(fd, 1024)
    finally:
        os.close(fd)
    end = raw.rindex(b")")                      # the name may hold ") "
    return raw[:end], raw[end + 2:].split()


def _proc_stat(pid):
    """(ppid, start time in clock ticks since boot) from /proc/PID/stat: the
    start time tells a pid that was reused from the process it was."""
    rest = _proc_stat_fields(pid)[1]
    return int(rest[1]), int(rest[19])


def _proc_identity(pid):
    """(pid and name, parent, start time) from /proc/PID/stat: what changes
    when the pid is reused, the process is re-parented or it executes another
    program (its name)."""
    name, rest = _proc_stat_fields(pid)
    return name, rest[1], rest[19]


def _unit_of(pid):
    """The systemd unit or session scope of pid, from its cgroup path."""
    try:
        cg = _proc_read(pid, "cgroup").decode("utf-8", "replace")
    except OSError:
        return None
    for part in reversed(cg.strip().split("\n")[-1].split("/")):
        if part.endswith((".service", ".scope")):
            return esc(part)
    return None


def process_info(pid):
    """What /proc says about pid now: the `process` field of an event, or
    None when the process is gone. The chain walks parents up to (not
    including) pid 1: e.g. ["sshd", "bash", "sudo", "vim"]."""
    try:
        ppid, uid, comm = _proc_status(pid)
        raw = _proc_read(pid, "cmdline", 2048)
    except (OSError, ValueError):
        return None
    info = {"pid": pid, "ppid": ppid, "comm": esc(comm),
            "cmdline": esc(raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace"))[:500]}
    try:
        info["exe"] = esc(os.readlink("%s/%d/exe" % (PROC, pid)))
    except OSError:
        info["exe"] = None                     # a kernel thread, or not ours to read
    if uid is not None:
        info["uid"], info["user"] = uid, user_name(uid)
    try:
        login = int(_proc_read(pid, "loginuid", 32))
        if login != 0xFFFFFFFF:
            info["login_uid"], info["login_user"] = login, user_name(login)
        sess = int(_proc_read(pid, "sessionid", 32))
        if sess != 0xFFFFFFFF:
            info["session"] = sess
    except (OSError, ValueError):
        pass
    unit = _unit_of(pid)
    if unit:
        info["unit"] = unit
    info["chain"] = _chain(ppid) + [esc(comm)]
    return info


def _chain(pid, depth=12):
    out = []
    while pid > 1 and len(out) < depth:
        try:
            ppid, _, comm = _proc_status(pid)
        except (OSError, ValueError):
            break
        out.append(esc(comm))
        pid = ppid
    return out[::-1]


class ProcessCache:
    """pid -> process info, read once per pid per read() of the queue; a pid
    that has exited since is named from what an earlier record of it read,
    or from the exec cache (executed(pid): the binary it last executed, and
    the script it ran), with confidence "cached"; else by number only
    ("none"). A live process whose /proc/PID/exe we may not read gets its
    exe from the exec cache too."""
    KEEP = 512
    # A process whose /proc/PID/stat still shows the same start time, parent
    # and name is not read again for this long: a writer busy over many reads
    # of the queue costs one small read per read, not a dozen and its chain.
    FRESH = 1.0

    def __init__(self, executed=None):
        self.seen = collections.OrderedDict()     # pid -> (start time, info), last read
        self.batch = {}
        self.fresh = {}                           # pid -> (identity, monotonic, info)
        self.executed = executed or (lambda pid, start=None: {})

    def new_batch(self):
        self.batch = {}

    def _live(self, pid):
        """process_info(pid), or what it said of this same process (see
        FRESH); None when the process is gone."""
        try:
            ident = _proc_identity(pid)
        except (OSError, ValueError, IndexError):
            return None
        now = time.monotonic()
        hit = self.fresh.get(pid)
        if hit is not None and hit[0] == ident and now - hit[1] < self.FRESH:
            return hit[2]
        live = process_info(pid)
        if live is not None:
            # What the exec cache adds, once per read of /proc (not per hit):
            # the exe where /proc/PID/exe may not be read, and the #! script
            # of one still running.
            ex = self.executed(pid, int(ident[2]))
            if live.get("exe") is None:
                live["exe"] = ex.get("exe")
            if ex.get("script") and ex.get("exe") == live["exe"]:
                live["script"] = ex["script"]
            if len(self.fresh) >= self.KEEP:
                self.fresh.clear()
            self.fresh[pid] = (ident, now, live)
        return live

    def _started(self, pid):
        """The start time (clock ticks) of pid as _live() last read it; only
        right after _live(pid) returned its info."""
        return int(self.fresh[pid][0][2])

    def get(self, pid):
        info = self.batch.get(pid)
        if info is not None:
            return info
        live = self._live(pid)
        if live is not None:
            info = dict(live, confidence="live")
            self.seen[pid] = (self._started(pid), live)
            self.seen.move_to_end(pid)
            if len(self.seen) > self.KEEP:
                self.seen.popitem(last=False)
            self.batch[pid] = info
            return info
        ex = self.executed(pid)
        old = self.seen.get(pid)
        if old is not None and not (ex.get("started") or 0) > old[0]:
            # Gone; what an earlier read of it said, unless the exec cache
            # knows a later process of that pid (reused since that read).
            info = dict(old[1], confidence="cached")
        else:
            info = dict(ex, pid=pid, confidence="cached" if ex else "none")
            if ex.get("ppid"):
                self._from_parent(info)
        self.batch[pid] = info
        return info

    def _from_parent(self, info):
        """A writer gone before /proc was read (cp, sed -i, a dropper): who
        ran it, from its parent if that still lives (the shell it was started
        from, usually): the login user and session, which a child inherits,
        and the chain up to the writer. Its own uid is not guessed (sudo and
        set-id binaries change it)."""
        ppid, start = info["ppid"], info.pop("started", None)
        parent = self._live(ppid) if start is not None else None
        if parent is None or self._started(ppid) > start:
            return                       # gone too, or its pid is a younger process's
        for k in ("login_uid", "login_user", "session"):
            if k in parent:
                info[k] = parent[k]
        info["chain"] = parent["chain"] + [esc(os.path.basename(info["exe"]))]


_FS_ENCODING = (sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())
KEY_PREFIX = 16                  # fsid, handle_bytes, handle_type (see DirTree)


class DirTree:
    """fanotify's directory map, handle key <-> path, in flat arrays: a
    directory is a node, its name under its parent node, so it costs its
    name's and its key's bytes and a few array slots (~70 bytes), where a
    path string, a bytes key and two dict entries took ~230 (11 MB at
    50,000 directories). Two open-addressing tables find a node: by key
    (get, `in`: every record) and by (parent, name) (a path, one component
    at a time). Directories above the watched ones are nodes without a key
    (`/`, `/var`...), so a rename moves one node, not its subtree. Paths of
    the last looked-up keys are cached (a burst of records from one
    directory builds its path once)."""
    FREE, GONE = 0, -1               # table slots: never used, used then freed
    CACHE = 256                      # paths cached (get)
    COMPACT = 1 << 20                # bytes of unused names and keys kept at most

    def __init__(self):
        self.parent = array.array("i")   # node -> parent node (-1: the root "/")
        self.noff = array.array("I")     # node -> its name: names[noff:noff+nlen]
        self.nlen = array.array("I")
        # A key is the filesystem's id and the handle's size and type (the
        # same for a whole filesystem: stored once, in prefixes) and the
        # handle's bytes (keys[koff:koff+klen-1]); klen 0: no key (a node
        # above the watched directories).
        self.kpre = array.array("H")     # node -> its key's prefix: plist[kpre]
        self.koff = array.array("I")
        self.klen = array.array("B")
        self.prefixes, self.plist = {}, []
        self.kids = array.array("i")     # node -> nodes with it as parent; -1: free
        self.names, self.keys = bytearray(), bytearray()
        self.garbage = 0                 # bytes of names and keys no node uses
        self.free = array.array("i")
        self.ktab = array.array("i", bytes(4 * 64))   # slot -> node + 1 (or FREE/GONE)
        self.ctab = array.array("i", bytes(4 * 64))
        self.kused = self.cused = 0      # slots not FREE (GONE included)
        self.n = 0                       # nodes with a key
        self.cache = {}                  # key -> path (get)
        self.pcache = {}                 # path -> node (_node); emptied when nodes move or go
        self.root = self._new(-1, b"/")

    def __len__(self):
        return self.n

    # -- nodes --
    def _new(self, parent, name):
        if self.free:
            i = self.free.pop()
            self.parent[i], self.noff[i], self.nlen[i] = parent, len(self.names), len(name)
            self.kpre[i] = self.koff[i] = self.klen[i] = self.kids[i] = 0
        else:
            i = len(self.parent)
            self.parent.append(parent)
            self.noff.append(len(self.names))
            self.nlen.append(len(name))
            self.kpre.append(0)
            self.koff.append(0)
            self.klen.append(0)
            self.kids.append(0)
        self.names += name
        if parent >= 0:
            self.kids[parent] += 1
            self.cused = self._put(self.ctab, self.cused, hash((parent, name)), i)
            if self.cused * 2 > len(self.ctab):
                self.ctab, self.cused = self._table(self.ctab, self._ckey)
        return i

    def _name(self, i):
        o = self.noff[i]
        return bytes(self.names[o:o + self.nlen[i]])

    def _key(self, i):
        o = self.koff[i]
        return self.plist[self.kpre[i]] + self.keys[o:o + self.klen[i] - 1]

    def _ckey(self, i):
        return hash((self.parent[i], self._name(i)))

    def path(self, i):
        parts = []
        while i > 0:
            parts.append(self._name(i))
            i = self.parent[i]
        if not parts:
            return "/"
        parts.append(b"")
        return os.fsdecode(b"/".join(reversed(parts)))

    # -- the two tables: linear probing, at most half full --
    @staticmethod
    def _put(tab, used, h, i):
        mask = len(tab) - 1
        s = h & mask
        while tab[s] > 0:
            s = (s + 1) & mask
        if tab[s] == DirTree.FREE:
            used += 1
        tab[s] = i + 1
        return used

    def _table(self, old, hash_of):
        """old rebuilt without its GONE slots, twice the size if it is more
        than a quarter full of nodes."""
        live = sum(1 for v in old if v > 0)
        size = len(old) * (2 if live * 4 > len(old) else 1)
        tab = array.array("i", bytes(4 * size))
        for v in old:                    # no list of the nodes: a peak of its own
            if v > 0:
                self._put(tab, 0, hash_of(v - 1), v - 1)
        return tab, live

    def _slot(self, tab, h, i):
        """The slot that holds node i."""
        mask = len(tab) - 1
        s = h & mask
        while tab[s] != i + 1:
            s = (s + 1) & mask
        return s

    def _find(self, key):
        """The node with this key, or -1 (inlined: every record asks)."""
        pre = self.prefixes.get(key[:KEY_PREFIX])
        if pre is None:                  # another filesystem: most records on a busy host
            return -1
        tail = key[KEY_PREFIX:]
        tab, keys, koff, klen, kpre = self.ktab, self.keys, self.koff, self.klen, self.kpre
        mask = len(tab) - 1
        s = hash(key) & mask
        while True:
            v = tab[s] - 1
            if v < 0:
                if v == -1:              # FREE
                    return -1
            else:
                o = koff[v]
                if kpre[v] == pre and keys[o:o + klen[v] - 1] == tail:
                    return v
            s = (s + 1) & mask

    def _child(self, parent, name):
        tab, par, names, noff, nlen = self.ctab, self.parent, self.names, self.noff, self.nlen
        mask = len(tab) - 1
        s = hash((parent, name)) & mask
        while True:
            v = tab[s] - 1
            if v < 0:
                if v == -1:
                    return -1
            elif par[v] == parent:
                o = noff[v]
                if names[o:o + nlen[v]] == name:
                    return v
            s = (s + 1) & mask

    def _node(self, path, make=False):
        """The node of a path ("/a/b"), -1 if it has none (make: add the
        missing ones, without keys). From the nearest directory above that
        was looked up lately (a walk asks for a directory's children in a
        row), else from "/", one name at a time."""
        cache = self.pcache
        i = cache.get(path)
        if i is not None:
            return i
        todo, head = [], path
        while True:
            head, _, name = head.rpartition("/")
            todo.append(name)
            if not head:
                i = self.root
                break
            i = cache.get(head)
            if i is not None:
                break
        enc, errors = _FS_ENCODING
        parent = i
        for name in reversed(todo):
            if not name:
                continue
            name = name.encode(enc, errors)
            parent = i
            c = self._child(i, name)
            if c < 0:
                if not make:
                    return -1
                c = self._new(i, name)
            i = c
        if len(cache) >= self.CACHE:
            cache.clear()
        cache[path] = i
        cache[path.rpartition("/")[0] or "/"] = parent
        return i

    # -- the mapping --
    def __contains__(self, key):
        return key in self.cache or self._find(key) >= 0

    def get(self, key, default=None):
        p = self.cache.get(key)
        if p is None:
            i = self._find(key)
            if i < 0:
                return default
            if len(self.cache) >= self.CACHE:
                self.cache.clear()
            p = self.cache[key] = self.path(i)
        return p

    def key_of(self, path):
        i = self._node(path)
        return self._key(i) if i >= 0 and self.klen[i] else None

    def set(self, key, path):
        """path's key is key (what was there under either goes)."""
        old = self._find(key)
        i = self._node(path, make=True)
        if old == i:
            return
        if self.klen[i]:
            self._unkey(i, prune=False)
        pre = self.prefixes.get(key[:KEY_PREFIX])
        if pre is None:
            pre = self.prefixes[key[:KEY_PREFIX]] = len(self.plist)
            self.plist.append(key[:KEY_PREFIX])
        tail = key[KEY_PREFIX:]
        self.kpre[i], self.koff[i], self.klen[i] = pre, len(self.keys), len(tail) + 1
        self.keys += tail
        self.n += 1
        self.kused = self._put(self.ktab, self.kused, hash(key), i)
        if self.kused * 2 > len(self.ktab):
            self.ktab, self.kused = self._table(self.ktab, lambda j: hash(self._key(j)))
        if old >= 0:
            # After i has its key: old may be the last keyed node below i,
            # and pruning above old stops at a node with a key.
            self._unkey(old)

    def pop(self, path):
        """Forget path's key (its node goes if nothing hangs below it)."""
        i = self._node(path)
        if i >= 0 and self.klen[i]:
            self._unkey(i)

    def _unkey(self, i, prune=True):
        s = self._slot(self.ktab, hash(self._key(i)), i)
        self.ktab[s] = self.GONE
        self.garbage += self.klen[i] - 1
        self.klen[i] = 0
        self.n -= 1
        self.cache.clear()
        if prune:
            self._prune(i)

    def _prune(self, i):
        """Drop i and its parents while they have neither key nor children."""
        while i > 0 and not self.klen[i] and not self.kids[i]:
            self.pcache.clear()
            s = self._slot(self.ctab, self._ckey(i), i)
            self.ctab[s] = self.GONE
            p = self.parent[i]
            self.kids[p] -= 1
            self.kids[i] = -1
            self.garbage += self.nlen[i]
            self.free.append(i)
            i = p
        if self.garbage > self.COMPACT and self.garbage * 2 > len(self.names) + len(self.keys):
            self._compact()

    def _compact(self):
        names, keys = bytearray(), bytearray()
        for i in range(len(self.parent)):
            if self.kids[i] < 0:
                continue
            o = self.noff[i]
            self.noff[i] = len(names)
            names += self.names[o:o + self.nlen[i]]
            o = self.koff[i]
            self.koff[i] = len(keys)
            keys += self.keys[o:o + max(self.klen[i] - 1, 0)]
        self.names, self.keys, self.garbage = names, keys, 0

    def move(self, src, dst):
        """The directory src is now dst, with everything below it."""
        i = self._node(src)
        if i <= 0 or src == dst or os.fsencode(dst).rstrip(b"/") == b"":
            return
        self.drop_tree(dst)
        parent = self._node(os.path.dirname(dst), make=True)
        name = os.fsencode(os.path.basename(dst))
        s = self._slot(self.ctab, self._ckey(i), i)
        self.ctab[s] = self.GONE
        self.pcache.clear()
        old = self.parent[i]
        self.kids[old] -= 1
        self.kids[parent] += 1
        self.garbage += self.nlen[i]
        self.parent[i], self.noff[i], self.nlen[i] = parent, len(self.names), len(name)
        self.names += name
        self.cused = self._put(self.ctab, self.cused, hash((parent, name)), i)
        if self.cused * 2 > len(self.ctab):
            self.ctab, self.cused = self._table(self.ctab, self._ckey)
        self.cache.clear()
        self._prune(old)

    def under(self, top):
        """[path] of the nodes with a key at top or below it."""
        t = self._node(top)
        if t < 0:
            return []
        if not self.kids[t]:
            return [top] if self.klen[t] else []
        inside = bytearray(len(self.parent))    # 0 not known, 1 under t, 2 not
        inside[t] = 1
        out = []
        for i in range(len(self.parent)):
            chain = []
            j = i
            while j >= 0 and not inside[j]:
                chain.append(j)
                j = self.parent[j]
            mark = inside[j] if j >= 0 else 2
            for j in chain:
                inside[j] = mark
            if mark == 1 and self.klen[i] and self.kids[i] >= 0:
                out.append(self.path(i))
        return out

    def drop_tree(self, top):
        for p in self.under(top):
            self.pop(p)

    def paths(self):
        """[path] of every node with a key."""
        return [self.path(i) for i in range(len(self.parent))
                if self.klen[i] and self.kids[i] >= 0]


class FanotifyBackend:
    """fanotify(7) with FAN_MARK_FILESYSTEM: the same Engine calls as
    InotifyBackend, from one mark per filesystem and a handle -> directory
    map; writer(path) names the process behind the last record of path."""
    name = "fanotify"
    WRITERS_KEEP = 4096
    EXECS_KEEP = 4096            # pids whose last exec is remembered
    HANDLES_KEEP = 1024          # directory handles resolved by open_by_handle_at

    def __init__(self, fd=None):
        self.fd, self.flags = (fd, 0) if fd is not None else fanotify_open()
        self.marked = set()          # fsids with our filesystem mark
        self.mounts = {}             # mount id -> fsid (marked)
        self.dirs = DirTree()        # fsid + handle <-> directory path
        self.froms = {}              # object handle -> (path, isdir) of a MOVED_FROM
        self.from_reads = 0
        # pid -> (dir key, name, script key, t, ppid, start time)
        self.execs = collections.OrderedDict()
        self.last_exec = None        # pid of the last exec record
        self.handle_paths = collections.OrderedDict()   # dir key -> path or None
        self.mark_dirs = {}          # fsid -> a directory on it (the first marked)
        self.procs = ProcessCache(self.executed)
        self.writers = collections.OrderedDict()     # path -> process info
        self.setid_seen = {}         # (dev, ino) -> (set-id bits, capability) reported
        self.lazy = {}               # root -> wanted(dir): directories learned from records
        self.keep_own = frozenset()  # paths whose records of our own writes are kept
        self.me = os.getpid()
        # Records of other processes' files beside the trees: [count in the
        # window before, count in this window, monotonic start of this one].
        self.noise = [0, 0, 0.0]
        self.relevant = self.own = 0
        # 0 during the start-up walks (they drain the queue every 64
        # directories and must not sleep); NOISE_DELAY once watching.
        self.delay = 0.0

    def fileno(self):
        return self.fd

    def close(self):
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None

    def count(self):
        return len(self.dirs)

    def watch(self, d):
        """Record d's handle (marking its filesystem the first time); OSError
        when the filesystem refuses the mark or has no handles."""
        mount_id, handle = dir_handle(d)
        fsid = self.mounts.get(mount_id)
        if fsid is None:
            fsid = fsid_of(d)
            if fsid not in self.marked:
                try:
                    fanotify_mark_fs(self.fd, d)
                except OSError as e:     # a submount that refuses: say so, not skip
                    raise OSError(errno.EACCES, "fanotify cannot mark its filesystem: "
                                  + _refusal(e))
                self.marked.add(fsid)
                self.mark_dirs[fsid] = d
            self.mounts[mount_id] = fsid
        # Watched already (the start-up comparison walks what the watch walk
        # marked): set() keeps the node as it is.
        self.dirs.set(fsid + handle, d)

    def unwatch(self, d):
        self.dirs.pop(d)

    def unwatch_tree(self, top):
        self.dirs.drop_tree(top)

    def rename(self, src, dst):
        pre, n = src + "/", len(src)
        self.dirs.move(src, dst)
        for p in [p for p in self.writers if p.startswith(pre)]:
            self.writers[dst + p[n:]] = self.writers.pop(p)

    def watching(self, d):
        return self.dirs.key_of(d) is not None

    def prune_gone(self):
        for d in self.dirs.paths():
            if not os.path.isdir(d):
                self.unwatch(d)

    def writer(self, path):
        """The process behind the last record of path (then forgotten)."""
        return self.writers.pop(path, None)

    def peek_writer(self, path):
        """writer(path), left in place."""
        return self.writers.get(path)

    def learn(self, root, wanted):
        """Watch the tree under root at once, without walking it first: the
        filesystem mark already sees every change, and a record from a
        directory not in the map yet is resolved by its handle
        (open_by_handle_at, cached) and kept if it is under root and
        wanted(path) (not excluded). The start-up comparison's walk fills the
        map meanwhile; learned(root) ends this when it is done. False (the
        caller walks first) when root's own handle does not resolve back to
        root: a bind mount or a namespace where handles name other paths."""
        self.watch(root)
        key = self.dirs.key_of(root)
        self.handle_paths.pop(key, None)
        if self._dir_of_handle(key) != root:
            return False
        self.lazy[root] = wanted
        return True

    def learned(self, root):
        self.lazy.pop(root, None)

    def _learn(self, key):
        """A directory handle not in the map, while a tree is learned: is it
        one of the tree's directories? (Then it is in the map from now on.)"""
        d = self._dir_of_handle(key) if key[:8] in self.marked else None
        if d is None:
            return False
        for root, wanted in self.lazy.items():
            if within(d, root) and wanted(d):
                self.dirs.set(key, d)
                return True
        return False

    def _note_exec(self, data, off, end, pid):
        # Every execve on the filesystem comes here: read only the first info
        # record (the directory and name, as the kernel puts it first).
        if data[off] != FAN_INFO_DFID_NAME:
            return
        o = off + 20 + _U32.unpack_from(data, off + 12)[0]
        z = data.find(b"\0", o, end)
        name = data[o:z if z >= 0 else end]
        if name.startswith(b"ld-") and b".so" in name:
            return                       # the ELF interpreter, opened after the binary
        dkey = data[off + 4:off + 20 + _U32.unpack_from(data, off + 12)[0]]
        ex = self.execs
        # A script's execve opens the script, then its interpreter: two
        # records for one pid, in a row unless another process's exec came
        # between them (seen in a busy container), so "in a row" is one pid's
        # records within EXEC_PAIR seconds. The first is kept as the script
        # (executed() names it only if it starts with #!).
        now = time.monotonic()
        self.procs.fresh.pop(pid, None)  # another program now: read /proc again
        before = ex.get(pid)
        if before is not None and (self.last_exec != pid and now - before[3] > EXEC_PAIR):
            before = None
        try:                             # alive still, mostly: for _from_parent
            ppid, start = _proc_stat(pid)
        except (OSError, ValueError, IndexError):
            ppid = start = None
        ex[pid] = (dkey, name, before and before[:2], now, ppid, start)
        self.last_exec = pid
        ex.move_to_end(pid)
        if len(ex) > self.EXECS_KEEP:
            ex.popitem(last=False)

    def executed(self, pid, start=None):
        """{"exe": path} of the binary pid last executed, as the exec cache
        saw it, with "script": path when that was a #! script run by it;
        {} when unknown. start: the start time of the process that has pid
        now, when the caller read it (else read here, if it still runs)."""
        entry = self.execs.get(pid)
        exe = self._path_of(entry[:2]) if entry else None
        if exe is None:
            return {}
        if start is None:
            try:
                start = _proc_stat(pid)[1]
            except (OSError, ValueError, IndexError):
                pass                     # gone: the entry is the best we know
        if entry[5] is not None and start is not None and start != entry[5]:
            return {}                    # the pid was reused: not that process
        out = {"exe": esc(exe)}
        if entry[4]:
            out["ppid"], out["started"] = entry[4], entry[5]
        script = self._path_of(entry[2]) if entry[2] else None
        if script is not None and _is_script(script):
            out["script"] = esc(script)
        return out

    def _path_of(self, key):
        """The path of (directory handle key, name), or None if the
        directory cannot be found (map first, then open_by_handle_at)."""
        dkey, name = key
        d = self.dirs.get(dkey) or self._dir_of_handle(dkey)
        return None if d is None else (d if d != "/" else "") + "/" + os.fsdecode(name)

    def _dir_of_handle(self, dkey):
        """A directory outside the map, by handle (cached, misses too)."""
        hp = self.handle_paths
        if dkey in hp:
            return hp[dkey]
        path = None
        top = _mount_top(self.mark_dirs.get(dkey[:8]))
        if top is not None:
            # Opened for this lookup only: a held fd on a watched directory
            # would keep its inode, and with it IN_DELETE_SELF, from the kernel.
            try:
                mfd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                mfd = None
            if mfd is not None:
                try:
                    path = path_of_handle(mfd, dkey[8:])
                finally:
                    os.close(mfd)
        hp[dkey] = path
        if len(hp) > self.HANDLES_KEEP:
            hp.popitem(last=False)
        return path

    def _note_writer(self, path, pid):
        w = self.writers
        w[path] = self.procs.get(pid)
        w.move_to_end(path)
        if len(w) > self.WRITERS_KEEP:     # records that never became an event
            w.popitem(last=False)

    def read(self, eng):
        """Drain the fanotify queue into eng; returns the number of records."""
        noise = self.noise
        if self.delay and not self.relevant and noise[0] + noise[1] > NOISE_BUSY[0] \
                and (eng is None or not eng.scans):
            # The last wake-up was only other files on the same filesystem,
            # and there were many of those lately: a busy neighbour. Let its
            # records gather, so it costs a few reads per second instead of
            # one per write (latency: the delay, once). A stray write beside
            # the tree, or fimwatch's own writes, do not delay the next read:
            # a file that lives for milliseconds (a dropper) must be read
            # before it is gone. Not while a walk runs (the start-up check):
            # the loop then reads once per slice of it anyway.
            time.sleep(self.delay)
        self.relevant = self.own = 0
        self.procs.new_batch()
        n = drain(self.fd, lambda data: self._parse(eng, data))
        if n > self.own + self.relevant:
            now = time.monotonic()
            if now - noise[2] > NOISE_BUSY[1]:
                noise[:] = [noise[1] if now - noise[2] < 2 * NOISE_BUSY[1] else 0, 0, now]
            noise[1] += n - self.own - self.relevant
        end_of_read(self, eng, n, bool(self.froms))
        return n

    def _finish_moves(self, eng):
        froms, self.froms = self.froms, {}
        for path, isdir in froms.values():
            eng.moved_out(path, isdir)

    def _parse(self, eng, data):
        n, off, end = 0, 0, len(data)
        meta, dirs, me = _FAN_META, self.dirs, self.me
        while off + meta.size <= end:
            ln, _, _, mlen, mask, fd, pid = meta.unpack_from(data, off)
            if ln < meta.size:
                break
            n += 1
            if fd >= 0:                  # only without FID modes; never ours to keep
                os.close(fd)
            if mask & FAN_Q_OVERFLOW:
                self._finish_moves(eng)
                eng.overflow()
            elif pid == me:
                self.own += 1
                # Our own writes are not news, except to the events file: it
                # must be in the baseline (as inotify, which cannot tell who
                # wrote, puts it) so that another process truncating or
                # replacing it is compared with what we wrote, not taken for
                # the file we just made.
                if self.keep_own and not mask & FAN_OPEN_EXEC and off + mlen + 16 <= end:
                    dkey, name, _ = self._records(data, off + mlen, off + ln)
                    d = dirs.get(dkey)
                    if d is not None and name and d + "/" + os.fsdecode(name) in self.keep_own:
                        self._dispatch(eng, data, off + mlen, off + ln, mask, pid)
            elif off + mlen + 16 <= end:
                # The first info record names the directory (or, for a self
                # event, the object): most records on a filesystem mark are
                # outside the trees and end at this lookup.
                o = off + mlen
                if mask & FAN_OPEN_EXEC:
                    self._note_exec(data, o, off + ln, pid)
                    if not mask & FAN_CHANGES:
                        off += ln
                        continue
                key = data[o + 4:o + 20 + _U32.unpack_from(data, o + 12)[0]]
                if key in dirs or (self.lazy and self._learn(key)):
                    self.relevant += 1
                    self._dispatch(eng, data, o, off + ln, mask, pid)
                elif mask & SETID_MASK and not mask & FAN_ONDIR:
                    self._setid_outside(eng, data, o, off + ln, pid)
            off += ln
        return n

    def _setid_outside(self, eng, data, off, end, pid):
        """Set-id anywhere: a chmod, setcap or rename outside the watched
        trees that leaves a set-id file or file capabilities is critical
        (Samhain finds these only in a periodic full-disk scan). One lstat
        per such record; the directory's handle is resolved once (cached)."""
        dkey, name, _ = self._records(data, off, end)
        if name is None or name == b".":
            return
        p = self._path_of((dkey, name))
        if p is None:
            return
        try:
            st = os.lstat(p)
        except OSError:
            return
        if not stat.S_ISREG(st.st_mode):
            return
        try:
            cap = os.getxattr(p, _CAP_NAME, follow_symlinks=False)
        except OSError:
            cap = None
        setid = st.st_mode & (stat.S_ISUID | stat.S_ISGID)
        key = (st.st_dev, st.st_ino)
        seen = self.setid_seen
        state = (setid, cap)
        if not setid and cap is None:
            seen.pop(key, None)          # cleared: setting it again is news again
            return
        if seen.get(key) == state:
            return
        seen[key] = state
        if len(seen) > self.WRITERS_KEEP:
            seen.pop(next(iter(seen)))
        what = []
        if st.st_mode & stat.S_ISUID:
            what.append("setuid-%s" % (user_name(st.st_uid) or st.st_uid))
        if st.st_mode & stat.S_ISGID:
            what.append("setgid-%s" % (group_name(st.st_gid) or st.st_gid))
        if cap is not None:
            what.append("file capabilities %s" % cap_text(cap))
        ev = new_event(eng.cfg.hostname, "setid", "critical", "realtime", esc(p), kind="file",
                       mode="%04o" % stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                       owner=user_name(st.st_uid), group=group_name(st.st_gid),
                       capability=cap_text(cap) if cap is not None else None,
                       summary="%s outside the watched paths" % " and ".join(what),
                       message="%s is %s (outside the watched paths; seen by the "
                               "filesystem mark)" % (esc(p), " and ".join(what)))
        proc = self.procs.get(pid)
        if proc:
            ev["process"] = proc
        eng.stats["changes"] += 1
        eng.emit_cb(ev)

    def _dispatch(self, eng, data, off, end, mask, pid):
        dkey, name, okey = self._records(data, off, end)
        d = self.dirs.get(dkey)
        if d is not None:
            try:
                self._one(eng, d, name, okey, mask, pid)
            except Exception as e:       # one bad record must not end the watching
                eng.internal_error("fanotify record in %r" % d, e)

    @staticmethod
    def _records(data, off, end):
        """(dir key, name, object key) from the info records of one event."""
        dkey = name = okey = None
        info = _FAN_INFO
        while off + info.size <= end:
            typ, _, ln, fsid, hb, _ = info.unpack_from(data, off)
            if ln < info.size:
                break
            key = data[off + 4:off + info.size + hb]
            if typ == FAN_INFO_DFID_NAME:
                dkey = key
                name = data[off + info.size + hb:off + ln].split(b"\0", 1)[0]
            elif typ == FAN_INFO_FID:
                okey = key
            off += ln
        if dkey is None:                 # a self event: the object is the directory
            dkey, name = okey, b"."
        return dkey, name, okey

    def _one(self, eng, d, name, okey, mask, pid):
        isdir = bool(mask & FAN_ONDIR)
        if name == b".":                 # the directory itself
            if mask & (IN_DELETE_SELF | IN_MOVE_SELF):
                self._self_gone(eng, d, mask)
            elif eng.wanted(d, True):
                self._note_writer(d, pid)
                eng.changed(d, True)
            return
        p = d + "/" + os.fsdecode(name)
        if not eng.wanted(p, isdir):
            return
        self._note_writer(p, pid)
        if mask & IN_MOVED_FROM and not mask & IN_MOVED_TO:
            eng.changed(p, isdir)
            if okey is None:             # before 5.17: no pairing, it left
                eng.moved_out(p, isdir)
            else:
                self.froms[okey] = (p, isdir)
                self.from_reads = 0
            return
        if mask & IN_MOVED_TO:
            src = self.froms.pop(okey, None) if okey is not None else None
            if src is not None:
                eng.moved(src[0], p, isdir and src[1])
                return
        # Attribute-only (a `touch` loop) must not re-arm the settle window,
        # as with inotify; a write merged into the same record does.
        eng.changed(p, isdir, mask & FAN_CHANGES == IN_ATTRIB)
        if isdir and mask & (IN_CREATE | IN_MOVED_TO) and not mask & IN_DELETE:
            eng.dir_created(p)

    def _self_gone(self, eng, d, mask):
        eng.dir_gone(d)
        if mask & IN_DELETE_SELF:        # inotify's IN_IGNORED: the watch is gone
            self.unwatch(d)
            eng.watch_lost(d)


class MixedBackend:
    """Roots on fanotify and roots on inotify in one Engine: each directory
    goes to the backend of its root; one epoll fd wakes the loop for both."""
    name = "mixed"

    def __init__(self, parts, choice):
        self.parts = parts                       # {"fanotify": b, "inotify": b}
        self.route = sorted(choice.items(), key=lambda kv: -len(kv[0]))
        self.ep = select.epoll()
        for b in parts.values():
            self.ep.register(b.fileno(), select.EPOLLIN)

    def _for(self, d):
        for r, name in self.route:
            if within(d, r) or within(r, d):
                return self.parts[name]
        return self.parts["inotify"]

    def fileno(self):
        return self.ep.fileno()

    def close(self):
        for b in self.parts.values():
            b.close()
        self.ep.close()

    def count(self):
        return sum(b.count() for b in self.parts.values())

    def watch(self, d):
        self._for(d).watch(d)

    def unwatch(self, d):
        self._for(d).unwatch(d)

    def unwatch_tree(self, top):
        for b in self.parts.values():
            b.unwatch_tree(top)

    def rename(self, src, dst):
        for b in self.parts.values():
            b.rename(src, dst)

    def watching(self, d):
        return any(b.watching(d) for b in self.parts.values())

    def prune_gone(self):
        for b in self.parts.values():
            b.prune_gone()

    def writer(self, path):
        return self.parts["fanotify"].writer(path)

    def peek_writer(self, path):
        return self.parts["fanotify"].peek_writer(path)

    def learn(self, root, wanted):
        return self._for(root).learn(root, wanted)

    def learned(self, root):
        self._for(root).learned(root)

    def read(self, eng):
        return sum(b.read(eng) for b in self.parts.values())


def make_backend(want, roots, ino_mod):
    """The Engine's backend for `roots` and [(root, backend, reason)]. The
    probe's group becomes the backend's, so its marks are the ones used.
    backend = fanotify refused on any root is an error (exit 2)."""
    fd = None
    if want != "inotify":
        try:
            fd = fanotify_open()[0]
        except OSError:
            pass
    choices = choose_backends(roots, want, probe_fd=fd) if fd is not None else \
        choose_backends(roots, want)
    refused = [c for c in choices if c[1] == "inotify" and c[2] != "configured"]
    if want == "fanotify" and refused:
        if fd is not None:
            os.close(fd)
        raise FimwatchError("[watch] backend = fanotify: %s: %s (use backend = auto to "
                            "fall back to inotify)" % (esc(refused[0][0]), refused[0][2]))
    names = {c[1] for c in choices} or {"inotify"}
    parts = {}
    if "fanotify" in names:
        parts["fanotify"] = FanotifyBackend(fd)
    elif fd is not None:
        os.close(fd)
    if "inotify" in names:
        parts["inotify"] = InotifyBackend(ino_mod)
    if len(parts) == 1:
        return next(iter(parts.values())), choices
    return MixedBackend(parts, {c[0]: c[1] for c in choices}), choices


# ---------------------------------------------------------------------------
# Pipeline 1 of 3, continued: the mount table, I/O priority, open files
# ---------------------------------------------------------------------------


def _unoctal(b):
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), b)


def parse_mountinfo(data):
    """{mount id: (mount point, fstype, source)} from /proc/self/mountinfo."""
    out = {}
    for line in data.splitlines():
        left, sep, right = line.partition(b" - ")
        f, r = left.split(), right.split()
        if not sep or len(f) < 5 or len(r) < 2:
            continue
        out[f[0].decode()] = (os.fsdecode(_unoctal(f[4])), os.fsdecode(_unoctal(r[0])),
                              os.fsdecode(_unoctal(r[1])))
    return out


class MountTable:
    """The mount table as the daemon sees it: fileno() for the main loop's
    poll(2) (POLLPRI on every mount or unmount in the namespace), changes()
    the mounts added and removed since the last call. The kernel reports a
    change once per poll per open file, so the loop's wake-up and our own
    check each have an open file of their own."""

    def __init__(self, path=MOUNTINFO):
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.wake_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.poller = select.poll()
        self.poller.register(self.fd, select.POLLPRI | select.POLLERR)
        self.poller.poll(0)
        self.mounts = self._read()

    def fileno(self):
        return self.wake_fd

    def _read(self):
        os.lseek(self.fd, 0, os.SEEK_SET)
        chunks = []
        while True:
            b = os.read(self.fd, 1 << 16)
            if not b:
                break
            chunks.append(b)
        return parse_mountinfo(b"".join(chunks))

    def changes(self):
        """[(action, (mount point, fstype, source))], action mounted|unmounted;
        [] (one poll(2) call) when nothing changed."""
        if not self.poller.poll(0):
            return []
        old, new = self.mounts, self._read()
        self.mounts = new
        out = [("unmounted", v) for k, v in old.items() if k not in new]
        out += [("mounted", v) for k, v in new.items() if k not in old]
        return out

    def close(self):
        os.close(self.fd)
        os.close(self.wake_fd)


# ioprio_set(2)/ioprio_get(2): no wrapper in Python's os. Syscall numbers per
# architecture (uname -m); IOPRIO_WHO_PROCESS with who=0 is the calling thread.
_IOPRIO_SYSCALLS = {"x86_64": (251, 252), "aarch64": (30, 31), "i686": (289, 290),
                    "armv7l": (314, 315), "ppc64le": (273, 274), "s390x": (282, 283),
                    "riscv64": (30, 31)}
IOPRIO_IDLE = 3 << 13            # IOPRIO_CLASS_IDLE, level 0


def ioprio(value):
    """Set the calling thread's I/O priority; returns the previous value, or
    None where it cannot be done (unknown architecture, seccomp filter)."""
    nums = _IOPRIO_SYSCALLS.get(os.uname().machine)
    if nums is None:
        return None
    libc = _libc()[1]                # ctypes: only daemons with scan_interval load it
    prev = libc.syscall(nums[1], 1, 0)
    if prev < 0 or libc.syscall(nums[0], 1, 0, value) < 0:
        return None
    return prev


def open_paths(paths, proc="/proc"):
    """The subset of paths some process holds open (/proc/PID/fd links)."""
    want, held = set(paths), set()
    try:
        pids = [x for x in os.listdir(proc) if x.isdigit()]
    except OSError:
        return held
    for pid in pids:
        fd_dir = "%s/%s/fd" % (proc, pid)
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd_dir + "/" + fd)
            except OSError:
                continue
            if target in want:
                held.add(target)
    return held


# ---------------------------------------------------------------------------
# Pipeline 2 of 3: the Engine (walks, settle queue, comparison, events)
#
# the Engine calls the backend to watch, takes its calls (changed, moved, ...) into
# the settle queue, compares each settled path with the baseline (snapshot,
# compare) and emits one event per change (apply, emit_change) to the
# dispatcher: pipeline 3 of 3, the alert sinks below.
# ---------------------------------------------------------------------------


class Hasher:
    """Worker threads for reading and hashing files (hashlib and os.readv
    release the GIL, so two files hash on two cores). A job is fn(*args) and
    must not touch the Store: its result comes back through results() on the
    main thread, which applies it, so the commit order stays the loop's. The
    loop polls fileno(), which is readable when a result is waiting. Threads
    start at the first job."""

    def __init__(self, workers=HASH_WORKERS):
        self.workers = workers
        self.jobs = deque()
        self.cond = threading.Condition()
        self.done = deque()
        self.threads = []
        self.busy = 0                  # submitted, not yet taken back
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def fileno(self):
        return self.r

    def submit(self, tag, fn, *args):
        if not self.threads:
            for i in range(self.workers):
                t = threading.Thread(target=self._run, name="hash%d" % i, daemon=True)
                t.start()
                self.threads.append(t)
        self.busy += 1
        with self.cond:
            self.jobs.append((tag, fn, args))
            self.cond.notify()

    def _run(self):
        while True:
            with self.cond:
                while not self.jobs:
                    self.cond.wait()
                job = self.jobs.popleft()
            if job is None:
                return
            tag, fn, args = job
            try:
                res, err = fn(*args), None
            except Exception as e:        # handed to the main thread
                res, err = None, e
            self.done.append((tag, res, err))
            try:
                os.write(self.w, b".")
            except OSError:               # pipe full: the reader is behind anyway
                pass

    def results(self, wait=0.0):
        """[(tag, result, exception)] of the jobs done; waits up to wait
        seconds for one when none is done yet."""
        if wait and not self.done and self.busy:
            select.select([self.r], [], [], wait)
        try:
            while os.read(self.r, 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        out = []
        while self.done:
            out.append(self.done.popleft())
        self.busy -= len(out)
        return out

    def close(self):
        with self.cond:
            self.jobs.clear()
            self.jobs.extend([None] * len(self.threads))
            self.cond.notify_all()
        for t in self.threads:
            t.join(1.0)               # one stuck in a read (hung NFS) is a daemon thread
        self.threads = []
        for fd in (self.r, self.w):
            os.close(fd)
        self.r = self.w = -1


class Engine:
    """The watched roots, their walks, the per-path settle window, and the
    comparison with the baseline that turns a backend's calls into one
    semantic event per change.

    Design notes:
    - A new directory is watched first and scanned right after, because files
      can be created in it before the watch exists.
    - Renames come from the backend as moved() (a rename inside the trees) or
      moved_out(); a file rename is compared when it settles (try_move), a
      directory rename is reported at once (dir_renamed) and its subtree
      walked again.
    - overflow() means notifications were lost: rescan against the baseline.
    - A backend at its watch limit (ENOSPC) leaves the rest of that subtree to
      periodic scans until watches are free.
    """

    def __init__(self, cfg, store, emit, backend=None, progress=False):
        self.cfg, self.store, self._emit = cfg, store, emit
        # Without a backend (scan, accept) the walks only compare.
        self.backend = backend
        self.pending = {}            # path -> [deadline, first seen]
        self.due = []                # heap of (deadline, path); stale entries skipped
        self.moves = {}              # dst -> src of a rename inside the tree
        self.unwatched = set()       # subtree roots that got no watch (limit)
        self.recheck = deque()       # (when, dir): an early look at a new unwatched dir
        self.missing_roots = set()
        self.learning = set()        # roots whose directories fanotify learns (see start)
        self.scans = deque()         # incremental walks in progress
        self.limit_event_for = set()
        self.unreadable = set()
        self.progress = progress
        self.overflows = 0
        self.rescan_state = None
        self.pkgdb = PackageDB() if cfg.package_check else None
        # package transactions (daemon only): the one running, the ended ones
        # whose held changes are being compared before their digest
        self.pkgtx = PackageWatch(self.pkgdb) if self.pkgdb is not None and \
            backend is not None and self.pkgdb.available() else None
        self.tx_closing = []
        self.tx_roots = {}            # a watched path that appeared during a transaction -> it
        self.fresh = {}              # new path -> [first seen, Rec or None, snapshots]
        self.captures = 0            # snapshots of new paths in this CAPTURE_WINDOW
        self.capture_reset = 0.0     # when that window ends
        self.leftovers = {}          # editor swap/backup/lock names seen (check_leftovers)
        self.mount_table = None
        if backend is not None:
            try:
                self.mount_table = MountTable()
            except OSError:          # no procfs: mounts are seen by the scans only
                pass
        self._users, self._users_at = [], -10.0
        self.stats = {"events": 0, "changes": 0, "raw": 0, "silent": 0, "files": 0, "bytes": 0}
        self.verifier = None         # the periodic verification (scan_interval), throttled
        self.verify_resume = 0.0     # monotonic time it may go on (scan_rate)
        self.errors = 0
        # Files hashed off the loop's thread: a big file in real time and
        # scans (offload), every file while a baseline is built (_walk_dir).
        self.hasher = Hasher()
        self.inflight = {}           # path a worker hashes -> look again after (bool)
        self._build = None           # walk(): the state of a baseline being built
        self.retries = {}            # path -> times it changed while hashed
        self.growth = {}             # append-only path -> Growth at the last look
        self.rotated = {}            # append-only path -> when logrotate moved it away
        self.reset_timers()
        self._set_roots(cfg)

    def _set_roots(self, cfg):
        self.roots = _watch_roots(cfg)
        self.scan_only = [r for r in cfg.scan_only
                          if not any(within(r, o) for o in self.roots)]
        # fimwatch's own files never watch themselves (a write to the events
        # file would be an event, written to the events file...).
        # The events file itself is watched (append-only: our own appends
        # are silent); its rotated copies are logrotate's business.
        own = [_glob_escape(cfg.state_dir), _glob_escape(cfg.state_dir) + "/**"]
        growing = list(cfg.append_only.patterns)
        if cfg.events_file:
            own += [_glob_escape(cfg.events_file) + ".*", _glob_escape(cfg.events_file) + "-*"]
            growing.append(_glob_escape(cfg.events_file))
        self.append_only = PatternSet(growing)
        # Default exclusions never hide a file a service would load: the
        # probe name (4913) is silent only while it behaves like vim's probe,
        # gone within the settle window; swap, backup and lock names only
        # while an edit is plausible (see check_leftovers).
        pats = cfg.exclude.patterns
        self.probe = PatternSet([x for x in pats if x in PROBE_NAMES])
        self.editor = PatternSet([x for x in pats if x in EDITOR_NAMES])
        self.exclude = PatternSet([x for x in pats if x not in PROBE_NAMES
                                   and x not in EDITOR_NAMES] + own)
        # a file whose path and name these do not match: neither excluded()
        # nor append_only
        self.files_filter = PatternSet.files_filter(self.exclude, self.editor,
                                                    self.append_only)
        self.settle = cfg.settle
        self.max_delay = max(5.0, 10 * cfg.settle)
        # A root that is a file is watched through its directory, filtered.
        self.file_roots = {}
        self._wanted = {}             # (path, isdir) of a wanted entry: see wanted()
        self._plans = {}              # path -> what look() reads of it: see _plan()

    # -- helpers --
    def emit_cb(self, ev):
        self.stats["events"] += 1
        self._emit(ev)

    def wanted_dir(self, d):
        """Is directory d (under a root) in the tree: neither it nor a
        directory above it, up to its root, excluded?"""
        root = next((r for r in self.roots if within(d, r)), None)
        while root is not None and d != root:
            if self.excluded(d, True):
                return False
            d = os.path.dirname(d)
        return root is not None

    def excluded(self, path, is_dir=False):
        # Base-name patterns (*.swp, *~, 4913) are for editors' files: they
        # never hide a directory, or `mkdir 4913` would hide a whole tree.
        # No pattern hides fimwatch's own files (checked only when one matched).
        return (self.exclude.match(path, is_dir, dirs_by_name=False)
                or (not is_dir and self.editor.match(path))) and not self.cfg.is_own(path)

    def leftover_name(self, path, is_dir):
        """An editor's swap, backup or lock name, not excluded otherwise."""
        return not is_dir and self.editor.match(path) and \
            not self.exclude.match(path, False, dirs_by_name=False)

    def note_leftover(self, p):
        if len(self.leftovers) < LEFTOVERS_MAX:
            self.leftovers[p] = None

    def check_leftovers(self):
        """A swap, backup or lock name is silent while an edit is plausible:
        changed within editor_grace (ctime: cannot be set back), or held open
        by a process (vim keeps its swap file open for the whole session).
        One past that is reported once, with detected "scan", and baselined;
        cron, sudo and run-parts ignore these names, but an admin should know
        one lies there."""
        now, old = time.time(), []
        for p in list(self.leftovers):
            try:
                st = os.lstat(p)
            except OSError:
                st = None
            if st is None or self.store.get(p) is not None:
                del self.leftovers[p]
            elif now - st.st_ctime >= self.cfg.editor_grace:
                old.append(p)
        if not old:
            return
        held = open_paths(old)
        for p in old:
            if p in held:
                continue
            del self.leftovers[p]
            new = snapshot(p, self.cfg.hash_max_size)
            if new is None:
                continue
            self.emit_change("created", p, "scan", None, new, [], leftover=True,
                             message="an editor's swap, backup or lock file still there %s "
                                     "after its last change, open by no process"
                                     % fmt_duration(self.cfg.editor_grace))
            self.store.put(p, new)

    def watches(self):
        return self.backend.count() if self.backend is not None else 0

    def fileno(self):
        return self.backend.fileno()

    def wake_fds(self):
        """[(fd, poll events)] besides fileno() that should wake the loop."""
        fds = []
        if self.mount_table is not None:
            fds.append((self.mount_table.fileno(), select.POLLPRI | select.POLLERR))
        if self.pkgtx is not None and self.pkgtx.fileno() is not None:
            fds.append((self.pkgtx.fileno(), select.POLLIN))
        fds.append((self.hasher.fileno(), select.POLLIN))
        return fds

    def close(self):
        if self.backend is not None:
            self.backend.close()
        if self.mount_table is not None:
            self.mount_table.close()
            self.mount_table = None
        if self.pkgtx is not None:
            self.pkgtx.close()
        self.hasher.close()

    # -- watch management --
    def watch_dir(self, d):
        """Watch directory d: True, None (cannot: reported), or "limit"."""
        try:
            self.backend.watch(d)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                return "limit"
            if e.errno in (errno.EACCES, errno.EPERM):
                self.report_unreadable(d, e)
            return None
        return True

    def internal_error(self, what, e):
        import traceback
        sys.stderr.write("fimwatch: internal error on %s: %s\n%s" % (
            esc(str(what))[:300], esc(repr(e))[:300], traceback.format_exc()))
        self.errors += 1
        if self.errors <= 10:
            self.emit_cb(new_event(self.cfg.hostname, "error", "warning", "realtime", "",
                                   message="internal error on %s: %s (please report; "
                                           "the next scan re-checks it)"
                                           % (esc(str(what))[:200], type(e).__name__)))

    def report_unreadable(self, d, e):
        if d in self.unreadable:
            return
        self.unreadable.add(d)
        if len(self.unreadable) <= 20:
            self.emit_cb(new_event(self.cfg.hostname, "error", "warning", "realtime", esc(d),
                                   message="cannot watch or read %s: %s" % (esc(d), e.strerror)))

    def report_limit(self, roots, detected):
        new = [r for r in roots if r not in self.limit_event_for]
        if not new:
            return
        self.limit_event_for.update(new)
        limit = watch_limit()
        self.emit_cb(new_event(
            self.cfg.hostname, "watch_limit", "warning", detected, esc(new[0]),
            subtrees=[esc(r) for r in new[:20]], subtrees_total=len(new),
            watches=self.watches(), limit=limit,
            message="inotify watch limit reached (fs.inotify.max_user_watches=%s): %d "
                    "subtree(s) from %s on are checked by a scan every %s instead of in "
                    "real time. Raise it: sysctl -w fs.inotify.max_user_watches=%d (and in "
                    "/etc/sysctl.d/60-fimwatch.conf)"
                    % (limit, len(new), esc(new[0]), fmt_duration(self.cfg.poll_interval),
                       max(2 * (limit or 8192), 65536))))

    # -- walking: watch + compare in one pass --
    def root_mode(self, root, mode):
        """A path added to the config is baselined silently, like a first
        start: its existing files are not news."""
        return "build" if self.store.meta("root:" + esc(root)) is None else mode

    def root_done(self, root):
        if self.store.meta("root:" + esc(root)) is None:
            self.store.set_meta("root:" + esc(root), time.time())

    def walk_root(self, root, mode, detected, watch=True, drain=None):
        """Generator over one configured path: a directory tree, or a single
        file (watched through its directory, events filtered to its name)."""
        try:
            st = os.lstat(root)
        except OSError:
            st = None
        if st is not None and not stat.S_ISDIR(st.st_mode):
            if watch:
                self.watch_file_root(root)
            self.visit(root, self.store.get(root), detected, mode, st)
            return
        if st is None:
            self.visit(root, self.store.get(root), detected, mode)
            if watch and not self.watch_missing_own(root):
                self.missing_roots.add(root)
            return
        yield from self.walk(root, mode, detected, watch, drain)

    def watch_missing_own(self, root):
        """One of fimwatch's own files (or an append-only log) that does not
        exist yet is watched through its directory, like a single-file root:
        its creation is seen at once (the events file is created right after
        the first start) and an idle daemon need not poll for it."""
        if root not in self.cfg.own_files and not self.append_only.match(root):
            return False
        if not os.path.isdir(os.path.dirname(root)):
            return False
        self.watch_file_root(root)
        return os.path.dirname(root) in self.file_roots

    def watch_file_root(self, root):
        """A configured single file: watch its directory (add_watch on an
        already watched one returns the same wd), events filtered to its name."""
        parent, name = os.path.split(root)
        if self.watch_dir(parent) not in (None, "limit"):
            self.file_roots.setdefault(parent, set()).add(name)
            self._wanted.clear()

    def watch_root(self, root):
        """Generator: add the watches for one configured path, no comparing."""
        try:
            st = os.lstat(root)
        except OSError:
            if not self.watch_missing_own(root):
                self.missing_roots.add(root)
            return
        if not stat.S_ISDIR(st.st_mode):
            self.watch_file_root(root)
            return
        stack, limited, n = [root], [], 0
        while stack:
            d = stack.pop()
            wd = self.watch_dir(d)
            if wd is None:
                continue
            if wd == "limit":
                # The rest of this subtree is scanned every poll_interval.
                limited.append(d)
                self.unwatched.add(d)
                continue
            stack += self._subdirs(d)
            n += 1
            if n % 256 == 0:
                yield d
        if limited:
            self.report_limit(limited, "startup")

    def _subdirs(self, d):
        """The directories in d that are not excluded (symlinks not followed)."""
        out = []
        try:
            fd = open_deep(d)
            try:
                with os.scandir(fd) as it:
                    for e in it:
                        p = d + "/" + e.name
                        try:
                            if e.is_dir(follow_symlinks=False) and not self.excluded(p, True):
                                out.append(p)
                        except OSError:
                            pass
            finally:
                os.close(fd)
        except OSError as e:
            if not isinstance(e, (FileNotFoundError, NotADirectoryError)) \
                    and e.errno != errno.ELOOP:
                self.report_unreadable(d, e)
        return out

    def walk(self, top, mode, detected, watch=True, drain=None):
        """Generator: visit top and everything below it, one directory per step.

        mode: 'build' (record silently), 'quick' (compare, trust unchanged
        metadata), 'full' (compare, re-read every file), 'new' (a directory
        that just appeared: watch it and queue every entry as pending)."""
        store = self.store
        # Building: the files are read by the Hasher threads, in jobs across
        # directories, and recorded in batches; a tree with nothing in the
        # baseline yet (asked before top itself is recorded) costs no query
        # per directory.
        self._build = None if mode != "build" else \
            {"detected": detected, "fresh": not store.has_under(top), "items": [], "bytes": 0,
             "fd": None, "done": []}
        if mode != "new":
            self.visit(top, store.get(top), detected, mode)
        # Directories in the byte order of their paths, the baseline table's
        # (parent, name) order: a build appends to its B-tree, a comparison
        # reads its pages in order (SQLite's page cache is small).
        # A directory _walk_quick passed over carries its metadata in the
        # baseline (expect), compared once it is open.
        stack = [(os.fsencode(top), top, False, None, None)]
        limited = []
        # quick: the baseline's rows in one ordered scan (KeysReader)
        reader = store.keys_reader(top, self.cfg.hash_max_size) if mode == "quick" else None
        try:
            yield from self._walk_heap(stack, mode, detected, watch, limited, reader, drain,
                                       top)
        except GeneratorExit:
            if mode == "build":
                self._abandon_build()
            raise
        finally:
            if reader is not None:
                reader.close()
        if mode == "build":
            self._submit_build(True)
            self._wait_workers(0)
            self._build = None
        if limited:
            self.report_limit(limited, detected)

    def _abandon_build(self):
        """A build's walk closed before its end (the daemon stops, a reload):
        the files not handed to a thread yet are dropped with the directory
        fds they use; what was looked at is recorded."""
        b = self._build
        if b is None:
            return
        for fd in {it[4] for it in b["items"]}:
            os.close(fd)
        b["items"], b["fd"] = [], None
        if b["done"]:
            done, b["done"] = b["done"], []
            self._built(("dir", done[0][0], b["detected"]), self._new_rows(done), None)
        self._build = None

    def _walk_heap(self, stack, mode, detected, watch, limited, reader, drain, top):
        """walk()'s loop: one directory of the heap stack per step."""
        count = 0
        while stack:
            bd, d, parent_unwatched, ident, expect = heapq.heappop(stack)
            # The directory is opened without following a symlink and checked
            # to be the one seen from its parent: a user who swaps a directory
            # (or one above it) for a symlink between two steps of the walk
            # must not lead us out of the tree. Entries are then read through
            # this fd, never through the path.
            try:
                dfd = open_deep(d)
            except (FileNotFoundError, NotADirectoryError):
                self._dir_check(d, None, None, expect, detected, mode)
                continue
            except OSError as e:
                if e.errno != errno.ELOOP:
                    self.report_unreadable(d, e)
                self._dir_check(d, None, None, expect, detected, mode)
                continue
            try:
                if ident is not None:
                    fst = os.fstat(dfd)
                    if (fst.st_dev, fst.st_ino) != ident:
                        # replaced under us: the events tell the rest
                        self._dir_check(d, None, None, expect, detected, mode)
                        continue
                    self._dir_check(d, dfd, fst, expect, detected, mode)
                self._walk_dir(d, dfd, mode, detected, watch, parent_unwatched, limited, stack,
                               reader, bd)
            finally:
                os.close(dfd)
            count += 1
            if drain is not None and count % 64 == 0:
                drain()
            if count % 1000 == 0:
                trim_heap()              # what the last 1,000 freed, back
            if self.progress and count % 500 == 0:
                sys.stderr.write("\rfimwatch: scanning %s: %d directories"
                                 % (esc(top)[:50], count))
                sys.stderr.flush()
            yield d

    def _dir_check(self, d, dfd, fst, expect, detected, mode):
        """The comparison of a directory _walk_quick passed over (expect: its
        xattrs, capability, acl, flags in the baseline; None: compared
        already): its metadata read through dfd (fstat fst); in full if it
        differs, or when it could not be opened as the directory its parent
        saw (dfd None: gone, replaced)."""
        if expect is None or (dfd is not None and read_meta(dfd, fst, True) == expect):
            return
        self.visit(d, self.store.get(d), detected, mode)

    def _walk_dir(self, d, dfd, mode, detected, watch, parent_unwatched, limited, stack,
                  reader=None, bd=None):
        """One directory of walk(), read through its fd dfd (bd: its path in
        bytes; reader: mode quick's KeysReader)."""
        unwatched = parent_unwatched
        if watch:
            unwatched = self._watch_in_walk(d, mode, parent_unwatched, limited)
        try:
            it = os.scandir(dfd)
        except OSError as e:
            self.report_unreadable(d, e)
            return
        if mode == "quick":
            with it:
                old_children = self._walk_quick(d, dfd, detected, it, unwatched, stack,
                                                reader.keys_in(bd))
        else:
            old_children = self.store.children(d) if mode != "new" and not \
                (mode == "build" and self._build["fresh"]) else {}
            with it:
                for e in it:
                    p, st = self._walk_entry(d, dfd, e, mode, detected, old_children)
                    if st is not None and stat.S_ISDIR(st.st_mode):
                        heapq.heappush(stack, (os.fsencode(p), p, unwatched,
                                               (st.st_dev, st.st_ino), None))
        if mode == "build":
            self._build["fd"] = None         # the next directory's files: its own fd
        for name, old in old_children.items():      # in the baseline, not on disk
            p = d + "/" + name if d != "/" else "/" + name
            if p in self.pending:
                continue                     # compared when it settles, as above
            if self.excluded(p, old.kind == "dir"):
                self.store.delete_tree(p) if old.kind == "dir" else self.store.delete(p)
            else:
                self.apply(p, old, None, detected, silent=(mode == "build"))

    def _walk_quick(self, d, dfd, detected, it, unwatched, stack, keys):
        """The entries of one directory in mode quick (the start-up check).
        A file or symlink whose lstat has the type, mode, owner, size, times,
        inode and link count of its baseline row (Store.keys_in) is
        unchanged -- snapshot(trust=True) would rebuild the very same Rec --
        so it costs its lstat and one tuple comparison: no Rec, no query of
        its own, no event. The rest go through _walk_entry, with their Rec
        read then, from the store's connection (keys: KeysReader's, which may
        predate the real-time changes of the walk's last seconds). Returns
        {name: Rec} of the rows not seen on disk."""
        store, max_size = self.store, self.cfg.hash_max_size
        slow = []                        # [children_slow(d)], read at the first need
        prefix = d + "/" if d != "/" else "/"
        gone = {}

        def old_of(name, key):
            """The Rec of name's row now (key: the reader's, or None)."""
            if key is None or key[1] != -1:
                return store.get(prefix + name)
            if not slow:
                slow.append(store.children_slow(d, max_size))
            old = slow[0].get(name)
            return old if old is not None else store.get(prefix + name)
        pending, inflight = self.pending, self.inflight
        full_match, base_match = (r.match for r in self.files_filter)
        S_ISDIR, push, fsencode = stat.S_ISDIR, heapq.heappush, os.fsencode
        for e in it:
            name = e.name
            key = keys.pop(name, None)
            if key is not None and key[1] != -1:
                # Unchanged: its lstat matches key, with nothing else (an
                # exclusion, a settle window, a worker, append-only) to look
                # at. A directory matches on type, mode, owner and inode: its
                # metadata is compared once walk() opened it.
                p = prefix + name
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    st = None
                if st is None or p in pending or p in inflight:
                    pass
                elif S_ISDIR(key[1]):
                    if key[1:4] == (st.st_mode, st.st_uid, st.st_gid) and key[7] == st.st_ino \
                            and not self.excluded(p, True):
                        push(stack, (fsencode(p), p, unwatched, (st.st_dev, st.st_ino),
                                     key[9:13]))
                        continue
                elif key[1:9] == (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                                  st.st_ctime_ns, st.st_ino, st.st_nlink) \
                        and (full_match(p) is None and base_match(name) is None
                             or not self.excluded(p) and not self.append_only.match(p)):
                    continue
            old = old_of(name, key)
            one = {name: old} if old is not None else {}
            p, st = self._walk_entry(d, dfd, e, "quick", detected, one)
            gone.update(one)                 # excluded now: dropped by the caller
            if st is not None and stat.S_ISDIR(st.st_mode):
                heapq.heappush(stack, (os.fsencode(p), p, unwatched, (st.st_dev, st.st_ino), None))
        for name, key in keys.items():
            old = old_of(name, key)
            if old is not None:
                gone[name] = old
        return gone

    def _watch_in_walk(self, d, mode, parent_unwatched, limited):
        """Watch d during a walk; True when d (and so its subtree) has no watch."""
        if parent_unwatched:
            return True
        wd = self.watch_dir(d)
        if wd != "limit":
            if wd is not None:
                self.unwatched.discard(d)
            return False
        limited.append(d)
        self.unwatched.add(d)
        if mode == "new":
            # Just created: its files are probably being written now. Look
            # again shortly, then every poll_interval.
            self.recheck.append((time.monotonic() + 2.0, d))
        return True

    def _walk_entry(self, d, dfd, e, mode, detected, old_children):
        """Visit one entry of a walked directory: (its path, lstat result or None)."""
        name = e.name
        p = d + "/" + name if d != "/" else "/" + name
        try:
            isdir = e.is_dir(follow_symlinks=False)
        except OSError:
            isdir = False
        if self.excluded(p, isdir):
            # A leftover already reported keeps its baseline row (reported once).
            if self.leftover_name(p, isdir) and old_children.pop(name, None) is None:
                self.note_leftover(p)
            return p, None
        try:
            st = e.stat(follow_symlinks=False) if (isdir or mode != "new") else None
        except OSError:
            st = None
        if mode == "new":
            self.touch(p)
        elif mode == "build":
            self._build_entry(p, old_children.pop(name, None), st, dfd, name)
        elif p in self.pending:
            # Compared when its settle window ends, as a real-time change
            # with its writer (fanotify): not here as well, or first.
            old_children.pop(name, None)
        else:
            self.visit(p, old_children.pop(name, None), detected, mode, st, dir_fd=dfd,
                       name=name)
        return p, st

    def _build_entry(self, p, old, st, dfd, name):
        """One entry of a baseline being built: a file of BUILD_OFFLOAD_MIN
        or more waits for a Hasher thread, in jobs of BUILD_BATCH_FILES files
        or BUILD_BATCH_BYTES bytes across directories (each directory's files
        read through a dup of its fd); the rest is looked at here. Small
        files are mostly system calls: handing them to the threads too was
        measured at +20-30 % CPU and slower (the threads take turns at the
        GIL for them)."""
        b = self._build
        if st is not None and stat.S_ISREG(st.st_mode) and st.st_size >= BUILD_OFFLOAD_MIN:
            if b["fd"] is None:
                b["fd"] = os.dup(dfd)
            b["items"].append((p, old, st, name, b["fd"]))
            b["bytes"] += st.st_size
            if len(b["items"]) >= BUILD_BATCH_FILES or b["bytes"] >= BUILD_BATCH_BYTES:
                self._submit_build()
            return
        try:
            b["done"].append((p, old, self.look(p, old, "build", st, dfd, name)))
        except OSError as e:
            b["done"].append((p, old, e))
        if len(b["done"]) >= 256:
            self._submit_build()

    def _submit_build(self, last=False):
        """Record what was looked at here, and hand the files gathered by
        _build_entry to a Hasher thread once they make a job (or last); the
        job closes the fds its files use. At most two jobs per thread wait
        (the walk reads events meanwhile)."""
        b = self._build
        if b["done"]:
            done, b["done"] = b["done"], []
            self._built(("dir", done[0][0], b["detected"]), self._new_rows(done), None)
        if not b["items"] or (not last and len(b["items"]) < BUILD_BATCH_FILES
                              and b["bytes"] < BUILD_BATCH_BYTES):
            return
        items, b["items"], b["bytes"], b["fd"] = b["items"], [], 0, None
        self.hasher.submit(("dir", items[0][0], b["detected"]), self._look_dir, items)
        self._wait_workers(2 * self.hasher.workers)

    def _wait_workers(self, most):
        """Until at most `most` jobs are left: apply results, and read the
        backend's events meanwhile (they are compared once the build ends)."""
        while self.hasher.busy > most:
            if self.backend is not None:
                self.read_events()
            self.collect(wait=0.05)

    def _look_dir(self, items):
        """look() for files of a baseline being built (a Hasher job):
        _new_rows() of [(path, old, looked or the OSError)]; closes the
        directory fds they use."""
        out = []
        try:
            for p, old, st, name, fd in items:
                try:
                    out.append((p, old, self.look(p, old, "build", st, fd, name)))
                except OSError as e:
                    out.append((p, old, e))
        finally:
            for fd in {it[4] for it in items}:
                os.close(fd)
        return self._new_rows(out)

    def _built(self, tag, res, err):
        """Record a _look_dir result, (rows, rest) of _new_rows(): the rows
        in one statement, the rest through use()."""
        if err is not None:
            raise err
        rows, rest = res
        for p, old, looked in rest:
            if isinstance(looked, OSError):
                self.report_unreadable(p, looked)
            else:
                self.use(p, old, tag[2], "build", looked)
        if rows:
            self.stats["silent"] += len(rows)
            self.store.put_many(rows)

    @staticmethod
    def _new_rows(res):
        """Split looked-at entries [(path, old, looked or OSError)] of a build
        into (the files-table rows of new entries with no text or meaning to
        keep, the rest)."""
        rows, rest = [], []
        for p, old, looked in res:
            if old is None and not isinstance(looked, OSError) and looked[0] is not None \
                    and looked[1] is None and looked[2] is None:
                rows.append(Store.file_row(p, looked[0]))
            else:
                rest.append((p, old, looked))
        return rows, rest

    def visit(self, p, old, detected, mode, st=None, dir_fd=None, name=None):
        if mode != "build" and self.append_only.match(p) and \
                self.visit_growing(p, old, detected, mode, st, dir_fd, name):
            return
        if self.backend is not None and mode != "build":
            if p in self.inflight:          # a worker hashes it: look again after that
                self.inflight[p] = detected == "realtime"
                return
            if st is None:
                try:
                    st = lstat_deep(p) if dir_fd is None else os.lstat(name, dir_fd=dir_fd)
                except (FileNotFoundError, NotADirectoryError):
                    pass
            if st is not None and self._offload(p, old, detected, mode, st, dir_fd, name):
                return
        self.use(p, old, detected, mode, self.look(p, old, mode, st, dir_fd, name))

    def look(self, p, old, mode, st=None, dir_fd=None, name=None):
        """What visit() reads of p: (Rec or None, text kept for a diff or
        None, meaning kind, content read for its meaning). Reads only the file
        system, so it also runs on a Hasher thread."""
        plan = self._plans.get(p)
        if plan is None:
            plan = self._plan(p)
        keep, kind = plan
        out = [] if keep else None
        raw = [] if kind else None      # read for its meaning, kept only as facts
        new = snapshot(p, self.cfg.hash_max_size, old, trust=(mode == "quick"), st=st,
                       keep=max(keep, MEANING_MAX if kind else 0), out=raw if kind else out,
                       dir_fd=dir_fd, name=name)
        if kind and out is not None and raw and len(raw[0]) <= keep:
            out.append(raw[0])
        return new, out, kind, raw

    def _plan(self, p):
        """(bytes of p kept for a diff or 0, its meaning kind or None): fixed
        by the config, so kept per path (look() asks for every comparison)."""
        cfg = self.cfg
        keep = 0
        if cfg.diff_max_size and cfg.diff_paths.match(p) and not cfg.no_diff.match(p):
            keep = cfg.diff_max_size
        plan = keep, meaning_kind(p)
        plans = self._plans
        if len(plans) >= MEMO_KEEP:
            plans.clear()
        plans[p] = plan
        return plan

    def use(self, p, old, detected, mode, looked, extra=None):
        """The main thread's half of visit(): compare what look() saw with
        the baseline, report, record."""
        new, out, kind, raw = looked
        if mode == "full" and new is not None and new.kind == "file":
            self.stats["files"] += 1
            if not new.skipped:
                self.stats["bytes"] += new.size
        self.apply(p, old, new, detected, silent=(mode == "build"), content=out,
                   meaning=(kind, facts(kind, raw[0]) if raw else None) if kind else None,
                   extra=extra)

    # -- hashing off the loop's thread --
    def _offload(self, p, old, detected, mode, st, dir_fd, name):
        """Hand a big regular file that must be read to a Hasher thread, so
        the loop goes on meanwhile; True if it did. The result is applied by
        collect() once the file is known not to have changed while hashed."""
        if not stat.S_ISREG(st.st_mode) or not \
                OFFLOAD_MIN_SIZE <= st.st_size <= self.cfg.hash_max_size:
            return False
        if (mode == "quick" and old is not None and old.kind == "file" and old.sha256
                and (old.size, old.mtime_ns, old.ctime_ns, old.ino)
                == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)):
            return False                     # trusted: nothing to read
        fd = None if dir_fd is None else os.dup(dir_fd)
        self.inflight[p] = False
        self.hasher.submit(("one", p, detected, mode, st), self._look_closing, p, old,
                           mode, st, fd, name)
        return True

    def _look_closing(self, p, old, mode, st, fd, name):
        try:
            return self.look(p, old, mode, st, fd, name)
        finally:
            if fd is not None:
                os.close(fd)

    def collect(self, wait=0.0):
        """Apply what the Hasher threads finished (waiting up to wait s for one)."""
        for tag, res, err in self.hasher.results(wait):
            try:
                if tag[0] == "one":
                    self._offloaded(tag, res, err)
                elif tag[0] == "deb":
                    self._deb_read(tag, res, err)
                else:
                    self._built(tag, res, err)
            except Exception as e:
                self.internal_error(esc(tag[1]), e)

    def _offloaded(self, tag, res, err):
        """A big file hashed by a worker. If lstat says it changed while it was
        hashed, what was read may be no state the file ever had: queue it
        again one settle window later (writes do not defer that); after
        CHANGING_RETRIES such tries it is reported anyway, marked `changing`,
        so a file rewritten without pause is reported each time it is
        compared and never hashed forever."""
        _, p, detected, mode, st = tag
        again = self.inflight.pop(p, False)     # events came meanwhile: look again
        if err is not None:
            if again:
                self.touch(p)
            if isinstance(err, OSError):
                self.report_unreadable(p, err)
                return
            raise err
        try:
            now = os.lstat(p)
        except OSError:
            now = None
        extra = None
        if now is None or (now.st_ino, now.st_size, now.st_mtime_ns, now.st_ctime_ns) != \
                (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns):
            n = self.retries.get(p, 0) + 1
            if n <= CHANGING_RETRIES or now is None:
                self.retries[p] = n
                self.touch(p)
                ent = self.pending[p]
                ent[2] = min(ent[2], time.monotonic() + self.settle)
                ent[0] = min(ent[0], ent[2])
                heapq.heappush(self.due, (ent[0], p))
                return
            extra = {"changing": True}
        self.retries.pop(p, None)
        self.use(p, self.store.get(p), detected, mode, res, extra)
        if again:
            self.touch(p)

    def finish_hashing(self, budget):
        """Wait (up to budget s) for the workers' files and apply them."""
        end = time.monotonic() + budget
        while self.hasher.busy and time.monotonic() < end:
            self.collect(wait=min(0.1, max(0.0, end - time.monotonic())))

    def visit_growing(self, p, old, detected, mode, st, dir_fd, name):
        """[watch] append_only: appends are silent; a truncation, an edit of
        bytes already written, or a replacement that is not logrotate's
        rotation is critical. True when p was handled here, False when the
        usual comparison applies (not a file, an unchanged file, a deletion)."""
        if old is None:
            if p == self.cfg.events_file or time.monotonic() - self.rotated.pop(p, -1e9) < 600:
                # the events file made by its writer, or a log's new file
                # after a rotation: not news
                self.apply(p, None, snapshot(p, self.cfg.hash_max_size), detected, silent=True)
                return True
            return False
        if old.kind != "file":
            return False
        if st is None:
            try:
                st = os.lstat(name if dir_fd is not None else p, dir_fd=dir_fd)
            except OSError:
                st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            return False                           # another kind: a type change
        if st is None or st.st_ino != old.ino:
            if rotated_to(p, old.ino) is None:
                return st is not None and self.broken_growth(p, old, detected, "replaced")
            self.growth.pop(p, None)
            new = snapshot(p, self.cfg.hash_max_size) if st is not None else None
            if new is None:
                self.rotated[p] = time.monotonic()
            self.apply(p, old, new, detected, silent=True)
            return True
        if st.st_size < old.size:
            return self.broken_growth(p, old, detected, "truncated")
        if st.st_size == old.size:
            if (st.st_mtime_ns, st.st_ctime_ns) == (old.mtime_ns, old.ctime_ns):
                return False
            new = snapshot(p, self.cfg.hash_max_size, st=st, dir_fd=dir_fd, name=name)
            if new is not None and new.ino == old.ino and "content" in \
                    (compare(old, new) or ("", []))[1]:
                return self.broken_growth(p, old, detected, "edited", new)
            return False
        return self.grown(p, old, detected, mode, st, dir_fd, name)

    def grown(self, p, old, detected, mode, st, dir_fd, name):
        """An append-only file that is larger: appended (silent), or edited."""
        try:
            fd = os.open(name if dir_fd is not None else p, _O_HASH, dir_fd=dir_fd)
        except OSError:
            return False
        try:
            fst = os.fstat(fd)
            if not stat.S_ISREG(fst.st_mode) or fst.st_ino != old.ino:
                return False                       # replaced meanwhile: look again
            # the periodic verification reads the whole file again
            known = None if detected == "scan" and mode == "full" else self.growth.get(p)
            ok, g = check_growth(fd, fst, old.size, old.sha256, known)
            meta = read_meta(fd, fst, True)
        finally:
            os.close(fd)
        if not ok:
            self.growth.pop(p, None)
            return self.broken_growth(p, old, detected, "edited")
        self.growth[p] = g
        over = fst.st_size > self.cfg.hash_max_size
        new = _make_rec("file", fst, None if over else g.h.hexdigest(), None, int(over), meta)
        r = compare(old, new)
        changes = [c for c in (r[1] if r else []) if c != "content"]
        if changes:
            self.emit_change("attributes", p, detected, old, new, changes)
        self.store.put(p, new)
        return True

    def broken_growth(self, p, old, detected, how, new=None):
        """Report an append-only file that did more than grow: critical."""
        self.growth.pop(p, None)
        if new is None:
            new = snapshot(p, self.cfg.hash_max_size)
        if new is None:
            return False
        was = {"truncated": "truncated from %d to %d bytes" % (old.size, new.size),
               "edited": "bytes already written were changed",
               "replaced": "replaced by another file (inode %d, was %d), not by "
                           "logrotate's rotation" % (new.ino, old.ino)}[how]
        changes = ["content"] + [c for c in (compare(old, new) or ("", []))[1]
                                 if c != "content"]
        self.emit_change("modified", p, detected, old, new, changes, severity="critical",
                         append_only=how,
                         message="append-only log %s: %s (someone may have erased their "
                                 "tracks)" % (esc(p), was))
        self.store.put(p, new)
        return True

    def apply(self, p, old, new, detected, silent=False, content=None, meaning=None,
              extra=None):
        """Emit the event, if any, then record new as the baseline of p. The
        event row is written first, in the same transaction: a crash in
        between repeats it at the next start instead of losing it. silent:
        record only (a baseline being built or accepted). meaning: (kind,
        facts of the new content) for summarize(), facts None if not read."""
        if old is not None and old.kind == "dir" and (new is None or new.kind != "dir"):
            self._tree_gone(p, old, new, detected, silent)
            if new is None:
                return
        elif new is None:
            if old is not None:
                self._report_gone(p, old, detected, silent)
                self.store.delete(p)
            return
        r = compare(old, new)
        keep_text = self._text_to_keep(new, content)
        if r is not None:
            if silent:
                self.stats["silent"] += 1
            else:
                self._report(p, old, new, r, detected, keep_text, meaning, extra)
        self._record(p, old, new, content, keep_text)
        if meaning is not None and meaning[1] is not None:
            self.store.put_facts(p, meaning[1])

    def _tree_gone(self, p, old, new, detected, silent):
        """A directory gone or replaced by a file or symlink: everything that
        was in it is gone too."""
        desc = self.store.descendants(p)
        if new is None:
            self._report_gone(p, old, detected, silent)
        if not silent:
            for dp, drec in desc:
                self.emit_change("deleted", dp, detected, drec, None, [])
        self.store.delete_tree(p)

    def _report_gone(self, p, old, detected, silent):
        if silent:
            self.stats["silent"] += 1
        else:
            self.emit_change("deleted", p, detected, old, None, [])

    @staticmethod
    def _text_to_keep(new, content):
        """The text to keep for the next diff: not a binary, and not a file
        others may not read (likely to hold secrets: never kept or shown)."""
        if content and b"\0" not in content[0] and new.mode & 0o004:
            return content[0]
        return None

    def _report(self, p, old, new, r, detected, keep_text, meaning=None, extra=None):
        event, changes = r
        extra = dict(extra or {})
        if meaning is not None:
            kind, now = meaning
            was = self.store.get_facts(p) if event != "created" else []
            if was is None and event == "modified":     # kept before facts were
                was = facts(kind, self.store.get_content(p))
            extra["meaning"] = (kind, was, now)
        if keep_text is not None and event in ("modified", "created"):
            # A new small text file is shown as a diff from nothing.
            prev_text = self.store.get_content(p) if event == "modified" else b""
            d = unified_diff(prev_text, keep_text, esc(p)) if prev_text is not None else None
            if d:
                extra["diff"] = d
        self.emit_change(event, p, detected, old if event != "created" else None, new, changes,
                         **extra)

    def _record(self, p, old, new, content, keep_text):
        if new == old:
            return
        self.store.put(p, new)
        if content:
            self.store.put_content(p, keep_text)
        elif content is not None and old is not None and new.kind == "file" \
                and old.sha256 != new.sha256:
            self.store.put_content(p, None)         # the kept text is stale

    def emit_change(self, event, p, detected, old, new, changes, meaning=None, **extra):
        cfg = self.cfg
        self.stats["changes"] += 1
        sev = cfg.severity_for(p)
        kind = (new or old)[0]
        ev = new_event(cfg.hostname, event, sev, detected, esc(p), kind=kind)
        if changes:
            ev["changes"] = changes
        if new is not None:
            ev.update(rec_fields(new, changes=changes))
        if old is not None and event != "created":
            prev = rec_fields(old, prefix_mtime=False, changes=changes)
            ev["previous"] = prev
        if extra.get("moved_from") is not None:
            ev["from"] = esc(extra.pop("moved_from"))
        ev.update(extra)
        if detected == "realtime":
            now = time.monotonic()
            if now - self._users_at > 1.0:        # a storm must not re-read utmp per event
                self._users, self._users_at = login_users(), now
            users = self._users
            if users:
                ev["users"] = users
            ev.update(self._writer(p))
        tx = self._tx_of(p)
        if tx is not None and tx.take(self.pkgdb, p, ev, new, changes):
            return                       # verified or generated: in the digest
        if (tx is None and self.pkgdb is not None and kind == "file"
                and event in ("modified", "created")
                and new is not None and p.startswith(PACKAGE_PREFIXES)):
            # No package manager ran: a match is no all-clear (a trojan's
            # cover put back looks just like this), so the severity stays.
            pkg = self.pkgdb.check(p, new.sha256 or "")
            if pkg is not None:
                ev["package"] = dict({"transaction": "none"}, **pkg)   # rpm: maybe untracked
                if pkg.get("mismatch"):       # the md5sums list lies: tampering
                    ev["severity"] = "critical"
        add_summary(ev, *(meaning or (None, None, None)))
        if tx is None and self._record_edit(p, detected):
            mark_record_edit(ev, p, self.pkgdb)
        self.emit_cb(ev)

    def _writer(self, p):
        """{"process": ...} when the backend knows who changed p (fanotify)."""
        proc = self.backend.writer(p) if self.backend is not None else None
        return {"process": proc} if proc else {}

    def _tx_of(self, p):
        """The ended transaction whose held changes p belongs to, or None.
        A change in dpkg's own directory while one runs is the running one's
        (some reach here before it ends: dpkg's tmp.ci, filled and emptied
        for each package, is compared as its entries come and go)."""
        for tx in self.tx_closing:
            if p in tx.paths:
                return tx
        for root, tx in self.tx_roots.items():
            if within(p, root):
                return tx
        if self.pkgtx is not None and p.startswith(self.pkgdb.base + "/"):
            # ... and dpkg emptying tmp.ci as it ends is the ending one's
            return self.pkgtx.tx or (self.tx_closing[-1] if self.tx_closing else None)
        return None

    def _record_edit(self, p, detected):
        """A dpkg record changed by hand: no transaction runs or just ended."""
        pw = self.pkgtx
        return detected == "realtime" and pw is not None and pw.tx is None and \
            not self.tx_closing and time.monotonic() - pw.ended_at > TX_RECORD_GRACE and \
            dpkg_record(p, self.pkgdb) and pw.holder() is None

    # -- raw events --
    def touch(self, p, attrib=False):
        """Queue p for comparison after the settle window. A write re-arms the
        window, but never past first sight + max_delay (2 s at most on
        critical paths); attribute-only activity (a `touch` loop) never
        re-arms it, so it cannot keep deferring the comparison of a content
        change. A path not in the baseline is captured at first sight, so a
        file that vanishes before its window ends is still reported
        (transient)."""
        now = time.monotonic()
        ent = self.pending.get(p)
        if ent is None:
            limit = now + self.max_delay_for(p)
            self.pending[p] = [min(now + self.settle, limit), now, limit]
            heapq.heappush(self.due, (self.pending[p][0], p))
            self.capture(p, now)
        else:
            # A window that has ended is not re-armed: the path was quiet for
            # the settle time and waits only for the loop (busy), so it is
            # compared at once and sees this write too; re-arming it would
            # add a whole window to a busy daemon's lag.
            if not attrib and ent[0] > now:
                ent[0] = min(now + self.settle, ent[2] if len(ent) > 2 else ent[1] + self.max_delay)
            if p in self.fresh:
                self.capture(p, now)

    def max_delay_for(self, p):
        if self.cfg.severity_for(p) == "critical":
            return min(self.max_delay, CRITICAL_MAX_DELAY)
        return self.max_delay

    def capture(self, p, now):
        """First sight of p, or a later event on it while it is new: if it is
        not in the baseline, remember what it is now (hashed up to
        CAPTURE_MAX_SIZE), for a `transient` event if it is gone when its
        window ends. Bounded: CAPTURE_PER_WINDOW snapshots per CAPTURE_WINDOW and
        CAPTURE_PER_PATH per path, so a storm or a file written in many small
        writes costs little."""
        ent = self.fresh.get(p)
        if ent is None:
            if self.store.get(p) is not None:
                return
            ent = self.fresh[p] = [now, None, 0]
        if self.captures >= CAPTURE_PER_WINDOW or ent[2] >= CAPTURE_PER_PATH:
            return
        self.captures += 1
        ent[2] += 1
        try:
            rec = snapshot(p, CAPTURE_MAX_SIZE)
        except OSError:
            rec = None
        if rec is not None:
            ent[1] = rec

    def report_transient(self, p, ent):
        """p appeared and vanished before its settle window ended. A probe
        name (vim's 4913) that did so is what it claims to be: silent."""
        if self.probe.match(p):
            return
        rec = ent[1]
        extra = {"seconds": round(time.monotonic() - ent[0], 3),
                 "message": "%s appeared and vanished within the settle window"
                            % esc(p)}
        if rec is None:
            # Gone at first sight: it may have been made while fimwatch was
            # not watching (stopped, or before its start-up comparison read it).
            extra["message"] = ("%s was not in the baseline and was deleted before fimwatch "
                                "could read it" % esc(p))
            self.stats["changes"] += 1
            ev = new_event(self.cfg.hostname, "transient", self.cfg.severity_for(p),
                           "realtime", esc(p), captured=False, **extra)
            tx = self._tx_of(p)          # a maintainer script's temp file: the digest's
            if tx is not None and tx.take(self.pkgdb, p, ev, None, []):
                return
            self.emit_cb(ev)
            return
        self.emit_change("transient", p, "realtime", None, rec, [], captured=True, **extra)

    def read_events(self):
        """Take what the backend has; returns the number of raw records."""
        now = time.monotonic()
        if now >= self.capture_reset:
            self.captures, self.capture_reset = 0, now + CAPTURE_WINDOW
        n = self.backend.read(self)
        self.stats["raw"] += n
        return n

    # -- the backend's calls (see "Pipeline 1 of 3: watcher backends") --
    def wanted(self, p, isdir):
        # Every record of a path asks (a file written 5 times a second asks
        # 5 times): a yes is kept until file_roots changes (watch_file_root,
        # file_root_dir_lost); exclusions are fixed for an Engine.
        key = (p, isdir)
        memo = self._wanted
        if key in memo:
            return True
        if not self._wanted_now(p, isdir):
            return False
        if len(memo) >= MEMO_KEEP:
            memo.clear()
        memo[key] = True
        return True

    def _wanted_now(self, p, isdir):
        names = self.file_roots.get(os.path.dirname(p))
        if names is not None and os.path.basename(p) not in names:
            return False
        if self.excluded(p, isdir):
            if self.leftover_name(p, isdir):
                self.note_leftover(p)
            return False
        return True

    def changed(self, p, isdir, attrib=False):
        """attrib: only metadata changed (IN_ATTRIB); it does not re-arm a
        pending path's settle window."""
        if not (isdir and p in self.file_roots):     # a file root's directory itself
            self.touch(p, attrib)

    def dir_created(self, p):
        self.walk_now(p, "new")

    def moved(self, src, dst, isdir):
        if isdir:
            self.dir_renamed(src, dst)
            return
        self.pending.pop(src, None)
        ent = self.fresh.pop(src, None)   # renamed, not gone (an editor's temp file)
        self.moves[dst] = src
        self.touch(dst)
        if ent is not None and dst in self.fresh:
            self.fresh[dst][0] = ent[0]

    def moved_out(self, p, isdir):
        """The entry left the trees (or went to an excluded name); its path
        was queued when it left, so the flush reports it gone."""
        if isdir:
            self.backend.unwatch_tree(p)

    def dir_gone(self, d):
        if d in self.file_roots:
            self.file_root_dir_lost(d)
        elif d in self.roots:
            self.root_lost(d)

    def watch_lost(self, d):
        if d in self.file_roots:
            self.file_root_dir_lost(d)
        elif d in self.roots and not os.path.isdir(d):
            self.root_lost(d)
        elif os.path.isdir(d) and not os.path.islink(d) and \
                (d in self.roots or self.backend.watching(os.path.dirname(d))):
            # Still there (an unmount): watch it again and compare.
            self.scans.append(self.walk(d, "quick", "realtime"))

    def walk_now(self, top, mode, detected="realtime"):
        for _ in self.walk(top, mode, detected):
            pass

    def dir_renamed(self, src, dst):
        self.backend.rename(src, dst)
        pre, n = src + "/", len(src)
        for p in [p for p in self.fresh if p == src or p.startswith(pre)]:
            del self.fresh[p]            # renamed, not gone
        for p in [p for p in self.pending if p == src or p.startswith(pre)]:
            ent = self.pending.pop(p)
            self.pending[dst + p[n:]] = ent
            heapq.heappush(self.due, (ent[0], dst + p[n:]))
        old = self.store.get(src)
        if old is None:
            self.walk_now(dst, "new")
            self.touch(dst)
            return
        self.store.rename_tree(src, dst)
        try:
            new = snapshot(dst, self.cfg.hash_max_size)
        except OSError:
            new = None
        if new is not None:
            self.store.put(dst, new)
        ch = compare(old, new)
        self.emit_change("moved", dst, "realtime", old, new or old, ch[1] if ch else [],
                         moved_from=src)
        # Anything that changed inside while we were not looking at the new name:
        self.scans.append(self.walk(dst, "quick", "realtime"))

    def file_root_dir_lost(self, d):
        """The directory of a single watched file was deleted or moved: each
        of its files is missing now and is watched for again."""
        self.backend.unwatch(d)
        self._wanted.clear()
        for name in self.file_roots.pop(d, ()):
            root = d + "/" + name
            self.missing_roots.add(root)
            self.touch(root)

    def root_lost(self, root):
        self.backend.unwatch_tree(root)
        self.missing_roots.add(root)
        self.touch(root)

    def check_missing_roots(self, ended=None):
        """Walk the watched paths that appeared. One that appears while a
        package transaction runs (nginx makes /var/www) is walked when it
        ends (ended), its changes that transaction's (tx_roots)."""
        running = self.pkgtx.tx if self.pkgtx is not None else None
        for root in list(self.missing_roots):
            if not os.path.lexists(root):
                continue
            if running is not None and self.tx_holds(root) and \
                    time.monotonic() - running.start_mono < TX_MAX_HOLD:
                continue
            self.missing_roots.discard(root)
            if ended is not None and self.tx_holds(root):
                self.scans.append(self._tx_walk(root, ended))
            else:
                self.scans.append(self.walk_root(root, "quick", "realtime"))

    def _tx_walk(self, root, tx):
        tx.walks += 1
        self.tx_roots[root] = tx
        try:
            yield from self.walk_root(root, "quick", "realtime")
        finally:
            self.tx_roots.pop(root, None)
            tx.walks -= 1

    def overflow(self):
        self.overflows += 1
        if self.rescan_state:
            # One rescan runs; it starts over once more when it ends.
            self.rescan_state = "again"
            return
        self.rescan_state = "running"
        self.emit_cb(new_event(self.cfg.hostname, "error", "notice", "realtime", "",
                               message="%s queue overflowed; rescanning the watched "
                                       "trees so no change is lost"
                                       % getattr(self.backend, "name", "inotify")))
        self.scans.append(self._rescan())

    # -- background walks: rescans, start-up comparison, scheduled scans --
    def _rescan(self):
        """After an overflow: walk every root again (quick compare), refreshing
        every watch, then drop the watches of directories that are gone."""
        t0 = time.monotonic()
        seen_dirs = 0
        changes_before = self.stats["changes"]
        for root in self.roots:
            for _ in self.walk_root(root, "quick", "scan"):
                seen_dirs += 1
                yield
        self.backend.prune_gone()
        again = self.rescan_state == "again"
        self.rescan_state = None
        if again:
            self.overflow()
        n = self.stats["changes"] - changes_before
        self.emit_cb(new_event(self.cfg.hostname, "rescan", "notice", "scan", "",
                               directories=seen_dirs, watches=self.watches(), changes_found=n,
                               seconds=round(time.monotonic() - t0, 3),
                               message="rescanned %d directories after an inotify queue "
                                       "overflow; %d change(s) found" % (seen_dirs, n)))

    def reset_timers(self, carry=None):
        """Start the engine's timers from now; carry: {name: due} of timers
        that keep their time (a reload must not postpone polls and scans)."""
        now, cfg = time.monotonic(), self.cfg
        self.timers = {"poll": now + cfg.poll_interval, "roots": now + ROOT_RETRY_EVERY,
                       "scan": now + cfg.scan_interval if cfg.scan_interval else None}
        for name, due in (carry or {}).items():
            if due is not None and self.timers.get(name) is not None:
                self.timers[name] = due

    def start(self, mode, detected, keepalive=lambda: None, stopping=lambda: False,
              carry=None):
        """Watch every configured path. A path never baselined is baselined
        now (silently, watch and hash in one pass). Paths with a baseline get
        their watches first (a fast walk of directories only) and are compared
        afterwards, in slices of tick(): a change made meanwhile is caught by
        the backend, and the daemon is watching within about a second even on
        100,000 directories."""
        later = []
        for root in self.roots:
            rmode = self.root_mode(root, mode)
            if rmode == "build":
                walker = self.walk_root(root, rmode, detected, drain=self.read_events)
            elif os.path.isdir(root) and not os.path.islink(root) and \
                    self.backend.learn(root, self.wanted_dir):
                walker = ()                  # fanotify: watching already; the
                later.append(root)           # comparison's walk fills the map
                self.learning.add(root)
            else:
                walker = self.watch_root(root)
                later.append(root)
            for _ in walker:
                if stopping():
                    break
                if rmode != "build":       # building: compared once the build ends
                    self.flush_due(budget=FLUSH_SLICE)
                keepalive()
            self.root_done(root)
            self.store.commit_turn()
        for root in self.scan_only:
            if self.root_mode(root, mode) == "build":
                for _ in self.walk_root(root, "build", detected, watch=False):
                    keepalive()
                self.root_done(root)
            else:
                later.append(root)
        self.store.commit_turn()
        if self.progress:
            sys.stderr.write("\r\x1b[K")
        self.reset_timers(carry)          # from the end of a long first build
        if later:
            self.scans.append(self._verify(later, mode, detected))

    def _verify(self, roots, mode, detected):
        """The start-up comparison, in slices of tick(); its end is an event,
        so an admin (or a benchmark) knows when coverage is complete."""
        t0, c0, n = time.monotonic(), self.stats["changes"], 0
        for root in roots:
            learning = root in self.learning
            for _ in self.walk_root(root, mode, detected, watch=learning):
                n += 1
                yield
            if learning:
                self.learning.discard(root)
                self.backend.learned(root)
        changes = self.stats["changes"] - c0
        self.emit_cb(new_event(
            self.cfg.hostname, "verified", "info", "scan", "", directories=n,
            changes_found=changes,
            seconds=round(time.monotonic() - t0, 3),
            message="comparison with the baseline done: %d directories, %d change(s) in %.1fs"
                    % (n, changes, time.monotonic() - t0)))

    def check_mounts(self):
        """A mount or unmount on or under a watched path (or over a directory
        above one) is a critical `mount` event, and what is visible there now
        is compared with the baseline at once, and watched: the old watches
        are on the covered directories and see nothing of the new tree."""
        for action, (mp, fstype, source) in self.mount_table.changes():
            inside = [r for r in self.roots + self.scan_only
                      if within(mp, r) or within(r, mp)]
            if not inside:
                continue
            self.stats["changes"] += 1
            self.emit_cb(new_event(
                self.cfg.hostname, "mount", "critical", "realtime", esc(mp), action=action,
                fstype=esc(fstype), source=esc(source),
                message="%s %s (%s from %s): the tree there is compared with the baseline"
                        % (esc(mp), action, esc(fstype), esc(source))))
            for r in inside:
                top = mp if len(mp) > len(r) else r
                watch = r in self.roots
                if os.path.isdir(top) and not os.path.islink(top):
                    self.scans.appendleft(self.walk(top, "quick", "realtime", watch=watch))
                else:
                    self.flush_path(top)

    def _verification(self):
        """The periodic verification: re-read every file of the baseline's
        paths (mode full: no hash is trusted), at most scan_rate bytes per
        second, and end with one `verification` summary event."""
        t0, c0 = time.monotonic(), self.stats["changes"]
        f0, b0, n = self.stats["files"], self.stats["bytes"], 0
        walks = [self.walk_root(r, "full", "scan") for r in self.roots]
        walks += [self.walk_root(r, "full", "scan", watch=False) for r in self.scan_only]
        rate = self.cfg.scan_rate
        for w in walks:
            for _ in w:
                n += 1
                if rate:
                    self.verify_resume = t0 + (self.stats["bytes"] - b0) / rate
                yield
        files, changes = self.stats["files"] - f0, self.stats["changes"] - c0
        secs = time.monotonic() - t0
        self.emit_cb(new_event(
            self.cfg.hostname, "verification", "warning" if changes else "info", "scan", "",
            files=files, directories=n, bytes=self.stats["bytes"] - b0, changes=changes,
            seconds=round(secs, 3),
            message="verification: {:,} files, {:,} change{} real time did not see ({})".format(
                files, changes, "" if changes == 1 else "s", fmt_duration(secs))))

    def _verify_slice(self, now):
        """One slice of the verification, at idle I/O priority."""
        if self.verifier is None or now < self.verify_resume:
            return
        prev = ioprio(IOPRIO_IDLE)
        try:
            end = time.monotonic() + 0.05
            while time.monotonic() < end and time.monotonic() >= self.verify_resume:
                next(self.verifier)
        except StopIteration:
            self.verifier = None
        finally:
            if prev is not None:
                ioprio(prev)

    # -- the engine's turn in the main loop --
    def next_wakeup(self, now):
        """Monotonic time of the engine's next work (now while a walk runs)."""
        if self.scans:
            return now
        t = self.timers
        waits = [t["poll"]]
        if t["scan"] is not None:
            waits.append(t["scan"])
        if self.verifier is not None:
            waits.append(self.verify_resume)
        if self.missing_roots:           # an idle daemon does not poll for roots
            waits.append(t["roots"])
        if self.due:
            waits.append(self.due[0][0])
        if self.recheck:
            waits.append(self.recheck[0][0])
        if self.pkgtx is not None and self.pkgtx.next_check(now) is not None:
            waits.append(self.pkgtx.next_check(now))
        return min(waits)

    def tick(self, now):
        """Compare what has settled, advance background walks by a slice,
        start what the timers say is due."""
        if self.hasher.busy:
            self.collect()
        if self.mount_table is not None:
            self.check_mounts()
        self.tx_turn(now)
        # A short slice: the turn then commits and writes what it compared
        # (a change is visible only then) and reads the kernel's queue again.
        # 0.1 s here made p99 at 5,000 writes/s 320 ms; 0.02 s ~160 ms.
        self.flush_due(budget=FLUSH_SLICE)
        self.tx_finish()
        end = time.monotonic() + 0.1
        while self.scans and time.monotonic() < end:
            try:
                next(self.scans[0])
            except StopIteration:
                self.scans.popleft()
            if len(self.pending) > 1000:     # let the settle queue drain first
                break
        now = time.monotonic()
        t = self.timers
        while self.recheck and self.recheck[0][0] <= now:
            self.scans.append(self.walk(self.recheck.popleft()[1], "quick", "scan"))
        if now >= t["roots"]:
            self.check_missing_roots()
            t["roots"] = now + ROOT_RETRY_EVERY
        if now >= t["poll"]:
            # Subtrees left without watches (the limit) are scanned instead.
            for top in sorted(self.unwatched):
                if not any(top.startswith(o + "/") for o in self.unwatched):
                    self.scans.append(self.walk(top, "quick", "scan"))
            if self.leftovers:
                self.check_leftovers()
            t["poll"] = now + self.cfg.poll_interval
        if len(self.pending) <= 1000 and not self.scans:
            self._verify_slice(now)
        if t["scan"] is not None and now >= t["scan"]:
            if self.verifier is None:        # one at a time; a late one is not doubled
                self.verifier = self._verification()
                self.verify_resume = now
            t["scan"] = now + self.cfg.scan_interval

    # -- settling --
    def next_due(self):
        return self.due[0][0] if self.due else None

    def flush_due(self, budget=FLUSH_SLICE, force=False):
        """Compare every path whose settle window has passed (at most budget s)."""
        end = time.monotonic() + budget
        due, pending = self.due, self.pending
        n = 0
        # A heap ordered by deadline: a path re-armed by a later write goes
        # back in at its new deadline and never holds up the ones behind it.
        while due:
            now = time.monotonic()
            t, p = due[0]
            if not force and t > now:
                break
            heapq.heappop(due)
            ent = pending.get(p)
            if ent is None:
                continue
            if ent[0] > now and not force:
                heapq.heappush(due, (ent[0], p))    # re-armed by a later event
                continue
            if self.defer_for_dpkg(p, now, ent[1]) and not force:
                ent[0] = now + 2.0
                heapq.heappush(due, (ent[0], p))
                continue
            del pending[p]
            try:
                self.flush(p)
            except Exception as e:
                self.internal_error(esc(p), e)
            n += 1
            if n % 32 == 0 and time.monotonic() > end and not force:
                break
        if force:
            self.finish_hashing(max(1.0, end - time.monotonic()))
        return n

    def defer_for_dpkg(self, p, now, first=None):
        """A change under the package prefixes first seen (first: monotonic)
        while a package transaction runs waits, up to 30 minutes, for it to
        end: then it is verified against the database as dpkg left it. One
        first seen before the transaction started is not the transaction's."""
        if self.pkgtx is None or (self.pkgtx.tx is None and not self.tx_closing):
            return False                 # no transaction to hold it for (the usual case)
        if not self.tx_holds(p):
            return False
        if first is None:
            first = now
        for tx in self.tx_closing:
            if p in tx.paths:
                return bool(tx.deb_wait)
            if tx.start_mono <= first <= tx.ended:    # settled after the end
                tx.paths[p] = None
                return bool(tx.deb_wait)
        tx = self.pkgtx.tx
        if tx is None or first < tx.start_mono:
            return False
        if p not in tx.paths:
            tx.paths[p] = self.pkgdb.lookup(p)
        return now - tx.start_mono < TX_MAX_HOLD

    def tx_holds(self, p):
        """Is a change to p first seen during a transaction held for it: under
        the package prefixes or dpkg's directory, or elsewhere unless critical
        there (a maintainer script writes /var/www/html too; an SSH key or a
        crontab is never held back)."""
        if package_managed(p, self.pkgdb):
            return True
        return self.cfg.severity_for(p) != "critical" and not self.written_outside_tx(p)

    def written_outside_tx(self, p):
        """Did fanotify name a live writer of p whose parents, read up to
        pid 1, include no process that holds (or held) dpkg's lock for a
        transaction (a web server's worker dropping a file while apt runs)?
        Then its change is not the transaction's and is not held back. A
        writer gone, or a parent gone, cannot tell: held, as with inotify."""
        w = self.backend.peek_writer(p)
        if not w or w.get("confidence") != "live":
            return False
        txs = [self.pkgtx.tx] + list(self.tx_closing)
        holders = {t.holder.get("pid") for t in txs if t is not None and t.holder} - {None}
        if not holders:                  # an OFD lock, another pid namespace: unknown
            return False
        pid = w.get("pid")
        for _ in range(64):
            if pid in holders:
                return False
            if not isinstance(pid, int) or pid <= 1:
                return True
            try:
                pid = _proc_status(pid)[0]
            except (OSError, ValueError):
                return False
        return False

    def tx_turn(self, now):
        """A transaction that ended: its held changes are compared now; once
        none of them waits any more, its digest goes out."""
        if self.pkgtx is None:
            return
        now = time.monotonic()
        ended = self.pkgtx.poll(now)
        if ended is None:
            return
        # What the watched trees queued before the lock was released is read
        # now, or a file written last could miss its transaction.
        self.read_events()
        ended.ended = time.monotonic()
        self.tx_closing.append(ended)
        self.check_missing_roots(ended)
        self.read_debs_ahead(ended)
        if not ended.deb_wait:
            self.release_held(ended)
        for p, ent in self.pending.items():   # seen, not settled yet: the digest waits
            if ent[1] >= ended.start_mono and self.tx_holds(p):
                ended.paths.setdefault(p, None)

    def release_held(self, tx):
        """The changes tx held: compared now."""
        now = time.monotonic()
        for p in tx.paths:
            ent = self.pending.get(p)
            if ent is not None:
                ent[0] = now
                heapq.heappush(self.due, (now, p))

    def read_debs_ahead(self, tx):
        """The .debs of the packages owning files tx changed are read by the
        Hasher threads (an 8.7 MB .deb takes ~1.2 s), not on the loop, before
        its held changes are compared; PackageDB.check then finds their
        sha256s pinned. A .deb that fails to read is read again by check()."""
        db = self.pkgdb
        want = set()
        for p in tx.paths:
            hit = db.lookup(p, resolve=False)        # files have an md5 (or will)
            for i in range(0, len(hit or ()), 2):
                ver = db.versions.get(hit[i])
                if hit[i + 1] is not None and ver and (hit[i], ver) not in db.deb_pinned:
                    want.add((hit[i], ver))
        for pkg, ver in sorted(want):
            tx.deb_wait.add((pkg, ver))
            self.hasher.submit(("deb", pkg, ver, tx), db._read_deb, pkg, ver)

    def _deb_read(self, tag, res, err):
        _, pkg, ver, tx = tag
        if err is None:
            self.pkgdb.deb_pinned[(pkg, ver)] = res
        tx.deb_wait.discard((pkg, ver))
        if not tx.deb_wait and tx in self.tx_closing:
            self.release_held(tx)

    def tx_finish(self):
        while self.tx_closing and not self.tx_closing[0].walks and \
                not self.tx_closing[0].deb_wait and \
                not any(p in self.pending for p in self.tx_closing[0].paths):
            tx = self.tx_closing.pop(0)
            crit = [p for p in tx.paths if self.cfg.severity_for(p) == "critical"]
            self.emit_cb(tx.digest(self.cfg.hostname, set(esc(p) for p in crit),
                                   md5sums_digests(self.pkgdb.info_dir),
                                   apt_sources(tx.changed_packages(),
                                               tmpdir=self.cfg.state_dir)))
        if not self.tx_closing and self.pkgdb is not None:
            self.pkgdb.deb_pinned.clear()

    def flush(self, p):
        src = self.moves.pop(p, None)
        if src is not None and src not in self.pending:
            if self.try_move(src, p):
                self.fresh.pop(p, None)
                return
            self.flush_path(src)
        self.flush_path(p)

    def try_move(self, src, dst):
        store = self.store
        old_src = store.get(src)
        try:
            if old_src is None or store.get(dst) is not None or os.path.lexists(src):
                return False
            new = snapshot(dst, self.cfg.hash_max_size)
        except OSError:                  # e.g. a name beyond PATH_MAX
            return False
        if new is None or new.kind != old_src.kind or \
                (new.kind == "file" and new.sha256 != old_src.sha256):
            return False
        content = store.get_content(src)
        store.delete(src)
        store.put(dst, new)
        if content is not None:
            store.put_content(dst, content)
        ch = compare(old_src, new)
        self.emit_change("moved", dst, "realtime", old_src, new, ch[1] if ch else [],
                         moved_from=src)
        return True

    def flush_path(self, p):
        ent = self.fresh.pop(p, None)
        try:
            old = self.store.get(p)
            st = None
            if ent is not None and old is None:
                try:
                    st = lstat_deep(p)           # visit() looks with this lstat
                except OSError:
                    self.report_transient(p, ent)
                    return
            self.visit(p, old, "realtime", "full", st=st)
        except OSError as e:
            self.report_unreadable(p, e)



# ---------------------------------------------------------------------------
# Pipeline 3 of 3: alert sinks, 1: local (events file, syslog)
#
# events_file, syslog and the journal are local and cheap: they get an event
# once it is committed (the events file is written once per loop turn).
# email and webhooks are Channels: every event they want is first put
# in the durable spool (SQLite), then a worker thread per channel delivers it,
# batching bursts into digests, retrying with backoff. A dead or slow channel
# therefore never stalls detection and survives kill -9.
# ---------------------------------------------------------------------------

def logfmt_value(v):
    s = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) \
        if isinstance(v, (dict, list)) else str(v)
    s = esc(s)
    if s == "" or any(c in s for c in ' ="'):
        return '"' + s.replace('"', '\\"') + '"'
    return s


META_KEYS = ("capability", "acl", "flags", "xattrs", "rdev", "links")


def syslog_message(ev):
    """`<severity> <event> <path> key=value ...` (SPEC's syslog line)."""
    parts = [ev["severity"], ev["event"], logfmt_value(ev.get("path") or "-")]
    kv = [("summary", ev.get("summary")), ("detected", ev.get("detected"))]
    for k in ("kind", "from", "size", "mode", "owner", "group", "target", "sha256") + META_KEYS:
        if k in ev:
            kv.append((k, ev[k]))
    if change_list(ev):
        kv.append(("changes", ",".join(change_list(ev))))
    prev = ev.get("previous") or {}
    for k in ("size", "mode", "owner", "group", "target", "sha256") + META_KEYS:
        if k in prev and prev.get(k) != ev.get(k):
            kv.append(("prev_" + k, prev[k]))
    pkg = ev.get("package")
    if pkg:
        kv.append(("package", pkg["name"]))
        kv.append(("package_verified", "yes" if pkg["verified"] else "no"))
    if ev.get("users"):
        kv.append(("users", ",".join(ev["users"])))
    for k in ("count", "message", "gap_seconds"):
        if k in ev:
            kv.append((k, ev[k]))
    kv.append(("id", ev["id"]))
    kv.append(("sequence", ev.get("sequence")))
    return " ".join(parts + ["%s=%s" % (k, logfmt_value(v)) for k, v in kv if v is not None])


CHAIN_ZERO = "0" * 64       # chain_prev of the very first line


def line_hash(raw):
    """The chain hash of one events-file line (its bytes, without the newline)."""
    return hashlib.sha256(raw).hexdigest()


def chain_line(line, n, prev):
    """The events-file form of an event line: the event, then chain_n (its
    place in the chain: 1, 2, ...) and chain_prev (line_hash of the line
    before it), so removing, editing or reordering a line breaks the chain."""
    return '%s, "chain_n": %d, "chain_prev": "%s"}' % (line[:-1], n, prev)


def last_line_head(fd, size, window=1 << 16):
    """(chain_n, hash) of the last complete chained line of an open events
    file, or None: what another process (or we, before a kill -9) wrote
    after the head the database knows."""
    if size <= 0:
        return None
    data = os.pread(fd, min(size, window), max(0, size - window))
    if not data.endswith(b"\n"):
        return None
    raw = data[:-1].rsplit(b"\n", 1)[-1]
    m = re.search(rb'"chain_n": (\d+), "chain_prev": "[0-9a-f]{64}"}$', raw)
    return (int(m.group(1)), line_hash(raw)) if m else None


def read_tail(path, window):
    """The last window bytes of path, or None. Only a regular file is read:
    opened O_NONBLOCK and O_NOFOLLOW, so a FIFO or a device someone put
    there is never waited on or read for ever, and a symlink not followed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        return os.pread(fd, min(st.st_size, window), max(0, st.st_size - window))
    except OSError:
        return None
    finally:
        os.close(fd)


def last_sequence_in(path, window=1 << 16):
    """The `sequence` of the last line of an events file, or 0."""
    data = read_tail(path, window)
    found = re.findall(rb'"sequence": (\d+)', data or b"")
    return int(found[-1]) if found else 0


# the ECS (Elastic Common Schema) form of an event: [log] format = ecs and the
# `ecs` webhook format. Field names and types follow ECS's generated field
# table (tests/ecs_fields.json says which version); event.action uses the
# words of Auditbeat's file_integrity module; fimwatch's own fields that ECS
# has no name for live under `fimwatch.`.
ECS_VERSION = "8.11.0"
ECS_ACTION = {"created": "created", "modified": "updated", "attributes": "attributes_modified",
              "deleted": "deleted", "moved": "moved"}
ECS_TYPE = {"created": "creation", "modified": "change", "attributes": "change",
            "deleted": "deletion", "moved": "change", "started": "start", "stopped": "end"}
ECS_MAX_LINE = 8000          # bytes; an ECS line stays under 8 KiB (chain fields included)
_ECS_FILE = (("size", "size"), ("mode", "mode"), ("owner", "owner"), ("group", "group"),
             ("sha256", "hash.sha256"), ("target", "target_path"))


def _ecs_file(ev):
    f = {"path": ev["path"], "name": os.path.basename(ev["path"]),
         "directory": os.path.dirname(ev["path"]), "type": ev.get("kind", "file")}
    for ours, theirs in _ECS_FILE:
        if ours in ev:
            f[theirs] = ev[ours]
    for k in ("uid", "gid"):
        if k in ev:
            f[k] = str(ev[k])           # keyword in ECS
    if "mtime" in ev:
        f["mtime"] = ev["mtime"]
    return f


def _ecs_extras(ev):
    """fimwatch's fields without an ECS name (previous, changes, diff...)."""
    skip = {"id", "sequence", "host_id", "time", "host", "event", "severity", "message",
            "path", "kind", "process", "users", "package"} | {k for k, _ in _ECS_FILE} \
        | {"uid", "gid", "mtime"}
    return {k: v for k, v in ev.items() if k not in skip}


def ecs_event(ev):
    """The ECS document of an event (a new dict; ev is not changed)."""
    is_file = ev["event"] in ECS_ACTION
    doc = {"@timestamp": ev["time"], "message": syslog_message(ev),
           "ecs": {"version": ECS_VERSION},
           "event": {"id": ev["id"], "sequence": ev.get("sequence"),
                     "kind": "state" if ev["event"] == "heartbeat" else "event",
                     "category": ["file"] if is_file else ["host"],
                     "type": [ECS_TYPE.get(ev["event"], "info")],
                     "action": ECS_ACTION.get(ev["event"], ev["event"]),
                     "severity": SYSLOG_PRI.get(ev["severity"], 6),
                     "module": "fimwatch", "dataset": "fimwatch.events"},
           "log": {"level": ev["severity"]},
           "host": {"name": ev.get("host", ""), "id": ev.get("host_id", "")},
           "fimwatch": _ecs_extras(ev)}
    if is_file:
        doc["file"] = _ecs_file(ev)
    proc = ev.get("process")
    if isinstance(proc, dict):
        doc["process"] = {k: proc[o] for o, k in (("pid", "pid"), ("exe", "executable"),
                                                  ("cmdline", "command_line")) if o in proc}
        if proc.get("user"):
            doc["user"] = {"name": proc["user"]}
    if ev.get("users"):
        doc["related"] = {"user": list(ev["users"])}
    if isinstance(ev.get("package"), dict) and ev["package"].get("name"):
        doc["package"] = {"name": ev["package"]["name"]}
    return doc


def ecs_line(ev, limit=ECS_MAX_LINE):
    """The ECS document as one JSON line under `limit` bytes: a long diff
    (then any long text field of fimwatch.*) is cut, with a marker."""
    doc = ecs_event(ev)
    line = event_json(doc)
    over = len(line.encode("utf-8", "surrogateescape")) - limit
    if over <= 0:
        return line
    extra = doc["fimwatch"]
    for k in ["diff"] + sorted(extra, key=lambda k: -len(json.dumps(extra[k]))):
        if over <= 0:
            break
        text = extra.get(k)
        text = text if isinstance(text, str) else json.dumps(text, ensure_ascii=False)
        keep = max(0, len(text) - over - 64)
        extra[k] = text[:keep] + "\n[cut by fimwatch: %d characters more]" % (len(text) - keep)
        doc["fimwatch_cut"] = True
        line = event_json(doc)
        over = len(line.encode("utf-8", "surrogateescape")) - limit
    return line


class EventsFileSink:
    """[log] events_file: one JSON event per line, each chained to the one
    before it (chain_n, chain_prev; `fimwatch verify-log`); reopened when
    logrotate moves it away. The chain head is kept in the database
    (Store.chain_locked), so several writing processes and a rotation
    continue one chain. A line that cannot be written (a full disk) is kept,
    in order, and written at a later flush: every line once, none torn for
    good (a partly written line is written again whole, same chain place)."""
    name = "events_file"
    MAX_PENDING = 100000
    WRITE_BATCH = 1000         # lines per write(2)

    def __init__(self, path, store=None, fmt="fimwatch"):
        self.path = path
        self.store = store
        self.fmt = fmt
        self.key = "chain:" + path
        self.head = None           # (n, hash) of the last line we wrote
        self.f = None
        self.checked = 0.0
        self.dirty = False
        self.pending = deque()     # event lines (str) not yet written
        self.cur = None            # (bytes, n, hash) of the line being written
        self.off = 0               # bytes of cur already in the file
        self.error = None
        self.dropped = 0

    def wants(self, ev):
        return True

    def _open(self):
        d = os.path.dirname(self.path)
        if not os.path.isdir(d):
            os.makedirs(d, mode=0o750, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                     | os.O_NOFOLLOW, 0o640)
        # A crash or a full disk can leave a torn last line: end it, so the
        # next event (often the one saying we were gone) stays readable.
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                os.write(fd, b"\n")
        except OSError:
            pass
        self.off = 0               # a torn line is written again whole
        self.f = os.fdopen(fd, "a", encoding="utf-8")

    def send(self, ev, line):
        now = time.monotonic()
        if self.f is not None and now - self.checked > 1.0:
            self.checked = now
            try:
                if os.stat(self.path).st_ino != os.fstat(self.f.fileno()).st_ino:
                    self.close()
            except OSError:
                self.close()
        if len(self.pending) >= self.MAX_PENDING:
            self.pending.popleft()
            self.dropped += 1
        self.pending.append(ecs_line(ev, ECS_MAX_LINE - 120) if self.fmt == "ecs" else line)
        self.dirty = True

    def _start(self, head):
        """The chain head to continue: the latest of the database's, ours and
        the file's own last line (by chain_n)."""
        fd = self.f.fileno()
        try:
            tail = last_line_head(fd, os.fstat(fd).st_size)
        except OSError:
            tail = None
        best = max((h for h in (head, self.head, tail) if h), default=(0, CHAIN_ZERO))
        return best

    def _write(self, head):
        """Write what is pending after head; returns the new head. An OSError
        stops it (kept in self._err); what was written whole counts."""
        n, h = self._start(head)
        fd = self.f.fileno()
        try:
            while self.pending or self.cur:
                if self.cur is None or self.cur[1] != n + 1:
                    if self.off:           # a fragment, now out of turn: end it
                        os.write(fd, b"\n")
                    self.cur, self.off = self._chained(self.pending[0], n, h), 0
                # the rest of cur and the lines after it, chained on, in one write
                batch = [self.cur]
                for text in itertools.islice(self.pending, 1, self.WRITE_BATCH):
                    batch.append(self._chained(text, batch[-1][1], batch[-1][2]))
                k = self.off + os.write(fd, b"".join([b[0] + b"\n" for b in batch])[self.off:])
                for line in batch:
                    if k <= len(line[0]):  # a short write: the rest at the next turn
                        self.cur, self.off = line, k
                        break
                    k -= len(line[0]) + 1
                    n, h = line[1], line[2]
                    self.pending.popleft()
                    self.cur, self.off = None, 0
        except OSError as e:
            self._err = e
        self.head = (n, h)
        return self.head

    @staticmethod
    def _chained(text, n, h):
        """(bytes, chain_n, hash) of the pending line text placed after (n, h)."""
        raw = chain_line(text, n + 1, h).encode("utf-8", "surrogateescape")
        return raw, n + 1, line_hash(raw)

    def flush(self):
        """Once per main-loop turn (and at close), not once per event."""
        if not self.pending:
            return
        self._err = None
        try:
            if self.f is None:
                self._open()
            if self.store is not None:
                self.store.chain_locked(self.key, self._write)
            else:
                self._write(None)
        except OSError as e:
            self._err = e
        if self._err is not None:
            self._failed(self._err)
            return
        self.dirty = False
        if self.error is not None:
            self.error = None
            sys.stderr.write("fimwatch: events_file: %s: writing again%s\n" % (
                esc(self.path), "; %d line(s) were dropped (more than %d waited)"
                % (self.dropped, self.MAX_PENDING) if self.dropped else ""))
            self.dropped = 0

    def _failed(self, e):
        if self.error is None:
            self.error = e
            sys.stderr.write("fimwatch: events_file: %s: %s; %d line(s) kept in memory "
                             "and written when it works again\n"
                             % (esc(self.path), e.strerror or e, len(self.pending)))

    def close(self):
        self.flush()
        if self.f is not None:
            try:
                self.f.close()
            except OSError:
                pass
            self.f = None


def _sd_value(v):
    """An RFC 5424 PARAM-VALUE: '"', '\\' and ']' escaped (section 6.3.3)."""
    return esc(str(v)).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def rfc5424_packet(ev, pri, pid):
    """`<PRI>1 TIME HOST fimwatch PID EVENT [fimwatch@32473 id= sequence=
    host_id= severity= path=] MESSAGE`: the structured data is what a
    collector indexes without parsing the message."""
    sd = " ".join('%s="%s"' % (k, _sd_value(ev[k])) for k in
                  ("id", "sequence", "host_id", "severity", "detected", "path") if k in ev)
    host = re.sub(r"[^!-~]", "", ev.get("host") or "")[:255] or "-"
    msgid = re.sub(r"[^!-~]", "", ev["event"])[:32] or "-"
    head = "<%d>1 %s %s fimwatch %d %s [%s %s] " % (pri, ev["time"], host, pid, msgid, SD_ID, sd)
    return head.encode("utf-8", "replace") + syslog_message(ev).encode("utf-8", "replace")


class _DatagramSink:
    """A local sink that sends one datagram per event on a socket of its
    own: reconnected once when the send fails (a restarted syslog daemon),
    then the error goes to the Dispatcher, which counts it."""
    sock = None

    def wants(self, ev):
        return SEV_RANK.get(ev["severity"], 0) >= self.min_rank

    def _send(self, data):
        for attempt in (1, 2):
            try:
                if self.sock is None:
                    self._connect()
                self.sock.send(data)
                return
            except OSError:
                self.close()
                if attempt == 2:
                    raise

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class JournalSink(_DatagramSink):
    """[journal]: the journald native protocol (systemd's
    /run/systemd/journal/socket): MESSAGE (the syslog line), PRIORITY,
    MESSAGE_ID (one per event type) and FIMWATCH_* fields, so `journalctl -o
    json` and journal-upload/remote carry every field, not only the text."""
    name = "journal"
    MAX = 200 * 1024             # below the socket's default datagram limit

    def __init__(self, path, facility, min_severity):
        self.path, self.facility = path, FACILITIES[facility]
        self.min_rank = SEV_RANK[min_severity]

    def _connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.settimeout(1.0)
        s.connect(self.path)
        self.sock = s

    def send(self, ev, line):
        self._send(journal_packet(ev, line, self.facility))


def message_id(event):
    """The journal MESSAGE_ID of an event type: 128 bits, the same on every host."""
    import uuid
    return uuid.uuid5(uuid.NAMESPACE_URL, "https://fimwatch/event/" + event).hex


def journal_packet(ev, line, facility):
    """The native protocol: KEY\\n, 64-bit little-endian length, value, \\n for
    every field (safe for any bytes). Scalar event fields become FIMWATCH_KEY;
    FIMWATCH_JSON holds the whole event."""
    fields = [("MESSAGE", syslog_message(ev)), ("PRIORITY", SYSLOG_PRI.get(ev["severity"], 6)),
              ("SYSLOG_FACILITY", facility), ("SYSLOG_IDENTIFIER", "fimwatch"),
              ("MESSAGE_ID", message_id(ev["event"]))]
    for k, v in ev.items():
        if isinstance(v, (str, int, float, bool)) and re.match(r"^[a-z][a-z0-9_]*$", k):
            fields.append(("FIMWATCH_" + k.upper(), v))
    if ev.get("changes"):
        fields.append(("FIMWATCH_CHANGES", ",".join(change_list(ev))))
    if len(line) < JournalSink.MAX // 2:
        fields.append(("FIMWATCH_JSON", line))
    out = bytearray()
    for k, v in fields:
        b = (v if isinstance(v, str) else json.dumps(v)).encode("utf-8", "surrogateescape")
        out += k.encode() + b"\n" + struct.pack("<Q", len(b)) + b + b"\n"
    return bytes(out)


class SyslogSink(_DatagramSink):
    """[syslog]: RFC 3164 lines to a unix datagram socket (/dev/log) or UDP."""
    name = "syslog"
    MAX = 4096

    def __init__(self, address, facility, min_severity, fmt="rfc3164"):
        self.address, self.facility = address, FACILITIES[facility]
        self.min_rank = SEV_RANK[min_severity]
        self.fmt = fmt
        self.pid = os.getpid()

    def _connect(self):
        if self.address.startswith("/"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            s.settimeout(1.0)
            s.connect(self.address)
            self.udp = False
        else:
            host, _, port = self.address.rpartition(":")
            host = host.strip("[]")
            info = socket.getaddrinfo(host, int(port), 0, socket.SOCK_DGRAM)[0]
            s = socket.socket(info[0], socket.SOCK_DGRAM)
            s.settimeout(1.0)
            s.connect(info[4])
            self.udp = True
        self.sock = s

    def packet(self, ev):
        pri = self.facility * 8 + SYSLOG_PRI.get(ev["severity"], 6)
        if self.fmt == "rfc5424":
            return rfc5424_packet(ev, pri, self.pid)
        stamp = time.strftime("%b %d %H:%M:%S", time.localtime(event_epoch(ev)))
        host = (" " + ev.get("host", "")) if self.address[:1] != "/" else ""
        return ("<%d>%s%s fimwatch[%d]: %s" % (pri, stamp, host, self.pid,
                                               syslog_message(ev))).encode("utf-8", "replace")

    def send(self, ev, line=None):
        data = self.packet(ev)
        if len(data) > self.MAX:
            data = data[:self.MAX - 3] + b"..."
        self._send(data)


# ---------------------------------------------------------------------------
# Alert sinks, 2: messages for humans (summary, email text, digests)
# ---------------------------------------------------------------------------


def event_summary(ev):
    """One line: 'CRITICAL modified /etc/passwd (content, mode)'."""
    s = "%s %s %s" % (ev["severity"].upper(), ev["event"], ev.get("path") or "")
    if ev.get("from"):
        s += " (from %s)" % ev["from"]
    if change_list(ev):
        s += " (%s)" % ", ".join(change_list(ev))
    if ev.get("message") and not ev.get("path"):
        s += " " + ev["message"]
    return s.strip()


def event_subject(ev):
    """SPEC's subject; with a summary, the summary says what happened (a
    change's path stays first, a digest's summary replaces 'N changes')."""
    if ev["event"] == "digest" and ev.get("summary"):
        s = "[fimwatch] %s %s on %s (%d files)" % (ev["severity"].upper(), ev["summary"],
                                                   ev["host"], ev.get("count", 0))
    elif ev["event"] == "digest":
        s = "[fimwatch] %s %d changes on %s" % (ev["severity"].upper(), ev.get("count", 0),
                                                  ev["host"])
    elif ev.get("path"):
        s = "[fimwatch] %s %s %s on %s" % (ev["severity"].upper(), ev["event"], ev["path"],
                                           ev["host"])
        if ev.get("summary"):
            s += ": " + ev["summary"]
    else:
        s = "[fimwatch] %s %s on %s" % (ev["severity"].upper(), ev["event"], ev["host"])
    # The fields are escaped already (esc); only a control character that got
    # in some other way is escaped here, so backslashes are not doubled.
    s = "".join(esc(c) if not c.isprintable() else c for c in s)
    return s if len(s) <= 160 else s[:157] + "..."


def _cell(v):
    """A before/after cell of event_text: an xattrs map as name=hash, ..."""
    if isinstance(v, dict):
        return ", ".join("%s=%s" % (esc(k), x) for k, x in v.items()) or "(none)"
    return "(none)" if v == "" else v


def event_text(ev):
    """The body a tired admin reads at 2 AM."""
    out = _digest_text(ev) if ev["event"] == "digest" else _change_text(ev)
    if ev.get("dropped"):
        out += ["", "NOTE: %d older alert(s) could not be delivered for 7 days and were "
                "dropped (see fimwatch status)." % ev["dropped"]]
    out += ["", "-- fimwatch %s on %s, event id %s" % (__version__, ev["host"], ev["id"])]
    return "\n".join(out) + "\n"


def _local_time(ev):
    return ev.get("time", "")[:19].replace("T", " ")


def three_lines(ev, head=None):
    """What happened, who, what now: the first lines of every email (head:
    what happened, when there is no summary)."""
    if ev.get("summary"):
        what = "%s on %s: %s" % (ev["severity"].upper(), ev["host"], ev["summary"])
        if ev.get("reason") and ev["reason"] != CHANGE_TOGETHER:    # why one digest
            what += " (%s)" % ev["reason"]
    elif ev["event"] == "digest":
        what = "%s: %d changes on %s%s." % (ev["severity"].upper(), ev.get("count", 0),
                                            ev["host"], " (" + ev["reason"] + ")"
                                            if ev.get("reason") else "")
    else:
        what = head or "%s: %s on %s." % (ev["severity"].upper(), ev["event"], ev["host"])
    who = [process_phrase(ev["process"])] if isinstance(ev.get("process"), dict) else []
    if ev.get("users"):
        who.append("logged in: " + ", ".join(ev["users"]))
    who = "Who:  " + ("; ".join(who) if who else "not known (nobody was logged in)")
    now = "Next: expected (you, a deploy, an upgrade)? Nothing to do: fimwatch already " \
          "keeps the new state. If not, see below."
    return [what, who, now]


def process_phrase(p):
    """Who wrote, in words: "alice (session 4) ran /usr/bin/vim as root
    (pid 812, seen live)"; the program is the script for a #! run."""
    prog = p.get("script") or p.get("exe") or p.get("comm") or "an unknown program"
    login, user = p.get("login_user"), p.get("user")
    if login:
        sess = " (session %s)" % p["session"] if p.get("session") is not None else ""
        text = "%s%s ran %s" % (login, sess, prog)
    else:
        text = "process %s" % prog
    if user and user != login:
        text += " as %s" % user
    text += " (pid %s" % p.get("pid", "?")
    if p.get("confidence") and p["confidence"] != "live":
        text += ", %s" % {"cached": "named from its exec, it had exited",
                          "none": "not named"}.get(p["confidence"], p["confidence"])
    return text + ")"


def _digest_text(ev):
    if ev.get("reason") == CHANGE_TOGETHER:
        return _together_text(ev)
    out = three_lines(ev) + [""]
    if ev.get("by_severity"):
        out.append("By severity: " + ", ".join("%s %d" % kv for kv in ev["by_severity"].items()))
    if ev.get("by_directory"):
        out.append("By directory:")
        out += ["  %6d  %s" % (n, d) for d, n in ev["by_directory"].items()]
    shown = len(ev["events"])
    out += ["", "Changes%s:" % (" (first %d)" % shown if shown < ev.get("count", 0) else "")]
    out += ["  %s  %s" % (_local_time(e), event_summary(e)) for e in ev["events"]]
    out += ["", "All events: fimwatch events --since 24h   (or the events_file log)",
            "To leave a note that you checked them: fimwatch accept"]
    return out


CHANGE_TOGETHER = "changes made together"


def _together_text(ev):
    """One change that touched several files (useradd: passwd, shadow, group,
    gshadow and their backups): the summary, then the files, then diffs."""
    out = three_lines(ev) + ["", "When:      %s UTC (detected: %s)" % (
        _local_time(ev), ev.get("detected"))]
    out += ["", "Files changed together (%d):" % ev.get("count", 0)]
    for e in ev["events"]:
        line = "  %-8s %s%s" % (e["event"], e.get("path"),
                                "  (backup)" if backup_base(e.get("path") or "") else "")
        out.append(line + ("  - " + e["summary"] if e.get("summary") else ""))
    for e in [e for e in ev["events"] if e.get("diff") and not backup_base(e["path"])][:5]:
        out += ["", "Diff of %s:" % e["path"], e["diff"].rstrip("\n")]
    return out + _advice(ev["events"][0], "")


_WHAT_HAPPENED = {"created": "was created", "modified": "was modified",
                  "attributes": "had its attributes changed", "deleted": "was deleted"}


def _change_text(ev):
    what = _WHAT_HAPPENED.get(ev["event"])
    if ev["event"] == "moved":
        what = "was moved here from %s" % ev.get("from")
    sev = ev["severity"].upper()
    if what and ev.get("path"):
        out = ["%s: %s %s on %s." % (sev, ev["path"], what, ev["host"])]
    else:
        out = ["%s: %s on %s." % (sev, ev["event"], ev["host"])]
    if ev.get("path"):
        out = three_lines(ev, out[0]) + ([""] + out if ev.get("summary") else [])
    if ev.get("message"):
        out.append(ev["message"])
    out += ["", "When:      %s UTC (detected: %s)" % (_local_time(ev), ev.get("detected"))]
    if change_list(ev):
        out.append("Changed:   %s" % ", ".join(change_list(ev)))
    out += _before_after(ev) + _context_lines(ev)
    if ev.get("diff"):
        out += ["", "Diff:", ev["diff"].rstrip("\n")]
    return out + _advice(ev)


def before_after_rows(ev):
    """[(field, before, after)] of the fields that an event has."""
    prev = ev.get("previous") or {}
    if not ev.get("path"):
        return []
    return [(k, _cell(prev.get(k, "-")) if ev["event"] != "created" else "-",
             _cell(ev.get(k, "-")))
            for k in ("size", "mode", "owner", "group", "target", "sha256") + META_KEYS
            if k in ev or k in prev]


def _before_after(ev):
    """The table of the fields that an event has, before and after."""
    rows = before_after_rows(ev)
    if not rows:
        return []
    return ["", "            %-34s %s" % ("before", "after")] + \
        ["  %-9s %-34s %s" % row for row in rows]


def _context_lines(ev):
    """Who was logged in, which process wrote it, which package owns it."""
    out = []
    if ev.get("users"):
        out += ["", "Logged in: %s" % ", ".join(ev["users"])]
    p = ev.get("process")
    if p:
        out.append("Process:   pid %s %s (%s)" % (p.get("pid"), p.get("exe", ""),
                                                 p.get("user", "")))
    p = ev.get("package")
    if p:
        out.append("Package:   %s (%s): %s" % (
            p["name"], p["manager"], "matches the package database" if p["verified"] else
            "a config file, edited" if p.get("config") else
            "does NOT match the package database"))
    return out


def _advice(ev, path=None):
    """What to do next, as README says it: no acknowledgement needed."""
    if not ev.get("path") or ev["event"] not in ("created", "modified", "attributes",
                                                  "deleted", "moved"):
        return []
    who = "who was logged in (above), " if ev.get("users") else ""
    if ev.get("process"):
        who = "the process (above), " + who
    path = ev["path"] if path is None else path
    return ["", "What to do:",
            "  - If you (or a deploy, or a package upgrade) made this change: nothing.",
            "    fimwatch has recorded the new state; to leave a note that you checked",
            "    it:  fimwatch accept%s" % (" " + path if path else ""),
            "  - If nobody expected it: look at %s`last`," % who,
            "    `journalctl --since '%s'`, and the file itself before touching it."
            % _local_time(ev)]
def change_key(ev):
    """Which change an event belongs to, for one message per change: the
    account databases of one directory and their backups together, a unit
    and its enablement link, the writes of one process, the files of one
    package, a file and the backups tools write beside it (passwd-,
    *.dpkg-old)."""
    p = ev.get("path") or ""
    if not p:
        return ("event", ev.get("id"))
    base = backup_base(p) or p
    d, name = os.path.split(base)
    if name in ACCOUNT_DBS:
        return ("accounts", d)
    if "/systemd/" in p and name.endswith(_UNIT_SUFFIXES):
        return ("unit", name)
    proc = ev.get("process") or {}
    if proc.get("pid"):
        return ("process", proc.get("pid"), proc.get("exe"))
    if (ev.get("package") or {}).get("name"):
        return ("package", ev["package"]["name"])
    return ("path", base)


def change_groups(pairs):
    """[(seq, event)] -> [[(seq, event), ...]] by change_key, first seen first."""
    groups = {}
    for seq, ev in pairs:
        groups.setdefault(change_key(ev), []).append((seq, ev))
    return list(groups.values())


def event_html(ev):
    """The HTML part beside the plain text, where a table helps: the before/
    after of one change, the files of one change made together. None where
    the plain text says it as well. Everything in it is in the plain text.
    Only alerts with a summary (what a change means) get one: the rest stay
    the single text/plain part they always were."""
    if not ev.get("summary"):
        return None
    import html
    e = html.escape
    rows = []
    if ev["event"] == "digest" and ev.get("reason") == CHANGE_TOGETHER:
        head = ("event", "file", "what it means")
        rows = [(x["event"], x.get("path", "") + (" (backup)" if backup_base(
            x.get("path") or "") else ""), x.get("summary", "")) for x in ev["events"]]
    elif ev["event"] != "digest" and ev.get("path"):
        head = ("", "before", "after")
        rows = before_after_rows(ev)
    if not rows:
        return None
    top = "".join("<p>%s</p>" % (("<b>%s</b>" if i == 0 else "%s") % e(ln))
                  for i, ln in enumerate(three_lines(ev)))
    table = "<table border=1 cellpadding=4 style='border-collapse:collapse'><tr>%s</tr>%s" \
        "</table>" % ("".join("<th>%s</th>" % e(h) for h in head),
                      "".join("<tr>%s</tr>" % "".join("<td>%s</td>" % e(str(c)) for c in r)
                              for r in rows))
    diffs = [x for x in (ev.get("events") or [ev]) if x.get("diff")][:5]
    pre = "".join("<pre>%s</pre>" % e(x["diff"]) for x in diffs)
    return "<html><body>%s%s%s<p>%s</p></body></html>" % (
        top, table, pre, e("-- fimwatch %s on %s, event id %s" % (__version__, ev["host"],
                                                                 ev["id"])))


def digest_listing(events, limit):
    """The events a digest lists: every critical one first (however many),
    then the rest by severity, highest first, each group in time order."""
    ranked = sorted(events, key=lambda e: -SEV_RANK.get(e.get("severity"), 0))
    crit = [e for e in ranked if e.get("severity") == "critical"]
    return crit + ranked[len(crit):max(len(crit), limit)]


def make_digest(events, host, reason="", limit=50, dropped=0):
    by_sev, by_dir = {}, {}
    for e in events:
        by_sev[e["severity"]] = by_sev.get(e["severity"], 0) + 1
        d = os.path.dirname(e.get("path") or "") or "-"
        by_dir[d] = by_dir.get(d, 0) + 1
    top = max((e["severity"] for e in events), key=lambda s: SEV_RANK.get(s, 0),
              default="info")
    dirs = dict(sorted(by_dir.items(), key=lambda kv: -kv[1])[:20])
    ev = new_event(host, "digest", top, "realtime", "", count=len(events), reason=reason,
                   by_severity={k: by_sev[k] for k in reversed(SEVERITIES) if k in by_sev},
                   by_directory=dirs, events=digest_listing(events, limit))
    # The same events make the same digest id, also when it is retried.
    import uuid
    ev["id"] = uuid.uuid5(uuid.NAMESPACE_OID, ",".join(sorted(e.get("id", "") for e in events))
                          ).hex
    if dropped:
        ev["dropped"] = dropped
    _digest_context(ev, events)
    return ev


def _digest_context(ev, events):
    """A digest's summary (what its changes mean together), the login
    sessions and the first known writing process."""
    summary = combined_summary(events)
    if summary:
        ev["summary"] = summary
        if any(e.get("detected") != "realtime" for e in events):
            ev["detected"] = events[0].get("detected")
    users = sorted({u for e in events for u in e.get("users") or ()})
    if users:
        ev["users"] = users
    proc = next((e["process"] for e in events if e.get("process")), None)
    if proc:
        ev["process"] = proc


def send_email(conf, ev, host, sendmail=None, timeout=60):
    from email.message import EmailMessage
    from email.utils import formatdate, make_msgid
    msg = EmailMessage()
    try:
        ahost = host.encode("idna").decode("ascii")
    except UnicodeError:
        ahost = re.sub(r"[^A-Za-z0-9.-]", "-", host.encode("ascii", "replace").decode())
    host = ahost or "localhost"
    msg["Subject"] = event_subject(ev)
    msg["From"] = conf["from"] or "fimwatch@%s" % host
    msg["To"] = ", ".join(conf["to"].replace(",", " ").split())
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid("fimwatch." + ev["id"][:12], domain=host)
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Fimwatch-Event"] = ev["id"]
    msg["X-Fimwatch-Severity"] = ev["severity"]
    msg.set_content(event_text(ev))
    html = event_html(ev)
    if html:
        msg.add_alternative(html, subtype="html")
    prog = sendmail or conf["sendmail"]
    cmd = [prog, "-oi", "-t"]
    # Inside fimwatch.service's sandbox an MTA's sendmail cannot work (no
    # setuid, no capabilities): the unit names a relay that hands the message
    # to a socket-activated service running the real sendmail outside.
    relay = os.environ.get("FIMWATCH_SENDMAIL_RELAY")
    if relay:
        cmd = [relay] + cmd
    try:
        r = subprocess.run(cmd, input=msg.as_bytes(), capture_output=True,
                           timeout=timeout, close_fds=True)
    except FileNotFoundError:
        raise DeliveryError("sendmail program %s not found (install an MTA such as postfix, "
                            "exim4 or msmtp-mta, or set [email] sendmail)" % prog)
    except subprocess.TimeoutExpired:
        raise DeliveryError("%s timed out after %ds" % (prog, timeout))
    except OSError as e:
        raise DeliveryError("cannot run %s: %s" % (prog, e.strerror))
    if r.returncode != 0:
        err = (r.stderr or r.stdout or b"").decode("utf-8", "replace").strip().splitlines()
        raise DeliveryError("%s exited %d%s" % (prog, r.returncode,
                                                ": " + esc(err[-1])[:200] if err else ""))


def chat_text(ev):
    if ev["event"] == "digest":
        lines = ["*fimwatch*: %d changes on %s" % (ev.get("count", 0), ev["host"])]
        if ev.get("summary"):
            lines = ["*fimwatch* on %s: %s %s (%d files)" % (
                ev["host"], ev["severity"].upper(), ev["summary"], ev.get("count", 0))]
        lines += ["• " + event_summary(e) for e in ev["events"][:15]]
        if ev.get("count", 0) > 15:
            lines.append("… and %d more (fimwatch events --since 24h)" % (ev["count"] - 15))
        return "\n".join(lines)
    s = "*fimwatch* on %s: %s" % (ev["host"], event_summary(ev))
    if ev.get("summary"):
        s = "*fimwatch* on %s: %s %s\n%s" % (ev["host"], ev["severity"].upper(),
                                             ev["summary"], event_summary(ev))
    if ev.get("message") and ev.get("path"):
        s += "\n" + ev["message"]
    if ev.get("users"):
        s += "\nlogged in: " + ", ".join(ev["users"])
    if ev.get("package"):
        s += "\npackage %s: %s" % (ev["package"]["name"], "verified" if ev["package"]["verified"]
                                   else "config file, edited" if ev["package"].get("config")
                                   else "NOT verified")
    if ev.get("path") and ev["event"] in ("created", "modified", "attributes", "deleted", "moved"):
        s += "\nexpected? nothing to do (to note that you checked: `fimwatch accept %s`)" \
            % ev["path"]
    return s


_NTFY_PRIO = {"info": "2", "notice": "3", "warning": "4", "critical": "5"}


def webhook_body(fmt, ev):
    """(body bytes, content type, extra headers) for one webhook format."""
    if fmt == "json":
        return (json.dumps(ev, ensure_ascii=False).encode("utf-8"),
                "application/json", {})
    if fmt == "ecs":
        return ecs_line(ev).encode("utf-8", "surrogateescape"), "application/json", {}
    text = chat_text(ev)
    if fmt in ("slack", "mattermost"):
        body = {"text": text}
    elif fmt == "discord":
        body = {"content": text[:1990], "allowed_mentions": {"parse": []}}
    elif fmt == "teams":
        body = {"text": text.replace("\n", "  \n")}
    elif fmt == "gotify":
        body = {"title": event_subject(ev), "message": text,
                "priority": int(_NTFY_PRIO[ev["severity"]]) * 2}
    elif fmt == "ntfy":
        return (text.encode("utf-8"), "text/plain; charset=utf-8",
                {"Title": event_subject(ev).encode("ascii", "replace").decode(),
                 "Priority": _NTFY_PRIO.get(ev["severity"], "3"), "Tags": "warning"})
    else:
        raise AssertionError(fmt)
    return json.dumps(body, ensure_ascii=False).encode("utf-8"), "application/json", {}


_opener = None


def _http_opener():
    """An opener that does not follow redirects (a redirect could send the
    signed body somewhere else)."""
    global _opener
    if _opener is None:
        import urllib.request

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *a, **k):
                return None
        _opener = urllib.request.build_opener(NoRedirect)
    return _opener


def split_userinfo(url):
    """(url without user:password@, 'Basic ...' header value or None)."""
    import urllib.parse
    p = urllib.parse.urlsplit(url)
    if "@" not in p.netloc:
        return url, None
    userinfo, _, hostport = p.netloc.rpartition("@")
    user, _, pw = userinfo.partition(":")
    import base64
    cred = base64.b64encode(("%s:%s" % (urllib.parse.unquote(user),
                                        urllib.parse.unquote(pw))).encode()).decode()
    return urllib.parse.urlunsplit((p.scheme, hostport, p.path, p.query, p.fragment)), \
        "Basic " + cred


def _webhook_request(conf, ev):
    """The signed POST request of one event (credentials from the URL sent as
    Basic auth, never in the URL)."""
    import urllib.request
    body, ctype, headers = webhook_body(conf["format"], ev)
    url, auth = split_userinfo(conf["url"])
    req = urllib.request.Request(url, data=body, method="POST")
    headers = dict(headers, **{"Content-Type": ctype, "User-Agent": "fimwatch/" + __version__,
                               "X-Fimwatch-Event": ev["id"]})
    if auth:
        headers["Authorization"] = auth
    if conf["secret"]:
        sig = hmac.new(conf["secret"].encode(), body, hashlib.sha256).hexdigest()
        headers["X-Fimwatch-Signature"] = "sha256=" + sig
    for k, v in headers.items():
        req.add_header(k, v)
    return req


def send_webhook(conf, ev):
    import http.client
    import urllib.error
    where = redact_url(conf["url"])
    try:
        req = _webhook_request(conf, ev)
        with _http_opener().open(req, timeout=conf["timeout"]) as r:
            r.read(65536)
            if not 200 <= r.status < 300:
                raise DeliveryError("%s answered HTTP %d" % (where, r.status))
    except urllib.error.HTTPError as e:
        raise DeliveryError("%s answered HTTP %d" % (where, e.code))
    except urllib.error.URLError as e:
        reason = getattr(e.reason, "strerror", None) or type(e.reason).__name__
        if isinstance(e.reason, socket.timeout):
            reason = "timed out after %gs" % conf["timeout"]
        raise DeliveryError("%s: %s" % (where, esc(str(reason))[:200]))
    except (http.client.InvalidURL, ValueError):
        # The exception text would quote the URL, and the URL may hold a token.
        raise DeliveryError("%s: invalid URL" % where)
    except http.client.HTTPException as e:      # garbage answers, cut-off replies
        raise DeliveryError("%s: bad HTTP response (%s)" % (where, type(e).__name__))
    except socket.timeout:
        raise DeliveryError("%s: timed out after %gs" % (where, conf["timeout"]))
    except OSError as e:                         # resets, refused
        raise DeliveryError("%s: %s" % (where, esc(e.strerror or type(e).__name__)[:200]))


# ---------------------------------------------------------------------------
# Alert sinks, 3: channels (durable spool, email, webhooks) and the Dispatcher
# ---------------------------------------------------------------------------


_PUMP_LOCKS = {}


class Channel:
    """One email or webhook destination: spool + worker thread + digests."""

    GATHER = 1.0            # wait this long after the first event, to batch bursts
    BURST = 3               # more events than this in one batch -> one digest
    DIGEST_LIMIT = 50

    def __init__(self, kind, name, conf, cfg, store):
        self.kind, self.name, self.conf, self.cfg = kind, name, conf, cfg
        # send() runs in the main thread and writes through its connection;
        # the worker uses a connection of its own, so it never commits half
        # of the main thread's batch (a baseline row without its event).
        self.main_store = store
        self._wstore = None
        self._spooled = False
        store.on_commit.append(self._kick)
        self.id = kind if kind == "email" else "webhook:" + name
        self.min_rank = SEV_RANK[conf["min_severity"]]
        self.max_per_hour = conf.get("max_per_hour") or 0
        # Send times of the last hour, kept in the database so that a reload
        # or a restart does not hand out a fresh max_per_hour allowance.
        try:
            self.sent = deque(float(t) for t in json.loads(
                store.meta(self._meta_key("sent"), "[]") or "[]")
                if time.time() - float(t) < 3600)
        except (ValueError, TypeError):
            self.sent = deque()
        self.wake = threading.Event()
        self.stopping = False
        self.flush_now = False
        self.thread = None

    def wants(self, ev):
        if ev["event"] == "test":
            return True
        return SEV_RANK.get(ev["severity"], 0) >= self.min_rank

    def describe(self):
        if self.kind == "email":
            return "email to %s via %s" % (self.conf["to"], self.conf["sendmail"])
        return "webhook %s (%s, %s)" % (self.name, self.conf["format"],
                                        redact_url(self.conf["url"]))

    @property
    def store(self):
        if self._wstore is None:
            self._wstore = Store(self.cfg.state_dir, create=False)
            self._wstore.db = StateDB(self._wstore.db)    # a full disk must not kill it
        return self._wstore

    def deliver(self, ev):
        if self.kind == "email":
            send_email(self.conf, ev, self.cfg.hostname)
        else:
            send_webhook(self.conf, ev)

    # -- main thread side --
    def send(self, ev, line):
        """Spool the event (durable before any delivery attempt); the worker
        is woken once the main thread's batch is committed."""
        self.main_store.spool_add(self.id, line, time.time())
        self._spooled = True

    def _kick(self):
        if self._spooled:
            self._spooled = False
            self.wake.set()

    def start(self):
        self.thread = threading.Thread(target=self._run, name=self.id, daemon=True)
        self.thread.start()

    def close(self, deadline):
        self.stopping = self.flush_now = True
        if self._kick in self.main_store.on_commit:
            self.main_store.on_commit.remove(self._kick)
        self.wake.set()
        if self.thread is not None:
            self.thread.join(max(0.0, deadline - time.monotonic()))
            if self.thread.is_alive():
                return                   # still delivering: it closes its own store
        if self._wstore is not None:
            self._wstore.close()
            self._wstore = None

    # -- worker side --
    def _meta_key(self, what):
        return "chan:%s:%s" % (self.id, what)

    def _run(self):
        while True:
            try:
                delay = self.pump()
            except Exception as e:           # never let the worker die silently
                self._note_error("internal error: %s" % e)
                delay = 30.0
            if self.stopping:
                return
            self.wake.wait(delay)
            self.wake.clear()

    def pump(self, now=None):
        """Deliver what is due; returns seconds until there may be more work.
        One pump per channel id at a time, also across a reload (the old
        worker may still be in a slow delivery): no alert goes out twice."""
        lock = _PUMP_LOCKS.setdefault(self.id, threading.Lock())
        with lock:
            return self._pump(now or time.time())

    def _pump(self, now):
        store = self.store
        db = store.db
        if isinstance(db, StateDB) and db.failing() and not db.retry():
            # Our last writes (a delivered row's delete) are held: deliver
            # nothing until they are recorded, or the row would go out again.
            return max(0.5, db.next_try - time.monotonic())
        self._expire(now)
        rows, nxt = store.spool_due(self.id, now)
        idle = max(0.2, min((nxt - now) if nxt else 60.0, 60.0))
        if not rows:
            return idle
        wait = self._hold(rows, now)
        if wait is not None:
            return wait
        was_paused = bool(store.meta(self._meta_key("held_for_pause")))
        for seqs, ev in self._messages(rows, was_paused):
            if not self._deliver_one(seqs, ev, rows, now):
                return 1.0
        if was_paused:
            store.set_meta(self._meta_key("held_for_pause"), "")
            store.commit()
        return 0.05 if len(rows) >= SPOOL_BATCH else idle

    def _hold(self, rows, now):
        """Seconds to wait before sending, or None to send now: a burst is
        still arriving, a maintenance window is on, or max_per_hour is used up."""
        newest = max(r.created for r in rows)
        if not self.flush_now and now - newest < self.GATHER and len(rows) < SPOOL_BATCH:
            return self.GATHER - (now - newest) + 0.05
        store = self.store
        pause_until = float(store.meta("pause_until", 0) or 0)
        if pause_until > now:
            # Maintenance window: keep everything for one digest at its end.
            if not store.meta(self._meta_key("held_for_pause")):
                store.set_meta(self._meta_key("held_for_pause"), "1")
                store.commit()
            return min(pause_until - now, 5.0)
        if self.max_per_hour:
            self._forget_sends(now)
            if len(self.sent) >= self.max_per_hour and not self.stopping:
                return min(3600 - (now - self.sent[0]) + 0.1, 60.0)
        return None

    def _messages(self, rows, was_paused):
        """[(spool seqs, event to send)]: one digest for a burst, after a pause
        or past max_per_hour, else one message per event. Queued events are
        never changed: a note about dropped alerts goes on a copy."""
        events = []
        for r in rows:
            try:
                events.append((r.seq, json.loads(r.payload)))
            except ValueError:
                self._count_dropped([r.seq])     # unreadable: counted as dropped
        valid = [e for _, e in events]
        groups = change_groups(events)
        dropped = int(self.store.meta(self._meta_key("dropped_unreported"), 0) or 0)
        cap = self.max_per_hour
        if len(groups) > self.BURST or (was_paused and valid) or \
                (cap and len(self.sent) + len(groups) > cap):
            reason = "maintenance window ended" if was_paused else \
                "more than %d alerts this hour" % cap if cap and len(self.sent) >= cap else \
                "burst of changes"
            return [([r.seq for r in rows], make_digest(valid, self.cfg.hostname, reason,
                                                         self.DIGEST_LIMIT, dropped))]
        return self._per_change(groups, dropped)

    def _per_change(self, groups, dropped):
        """One message per change: an event alone as itself, the events of
        one change (change_groups) as one digest with their summary."""
        out = []
        for group in groups:
            seqs = [s for s, _ in group]
            # A tool's own lock and temp files (passwd.PID, passwd.lock) that
            # lived for milliseconds are in the event log, not in the mail.
            shown = [e for _, e in group if not (e["event"] == "transient" and
                                                 backup_base(e.get("path") or ""))]
            shown = shown or [e for _, e in group]
            if len(shown) == 1:
                e = shown[0]
            else:
                e = make_digest(shown, self.cfg.hostname, CHANGE_TOGETHER, self.DIGEST_LIMIT)
            if dropped:
                e, dropped = dict(e, dropped=dropped), 0
            out.append((seqs, e))
        return out

    def _deliver_one(self, seqs, ev, rows, now):
        """Send one message; its spool rows go only once it was delivered."""
        try:
            self.deliver(ev)
        except DeliveryError as e:
            self._failed(seqs, str(e), rows, now)
            return False
        except Exception as e:           # a bug must not lose the alert either
            self._failed(seqs, "internal error: %s" % e, rows, now)
            return False
        t = time.time()
        self.sent.append(t)
        self._forget_sends(t)
        store = self.store
        with store.lock:
            store.set_meta(self._meta_key("sent"), json.dumps(list(self.sent)))
            store.spool_done(seqs)
            store.set_meta(self._meta_key("last_ok"), t)
            if ev.get("dropped"):
                store.set_meta(self._meta_key("dropped_unreported"), 0)
            store.commit_delivered()
        return True

    def _forget_sends(self, now):
        while self.sent and now - self.sent[0] > 3600:
            self.sent.popleft()

    def _failed(self, seqs, err, rows, now):
        # One retry time for the whole message, so a failed digest is retried
        # as the same digest, not split up by per-row jitter.
        attempts = {r.seq: r.attempts for r in rows}
        a = max(attempts.get(s, 0) for s in seqs) + 1
        import random
        backoff = min(3600.0, self.conf["retry_min"] * 2 ** min(a - 1, 10)) \
            * random.uniform(0.8, 1.2)
        self.store.spool_retry(seqs, a, now + backoff, err)
        self.store.commit()
        self._note_error(err)

    def _note_error(self, err):
        self.store.set_meta(self._meta_key("last_error"), "%s %s" % (iso_s(time.time()), err))
        self.store.commit()
        sys.stderr.write("fimwatch: %s: delivery failed, will retry: %s\n" % (self.id, err))

    def _expire(self, now):
        store = self.store
        with store.lock:
            n = store.spool_expire(self.id, now - SPOOL_MAX_AGE)
            if n:
                self._add_dropped(n)
                store.commit()

    def _count_dropped(self, seqs):
        """Spool rows that cannot be sent (not JSON): deleted and counted as
        dropped, so status and the next alert say so."""
        with self.store.lock:
            self.store.spool_done(seqs)
            self._add_dropped(len(seqs))
            self.store.commit()

    def _add_dropped(self, n):
        for key in ("dropped_total", "dropped_unreported"):
            k = self._meta_key(key)
            self.store.set_meta(k, int(self.store.meta(k, 0) or 0) + n)


def build_channels(cfg, store):
    chans = []
    if cfg.get("email", "enabled"):
        conf = {k: cfg.get("email", k) for k in SCHEMA["email"]}
        chans.append(Channel("email", "email", conf, cfg, store))
    for name, hook in cfg.webhooks:
        if hook["enabled"]:
            chans.append(Channel("webhook", name, hook, cfg, store))
    return chans


def host_identity(state_dir, machine_id=MACHINE_ID):
    """`host_id`: sha256 of /etc/machine-id and of the install id (state_dir/
    install.id, made by install.sh or else here), cut to 32 hex digits. Cloned
    images share a machine-id; two installs never share an install id. The
    machine-id itself is not shown: machine-id(5) asks that it stay private."""
    try:
        with open(machine_id, encoding="ascii", errors="replace") as f:
            mid = f.read().strip()
    except OSError:
        mid = ""
    path = os.path.join(state_dir, INSTALL_ID)
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            inst = f.read().strip()
    except OSError:
        inst = ""
    if not inst:
        inst = event_id()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(inst + "\n")
        except FileExistsError:             # another process made it first: use theirs
            return host_identity(state_dir, machine_id)
        except OSError:
            pass                            # read-only or full: an id for this process only
    return hashlib.sha256(("%s\n%s" % (mid, inst)).encode()).hexdigest()[:32]


class Dispatcher:
    """Stamps each event with its `sequence` and `host_id`, stores it, and
    spools it for the channels (same transaction); the local sinks (events
    file, syslog) get it only once that transaction is committed (Store's
    on_commit), so a crash can never show a receiver an id that the restart
    then reports again under another. While the state database takes no
    writes (StateDB), a commit holds them in memory and the local sinks still
    get every event at once: they need no disk. A failing sink is counted,
    never fatal."""

    def __init__(self, cfg, store, local=True, channels=True, echo=None):
        self.cfg, self.store, self.echo = cfg, store, echo
        self.host_id = host_identity(cfg.state_dir)
        self.local = []
        if local and cfg.events_file:
            self.local.append(EventsFileSink(cfg.events_file, store, cfg.get("log", "format")))
        if local and cfg.get("syslog", "enabled"):
            self.local.append(SyslogSink(cfg.get("syslog", "address"),
                                         cfg.get("syslog", "facility"),
                                         cfg.get("syslog", "min_severity"),
                                         cfg.get("syslog", "format")))
        if local and cfg.get("journal", "enabled"):
            self.local.append(JournalSink(cfg.get("journal", "socket"),
                                          cfg.get("syslog", "facility"),
                                          cfg.get("journal", "min_severity")))
        self.channels = build_channels(cfg, store) if channels else []
        self.committed = deque()           # (event, line) stored, waiting for the commit
        store.on_commit.append(self.after_commit)
        self.errors = {}
        self.count = 0

    @property
    def sinks(self):
        return self.local + self.channels

    def emit(self, ev):
        """Stamp, store and spool ev; returns the event as stored and sent."""
        with self.store.lock:
            seq = self.store.next_sequence()
            stamped = {"id": ev["id"], "sequence": seq, "host_id": self.host_id}
            stamped.update(ev)           # keys already there keep their place
            if stamped["sequence"] != seq or stamped["host_id"] != self.host_id:
                stamped["sequence"], stamped["host_id"] = seq, self.host_id
            ev = stamped
            line = event_json(ev)
            self.store.add_event(ev, line)
            for c in self.channels:
                self._send(c, ev, line)
        self.committed.append((ev, line))
        self.count += 1
        if self.echo:
            self.echo(ev)
        return ev

    def after_commit(self):
        """Store.on_commit: hand what was committed to the local sinks."""
        while self.committed:
            ev, line = self.committed.popleft()
            for s in self.local:
                self._send(s, ev, line)

    def _send(self, s, ev, line):
        try:
            if s.wants(ev):
                s.send(ev, line)
        except Exception as e:
            key = getattr(s, "id", None) or s.name
            n = self.errors.get(key, 0)
            self.errors[key] = n + 1
            if n < 5 or n % 1000 == 0:
                sys.stderr.write("fimwatch: %s: %s\n" % (key, esc(str(e))[:300]))

    def start(self):
        for c in self.channels:
            c.start()

    def flush(self):
        for s in self.sinks:
            if isinstance(s, EventsFileSink):
                try:
                    s.flush()
                except OSError as e:
                    sys.stderr.write("fimwatch: events_file: %s\n" % esc(str(e))[:300])

    def close(self, timeout=5.0):
        self.store.commit()
        if self.after_commit in self.store.on_commit:
            self.store.on_commit.remove(self.after_commit)
        deadline = time.monotonic() + timeout
        for c in self.channels:
            c.close(deadline)
        for s in self.sinks:
            if hasattr(s, "close") and not isinstance(s, Channel):
                s.close()

    def deliver_pending(self, timeout=30.0):
        """For one-shot commands: deliver what is spooled now, synchronously."""
        self.store.commit()
        deadline = time.monotonic() + timeout
        if float(self.store.meta("pause_until", 0) or 0) > time.time():
            return
        for c in self.channels:
            c.flush_now = c.stopping = True
            while time.monotonic() < deadline and \
                    self.store.spool_count_due(c.id, time.time()):
                c.pump()


# ---------------------------------------------------------------------------
# Daemon loop
# ---------------------------------------------------------------------------

def sd_notify(msg):
    """systemd's notify protocol, spoken directly (no dependency)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(msg.encode())
    except OSError:
        pass


class StateLock:
    """An flock on state_dir/fimwatch.lock: one daemon per state dir, and the
    way `status` tells whether it runs."""

    def __init__(self, state_dir):
        self.path = os.path.join(state_dir, LOCK_NAME)
        self.fd = None

    def acquire(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = self.holder()
            # A state condition, not a typo: exit 3, so the unit keeps
            # retrying and comes back once the other daemon is gone.
            raise StateError("another fimwatch daemon%s already uses %s"
                                % (" (pid %s)" % pid if pid else "", os.path.dirname(self.path)))
        os.ftruncate(self.fd, 0)
        os.write(self.fd, b"%d\n" % os.getpid())

    def holder(self):
        """pid of the running daemon, or None."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return None
            except BlockingIOError:
                data = os.read(fd, 32).strip()
                return int(data) if data.isdigit() else -1
        finally:
            os.close(fd)


def stop_reason(state_dir, systemctl="systemctl"):
    """Why a clean stop is not news: "upgrade" (install.sh left its mark in
    state_dir less than an hour ago), "shutdown" (the system is going down),
    else None: someone stopped the monitor."""
    mark = os.path.join(state_dir, UPGRADE_MARK)
    try:
        fresh = time.time() - os.stat(mark).st_mtime < 3600
        os.unlink(mark)
        if fresh:
            return "upgrade"
    except OSError:
        pass
    try:
        r = subprocess.run([systemctl, "is-system-running"], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, timeout=2)
        if r.stdout.strip() == b"stopping":
            return "shutdown"
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def stopped_event(cfg):
    """A clean stop: a `warning` (it goes to email and webhooks) unless it is
    an upgrade or a system shutdown. A kill -9 has no stopped event at all:
    the missing heartbeat and the next start's `gap` show it."""
    why = stop_reason(cfg.state_dir)
    what = {"upgrade": "stopped for an upgrade", "shutdown": "stopped: the system shuts down",
            None: "fimwatch was stopped (not by an upgrade or a shutdown)"}[why]
    return new_event(cfg.hostname, "stopped", "notice" if why else "warning", "realtime", "",
                     reason=why or "stopped",
                     message="%s; changes from now on are reported when it starts again"
                             % what)


class Daemon:
    def __init__(self, cfg):
        self.cfg = cfg
        self.stop = False
        self.reload = False
        self._last_alive = time.monotonic()

    def _signal(self, signum, frame):
        if signum == signal.SIGHUP:
            self.reload = True
        else:
            self.stop = True

    def log(self, msg):
        sys.stderr.write("fimwatch: %s\n" % msg)
        sys.stderr.flush()

    def run(self):
        cfg = self.cfg
        one_malloc_arena()
        ino_mod = import_inotify()
        findings = self._open_state()
        store = self.store
        self.report_findings(findings)
        first = store.meta("built") is None
        self.report_root_swaps()
        before = {k: store.meta(k) for k in ("state", "heartbeat", "stopped_at")}
        t_start = time.time()
        for k, v in (("state", "running"), ("pid", os.getpid()), ("started_at", t_start),
                     ("heartbeat", t_start)):
            store.set_meta(k, v)
        store.commit()
        sd_notify("STATUS=%s the baseline" % ("building" if first else "checking"))
        self.log("%s the baseline of %s" % ("building" if first else "checking",
                                            " ".join(cfg.all_roots())))
        eng = self.start_engine(ino_mod, "build" if first else "quick", "startup")
        store.set_meta("built", store.meta("built") or t_start)
        store.commit()
        self.guard.built(store)
        started = self._started_event(first, before, t_start)
        self.dispatch.emit(started)
        ev = upgrade_notice(store, cfg.hostname)
        if ev is not None:
            self.dispatch.emit(ev)
        store.commit()
        self.dispatch.flush()
        self.check_state()
        self.log("watching %d directories, %d baseline entries (%.1fs)"
                 % (eng.watches(), started["baseline_entries"], started["seconds"]))
        sd_notify("READY=1\nSTATUS=watching %d directories" % eng.watches())
        try:
            self.loop()
        finally:
            self._shutdown()
        return EXIT_OK

    def _open_state(self):
        """Lock the state dir, look for lost or broken state (StateGuard), open
        the database, set up signals and the dispatcher. Returns what the
        guard found, to be reported once the dispatcher runs."""
        cfg = self.cfg
        try:
            ensure_state_dir(cfg.state_dir)
            self.lock = StateLock(cfg.state_dir)
            self.lock.acquire()
            os.umask(0o077)
            self.guard = StateGuard(cfg.state_dir, cfg.events_file)
            findings = self.guard.examine()
        except OSError as e:
            # a read-only or immutable state_dir, a full disk, I/O errors: a
            # state fault (exit 3, restarted by the unit), not a crash
            raise StateError("state_dir %s: %s" % (cfg.state_dir, e))
        self.store = Store(cfg.state_dir)
        self.store.db = StateDB(self.store.db)
        if cfg.events_file and not self.store.last_sequence():
            self.store.seed_sequence(last_sequence_in(cfg.events_file))
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._signal)
        self.dispatch = Dispatcher(cfg, self.store)
        self.dispatch.start()
        self._catch_up_local_sinks()
        return findings

    def _catch_up_local_sinks(self, limit=10000):
        """Events a daemon committed but was killed before it wrote them to
        the events file (and syslog, which gets them at the same moment): sent
        now, with their own id and sequence, so the file misses none. Judged
        by the events file's last sequence; an empty (just rotated) file
        tells nothing, and nothing is sent again then."""
        cfg = self.cfg
        last = last_sequence_in(cfg.events_file) if cfg.events_file else 0
        if not last or last >= self.store.last_sequence():
            return
        lines = self.store.events_after(last, limit)
        for line in lines:
            try:
                self.dispatch.committed.append((json.loads(line), line))
            except ValueError:
                continue
        self.dispatch.after_commit()
        self.dispatch.flush()
        if lines:
            self.log("%d event(s) recorded before the last stop but missing from %s: "
                     "written now" % (len(lines), esc(cfg.events_file)))

    def _started_event(self, first, before, t_start):
        """The started event: whether we were gone, and for how long."""
        eng, store = self.eng, self.store
        extra = {"watches": eng.watches(), "baseline_entries": store.count(),
                 "seconds": round(time.time() - t_start, 3), "version": __version__,
                 "baseline_id": store.meta("db_id")}
        sev = "notice"
        if first:
            extra["message"] = "baseline built: %d entries; watching %d directories" % (
                extra["baseline_entries"], eng.watches())
            return new_event(self.cfg.hostname, "started", sev, "realtime", "", **extra)
        unclean = before["state"] == "running"
        last_seen = float(before["heartbeat"] or 0)
        gap_from = last_seen if unclean else (float(before["stopped_at"] or 0) or last_seen)
        extra["unclean"] = unclean
        if gap_from:
            # 'gap' is the unexpected hole (crash, kill -9, power loss);
            # after a clean stop the same numbers are 'downtime'.
            extra["gap" if unclean else "downtime"] = {"from": iso_s(gap_from),
                                                        "to": iso_s(t_start)}
            extra["gap_seconds"] = int(t_start - gap_from)
            extra["message"] = "%snot watching from %s to %s (%s)" % (
                "fimwatch stopped unexpectedly: " if unclean else "",
                iso_s(gap_from), iso_s(t_start), fmt_duration(t_start - gap_from))
        if unclean:
            sev = "warning"
        return new_event(self.cfg.hostname, "started", sev, "realtime", "", **extra)

    def _shutdown(self):
        """Compare what is still settling, say we stopped, close everything."""
        store = self.store
        sd_notify("STOPPING=1")
        try:
            self.eng.flush_due(budget=5.0, force=True)
        except Exception as e:            # still record the stop
            self.log("error while flushing: %s" % e)
        self.dispatch.emit(stopped_event(self.cfg))
        store.set_meta("state", "stopped")
        store.set_meta("stopped_at", time.time())
        store.commit()
        self.state_at_stop()
        self.guard.seen(force=True)
        self.dispatch.close(timeout=5.0)
        self.eng.close()
        store.close()

    def start_engine(self, ino_mod, mode, detected, prev=None):
        cfg = self.cfg
        backend, choices = make_backend(cfg.get("watch", "backend"), _watch_roots(cfg), ino_mod)
        eng = self.eng = Engine(cfg, self.store, self.dispatch.emit, backend, progress=_tty())
        for part in getattr(backend, "parts", {0: backend}).values():
            if isinstance(part, FanotifyBackend) and cfg.events_file:
                part.keep_own = frozenset([cfg.events_file])
        self.store.set_meta("backends", json.dumps(choices))
        extra = set(cfg.extra_roots())
        for root, name, why in choices:
            if root not in extra:
                self.log("%s: %s (%s)" % (esc(root), name, why))
        if extra:
            self.log("also watched, whatever [watch] paths says (its own files, single "
                     "append-only logs): %s" % " ".join(esc(p) for p in sorted(extra)))
        carry = None
        if prev is not None:
            eng.growth = prev.growth          # append-only logs: no full read again
        if prev is not None:                  # a reload does not postpone polls and scans
            carry = {"poll": prev.timers["poll"] if cfg.poll_interval ==
                     prev.cfg.poll_interval else None,
                     "scan": prev.timers["scan"] if cfg.scan_interval ==
                     prev.cfg.scan_interval else None}
        eng.start(mode, detected, keepalive=self.keepalive, stopping=lambda: self.stop,
                  carry=carry)
        for part in getattr(eng.backend, "parts", {0: eng.backend}).values():
            if isinstance(part, FanotifyBackend):
                part.delay = NOISE_DELAY       # start-up is over: coalesce noise
        return eng

    def keepalive(self):
        """During a long start-up walk: keep systemd's start timeout and
        watchdog from killing a daemon that is busy, not stuck."""
        now = time.monotonic()
        if now - self._last_alive >= 10.0:
            self._last_alive = now
            sd_notify("WATCHDOG=1\nEXTEND_TIMEOUT_USEC=60000000")

    def loop(self):
        """poll -> read -> tick -> timers, until a signal says stop."""
        poller = select.poll()
        poller.register(self.eng.fileno(), select.POLLIN)
        for fd, mask in self.eng.wake_fds():
            poller.register(fd, mask)
        poller.register(self.wake_r, select.POLLIN)
        wd_usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        wd_every = wd_usec / 3e6 if wd_usec else None
        now = time.monotonic()
        self.timers = {"beat": now + HEARTBEAT_EVERY, "prune": now + 3600,
                       "dog": now if wd_every else None,
                       "heartbeat": now + self.cfg.heartbeat if self.cfg.heartbeat else None}
        turn = 0.0
        while not self.stop:
            now = time.monotonic()
            wake = min([self.eng.next_wakeup(now)]
                       + [t for t in self.timers.values() if t is not None])
            ready = ()
            try:
                ready = poller.poll(min(max(0.0, wake - now), 60.0) * 1000)
            except InterruptedError:
                pass
            # A busy tree wakes the loop for every write: at most one turn
            # per TURN_MIN shares a turn's fixed costs (the commit, the events
            # file's chain, the writer's /proc) among the changes it compares.
            rest = turn + TURN_MIN - time.monotonic()
            if rest > 0 and not self.stop:
                time.sleep(rest)
            turn = time.monotonic()
            if any(fd == self.wake_r for fd, _ in ready):
                self._drain_wakeup()
            self.store.refresh()
            self.eng.read_events()
            self.eng.tick(now)
            self._timers(time.monotonic(), wd_every)
            # The database first, then the events file: a kill between the two
            # must not leave a line whose change is reported again on restart.
            self.store.commit_turn()
            self.dispatch.flush()
            self.check_state()
            if self.reload:
                self.reload = False
                self.do_reload(poller)
        return EXIT_OK

    def _drain_wakeup(self):
        try:
            while os.read(self.wake_r, 512):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _timers(self, now, wd_every):
        """The daemon's own timers: watchdog, heartbeat, event pruning."""
        t, store, eng = self.timers, self.store, self.eng
        if t["dog"] is not None and now >= t["dog"]:
            sd_notify("WATCHDOG=1")
            t["dog"] = now + wd_every
        if now >= t["beat"]:
            store.set_meta("heartbeat", time.time())
            store.set_meta("watches", eng.watches())
            store.set_meta("unwatched", len(eng.unwatched))
            if eng.pkgdb is not None:
                eng.pkgdb.maybe_drop()
            t["beat"] = now + HEARTBEAT_EVERY
        if now >= t["prune"]:
            store.prune_events()
            t["prune"] = now + 3600
        if t["heartbeat"] is not None and now >= t["heartbeat"]:
            self.dispatch.emit(self.heartbeat_event())
            every = self.cfg.heartbeat
            t["heartbeat"] = now + every if every else None

    def _chain_fields(self):
        """The events file's chain head: a remote copy of the heartbeats
        proves that the local file once had this many lines, ending so."""
        head = self.store.chain_head("chain:" + self.cfg.events_file) \
            if self.cfg.events_file else None
        return {"chain_head": {"n": head[0], "sha256": head[1]}} if head else {}

    def heartbeat_event(self):
        """[fimwatch] heartbeat: 'still watching', with the counts a receiver
        compares (no event lost between two beats: last_sequence) and the
        events file's chain head, so a remote copy can prove the local file
        was cut. A receiver alerts when none came for 2 intervals plus a bit."""
        store, eng, every = self.store, self.eng, self.cfg.heartbeat
        now = time.time()
        counts = store.events_by_severity(now - 86400)
        return new_event(
            self.cfg.hostname, "heartbeat", "info", "realtime", "",
            interval=every, next_before=iso_s(now + 2 * every + 60),
            last_sequence=store.last_sequence(), watches=eng.watches(),
            unwatched=len(eng.unwatched), baseline_entries=store.count(),
            events_24h={k: counts.get(k, 0) for k in SEVERITIES},
            spooled=sum(store.spool_summary(c)[0] for c in store.spool_channels()),
            state_db="failing" if store.db.failing() else "ok",
            **self._chain_fields(),
            message="fimwatch is watching; next heartbeat within %s" % fmt_duration(every))
    def report_findings(self, findings):
        """What StateGuard found before the database was opened: said first,
        before the (fresh) baseline is built."""
        self.guard.adopt(self.store, rebuild=bool(findings))
        self.store.on_commit.append(self.guard.seen)
        for sev, event, fields in findings:
            self.log(fields["message"])
            self.dispatch.emit(new_event(self.cfg.hostname, event, sev, "startup", "",
                                         **fields))
        self.store.commit()
        self.dispatch.flush()

    def report_root_swaps(self):
        for p, was, now in check_root_swaps(self.cfg, self.store):
            if now["kind"] == "symlink":
                msg = ("watched path %s was %s and is now a symlink to %s: not followed, "
                       "not baselined; the baseline keeps what was there. Restore it, or "
                       "put the real path in [watch] paths" % (
                           esc(p), "a symlink to " + esc(was.get("target", "?"))
                           if was.get("kind") == "symlink" else "a " + was.get("kind", "?"),
                           esc(now.get("target", "?"))))
            else:
                msg = ("watched path %s is on a different filesystem than when it was "
                       "baselined (device %s, was %s): something may be mounted over it"
                       % (esc(p), now.get("dev"), was.get("dev")))
            self.log(msg)
            clean = [{k: esc(v) if isinstance(v, str) else v for k, v in d.items()}
                     for d in (was, now)]
            self.dispatch.emit(new_event(self.cfg.hostname, "root_swapped", "critical",
                                         "startup", esc(p), was=clean[0], now=clean[1],
                                         message=msg))

    def check_state(self):
        """Once per loop turn: retry the writes the state database did not
        take, and say so when it fails or recovers. The watch goes on."""
        db, store = self.store.db, self.store
        if not isinstance(db, StateDB):
            return
        with store.lock:
            if db.failing() and not store._tx:
                db.retry()
        for note in db.notes():
            if note[0] == "fault":
                msg = ("cannot write the state database %s (%s): the baseline, the event log "
                       "and the alert spool are not being recorded; events still go to "
                       "syslog, the journal and the events file; retrying with backoff"
                       % (store.path, note[1]))
                self.log(msg)
                self.dispatch.emit(new_event(self.cfg.hostname, "state_error", "warning",
                                             "realtime", "", error=esc(note[1]),
                                             message=esc(msg)))
            else:
                since = note[2] or time.time()
                msg = ("the state database takes writes again: %d write(s) held since %s "
                       "recorded" % (note[1], iso_s(since)))
                self.log(msg)
                self.dispatch.emit(new_event(self.cfg.hostname, "state_recovered", "notice",
                                             "realtime", "", writes=note[1],
                                             since=iso_s(since), message=msg))
        if db.failing() and getattr(self, "_retry_timer", None) is None:
            # Wake the loop when the next retry is due, also when idle.
            def wake():
                self._retry_timer = None
                try:
                    os.write(self.wake_w, b"r")
                except OSError:
                    pass
            self._retry_timer = threading.Timer(max(0.05, db.next_try - time.monotonic()),
                                                wake)
            self._retry_timer.daemon = True
            self._retry_timer.start()

    def state_at_stop(self):
        """Stopping while the database takes no writes: one last try, then say
        what is lost (those changes are reported again at the next start)."""
        db = self.store.db
        if isinstance(db, StateDB) and db.failing() and not db.retry(force=True):
            self.log("stopping while the state database takes no writes (%s): %d write(s) "
                     "are lost; changes since %s are reported again at the next start"
                     % (db.error, len(db.backlog) + len(db.ops), iso_s(db.failing_since)))
            db.backlog, db.ops = [], []
            db.error = None

    def do_reload(self, poller):
        try:
            new = load_config(self.cfg.path)
        except FimwatchError as e:
            self.log("reload failed, keeping the running config: %s" % e)
            self.dispatch.emit(new_event(self.cfg.hostname, "error", "warning", "realtime", "",
                                         message="config reload failed, the running config "
                                                 "is kept: %s" % esc(str(e))))
            return
        self.log("reloading %s" % new.path)
        new.no_follow = getattr(self.cfg, "no_follow", set())      # a swapped root stays unfollowed
        old_eng = self.eng
        old_eng.flush_due(budget=5.0, force=True)
        self.store.commit()
        self.dispatch.close(timeout=2.0)
        poller.unregister(old_eng.fileno())
        for fd, _ in old_eng.wake_fds():
            poller.unregister(fd)
        old_eng.close()
        _names.clear()
        self.cfg = new
        self.dispatch = Dispatcher(new, self.store)
        self.dispatch.start()
        eng = self.start_engine(import_inotify(), "quick", "scan", prev=old_eng)
        poller.register(eng.fileno(), select.POLLIN)
        for fd, mask in eng.wake_fds():
            poller.register(fd, mask)
        self.dispatch.emit(new_event(new.hostname, "started", "notice", "realtime", "",
                                     reload=True, watches=eng.watches(),
                                     message="config reloaded; watching %d directories"
                                             % eng.watches()))
        sd_notify("READY=1\nSTATUS=watching %d directories" % eng.watches())


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------

def print_event(ev, as_json):
    if as_json:
        print(event_json(ev), flush=True)
    else:
        print("%s  %s" % (ev["time"][:19].replace("T", " "), event_summary(ev)), flush=True)


def cmd_run(cfg, args):
    if os.geteuid() != 0 and not args.allow_non_root:
        sys.stderr.write("fimwatch: warning: not running as root; files you cannot read "
                         "are reported by metadata only\n")
    return Daemon(cfg).run()


def _one_shot_engine(cfg, store, dispatch):
    return Engine(cfg, store, dispatch.emit, None, progress=_tty())


def cmd_scan(cfg, args):
    store = Store(cfg.state_dir)
    first = store.meta("built") is None
    dispatch = Dispatcher(cfg, store, local=not args.no_alert,
                          channels=not args.no_alert and not first,
                          echo=None if first else (lambda ev: print_event(ev, args.json)))
    if args.no_alert and cfg.events_file:
        dispatch.local.insert(0, EventsFileSink(cfg.events_file, store,
                                                cfg.get("log", "format")))
    eng = _one_shot_engine(cfg, store, dispatch)
    mode = "build" if first else ("quick" if args.quick else "full")
    for root in eng.roots + eng.scan_only:
        for _ in eng.walk_root(root, eng.root_mode(root, mode), "scan", watch=False):
            store.commit()               # short transactions: the daemon writes too
        eng.root_done(root)
        store.commit()
    if eng.progress:
        sys.stderr.write("\r\x1b[K")
    if first:
        store.set_meta("built", time.time())
        store.commit()
        print("fimwatch: baseline built: %d entries" % store.count())
        return EXIT_OK
    store.set_meta("last_scan", time.time())
    store.commit()
    changes = eng.stats["changes"]
    dispatch.deliver_pending()
    dispatch.close(timeout=0)
    if not args.json:
        print("fimwatch: %d change(s)" % changes, file=sys.stderr)
    return EXIT_CHANGES if changes else EXIT_OK


def _under_roots(cfg, path):
    for r in cfg.all_roots() + [w for _, w in cfg.resolved_roots()] + cfg.extra_roots():
        if within(path, r):
            return True
    return False


def cmd_accept(cfg, args):
    store = Store(cfg.state_dir)
    dispatch = Dispatcher(cfg, store, local=False, channels=False)
    eng = _one_shot_engine(cfg, store, dispatch)
    paths = [os.path.normpath(os.path.abspath(p)) for p in args.paths] or \
        eng.roots + eng.scan_only
    for p in paths:
        if not _under_roots(cfg, p):
            raise FimwatchError("%s is not under a watched path (%s)"
                                % (esc(p), " ".join(cfg.all_roots())))
    for p in paths:
        if os.path.isdir(p) and not os.path.islink(p):
            for _ in eng.walk(p, "build", "scan", watch=False):
                store.commit()
        else:
            eng.visit(p, store.get(p), "scan", "build")
    store.set_meta("built", store.meta("built") or time.time())
    n = eng.stats["silent"]
    if n:
        audit(cfg, store, "accepted", "%d change(s) taken into the baseline by %s under %s"
              % (n, who(), " ".join(esc(p) for p in paths[:10])), changes_found=n,
              paths=[esc(p) for p in paths[:50]])
    store.commit()
    print("fimwatch: accepted %d change(s) into the baseline" % n)
    return EXIT_OK


def channel_status(store, chan_ids):
    out = {}
    now = time.time()
    for cid in chan_ids:
        row = store.spool_summary(cid)
        out[cid] = {
            "spooled": row[0], "oldest": iso_s(row[1]) if row[1] else None,
            "max_attempts": row[2] or 0,
            "last_ok": iso_s(float(store.meta("chan:%s:last_ok" % cid))) if
            store.meta("chan:%s:last_ok" % cid) else None,
            "last_error": store.meta("chan:%s:last_error" % cid) or None,
            "dropped": int(store.meta("chan:%s:dropped_total" % cid, 0) or 0),
        }
        if row[1]:
            out[cid]["oldest_age_seconds"] = int(now - row[1])
    return out


def inotify_watches_of(pid, proc="/proc"):
    """Watches held by one process, counted from /proc/PID/fdinfo."""
    n = 0
    fd_dir = "%s/%d/fd" % (proc, pid)
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return None
    for fd in fds:
        try:
            if os.readlink("%s/%s" % (fd_dir, fd)) != "anon_inode:inotify":
                continue
            with open("%s/%d/fdinfo/%s" % (proc, pid, fd)) as f:
                n += sum(1 for ln in f if ln.startswith("inotify wd:"))
        except OSError:
            continue
    return n


def inotify_usage(proc="/proc", top=8):
    """[(watches, pid, command)] of the processes holding inotify watches,
    most first: what to look at when the watch limit is reached."""
    out = []
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return out
    for pid in pids:
        n = inotify_watches_of(int(pid), proc)
        if n:
            try:
                with open("%s/%s/comm" % (proc, pid)) as f:
                    comm = f.read().strip()
            except OSError:
                comm = "?"
            out.append((n, int(pid), esc(comm)))
    out.sort(reverse=True)
    return out[:top]


def _meta_time(store, key):
    v = store.meta(key)
    return iso_s(float(v)) if v else None


def _state_status(cfg, store, pid):
    """The part of `status` that comes from the state database."""
    now = time.time()
    running = bool(pid)
    built = store.meta("built")
    st = {
        "watches": (inotify_watches_of(pid) or int(store.meta("watches", 0) or 0))
        if running and pid > 0 else 0,
        "unwatched_subtrees": int(store.meta("unwatched", 0) or 0) if running else 0,
        "baseline_entries": store.count(),
        "baseline_built": iso_s(float(built)) if built else None,
        "baseline_age_seconds": int(now - float(built)) if built else None,
        "last_heartbeat": _meta_time(store, "heartbeat"),
        "started_at": _meta_time(store, "started_at"),
        "paused_until": None, "pause_reason": None,
    }
    pu = float(store.meta("pause_until", 0) or 0)
    if pu > now:
        st["paused_until"] = iso_s(pu)
        st["pause_reason"] = store.meta("pause_reason") or ""
    sev = store.events_by_severity(now - 86400)
    st["events_24h"] = {s: sev.get(s, 0) for s in reversed(SEVERITIES)}
    ids = [c.id for c in build_channels(cfg, store)]
    ids += [c for c in store.spool_channels() if c not in ids]
    st["channels"] = channel_status(store, ids)
    return st


def status_without_config(path, err):
    """`status` when the config does not load: the error, and still whether
    the daemon runs (it keeps the config it started with). state_dir is
    read leniently from the file, else the default. Exit 2: a config error."""
    parser = configparser.ConfigParser(strict=False, interpolation=None,
                                       inline_comment_prefixes=("#", ";"))
    try:
        parser.read(path, encoding="utf-8")
        state_dir = parser.get("fimwatch", "state_dir", fallback="") or DEFAULT_STATE_DIR
    except (configparser.Error, UnicodeError, OSError):
        state_dir = DEFAULT_STATE_DIR
    pid = StateLock(state_dir).holder() if os.path.isdir(state_dir) else None
    sys.stderr.write("fimwatch: error: %s\n" % err)
    if pid:
        print("fimwatch: running (pid %s), with the config it started with; fix %s "
              "before a reload or restart (fimwatch check-config)" % (pid, esc(path)))
    else:
        print("fimwatch: NOT running; fix %s first (fimwatch check-config)" % esc(path))
    return EXIT_ERROR


def status_info(cfg):
    """Everything `status` shows, as one dict (what --json prints)."""
    pid = StateLock(cfg.state_dir).holder() if os.path.isdir(cfg.state_dir) else None
    st = {"running": bool(pid), "pid": pid if pid and pid > 0 else None, "config": cfg.path,
          "state_dir": cfg.state_dir, "watch_limit": watch_limit(),
          "max_queued_events": read_sysctl("max_queued_events")}
    if os.path.exists(os.path.join(cfg.state_dir, DB_NAME)):
        store = Store(cfg.state_dir, create=False)
        try:
            st.update(_state_status(cfg, store, pid))
        finally:
            store.close()
    st["backends"] = _backends_status(cfg, bool(pid))
    st["inotify_watches_by_process"] = [{"pid": p, "command": c, "watches": n}
                                        for n, p, c in inotify_usage()]
    return st


def _print_state_status(cfg, st):
    if st["running"]:
        print("  watches:    %d in use, kernel limit %s (fs.inotify.max_user_watches)"
              % (st["watches"], st["watch_limit"]))
        if st["unwatched_subtrees"]:
            print("  WARNING:    %d subtree(s) without watches (limit reached), scanned every %s"
                  % (st["unwatched_subtrees"], fmt_duration(cfg.poll_interval)))
    if st["baseline_built"]:
        print("  baseline:   %d entries, built %s (%s ago)" % (
            st["baseline_entries"], st["baseline_built"],
            fmt_duration(st["baseline_age_seconds"] or 0)))
    else:
        print("  baseline:   not built yet (start the daemon or run fimwatch scan)")
    if st["paused_until"]:
        print("  PAUSED:     until %s (%s)" % (st["paused_until"], st["pause_reason"]))
    print("  events 24h: " + ", ".join("%s %d" % kv for kv in st["events_24h"].items()))
    for cid, c in st["channels"].items():
        print("  %-11s spooled %d, last ok %s%s%s" % (
            cid + ":", c["spooled"], c["last_ok"] or "never",
            ", last error: %s" % c["last_error"] if c["last_error"] else "",
            ", DROPPED %d after 7 days" % c["dropped"] if c["dropped"] else ""))


def cmd_status(cfg, args):
    st = status_info(cfg)
    if args.json:
        print(json.dumps(st, indent=2))
        return EXIT_OK if st["running"] else EXIT_CHANGES
    print("fimwatch: %s" % ("running (pid %s)" % st["pid"] if st["running"] else "NOT running"))
    print("  config:     %s" % cfg.path)
    if "baseline_entries" in st:
        _print_state_status(cfg, st)
    else:
        print("  no baseline yet in %s" % cfg.state_dir)
    _print_backends(st["backends"], "  backend:    ")
    if st["inotify_watches_by_process"]:
        print("  inotify watches by process (limit %s per user):" % st["watch_limit"])
        for w in st["inotify_watches_by_process"]:
            print("    %8d  pid %-7d %s" % (w["watches"], w["pid"], w["command"]))
    if not st["running"]:
        print("  start it:   systemctl start fimwatch   (or: fimwatch run)")
    return EXIT_OK if st["running"] else EXIT_CHANGES


def _backends_status(cfg, running):
    """[{path, backend, reason}]: what the running daemon chose for each
    root (recorded at its start), else what it would choose now."""
    rows = None
    if running and os.path.exists(os.path.join(cfg.state_dir, DB_NAME)):
        store = Store(cfg.state_dir, create=False)
        raw = store.meta("backends")
        store.close()
        rows = json.loads(raw) if raw else None
    if rows is None:
        rows = choose_backends(_watch_roots(cfg), cfg.get("watch", "backend"))
    # the configured paths; fimwatch's own files and single append-only logs
    # are listed once, as "also watched" (check-config)
    extra = set(cfg.extra_roots())
    return [{"path": esc(r), "backend": b, "reason": why} for r, b, why in rows
            if r not in extra]


def _print_backends(rows, prefix):
    for b in rows:
        print("%s%s: %s (%s)" % (prefix, b["path"], b["backend"], b["reason"]))


def _watch_roots(cfg):
    """The watched directories: configured paths resolved, fimwatch's own
    files and single append-only logs, a root inside another root left out
    (it is covered by it)."""
    roots = sorted(set(r for _, r in cfg.resolved_roots()) | set(cfg.extra_roots()))
    return [r for r in roots if not any(r.startswith(o + "/") for o in roots if o != r)]


def count_dirs(tops, exclude, limit=2000000):
    """Directories below (and including) tops that get a watch; tops are
    (where to read, the path the config's excludes see) pairs, the same but
    for a tree staged under another root."""
    n = 0
    for phys, logical in tops:
        stack = [(phys, logical)]
        while stack and n < limit:
            d, ld = stack.pop()
            n += 1
            try:
                with os.scandir(d) as it:
                    for e in it:
                        lp = ld + "/" + e.name
                        try:
                            if e.is_dir(follow_symlinks=False) and \
                                    not exclude.match(lp, True, dirs_by_name=False):
                                stack.append((e.path, lp))
                        except OSError:
                            pass
            except OSError:
                pass
    return n


def estimate_dirs(cfg, limit=2000000):
    """Directories the watch paths need (excluded ones get no watch)."""
    return count_dirs([(r, r) for _, r in cfg.resolved_roots()], cfg.exclude, limit)


# what check-config recommends for the inotify limits: one watch per
# directory, + 50% for growth, + spare watches for everything else root runs,
# rounded up to 1024; and a floor for the number of inotify instances.
WATCH_HEADROOM = 8192
MIN_USER_INSTANCES = 256


def recommended_watches(need):
    want = need + need // 2 + WATCH_HEADROOM
    return (want + 1023) // 1024 * 1024


def _resolve_in(root, path):
    """path with its symlinks resolved as if root were / (a link in a staged
    tree points into that tree, never into this host's)."""
    done, todo, hops = "/", [c for c in path.split("/") if c], 0
    while todo:
        c = todo.pop(0)
        if c == ".":
            continue
        if c == "..":
            done = os.path.dirname(done)
            continue
        nxt = os.path.join(done, c)
        try:
            target = os.readlink(root + nxt)
        except OSError:                 # not a link, or not there
            done = nxt
            continue
        hops += 1
        if hops > 40:                   # a loop: stop where it is
            return nxt
        if target.startswith("/"):
            done = "/"
        todo = [t for t in target.split("/") if t] + todo
    return done


def _staged_roots(cfg, root):
    """([{configured, watched, exists}], [(physical, logical)]) of the watch
    paths as they are inside a tree staged under root."""
    roots, tops = [], []
    for p in cfg.paths:
        last = os.path.join(_resolve_in(root, os.path.dirname(p)), os.path.basename(p))
        w = _resolve_in(root, p) if os.path.islink(root + last) else p
        phys = root + _resolve_in(root, w)
        roots.append({"configured": p, "watched": w, "exists": os.path.exists(phys)})
        tops.append((phys, w))
    return roots, tops


def check_config_report(cfg, root=None):
    """check-config --json: the config as the program reads it, and the watch
    estimate, for installers (install.sh asks this instead of parsing the
    config). With root, the watched paths are looked up inside that tree (a
    system staged with install.sh --root), and the estimate walks it."""
    if root is None:
        roots = [{"configured": p, "watched": w, "exists": os.path.exists(w)}
                 for p, w in cfg.resolved_roots()]
        need = estimate_dirs(cfg)
    else:
        roots, tops = _staged_roots(cfg, root)
        need = count_dirs(tops, cfg.exclude)
    return {
        "config": cfg.path,
        "valid": True,
        "version": __version__,
        "root": root,
        "state_dir": cfg.state_dir,
        "events_file": cfg.events_file or None,
        "roots": roots,
        # watched whatever [watch] paths says: its own files, single append-only logs
        "also_watched": cfg.extra_roots(),
        "scan_only": list(cfg.scan_only),
        "exclude": list(cfg.exclude.patterns),
        "backend": cfg.get("watch", "backend"),
        "watches_needed": need,
        "max_user_watches": read_sysctl("max_user_watches"),
        "recommended_max_user_watches": recommended_watches(need),
        "max_user_instances": read_sysctl("max_user_instances"),
        "recommended_max_user_instances": MIN_USER_INSTANCES,
    }


def cmd_check_config(cfg, args):
    root = getattr(args, "root", None)
    if root is not None:
        if not getattr(args, "json", False):
            raise ConfigError("check-config --root: only with --json")
        root = os.path.abspath(root).rstrip("/")
        if not root or not os.path.isdir(root):
            raise ConfigError("check-config --root: %s is not a directory (or is /)"
                              % esc(args.root))
    if getattr(args, "json", False):
        print(json.dumps(check_config_report(cfg, root), indent=2))
        return EXIT_OK
    print("# fimwatch %s: %s is valid. Effective settings:" % (__version__, cfg.path))
    _print_settings(cfg)
    _print_watch_notes(cfg)
    return EXIT_OK


def _print_settings(cfg):
    for sect, spec in SCHEMA.items():
        if sect == "webhook":
            continue
        print("[%s]" % sect)
        for key, (typ, _) in spec.items():
            print("%s = %s" % (key, _show(typ, cfg.get(sect, key))))
    for name, hook in cfg.webhooks:
        print("[webhook%s]" % ("" if name == "default" else " " + name))
        for key, (typ, _) in SCHEMA["webhook"].items():
            v = hook[key]
            if key == "url" and v:
                v = redact_url(v)
            elif key == "secret" and v:
                v = "(set, %d characters)" % len(v)
            print("%s = %s" % (key, _show(typ, v)))


def _print_watch_notes(cfg):
    need = estimate_dirs(cfg)
    limit = watch_limit()
    print("# watches needed: about %d directories; kernel limit fs.inotify.max_user_watches=%s"
          % (need, limit))
    if limit is not None and need > limit * 0.9:
        print("# WARNING: raise it: sysctl -w fs.inotify.max_user_watches=%d (install.sh does)"
              % recommended_watches(need))
    _print_backends(_backends_status(cfg, False), "# backend: ")
    for p, r in cfg.resolved_roots():
        if p != r:
            print("# note: %s is a symlink: %s is watched (and reported under that name)"
                  % (p, r))
    for p in cfg.all_roots():
        if not os.path.lexists(p):
            print("# note: %s does not exist (it is watched for when it appears)" % p)
    print("# also watched, whatever [watch] paths says (fimwatch's own files at critical, "
          "single append-only logs): %s" % " ".join(cfg.extra_roots()))


def _show(typ, v):
    if isinstance(v, PatternSet):
        return " ".join(v.patterns)
    if isinstance(v, list):
        return " ".join(v)
    if isinstance(v, bool):
        return "yes" if v else "no"
    if typ == "duration":
        if v == 0:
            return "0"
        if v < 1:
            return "%gms" % (v * 1000)
        for unit in ("d", "h", "m"):
            if v % _DUR_MULT[unit] == 0:
                return "%d%s" % (v // _DUR_MULT[unit], unit)
        return "%gs" % v
    return str(v)


def cmd_events(cfg, args):
    store = Store(cfg.state_dir, create=False)
    since = time.time() - args.since
    pat = PatternSet([args.path]) if args.path else None
    for line in store.events_since(since):
        ev = json.loads(line)
        if pat is not None and not pat.match(ev.get("path") or ""):
            continue
        print_event(ev, args.json)
    return EXIT_OK


ChainLine = collections.namedtuple("ChainLine", "where n prev hash kind")


def _chain_entry(where, raw):
    """One events-file line as the chain sees it; kind: chained, plain (an
    event from before 0.2: no chain fields) or torn (not JSON)."""
    try:
        ev = json.loads(raw)
    except ValueError:
        return ChainLine(where, None, None, line_hash(raw), "torn")
    if not isinstance(ev, dict) or not isinstance(ev.get("chain_n"), int):
        return ChainLine(where, None, None, line_hash(raw), "plain")
    return ChainLine(where, ev["chain_n"], ev.get("chain_prev"), line_hash(raw), "chained")


def read_chain(paths):
    """[ChainLine] of the complete lines of the files, in the order given
    (logrotate's .gz copies are read too)."""
    import gzip
    out = []
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        try:
            with opener(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise FimwatchError("verify-log: %s: %s" % (esc(path), e.strerror or e))
        if not data.endswith(b"\n"):
            data = data[:data.rfind(b"\n") + 1]          # a line being written now
        for i, raw in enumerate(data.splitlines(), 1):
            out.append(_chain_entry("%s:%d" % (esc(path), i), raw))
    return out


def _chain_break(a, b, i, chained, first_at):
    """What happened between two chained lines that do not follow."""
    if b.n <= a.n:
        return "reordered: %s (chain_n %d) comes after %s (chain_n %d)" % (
            b.where, b.n, a.where, a.n)
    if b.n > a.n + 1:
        if any(first_at.get(m, -1) > i for m in range(a.n + 1, min(b.n, a.n + 10000))):
            return "reordered: %s (chain_n %d) comes before lines with smaller chain_n" % (
                b.where, b.n)
        return "%d line(s) removed before %s (chain_n %d to %d are missing)" % (
            b.n - a.n - 1, b.where, a.n + 1, b.n - 1)
    return "edited: %s (the next line, %s, was chained to other content)" % (a.where, b.where)


def verify_chain(lines, head=None):
    """(problem or None, notes): the first line removed, edited, reordered
    or inserted, checked also against head (lines, hash) from the database."""
    notes, chained = [], []
    for ln in lines:
        if ln.kind == "plain" and chained:
            return "inserted or edited: %s has no chain fields" % ln.where, notes
        if ln.kind == "torn":
            notes.append("%s is a torn line (a crash or a full disk): skipped" % ln.where)
        if ln.kind == "chained":
            chained.append(ln)
    first_at = {}
    for i, ln in enumerate(chained):
        first_at.setdefault(ln.n, i)
    for i in range(1, len(chained)):
        a, b = chained[i - 1], chained[i]
        if not (b.n == a.n + 1 and b.prev == a.hash):
            return _chain_break(a, b, i, chained, first_at), notes
    if chained and head:
        last = chained[-1]
        if head[0] > last.n:
            return ("%d line(s) removed at the end: the state database's chain head is "
                    "chain_n %d, the file ends at %d (%s)" % (head[0] - last.n, head[0],
                                                              last.n, last.where)), notes
        if head[0] == last.n and head[1] != last.hash:
            return "edited: %s (the last line; the state database has another hash)" \
                % last.where, notes
    return None, notes


def rotated_copies(path):
    """logrotate's copies of path (name.1, name.2.gz, name-20261201), oldest first."""
    import glob
    found = [p for p in glob.glob(glob.escape(path) + ".*") + glob.glob(glob.escape(path) + "-*")
             if os.path.isfile(p)]
    return sorted(found, key=lambda p: os.stat(p).st_mtime)


def _db_chain_head(cfg, path):
    try:
        store = Store(cfg.state_dir, create=False)
    except FimwatchError:
        return None
    try:
        return store.chain_head("chain:" + path)
    finally:
        store.db.close()


def cmd_verify_log(cfg, args):
    paths = [os.path.abspath(p) for p in args.files] if args.files else \
        rotated_copies(cfg.events_file) + [cfg.events_file] if cfg.events_file else []
    if not paths:
        raise FimwatchError("verify-log: no [log] events_file configured; name the files")
    lines = read_chain(paths)
    head = _db_chain_head(cfg, paths[-1]) if paths[-1] == cfg.events_file else None
    problem, notes = verify_chain(lines, head)
    for n in notes:
        print("note: %s" % n)
    if problem:
        print("TAMPERED: %s" % problem)
        return EXIT_CHANGES
    chained = [ln for ln in lines if ln.kind == "chained"]
    print("intact: %d line(s) in %d file(s)%s%s" % (
        len(lines), len(paths),
        ", chain_n %d to %d" % (chained[0].n, chained[-1].n) if chained else "",
        "; the end matches the state database" if head else
        "; not compared with the state database (no chain head there)"))
    return EXIT_OK


def cmd_test_alert(cfg, args):
    store = Store(cfg.state_dir)
    ev = new_event(cfg.hostname, "test", "info", "realtime", "",
                   message="This is a test alert from fimwatch on %s. If you can read this, "
                           "alerts reach you." % cfg.hostname)
    ok = True
    local = Dispatcher(cfg, store, channels=False)
    for s in local.sinks:
        try:
            s.send(ev, event_json(ev))
            print("%-22s OK" % s.name)
        except Exception as e:
            ok = False
            print("%-22s FAILED: %s" % (s.name, esc(str(e))[:300]))
    chans = build_channels(cfg, store)
    for c in chans:
        try:
            c.deliver(ev)
            print("%-22s OK (%s)" % (c.id, c.describe()))
        except DeliveryError as e:
            ok = False
            print("%-22s FAILED: %s" % (c.id, e))
        except Exception as e:         # a bug: still say which channel
            ok = False
            print("%-22s FAILED: internal error: %s" % (c.id, type(e).__name__))
    if not local.sinks and not chans:
        print("no alert channel is enabled in %s" % cfg.path)
        ok = False
    local.close(0)
    return EXIT_OK if ok else EXIT_CHANGES


def who():
    """The admin behind a command: sudo's user, else the login name."""
    u = os.environ.get("SUDO_USER")
    if not u:
        try:
            u = os.getlogin()
        except OSError:
            u = user_name(os.getuid())
    return esc(u)


def audit(cfg, store, event, message, **fields):
    """Record an admin action (accept, pause, resume) in the event log,
    events_file and syslog: who silenced what, and when."""
    ev = new_event(cfg.hostname, event, "notice", "realtime", "", by=who(),
                   message=message, **fields)
    d = Dispatcher(cfg, store, channels=False)
    d.emit(ev)
    d.close(timeout=0)


def cmd_notify_failure(cfg, args):
    """Run by fimwatch-failure@.service when the unit failed: a critical alert
    through every channel, synchronously (the daemon is not there to do it)."""
    store = Store(cfg.state_dir)
    unit = esc(args.unit)
    ev = new_event(cfg.hostname, "stopped", "critical", "realtime", "", unit=unit,
                   result=esc(args.result or ""),
                   message="%s failed%s: fimwatch is NOT watching. See: journalctl -u %s -e; "
                           "fimwatch check-config; systemctl restart %s"
                           % (unit, " (%s)" % esc(args.result) if args.result else "", unit,
                              unit))
    dispatch = Dispatcher(cfg, store)
    dispatch.emit(ev)
    dispatch.deliver_pending(timeout=60)
    dispatch.close(timeout=0)
    return EXIT_OK


def cmd_pause(cfg, args):
    dur = args.duration
    store = Store(cfg.state_dir)
    until = time.time() + dur
    store.set_meta("pause_until", until)
    store.set_meta("pause_reason", esc(args.reason or ""))
    audit(cfg, store, "paused", "alerts paused by %s until %s%s" % (
        who(), iso_s(until), ": " + esc(args.reason) if args.reason else ""),
        until=iso_s(until), reason=esc(args.reason or ""))
    store.commit()
    if StateLock(cfg.state_dir).holder() is None:
        print("fimwatch: note: the daemon is not running; the pause applies when it runs")
    print("fimwatch: alerts paused until %s; changes are still recorded and sent as one "
          "digest when the window ends (fimwatch resume ends it early)" % iso_s(until))
    return EXIT_OK


def cmd_resume(cfg, args):
    store = Store(cfg.state_dir)
    if float(store.meta("pause_until", 0) or 0) <= time.time():
        print("fimwatch: alerts were not paused")
        return EXIT_OK
    store.set_meta("pause_until", 0)
    audit(cfg, store, "resumed", "alerts resumed by %s" % who())
    store.commit()
    print("fimwatch: alerts resumed; what changed in the window goes out as one digest")
    return EXIT_OK


# ---------------------------------------------------------------------------
# Main: arguments, commands, exit codes
# ---------------------------------------------------------------------------

def _arg_duration(lo=0.0, hi=DURATION_MAX):
    """argparse type= for a duration between lo and hi seconds."""
    def conv(text):
        try:
            v = parse_duration(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e))
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError("must be between %s and %s"
                                             % (_show("duration", lo), _show("duration", hi)))
        return v
    conv.__name__ = "duration"
    return conv


def _terminal_columns():
    """shutil.get_terminal_size().columns without importing shutil (and with
    it zlib, bz2 and lzma: ~0.4 MB the daemon never uses)."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _Width:
    """argparse's formatters import shutil for the width (every add_argument
    builds one, so even the daemon's parse did): this one does not."""
    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None, **kw):
        super().__init__(prog, indent_increment, max_help_position,
                         _terminal_columns() - 2 if width is None else width, **kw)


class _HelpFormatter(_Width, argparse.HelpFormatter):
    pass


class _RawHelpFormatter(_Width, argparse.RawDescriptionHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(EXIT_ERROR, "fimwatch: error: %s (see --help)\n" % message)


def build_parser():
    p = _Parser(prog="fimwatch", description="Real-time file integrity monitoring.",
                epilog="exit codes: 0 ok; 1 changes found / not running / delivery failed; "
                       "2 usage, config or dependency error",
                formatter_class=_RawHelpFormatter)
    p.add_argument("--config", metavar="PATH",
                   help="config file (default: $FIMWATCH_CONFIG or %s)" % DEFAULT_CONFIG)
    p.add_argument("--version", action="version", version="fimwatch " + __version__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sp = sub.add_parser("run", help="the daemon, in the foreground")
    sp.add_argument("--allow-non-root", action="store_true", help=argparse.SUPPRESS)
    sp = sub.add_parser("scan", help="compare with the baseline once (exit 1: changes)")
    sp.add_argument("--no-alert", action="store_true", help="only print and record")
    sp.add_argument("--json", action="store_true", help="JSON lines on stdout")
    sp.add_argument("--quick", action="store_true",
                    help="trust files whose size, mtime, ctime and inode are unchanged")
    sp = sub.add_parser("accept", help="take the current state into the baseline")
    sp.add_argument("paths", nargs="*", metavar="PATH",
                    help="files or directories under a watched path (default: all)")
    sp = sub.add_parser("status", help="is the daemon running; watches; baseline; alerts",
                        epilog="exit 0 running, 1 not running, 2 config error")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("test-alert", help="send a test alert through every channel")
    sp = sub.add_parser("check-config", help="validate the config, print effective settings")
    sp.add_argument("--json", action="store_true",
                    help="one JSON object: the watched paths, excludes, state_dir and the "
                         "watch estimate (what install.sh asks); nothing on stdout when "
                         "the config is invalid")
    sp.add_argument("--root", metavar="DIR",
                    help="with --json: look the watched paths up inside DIR, a system staged "
                         "with install.sh --root, and estimate the watches from that tree")
    sp = sub.add_parser("pause", help="maintenance window: summarise alerts until it ends")
    sp.add_argument("--for", dest="duration", required=True, metavar="DURATION",
                    type=_arg_duration(1, 7 * 86400),
                    help="e.g. 30m, 2h, 1d (a bare number is seconds; at most 7d)")
    sp.add_argument("--reason", metavar="TEXT", help="shown in status and in the digest")
    sub.add_parser("resume", help="end a maintenance window now")
    sp = sub.add_parser("notify-failure", help="alert that the service failed (for the "
                        "OnFailure= unit)")
    sp.add_argument("unit", metavar="UNIT")
    sp.add_argument("--result", metavar="TEXT", help="e.g. exit-code, watchdog, start-limit-hit")
    sp = sub.add_parser("verify-log", help="check the hash chain of the events file "
                        "(exit 1: a line was removed, edited or reordered)",
                        epilog="exit 0 intact, 1 tampered, 2 error")
    sp.add_argument("files", nargs="*", metavar="FILE",
                    help="events files, oldest first (default: [log] events_file and "
                         "its logrotate copies)")
    sp = sub.add_parser("events", help="recent events from the state database")
    sp.add_argument("--since", default=86400.0, metavar="DURATION", type=_arg_duration(),
                    help="how far back (default 24h; e.g. 30m, 7d)")
    sp.add_argument("--path", metavar="GLOB",
                    help="only these paths: '*.php' matches a base name anywhere, "
                         "'/var/www/**' a whole tree (config pattern rules)")
    sp.add_argument("--json", action="store_true", help="JSON lines")
    return p


COMMANDS = {"run": cmd_run, "scan": cmd_scan, "accept": cmd_accept, "status": cmd_status,
            "test-alert": cmd_test_alert, "check-config": cmd_check_config,
            "pause": cmd_pause, "resume": cmd_resume, "events": cmd_events,
            "notify-failure": cmd_notify_failure, "verify-log": cmd_verify_log}


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_usage(sys.stderr)
        sys.stderr.write("fimwatch: error: no command given (see fimwatch --help)\n")
        return EXIT_ERROR
    path = args.config or os.environ.get("FIMWATCH_CONFIG") or DEFAULT_CONFIG
    try:
        try:
            cfg = load_config(path)
        except ConfigError as e:
            if args.command != "status":
                raise
            return status_without_config(path, e)
        return COMMANDS[args.command](cfg, args)
    except FimwatchError as e:
        sys.stderr.write("fimwatch: error: %s\n" % e)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except sqlite3.Error as e:
        sys.stderr.write("fimwatch: error: state database: %s\n" % e)
        return EXIT_STATE


if __name__ == "__main__":
    sys.exit(main())
