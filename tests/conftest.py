"""Shared fixtures for the fimwatch test suite.

Every test that talks to the engine does it the way a user does: it writes a
config file, runs ``python3 fimwatch.py --config CONF COMMAND`` as a
subprocess, changes real files in a temp tree, and reads the daemon's
``[log] events_file`` (JSON lines).  No mocks, real inotify.

Main pieces:

* ``fim`` (fixture) -> :class:`Env`: a watched tree (``fim.root``), a config
  (root-owned 0600 file in a 0700 dir), ``state_dir`` and ``events_file``.
  ``fim.write_config(**sections)`` rewrites the config with overrides,
  ``fim.cli(*args)`` runs a one-shot command, ``fim.daemon()`` starts
  ``run`` and waits for its ``started`` event.
* :class:`Daemon`: ``wait_for(pred)``, ``events()``, ``mark()``, ``stop()``,
  ``hup()``, ``kill()``, ``assert_quiet(...)``; always killed at teardown.
* Kernel limits are never changed on the host: ``fim.daemon(watch_limit=N)``
  runs the daemon in a user namespace of its own where the inotify watch
  limit is N (``d.set_watch_limit(N)`` changes it later), and
  :func:`flood_queue` overflows the inotify queue at the host's own
  ``max_queued_events``.
"""

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIMWATCH = REPO / "fimwatch.py"
SETTLE = 0.1                 # seconds; matches "settle = 100ms" in test configs
START_TIMEOUT = 20.0         # seconds for the daemon's "started" event
DEFAULT_TEST_TIMEOUT = 180   # seconds; override with @pytest.mark.timeout(N)
FILE_EVENTS = {"created", "modified", "attributes", "deleted", "moved"}

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root")


# ---------------------------------------------------------------------------
# per-test timeout guard (no plugin): SIGALRM in the main thread
# ---------------------------------------------------------------------------

class TimeLimitExceeded(Exception):
    """Raised inside a test that ran past its time limit."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    marker = item.get_closest_marker("timeout")
    seconds = int(marker.args[0]) if marker else DEFAULT_TEST_TIMEOUT

    def expired(signum, frame):
        raise TimeLimitExceeded("test took longer than %d s" % seconds)

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(autouse=True)
def _inotify_mechanics(request, monkeypatch):
    """@pytest.mark.inotify: the test is about inotify itself (watches, its
    queue overflow, max_user_watches), so FIMWATCH_TEST_BACKEND=fanotify
    (the whole suite on fanotify) runs it on inotify all the same."""
    if request.node.get_closest_marker("inotify") is not None:
        monkeypatch.setenv("FIMWATCH_TEST_BACKEND", "inotify")


def pytest_collection_modifyitems(config, items):
    if not FIMWATCH.exists():
        skip = pytest.mark.skip(reason="fimwatch.py does not exist yet")
        for item in items:
            item.add_marker(skip)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def wait_until(predicate, timeout=10.0, interval=0.05, what="condition"):
    """Poll predicate() until it returns a true value; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


def is_event(event=None, path=None, **fields):
    """Build a predicate over parsed events: is_event("created", p, kind="file")."""
    path = None if path is None else str(path)

    def pred(e):
        if event is not None and e.get("event") != event:
            return False
        if path is not None and e.get("path") != path:
            return False
        return all(e.get(k) == v for k, v in fields.items())
    pred.__doc__ = "event=%r path=%r %r" % (event, path, fields)
    return pred


def read_events(events_file):
    """Parse events_file; every line must be one valid JSON object."""
    try:
        data = Path(events_file).read_bytes()
    except FileNotFoundError:
        return []
    if not data.endswith(b"\n"):
        # A line being written right now: ignore the incomplete tail.
        data = data[:data.rfind(b"\n") + 1]
    out = []
    for n, raw in enumerate(data.splitlines(), 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise AssertionError("events_file line %d is not UTF-8: %r (%s)" % (n, raw, exc))
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise AssertionError("events_file line %d is not JSON: %r (%s)" % (n, raw, exc))
        assert isinstance(obj, dict), "events_file line %d is not an object: %r" % (n, raw)
        out.append(obj)
    return out


def inotify_watch_count(pid):
    """Number of inotify watches held by process pid (sum over its inotify fds)."""
    total = 0
    fd_dir = "/proc/%d/fd" % pid
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(os.path.join(fd_dir, fd)) != "anon_inode:inotify":
                continue
            with open("/proc/%d/fdinfo/%s" % (pid, fd)) as f:
                total += sum(1 for line in f if line.startswith("inotify wd:"))
        except OSError:
            continue
    return total


def own_watches(fim, events_file=None):
    """The inotify watches a test daemon holds for fimwatch's own files
    (program, config, events file, and on this host the directories of the
    installed locations: watched whatever [watch] paths says), none of them
    under fim.root. Subtract it from inotify_watch_count() to count the tree's."""
    import fimwatch
    dirs = set()
    ev = str(fim.events_file) if events_file is None else events_file
    for p in fimwatch.own_files(str(fim.conf), ev):
        if os.path.isdir(p) and not os.path.islink(p):
            dirs.update(r for r, _, _ in os.walk(p))
        elif os.path.isdir(os.path.dirname(p)):
            dirs.add(os.path.dirname(p))
    return len(dirs)


def own_entries(fim):
    """Baseline entries of fimwatch's own files that exist (see own_watches)."""
    import fimwatch
    n = 0
    for p in fimwatch.own_files(str(fim.conf), str(fim.events_file)):
        n += sum(1 + len(f) for _, _, f in os.walk(p)) if os.path.isdir(p) else \
            os.path.lexists(p)
    return n


def tree_watch_count(d):
    """inotify watches of daemon d on its watched tree (own_watches left out)."""
    return inotify_watch_count(d.pid) - own_watches(d.env)


# --- kernel limits, without touching the host's --------------------------------
#
# inotify watch limits are per user namespace (/proc/sys/user/max_inotify_watches,
# counted hierarchically: a watch counts in its namespace and in every parent),
# so a daemon started in a user namespace of its own (root mapped to root) can
# be given a tiny limit while fs.inotify.max_user_watches on the host stays as
# it is. fs.inotify.max_queued_events has no per-namespace copy: the queue
# tests overflow it at its real value instead (flood_queue).

USERNS_LIMIT = "/proc/sys/user/max_inotify_watches"
# argv prefix: a new user namespace, root -> root, whose watch limit is $0.
USERNS_PREFIX = ["unshare", "--user", "--map-root-user", "--", "sh", "-c",
                 'echo "$0" > %s && exec "$@"' % USERNS_LIMIT]


def userns_prefix(watch_limit):
    """argv prefix that runs a command (same pid: no fork) in a new user
    namespace whose inotify watch limit is watch_limit."""
    if not IS_ROOT:
        pytest.skip("needs root: the daemon must run as root inside its namespace")
    return USERNS_PREFIX + [str(int(watch_limit))]


def flood_queue(a, b, minimum=None):
    """Queue more inotify events than fs.inotify.max_queued_events on two
    watched files a and b (IN_ATTRIB each, alternating so none merge), then
    restore their times: the daemon must be SIGSTOPped, and finds no change."""
    with open("/proc/sys/fs/inotify/max_queued_events") as f:
        limit = int(f.read())
    n = max(limit + 64, minimum or 0)
    if n > 5000000:
        pytest.skip("fs.inotify.max_queued_events=%d: too many events to overflow" % limit)
    sa, sb = os.stat(a), os.stat(b)
    for i in range(n // 2 + 1):
        os.utime(a, ns=(sa.st_atime_ns, sa.st_mtime_ns))
        os.utime(b, ns=(sb.st_atime_ns, sb.st_mtime_ns))
    return n


def clean_env():
    """Environment for fimwatch subprocesses: no systemd notify socket of ours."""
    env = dict(os.environ)
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "FIMWATCH_CONFIG",
                "LISTEN_FDS", "LISTEN_PID"):
        env.pop(var, None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


# ---------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------

def default_sections(root, state_dir, events_file):
    return {
        "fimwatch": {
            "state_dir": str(state_dir),
            "hostname": "testhost",
            "settle": "100ms",
            "hash_max_size": "256M",
            "scan_interval": "0",
            # off: on a Debian host the daemon would add two watches of its
            # own (/var/lib/dpkg, info/) that watch-count tests do not expect;
            # tests/test_transactions.py turns it on against a temp database
            "package_check": "no",
        },
        "watch": {
            "paths": str(root),
            "exclude": "*.swp *.swx *~ .#* 4913",
            "scan_only": "",
            # The engine suite runs on inotify; FIMWATCH_TEST_BACKEND=fanotify
            # runs all of it on fanotify (tests/test_fanotify.py runs a core set on both).
            "backend": os.environ.get("FIMWATCH_TEST_BACKEND", "inotify"),
            # off: the defaults (/var/log/auth.log ...) would add a watch on
            # the host's /var/log; tests/test_growing.py sets its own
            "append_only": "",
        },
        "severity": {
            "critical": "%s/critical/**" % root,
            "info": "%s/info/**" % root,
        },
        "syslog": {"enabled": "no"},
        "log": {"events_file": str(events_file)},
    }


def render_config(sections):
    lines = ["# written by tests/conftest.py"]
    for name, keys in sections.items():
        lines.append("")
        lines.append("[%s]" % name)
        for key, value in keys.items():
            lines.append("%s = %s" % (key, value) if value != "" else "%s =" % key)
    return "\n".join(lines) + "\n"


class Env:
    """One test's fimwatch world: tree, config, state, events file."""

    def __init__(self, base):
        self.base = Path(base)
        self.root = self.base / "tree"          # the watched path
        self.outside = self.base / "outside"    # same filesystem, not watched
        self.conf_dir = self.base / "etc"
        self.conf = self.conf_dir / "fimwatch.conf"
        self.state_dir = self.base / "state"
        self.log_dir = self.base / "log"
        self.events_file = self.log_dir / "events.jsonl"
        for d in (self.root, self.outside, self.log_dir):
            d.mkdir()
        self.conf_dir.mkdir(mode=0o700)
        os.chmod(self.conf_dir, 0o700)
        self.daemons = []
        self.write_config()

    # -- config -------------------------------------------------------------
    def sections(self, **overrides):
        """Default config sections, with {section: {key: value}} overrides merged in.

        A value of None removes the key."""
        sections = default_sections(self.root, self.state_dir, self.events_file)
        for section, keys in overrides.items():
            target = sections.setdefault(section, {})
            for key, value in keys.items():
                if value is None:
                    target.pop(key, None)
                else:
                    target[key] = value
        return sections

    def write_config(self, text=None, **overrides):
        """Write the config (default sections + overrides, or raw text)."""
        if text is None:
            text = render_config(self.sections(**overrides))
        tmp = self.conf.with_name(".fimwatch.conf.tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.conf)
        return self.conf

    # -- commands -------------------------------------------------------------
    def cli(self, *args, timeout=60, config=True, check=None, python=None, env=None):
        """Run one fimwatch command; returns CompletedProcess (text, captured)."""
        argv = [python or sys.executable, str(FIMWATCH)]
        if config:
            argv += ["--config", str(self.conf)]
        argv += [str(a) for a in args]
        proc = subprocess.run(argv, cwd=str(REPO), env=dict(clean_env(), **(env or {})),
                              stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=timeout, errors="backslashreplace")
        if check is not None:
            assert proc.returncode == check, describe(proc)
        return proc

    def daemon(self, wait=True, timeout=START_TIMEOUT, python=None, env=None,
               watch_limit=None, program=None):
        """Start `run`. watch_limit=N: in a user namespace of its own whose
        inotify watch limit is N (the host's limit is not touched).
        program: a copy of fimwatch.py to run instead of the checkout's."""
        d = Daemon(self, python=python, extra_env=env, watch_limit=watch_limit,
                   program=program)
        self.daemons.append(d)
        d.start(wait=wait, timeout=timeout)
        return d

    def baseline(self):
        """Build the baseline: start the daemon once and stop it."""
        d = self.daemon()
        d.stop()
        return d

    def events(self):
        return read_events(self.events_file)

    def cleanup(self):
        for d in self.daemons:
            d.kill_quietly()


def describe(proc):
    return "exit %s\n--- stdout ---\n%s\n--- stderr ---\n%s" % (
        proc.returncode, proc.stdout, proc.stderr)


class Daemon:
    """A `fimwatch run` subprocess and a cursor over the events_file."""

    def __init__(self, env, python=None, extra_env=None, watch_limit=None, program=None):
        self.env = env
        self.program = program or FIMWATCH
        self.watch_limit = watch_limit
        self.python = python or sys.executable
        self.extra_env = extra_env or {}
        self.proc = None
        self.start_index = 0
        self.out_path = env.base / ("daemon-%d.out" % len(env.daemons))
        self.err_path = env.base / ("daemon-%d.err" % len(env.daemons))

    @property
    def pid(self):
        return self.proc.pid

    def start(self, wait=True, timeout=START_TIMEOUT):
        self.start_index = len(self.env.events())
        argv = [self.python, str(self.program), "--config", str(self.env.conf), "run"]
        if self.watch_limit is not None:
            argv = userns_prefix(self.watch_limit) + argv
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(argv, cwd=str(REPO),
                                         env=dict(clean_env(), **self.extra_env),
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        if wait:
            self.started = self.wait_for(is_event("started"), timeout=timeout,
                                         since=self.start_index)
        return self

    # -- output -------------------------------------------------------------
    def stderr(self):
        try:
            return self.err_path.read_text(errors="backslashreplace")
        except FileNotFoundError:
            return ""

    def stdout(self):
        try:
            return self.out_path.read_text(errors="backslashreplace")
        except FileNotFoundError:
            return ""

    def events(self, since=None):
        """Events written since this daemon started (or since index `since`)."""
        return self.env.events()[self.start_index if since is None else since:]

    def mark(self):
        """Index to pass as since= to look only at events after this point."""
        return len(self.env.events())

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def _report(self, since):
        evs = self.env.events()[self.start_index if since is None else since:]
        lines = "\n".join(json.dumps(e, sort_keys=True)[:300] for e in evs[-20:])
        state = "running" if self.alive() else "EXITED with %s" % self.proc.returncode
        return "daemon %s\n--- events (%d, last 20) ---\n%s\n--- daemon stderr ---\n%s" % (
            state, len(evs), lines, self.stderr()[-4000:])

    def wait_for(self, pred, timeout=10.0, since=None, count=1):
        """Wait until `count` events matching pred exist after `since`; return the first."""
        deadline = time.monotonic() + timeout
        while True:
            matches = [e for e in self.events(since) if pred(e)]
            if len(matches) >= count:
                return matches[0]
            if not self.alive() or time.monotonic() > deadline:
                why = "timed out after %.1fs" % timeout if self.alive() else "daemon died"
                raise AssertionError("%s waiting for %s\n%s" % (
                    why, getattr(pred, "__doc__", None) or pred, self._report(since)))
            time.sleep(0.05)

    def matching(self, pred, since=None):
        return [e for e in self.events(since) if pred(e)]

    def assert_quiet(self, pred, since, control):
        """Prove that nothing matching pred happened after index `since`.

        Waits a few settle windows, then makes the positive-control change
        `control(root) -> predicate`, waits for it (so the daemon is alive and
        has processed everything before it), and only then checks."""
        time.sleep(SETTLE * 4)
        control_pred = control(self.env.root)
        self.wait_for(control_pred, since=since)
        time.sleep(SETTLE * 2)
        bad = [e for e in self.events(since) if pred(e)]
        assert not bad, "unexpected events: %s\n%s" % (bad, self._report(since))

    def set_watch_limit(self, n):
        """Change the inotify watch limit of this daemon's user namespace
        (started with watch_limit=...). Returns the old value."""
        assert self.watch_limit is not None, "daemon not started with watch_limit="
        r = subprocess.run(["nsenter", "--user", "--target", str(self.pid), "--",
                            "sh", "-c", 'cat %s; echo "$0" > %s' % (USERNS_LIMIT, USERNS_LIMIT),
                            str(int(n))], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, timeout=10)
        assert r.returncode == 0, "nsenter failed: %s" % r.stderr
        return int(r.stdout)

    # -- signals ------------------------------------------------------------
    @contextlib.contextmanager
    def paused(self):
        """SIGSTOP the daemon for the block (its inotify queue fills up), SIGCONT after."""
        os.kill(self.pid, signal.SIGSTOP)
        try:
            yield self
        finally:
            os.kill(self.pid, signal.SIGCONT)

    def hup(self):
        self.proc.send_signal(signal.SIGHUP)

    def stop(self, sig=signal.SIGTERM, timeout=20):
        """SIGTERM (or sig), wait, assert exit 0 and a `stopped` event."""
        mark = self.mark()
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("daemon did not stop within %ss\n%s"
                                 % (timeout, self._report(None)))
        assert rc == 0, "daemon exited %s on %s\n%s" % (rc, sig, self._report(None))
        assert [e for e in self.env.events()[mark:] if e.get("event") == "stopped"], \
            "no stopped event\n" + self._report(None)
        return rc

    def kill(self):
        """SIGKILL (an unclean stop)."""
        self.proc.kill()
        self.proc.wait()

    def kill_quietly(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.kill(self.proc.pid, signal.SIGCONT)
        except OSError:
            pass
        self.proc.kill()
        self.proc.wait()


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------

# Nothing here changes a kernel limit on the host. The one test that does,
# the opt-in tests/system test_ct_sysctl_raised_live_never_lowered
# (FIMWATCH_TEST_HOST_SYSCTL=1), takes this lock exclusively (so did older
# checkouts' limit tests); every daemon test takes it shared, so they never
# overlap on one machine.
MACHINE_LOCK = "/tmp/fimwatch-tests.lock"


@pytest.fixture
def fim(tmp_path):
    fd = os.open(MACHINE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        env = Env(tmp_path)
        yield env
        env.cleanup()
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# small file helpers used by several test modules
# ---------------------------------------------------------------------------

def write(path, data="x\n", mode=None):
    path = Path(path) if not isinstance(path, bytes) else path
    raw = data.encode() if isinstance(data, str) else data
    with open(path, "wb") as f:
        f.write(raw)
    if mode is not None:
        os.chmod(path, mode)
    return path


def write_apart(path, data="x\n"):
    """Write path from a short-lived process of its own (sh), so each file is
    one change on either backend: on fanotify the writer's pid is known and
    the writes of one process go out as one "changes made together" message."""
    raw = data.encode() if isinstance(data, str) else data
    subprocess.run(["sh", "-c", 'cat > "$1"', "sh", os.fsdecode(path)], input=raw, check=True)
    return Path(os.fsdecode(path))


def about(path):
    """Predicate: any file event whose path or from is `path`."""
    path = str(path)
    return lambda e: e.get("event") in FILE_EVENTS and path in (e.get("path"), e.get("from"))


def daemon_over(fim, path, data="x\n", mode=None):
    """Write path (data, mode), start the daemon; returns (daemon, mark)."""
    write(path, data, mode=mode)
    d = fim.daemon()
    return d, d.mark()


def event_after(fim, path, data, change, pred, mode=None):
    """Write path (data, mode), start the daemon, call change(path), and wait
    for the first event after the change that pred matches. Returns
    (daemon, mark, event); the daemon still runs."""
    d, m = daemon_over(fim, path, data, mode)
    change(path)
    return d, m, d.wait_for(pred, since=m)


def assert_change_is_quiet(fim, path, data, change, mode=None):
    """Write path (data, mode), start the daemon, call change(path): no event
    about path may follow (Daemon.assert_quiet, with its positive control).
    Stops the daemon."""
    d, m = daemon_over(fim, path, data, mode)
    change(path)
    d.assert_quiet(about(path), since=m, control=control_file())
    d.stop()


@contextlib.contextmanager
def churn(paths, content="v%d\n"):
    """Rewrite paths round-robin in a background thread for the duration of
    the block: write number i puts content % i into paths[i % len(paths)].
    The thread is stopped and joined when the block ends; an error in it is
    raised then."""
    stop = threading.Event()
    errors = []

    def run():
        i = 0
        try:
            while not stop.is_set():
                write(paths[i % len(paths)], content % i)
                i += 1
        except Exception as exc:    # re-raised in the test's thread
            errors.append(exc)
    t = threading.Thread(target=run)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
    if errors:
        raise errors[0]


def control_file(name="control.txt"):
    """A positive control for Daemon.assert_quiet: create a fresh file."""
    def control(root):
        p = Path(root) / ("%s-%d" % (name, time.monotonic_ns()))
        write(p, "control\n")
        return is_event("created", p)
    return control


def assert_scan_finds(fim, d, victim):
    """Change victim (a file in a subtree without inotify watches); then
    `scan` must report it, unless the daemon's own fallback scan already did."""
    m = d.mark()
    write(victim, "changed while unwatched\n")
    r = fim.cli("scan", "--no-alert", "--json", timeout=60)
    if r.returncode == 0:
        assert d.matching(is_event("modified", victim), since=m), r.stdout + r.stderr
    else:
        assert r.returncode == 1 and str(victim) in r.stdout, r.stdout + r.stderr


ISO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def hold_lock(lock, tmp_path, name="apt-get", env=None):
    """A process named like a package frontend holding an fcntl lock."""
    script = tmp_path / name
    script.write_text("import fcntl, sys, time\n"
                      "f = open(sys.argv[1], 'r+')\n"
                      "fcntl.lockf(f, fcntl.LOCK_EX)\n"
                      "print('locked', flush=True)\n"
                      "time.sleep(120)\n")
    p = subprocess.Popen([sys.executable, str(script), str(lock)], stdout=subprocess.PIPE,
                         text=True, env=dict(os.environ, **(env or {})))
    assert p.stdout.readline().strip() == "locked"
    return p
