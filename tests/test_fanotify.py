"""The fanotify backend: who wrote (`process`), paths from handles, the
fallback to inotify and why, overflow -> rescan, and a core set of the
engine tests on both backends.

fanotify's FAN_MARK_FILESYSTEM sees the whole filesystem of the temp tree
(other test suites on this machine too): the backend must keep to the roots.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

import test_events as te
from conftest import IS_ROOT, REPO, control_file, describe, is_event, wait_until, write

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="fanotify needs CAP_SYS_ADMIN")

USERNS = ["unshare", "--user", "--map-root-user", "--"]


def fan(fim, **watch):
    fim.write_config(watch=dict({"backend": "fanotify"}, **watch))


# --- attribution ---------------------------------------------------------------

def live_child_write(d, p):
    """A python child writes p and stays alive 2 s: (the created event, the child)."""
    code = "import sys, time; open(sys.argv[1], 'w').write('hi\\n'); time.sleep(2)"
    child = subprocess.Popen([sys.executable, "-c", code, str(p), "marker-arg"])
    try:
        return d.wait_for(is_event("created", p)), child
    finally:
        child.kill()
        child.wait()


def test_write_by_a_child_names_its_process(fim):
    fan(fim)
    d = fim.daemon()
    e, child = live_child_write(d, fim.root / "by-child.txt")
    proc = e.get("process")
    assert proc, e
    assert proc["pid"] == child.pid, proc
    assert proc["exe"] == os.path.realpath(sys.executable), proc
    assert "marker-arg" in proc["cmdline"] and proc["cmdline"].startswith(sys.executable), proc
    assert proc["uid"] == os.getuid() and proc["user"] == "root", proc
    assert proc["ppid"] == os.getpid(), proc
    assert proc["confidence"] == "live", proc
    assert proc["chain"][-1] == os.path.basename(sys.executable)[:15], proc
    d.stop()


def test_a_writer_that_changes_is_read_again(fim):
    """/proc of a busy writer is read once per process (ProcessCache.FRESH),
    not once per read of the queue; a writer that renamed itself or executed
    another program since is read again: its next event names what it is now."""
    fan(fim)
    d = fim.daemon()
    a, b, c = (fim.root / n for n in ("a.txt", "b.txt", "c.txt"))
    script = fim.root.parent / "writer.py"
    script.write_text(
        "import ctypes, os, sys, time\n"
        "if sys.argv[1] != 'exec':\n"
        "    open(sys.argv[1], 'w').write('1\\n'); time.sleep(0.4)\n"
        "    os.execv(sys.executable, [sys.executable, __file__, 'exec', sys.argv[2],\n"
        "                              sys.argv[3], 'ex' + 'ecd'])\n"
        "open(sys.argv[2], 'w').write('2\\n'); time.sleep(0.4)\n"
        "ctypes.CDLL(None).prctl(15, b'renamed-writer', 0, 0, 0)\n"
        "open(sys.argv[3], 'w').write('3\\n'); time.sleep(2)\n")
    child = subprocess.Popen([sys.executable, str(script), str(a), str(b), str(c)])
    try:
        ea = d.wait_for(is_event("created", a))
        eb = d.wait_for(is_event("created", b))
        ec = d.wait_for(is_event("created", c))
    finally:
        child.kill()
        child.wait()
    procs = [e.get("process") or {} for e in (ea, eb, ec)]
    assert [p.get("pid") for p in procs] == [child.pid] * 3, procs
    assert all(p.get("confidence") == "live" for p in procs), procs
    assert "execd" not in procs[0]["cmdline"], procs[0]
    # the same name after the exec: only the exec record says it changed
    assert procs[1]["comm"] == procs[0]["comm"], procs
    assert procs[1]["cmdline"].endswith(" execd"), procs[1]
    assert procs[2]["comm"] == "renamed-writer", procs[2]
    assert procs[2]["chain"][-1] == "renamed-writer", procs[2]
    d.stop()


def test_short_lived_dropper_is_still_named(fim):
    """write + delete within 50 ms, then exit: the deleted event carries the
    dropper's pid (and its exe, when /proc could still be read)."""
    p = write(fim.root / "payload.sh", "#!/bin/sh\ntrue\n")
    fan(fim)
    d = fim.daemon()
    code = ("import os, sys; f = sys.argv[1]; open(f, 'w').write('evil\\n'); "
            "os.unlink(f)")
    t0 = time.monotonic()
    child = subprocess.run([sys.executable, "-c", code, str(p)], check=True)
    assert time.monotonic() - t0 < 1.0
    del child
    e = d.wait_for(is_event("deleted", p))
    proc = e.get("process")
    assert proc and isinstance(proc["pid"], int) and proc["pid"] != d.pid, e
    assert proc["confidence"] in ("live", "cached", "none"), proc
    if proc["confidence"] != "none":
        assert proc["exe"] == os.path.realpath(sys.executable), proc
    d.stop()


def children_comms(pid):
    out = []
    for c in open("/proc/%d/task/%d/children" % (pid, pid)).read().split():
        try:
            out.append(open("/proc/%s/comm" % c).read().strip())
        except OSError:
            pass                         # exited meanwhile
    return out


def test_a_writer_gone_before_its_record_is_read_is_named_with_its_login(fim):
    """The exec cache keeps the writer's parent: a writer that exited before
    fimwatch read its write is named (cached) with the login user and
    session of the shell that started it, and the chain up to it."""
    fan(fim)
    d = fim.daemon()
    p = fim.root / "late"
    code = ("import os, sys; sys.stdin.read(1); "
            "fd = os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY, 0o644); "
            "os.write(fd, b'x'); os.close(fd)")
    # sh sets its login uid as pam_loginuid does at a login, runs the writer, stays
    sh = subprocess.Popen(["sh", "-c", 'echo 4242 > /proc/self/loginuid && '
                           '"$0" -c "$1" "$2" && sleep 10', sys.executable, code, str(p)],
                          stdin=subprocess.PIPE)
    try:
        wait_until(lambda: children_comms(sh.pid), what="the writer started")
        time.sleep(0.5)                  # its exec record is read meanwhile
        os.kill(d.pid, signal.SIGSTOP)   # the write is read only after the writer is gone
        try:
            sh.stdin.write(b"x")
            sh.stdin.flush()
            wait_until(lambda: children_comms(sh.pid) == ["sleep"], what="the writer gone")
        finally:
            os.kill(d.pid, signal.SIGCONT)
        proc = d.wait_for(is_event("created", p))["process"]
    finally:
        sh.kill()
        sh.wait()
    exe = os.path.realpath(sys.executable)
    assert proc["confidence"] == "cached" and proc["exe"] == exe, proc
    assert proc["login_uid"] == 4242 and isinstance(proc.get("session"), int), proc
    assert proc["chain"][-2:] == ["sh", os.path.basename(exe)], proc
    d.stop()


def test_exec_cache_entry_of_a_reused_pid_is_not_used():
    """Pid reuse: an exec cache entry names the process that had the pid when
    it executed; if a live process with another start time holds the pid
    now, the entry is not its. A reuse cannot be forced here, so the entry
    is written by hand for this (live) process, with its start time and
    with another."""
    import fimwatch
    b = fimwatch.FanotifyBackend()
    try:
        exe_dir, me = os.path.dirname(sys.executable), os.getpid()
        key = fimwatch.fsid_of(exe_dir) + fimwatch.dir_handle(exe_dir)[1]
        b.dirs.set(key, exe_dir)
        name = os.fsencode(os.path.basename(sys.executable))
        ppid, start = fimwatch._proc_stat(me)
        b.execs[me] = (key, name, None, 0.0, ppid, start)
        assert b.executed(me)["exe"] == sys.executable
        b.execs[me] = (key, name, None, 0.0, ppid, start + 1)
        assert b.executed(me) == {}
    finally:
        b.close()


def test_a_gone_pid_seen_earlier_is_not_named_as_its_old_process_after_reuse():
    """A pid read live earlier and gone at the next record is named from that
    earlier read (confidence "cached") -- unless the exec cache knows a later
    process of the same pid (its start time is younger than the earlier
    read's): the pid was reused, and the later process wrote. The process
    here is real (a sleep, read live, then killed); the exec cache's entry
    is given by hand, as a reuse cannot be forced."""
    import fimwatch
    later = {}
    pc = fimwatch.ProcessCache(executed=lambda pid, start=None: dict(later))
    child = subprocess.Popen(["sleep", "30"])
    try:
        live = pc.get(child.pid)
        assert live["confidence"] == "live" and live["exe"].endswith("/sleep"), live
        start = fimwatch._proc_stat(child.pid)[1]
    finally:
        child.kill()
        child.wait()
    pc.new_batch()
    gone = pc.get(child.pid)                      # nothing later known: the earlier read
    assert gone["confidence"] == "cached" and gone["exe"] == live["exe"], gone
    later.update(exe="/usr/bin/dropper", ppid=1, started=start)   # the same process
    pc.new_batch()
    assert pc.get(child.pid)["exe"] == live["exe"]
    later.update(started=start + 5)               # a younger process had the pid
    pc.new_batch()
    reused = pc.get(child.pid)
    assert reused["exe"] == "/usr/bin/dropper" and reused["confidence"] == "cached", reused


WRITERS = {"sh": (lambda f: ["sh", "-c", "echo x >> %s" % f], "/bin/sh"),
           "cp": (lambda f: ["cp", "/etc/hostname", f], "/bin/cp"),
           "sed": (lambda f: ["sed", "-i", "s/a/b/", f], "/bin/sed")}


def test_short_lived_writers_are_named_by_the_exec_cache(fim):
    """sh -c 'echo x >> f', cp and sed -i, 20 each, each gone at once: every
    event names the right exe (the binary, not the ELF interpreter that is
    opened for exec after it), from the exec cache when /proc came too late.
    The binaries are outside the tree: their directory is found by handle."""
    n = 20
    for name in WRITERS:
        for i in range(n):
            write(fim.root / ("%s-%d" % (name, i)), "a\n")
    fan(fim)
    d = fim.daemon()
    m = d.mark()
    for name, (argv, _) in WRITERS.items():
        for i in range(n):
            subprocess.run(argv(str(fim.root / ("%s-%d" % (name, i)))), check=True)
    for name, (_, exe) in WRITERS.items():
        exe = os.path.realpath(exe)
        evs = [d.wait_for(is_event("modified", fim.root / ("%s-%d" % (name, i))), since=m)
               for i in range(n)]
        procs = [e.get("process") or {} for e in evs]
        wrong = [p for p in procs if p.get("exe") != exe]
        assert not wrong, (name, exe, wrong[:3])
        assert all(p["confidence"] in ("live", "cached") for p in procs), procs
    d.stop()


def test_dropper_script_is_named_with_its_interpreter(fim):
    """A #! script outside the tree writes into it and exits: the event names
    the interpreter as exe and the script as script (its execve opened both);
    `sh -c 'exec cp ...'` is cp with no script (dash is no #! file)."""
    dropper = write(fim.outside / "dropper", "#!/bin/sh\necho evil > %s\n" % (fim.root / "h"),
                    mode=0o755)
    fan(fim)
    d = fim.daemon()
    subprocess.run([str(dropper)], check=True)
    subprocess.run(["sh", "-c", "exec cp /etc/hostname %s" % (fim.root / "c")], check=True)
    proc = d.wait_for(is_event("created", fim.root / "h"))["process"]
    assert proc["exe"] == os.path.realpath("/bin/sh") and proc["script"] == str(dropper), proc
    proc = d.wait_for(is_event("created", fim.root / "c"))["process"]
    assert proc["exe"] == os.path.realpath("/bin/cp") and "script" not in proc, proc
    d.stop()


def test_a_running_script_is_named_with_its_script(fim):
    """A #! script that writes and is still running when its record is read
    (live): the event names the script too, not only its interpreter."""
    script = write(fim.outside / "stays", "#!/bin/sh\necho evil > %s\nsleep 3\n"
                   % (fim.root / "s"), mode=0o755)
    fan(fim)
    d = fim.daemon()
    child = subprocess.Popen([str(script)])
    try:
        proc = d.wait_for(is_event("created", fim.root / "s"))["process"]
    finally:
        child.kill()
        child.wait()
    assert proc["confidence"] == "live" and proc["pid"] == child.pid, proc
    assert proc["exe"] == os.path.realpath("/bin/sh") and proc["script"] == str(script), proc
    d.stop()


@pytest.mark.skipif(not shutil.which("capsh"), reason="capsh (libcap2-bin) missing")
def test_exe_from_the_exec_cache_when_proc_exe_is_unreadable(fim, tmp_path):
    """As under the unit: a daemon without CAP_SYS_PTRACE may not read a
    root process's /proc/PID/exe (it has capabilities the daemon lacks); the
    live writer's exe comes from the exec cache, its cmdline from /proc."""
    wrapper = tmp_path / "python-without-ptrace"
    wrapper.write_text('#!/bin/sh\nexec capsh --drop=cap_sys_ptrace -- -c \'exec "$0" "$@"\' '
                       '%s "$@"\n' % sys.executable)
    wrapper.chmod(0o755)
    fan(fim)
    d = fim.daemon(python=str(wrapper))
    status = open("/proc/%d/status" % d.pid).read()
    eff = int(re.search(r"^CapEff:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    assert not eff & (1 << 19), "the daemon still has CAP_SYS_PTRACE"     # the premise
    e, child = live_child_write(d, fim.root / "by-live-child.txt")
    proc = e.get("process")
    assert proc and proc["pid"] == child.pid and proc["confidence"] == "live", e
    assert "marker-arg" in proc["cmdline"], proc
    assert proc["exe"] == os.path.realpath(sys.executable), proc
    d.stop()


def test_directory_handle_to_path(tmp_path):
    """open_by_handle_at turns a directory's handle back into its path; a
    handle of a deleted directory gives None, not an error."""
    import fimwatch
    d = tmp_path / "some" / "dir"
    d.mkdir(parents=True)
    handle = fimwatch.dir_handle(str(d))[1]
    mfd = os.open(fimwatch._mount_top(str(d)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert fimwatch.path_of_handle(mfd, handle) == str(d)
        d.rmdir()
        assert fimwatch.path_of_handle(mfd, handle) is None
        assert fimwatch.path_of_handle(mfd, b"\x08\0\0\0\x01\0\0\0" + b"\xff" * 8) is None
    finally:
        os.close(mfd)


def test_inotify_events_carry_no_process(fim):
    fim.write_config(watch={"backend": "inotify"})
    d = fim.daemon()
    p = write(fim.root / "x.txt", "x\n")
    e = d.wait_for(is_event("created", p))
    assert "process" not in e, e
    d.stop()


# --- handles: only the roots, renames, directories ------------------------------

def test_writes_outside_the_roots_are_not_events(fim):
    fan(fim)
    d = fim.daemon()
    m = d.mark()
    write(fim.outside / "elsewhere.txt", "x\n")
    os.mkdir(fim.outside / "sub")
    write(fim.outside / "sub" / "f", "y\n")
    write(fim.state_dir / "junk", "z\n")
    # Same name outside, by another process, within the settle window: the
    # root's file must not be pinned on it (nor touched at all).
    p = write(fim.root / "same.txt", "mine\n")
    subprocess.run([sys.executable, "-c", "open(%r, 'w').write('other')"
                    % str(fim.outside / "same.txt")], check=True)
    e = d.wait_for(is_event("created", p), since=m)
    assert e["process"]["pid"] == os.getpid(), e
    d.assert_quiet(lambda e: e.get("event") in te.FILE_EVENTS
                   and not e.get("path", "").startswith(str(fim.root)),
                   since=m, control=control_file())
    d.stop()


def test_setid_anywhere_on_the_marked_filesystem_is_critical(fim):
    """A setuid bit or file capabilities set outside the watched paths (on
    the filesystem the mark covers) is a critical `setid` event, once; a
    plain chmod there is not an event. The positive control comes last."""
    fan(fim)
    d = fim.daemon()
    m = d.mark()
    plain = write(fim.outside / "plain", "x\n")
    os.chmod(plain, 0o755)                                    # nothing set-id: silent
    evil = write(fim.outside / "rootshell", "#!/bin/sh\n")
    os.chmod(evil, 0o4755)
    e = d.wait_for(is_event("setid", evil), since=m)
    assert e["severity"] == "critical" and e["mode"] == "4755", e
    assert e["summary"] == "setuid-root outside the watched paths", e
    assert e["process"]["pid"] == os.getpid(), e
    os.utime(evil)                                            # same state: not again
    if shutil.which("setcap"):
        capped = write(fim.outside / "capped", "x\n")
        subprocess.run(["setcap", "cap_setuid+ep", str(capped)], check=True)
        e = d.wait_for(is_event("setid", capped), since=m)
        assert "file capabilities cap_setuid=ep" in e["summary"], e
    d.assert_quiet(lambda e: e.get("path") == str(plain) or
                   len([x for x in d.events(m) if x.get("path") == str(evil)]) > 1,
                   since=m, control=control_file())
    d.stop()


def test_changes_inside_are_seen_while_a_neighbour_writes_outside(fim):
    """Writes elsewhere on the filesystem make the backend coalesce its reads
    (NOISE_DELAY): a change in the tree meanwhile is still reported, fast."""
    fan(fim)
    d = fim.daemon()
    code = ("import sys, time\nend = time.time() + 4\nn = 0\n"
            "while time.time() < end:\n"
            "    open(sys.argv[1] + '/n%d' % (n % 50), 'w').write('x'); n += 1\n"
            "    time.sleep(0.001)\n")
    noise = subprocess.Popen([sys.executable, "-c", code, str(fim.outside)])
    try:
        time.sleep(0.5)
        for i in range(5):
            p = write(fim.root / ("during-%d" % i), "x\n")
            t0 = time.monotonic()
            d.wait_for(is_event("created", p))
            assert time.monotonic() - t0 < 1.0
            time.sleep(0.1)
    finally:
        noise.kill()
        noise.wait()
    d.stop()


def test_only_a_busy_neighbour_delays_the_next_read(tmp_path):
    """fanotify delays a read by NOISE_DELAY only while other processes
    write many files beside the trees: a stray write nearby, or fimwatch's
    own writes, must not delay the next read (a dropper that lives a few ms
    would be gone before it is read). Driven in this process on a tmpfs of
    its own, so no other writer on the machine is seen; "own" is this
    process, "other" a child."""
    import fimwatch
    fs = tmp_path / "fs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(fs)], check=True)
    b = fimwatch.FanotifyBackend()
    try:
        fimwatch.fanotify_mark_fs(b.fd, str(fs))
        b.delay = fimwatch.NOISE_DELAY

        def timed_read():
            t0 = time.monotonic()
            b.read(None)                 # records outside any tree: no Engine call
            return time.monotonic() - t0

        def others_write(n):
            subprocess.run([sys.executable, "-c", "import sys\nfor i in range(%d): "
                            "open('%s/o%%d' %% i, 'w').write('x')" % (n, fs)], check=True)
        for i in range(3):               # own writes, each read alone
            write(fs / ("own-%d" % i), "x\n")
            assert timed_read() < 0.015
        for i in range(100):             # many own writes (a burst of events)
            write(fs / ("own-many-%d" % i), "x\n")
        timed_read()
        write(fs / "own-last", "x\n")
        assert timed_read() < 0.015
        others_write(1)                  # a stray write of another process
        assert timed_read() < 0.015
        write(fs / "own-after", "x\n")
        assert timed_read() < 0.015      # not delayed by the stray write
        others_write(200)                # a busy neighbour: 600 records
        timed_read()
        write(fs / "own-busy", "x\n")
        assert timed_read() >= fimwatch.NOISE_DELAY   # positive control: gathered
    finally:
        b.close()
        subprocess.run(["umount", "-l", str(fs)])


def test_directory_rename_is_one_moved_event_and_the_new_name_is_watched(fim):
    os.mkdir(fim.root / "a")
    write(fim.root / "a" / "f.txt", "one\n")
    fan(fim)
    d = fim.daemon()
    os.rename(fim.root / "a", fim.root / "b")
    e = d.wait_for(is_event("moved", fim.root / "b"))
    assert e["from"] == str(fim.root / "a"), e
    write(fim.root / "b" / "f.txt", "two\n")
    d.wait_for(is_event("modified", fim.root / "b" / "f.txt"))
    os.mkdir(fim.root / "b" / "new")
    write(fim.root / "b" / "new" / "g", "g\n")
    d.wait_for(is_event("created", fim.root / "b" / "new" / "g"))
    d.stop()


def test_deleted_root_is_watched_for_again(fim):
    fan(fim)
    d = fim.daemon()
    write(fim.root / "f", "x\n")
    d.wait_for(is_event("created", fim.root / "f"))
    os.unlink(fim.root / "f")
    os.rmdir(fim.root)
    d.wait_for(is_event("deleted", fim.root))
    os.mkdir(fim.root)
    write(fim.root / "back", "x\n")
    d.wait_for(is_event("created", fim.root / "back"), timeout=15)
    d.stop()


# --- overflow -------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_queue_overflow_triggers_a_rescan_that_finds_the_lost_change(fim):
    victim = write(fim.root / "victim.txt", "before\n")
    fan(fim)
    d = fim.daemon()
    with open("/proc/sys/fs/fanotify/max_queued_events") as f:
        limit = int(f.read())
    if limit > 200000:
        pytest.skip("fs.fanotify.max_queued_events=%d: too many to overflow" % limit)
    m = d.mark()
    with d.paused():
        # Distinct names: fanotify merges repeated records of one object.
        for i in range(limit // 2 + 200):
            q = fim.outside / ("f%d" % i)
            q.touch()
            q.unlink()
        write(victim, "after, while the queue was full\n")
    d.wait_for(lambda e: e.get("event") == "rescan", since=m, timeout=60)
    d.wait_for(is_event("modified", victim), since=m)
    d.stop()


# --- choosing the backend, and saying why ---------------------------------------

def test_auto_falls_back_to_inotify_without_cap_sys_admin(fim):
    """In a user namespace the daemon has no CAP_SYS_ADMIN in the initial
    namespace: auto must use inotify and status/check-config say why."""
    fim.write_config(watch={"backend": "auto"})
    r = subprocess.run(USERNS + [sys.executable, "fimwatch.py", "--config", str(fim.conf),
                                 "check-config"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       cwd=str(REPO), timeout=60)
    assert r.returncode == 0, describe(r)
    assert "# backend: %s: inotify (" % fim.root in r.stdout, r.stdout
    assert "CAP_SYS_ADMIN" in r.stdout, r.stdout
    d = fim.daemon(watch_limit=100000)
    p = write(fim.root / "seen.txt", "x\n")
    e = d.wait_for(is_event("created", p))
    assert "process" not in e, e
    st = fim.cli("status", check=0)
    assert "backend:    %s: inotify (" % fim.root in st.stdout, st.stdout
    assert "CAP_SYS_ADMIN" in st.stdout, st.stdout
    js = fim.cli("status", "--json", check=0)
    assert '"backend": "inotify"' in js.stdout, js.stdout
    d.stop()


def test_auto_uses_fanotify_as_root_and_status_says_so(fim):
    fim.write_config(watch={"backend": "auto"})
    cc = fim.cli("check-config", check=0)
    assert "# backend: %s: fanotify (" % fim.root in cc.stdout, cc.stdout
    d = fim.daemon()
    st = fim.cli("status", check=0)
    assert "backend:    %s: fanotify (" % fim.root in st.stdout, st.stdout
    p = write(fim.root / "f.txt", "x\n")
    assert "process" in d.wait_for(is_event("created", p))
    d.stop()


@pytest.mark.skipif(not shutil.which("capsh"), reason="capsh (libcap2-bin) missing")
def test_refusal_without_cap_sys_admin_names_the_drop_in(fim):
    """Root without CAP_SYS_ADMIN (as under the unit without its fanotify
    drop-in): auto falls back, and the reason says which drop-in grants it."""
    fim.write_config(watch={"backend": "auto"})
    r = subprocess.run(["capsh", "--drop=cap_sys_admin", "--", "-c",
                        'exec "$0" "$@"', sys.executable, "fimwatch.py", "--config",
                        str(fim.conf), "check-config"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       cwd=str(REPO), timeout=60)
    assert r.returncode == 0, describe(r)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("# backend: ")]
    # Linux >= 5.13 gives an unprivileged FID group: then the mark is refused.
    assert len(line) == 1 and line[0].startswith("# backend: %s: inotify (" % fim.root), line
    assert ("not permitted: no CAP_SYS_ADMIN (under systemd: the unit's drop-in /etc/systemd/"
            "system/fimwatch.service.d/fanotify.conf grants it; install.sh installs it unless "
            "[watch] backend = inotify))") in line[0], line


def test_backend_fanotify_refused_is_a_config_error(fim):
    fan(fim)
    argv = USERNS + [sys.executable, "fimwatch.py", "--config", str(fim.conf), "run"]
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       cwd=str(REPO), timeout=30)
    assert r.returncode == 2, describe(r)
    assert "backend = fanotify" in r.stderr and "CAP_SYS_ADMIN" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_backend_is_a_config_error(fim):
    fim.write_config(watch={"backend": "dnotify"})
    r = fim.cli("check-config", check=2)
    assert "backend" in r.stderr, r.stderr


# --- a core set of the engine tests on both backends ---------------------------

CORE = [te.test_created_event_has_the_spec_fields, te.test_modified_event_has_previous_state,
        te.test_deleted_event_has_no_current_state, te.test_chmod_is_an_attributes_event,
        te.test_chown_is_an_attributes_event, te.test_rename_is_a_moved_event,
        te.test_file_replaced_by_directory_reports_a_type_change,
        te.test_touch_alone_is_not_an_event, te.test_burst_of_writes_is_one_event,
        te.test_vim_save_sequence_is_exactly_one_modified,
        te.test_swap_and_lock_files_are_never_reported,
        te.test_move_then_edit_in_one_settle_window_reports_the_edit,
        te.test_rename_over_an_existing_file_reports_both_sides]


@pytest.mark.parametrize("backend", ["inotify", "fanotify"])
@pytest.mark.parametrize("test", CORE, ids=[t.__name__[5:] for t in CORE])
def test_core_engine_test_on_backend(fim, monkeypatch, backend, test):
    monkeypatch.setenv("FIMWATCH_TEST_BACKEND", backend)   # read by every write_config
    fim.write_config()
    test(fim)


# --- the backend alone: renames with and without FAN_REPORT_TARGET_FID ---------

class RecordingEngine:
    """The Engine calls a backend makes, recorded."""

    def __init__(self):
        self.calls = []

    def wanted(self, p, isdir):
        return True

    def internal_error(self, what, e):
        raise e

    def __getattr__(self, name):
        if name not in ("changed", "dir_created", "moved", "moved_out", "dir_gone",
                        "watch_lost", "overflow"):
            raise AttributeError(name)
        return lambda *a: self.calls.append((name,) + a)


def renames_seen(tmp_path, target_fid):
    import fimwatch
    root = tmp_path / "r"
    (root / "d1").mkdir(parents=True)
    write(root / "f1", "x\n")
    fd, flags = fimwatch.fanotify_open(target_fid=target_fid)
    b = fimwatch.FanotifyBackend(fd)
    try:
        for d in (root, root / "d1"):
            b.watch(str(d))
        # Another process: the backend drops its own pid's records.
        subprocess.run(["sh", "-c", "mv f1 f2 && mv d1 d2"], cwd=str(root), check=True)
        eng = RecordingEngine()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(eng.calls) < 4:
            b.read(eng)
            time.sleep(0.02)
        b.read(eng)
        b.read(eng)                      # unpaired MOVED_FROMs wait one read
        return flags, eng.calls, b, str(root)
    finally:
        b.close()


def test_renames_are_paired_by_the_object_handle(tmp_path):
    import fimwatch
    flags, calls, b, root = renames_seen(tmp_path, True)
    if not flags & fimwatch.FAN_REPORT_TARGET_FID:
        pytest.skip("kernel %s has no FAN_REPORT_TARGET_FID (5.17)" % os.uname().release)
    assert ("moved", root + "/f1", root + "/f2", False) in calls, calls
    assert ("moved", root + "/d1", root + "/d2", True) in calls, calls
    assert not [c for c in calls if c[0] in ("moved_out", "dir_created")], calls


def test_renames_without_target_fid_are_delete_and_create(tmp_path):
    """Linux 5.10 (Debian 11): no object handle on MOVED_FROM/TO, so no
    pairing: the old name left, the new one appeared (a dir is walked anew)."""
    _, calls, b, root = renames_seen(tmp_path, False)
    assert not [c for c in calls if c[0] == "moved"], calls
    assert ("moved_out", root + "/f1", False) in calls, calls
    assert ("changed", root + "/f2", False, False) in calls, calls
    assert ("moved_out", root + "/d1", True) in calls, calls
    assert ("dir_created", root + "/d2") in calls, calls


@pytest.fixture
def overlay(tmp_path):
    """An overlayfs mount (lower, upper, work under tmp_path); skip if refused."""
    base = tmp_path / "ovl"
    dirs = {n: base / n for n in ("lower", "upper", "work", "merged")}
    for p in dirs.values():
        p.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        "lowerdir=%(lower)s,upperdir=%(upper)s,workdir=%(work)s" % dirs,
                        str(dirs["merged"])], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if r.returncode != 0:
        pytest.skip("cannot mount overlayfs here: %s" % r.stderr.strip())
    try:
        yield dirs["merged"]
    finally:
        subprocess.run(["umount", "-l", str(dirs["merged"])])


def test_auto_mixes_backends_per_root_overlayfs_on_inotify(fim, overlay):
    """One root on ext4 (fanotify), one on overlayfs (inotify): both seen, in
    one daemon; status names each root's backend and the overlay's reason."""
    fim.write_config(watch={"backend": "auto", "paths": "%s %s" % (fim.root, overlay)})
    cc = fim.cli("check-config", check=0)
    assert "# backend: %s: fanotify (" % fim.root in cc.stdout, cc.stdout
    assert "# backend: %s: inotify (overlayfs" % overlay in cc.stdout, cc.stdout
    d = fim.daemon()
    st = fim.cli("status", check=0).stdout
    assert "backend:    %s: inotify (overlayfs" % overlay in st, st
    a = write(fim.root / "on-ext4", "x\n")
    b = write(overlay / "on-overlay", "y\n")
    os.mkdir(overlay / "sub")
    c = write(overlay / "sub" / "deeper", "z\n")
    assert "process" in d.wait_for(is_event("created", a)), "fanotify root lost its writer"
    assert "process" not in d.wait_for(is_event("created", b))
    d.wait_for(is_event("created", c))
    os.rename(fim.root / "on-ext4", fim.root / "renamed")
    d.wait_for(is_event("moved", fim.root / "renamed"))
    d.stop()


def test_fanotify_watches_the_tree_before_walking_it(fim):
    """With fanotify nothing needs a walk before watching: `started` comes
    before the tree is walked, and a change in a directory the start-up
    comparison has not reached yet is reported in real time (its directory
    learned from the record's handle), with its writer. A directory under
    an excluded one is not learned. 1,000 directories of 20 files make the
    comparison last long enough; the changes are made in the directories it
    reaches last (its walk goes in the byte order of the paths)."""
    for i in range(1000):
        sub = fim.root / ("d%04d" % i)
        sub.mkdir()
        for j in range(20):
            (sub / ("f%02d" % j)).write_text("k\n")
    skip = fim.root / "skip" / "deep"
    skip.mkdir(parents=True)
    fan(fim, exclude="*.swp %s" % (fim.root / "skip"))
    fim.daemon().stop()                       # the baseline
    d = fim.daemon()
    started = [e for e in fim.events() if e.get("event") == "started"][-1]
    assert started["watches"] < 1000, started            # no walk before `started`
    m = d.mark()
    hidden = write(skip / "nope.txt", "x\n")
    last = sorted(n for n in os.listdir(fim.root) if n.startswith("d"))[-20:]
    paths = [write(fim.root / n / "new.txt", "new\n") for n in last]
    got = [d.wait_for(is_event("created", p), since=m, timeout=30) for p in paths]
    d.wait_for(is_event("verified"), since=m, timeout=60)
    for e in got:
        assert e["detected"] == "realtime" and e["process"]["pid"] == os.getpid(), e
    d.assert_quiet(is_event(path=str(hidden)), since=m, control=control_file())
    d.stop()
