"""Tampering with the monitor and with logs (issue 13): fimwatch's own
program, config and events file are watched at critical whatever [watch]
paths and [severity] say, and [watch] append_only logs may only grow: an
append is silent, a truncation, an edit of bytes already written or a
replacement that is not logrotate's rotation is critical. Against the running
daemon on real temp trees; every "silent" check ends with a positive control.
(The installed locations -- /usr/local/lib/fimwatch, the units and their
drop-ins -- are tested under the real unit in tests/system/test_install.py.)"""

import json
import os
import shutil

from conftest import FIMWATCH, about, control_file, is_event, wait_until, write


def db_events(fim):
    """Events from the state database (the events file may be the victim)."""
    r = fim.cli("events", "--json", "--since", "1h", check=0)
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def program_copy(fim):
    """A copy of fimwatch.py to run, so the test can edit "the program"."""
    d = fim.base / "lib"
    d.mkdir()
    return shutil.copy(FIMWATCH, d / "fimwatch.py")


def test_own_program_and_config_are_critical_whatever_paths_say(fim):
    prog = program_copy(fim)
    # no exclusion hides them either
    fim.write_config(watch={"exclude": "*.swp *.swx *~ .#* 4913 *.conf *.py"})
    d = fim.daemon(program=prog)
    m = d.mark()
    with open(prog, "a") as f:
        f.write("# injected\n")
    e = d.wait_for(is_event("modified", prog), since=m)
    assert e["severity"] == "critical" and e["changes"] == ["content"], e
    with open(fim.conf, "a") as f:
        f.write("# a quiet edit\n")
    e = d.wait_for(is_event("modified", fim.conf), since=m)
    assert e["severity"] == "critical", e
    # the daemon's own appends to its events file are not events
    d.assert_quiet(about(fim.events_file), since=d.start_index, control=control_file())
    d.stop()


def test_events_file_truncated_or_replaced_is_critical(fim):
    d = fim.daemon()
    write(fim.root / "a.txt", "one\n")
    d.wait_for(is_event("created", fim.root / "a.txt"))
    # cut into the first line: shorter than any size the daemon has seen
    os.truncate(fim.events_file, 100)

    def truncated():
        return [e for e in db_events(fim) if e.get("path") == str(fim.events_file)
                and e.get("append_only") == "truncated"]
    wait_until(truncated, timeout=10, what="the events file's truncation reported")
    e = truncated()[0]
    assert e["severity"] == "critical" and e["event"] == "modified", e
    assert e["previous"]["size"] > 100 and e["size"] == 100, e
    # replaced by a forged copy (a new inode, no rotated copy beside it)
    forged = fim.log_dir / ".forged"
    write(forged, "{}\n")
    os.replace(forged, fim.events_file)
    wait_until(lambda: any(e.get("append_only") == "replaced" for e in db_events(fim)),
               timeout=10, what="the events file's replacement reported")
    d.kill()


def growing_env(fim, log):
    fim.write_config(watch={"append_only": str(log)})
    return fim.daemon()


def test_append_only_log_appends_are_silent_truncation_is_critical(fim):
    log = fim.root / "auth.log"
    write(log, "".join("line %d\n" % i for i in range(20000)))
    d = growing_env(fim, log)
    m = d.mark()
    for i in range(5):
        with open(log, "a") as f:
            f.write("appended %d\n" % i)
    d.assert_quiet(about(log), since=m, control=control_file())
    os.truncate(log, 1000)
    e = d.wait_for(about(log), since=m)
    assert e["severity"] == "critical" and e["append_only"] == "truncated", e
    assert e["size"] == 1000, e
    d.stop()


def test_append_only_edit_in_place_is_critical_even_with_an_append(fim):
    (fim.root / "info").mkdir()
    log = fim.root / "info" / "auth.log"       # an info path: still critical
    write(log, "".join("line %d\n" % i for i in range(20000)))
    d = growing_env(fim, log)
    m = d.mark()
    with open(log, "a") as f:                  # one append: silent, and remembered
        f.write("ok\n")
    d.assert_quiet(about(log), since=m, control=control_file())
    # erase a line near the end (same length, so the size only grows by the
    # append made with it): the tail window catches it
    data = log.read_bytes()
    at = data.rindex(b"line 19990")
    with open(log, "r+b") as f:
        f.seek(at)
        f.write(b"XXXX")
        f.seek(0, 2)
        f.write(b"cover\n")
    e = d.wait_for(about(log), since=m)
    assert e["severity"] == "critical" and e["append_only"] == "edited", e
    # same size, a byte changed in the middle
    m = d.mark()
    with open(log, "r+b") as f:
        f.seek(50000)
        f.write(b"Z")
    e = d.wait_for(about(log), since=m)
    assert e["append_only"] == "edited" and e["severity"] == "critical", e
    d.stop()


def test_append_only_replaced_is_critical_rotation_is_not(fim):
    log = fim.root / "auth.log"
    write(log, "old\n" * 1000)
    d = growing_env(fim, log)
    m = d.mark()
    # logrotate (create mode): rename to auth.log.1, a new empty file
    os.rename(log, fim.root / "auth.log.1")
    write(log, "")
    with open(log, "a") as f:
        f.write("after rotation\n")
    d.assert_quiet(lambda e: e.get("path") == str(log), since=m, control=control_file())
    # sed -i style: a new inode with the old inode gone
    m = d.mark()
    tmp = fim.root / ".auth.tmp"
    write(tmp, "after rotation\n")
    os.replace(tmp, log)
    e = d.wait_for(is_event("modified", log), since=m)
    assert e["severity"] == "critical" and e["append_only"] == "replaced", e
    d.stop()


def test_append_only_appends_while_stopped_silent_edits_found_at_start(fim):
    log = fim.root / "auth.log"
    other = fim.root / "other.log"
    write(log, "a\n" * 5000)
    write(other, "b\n" * 5000)
    fim.write_config(watch={"append_only": "%s/*.log" % fim.root})
    fim.baseline()
    with open(log, "a") as f:
        f.write("while down\n")
    with open(other, "r+b") as f:             # an edit in the middle, then an append
        f.seek(3000)
        f.write(b"c")
        f.seek(0, 2)
        f.write(b"more\n")
    d = fim.daemon()
    e = d.wait_for(about(other), since=d.start_index)
    assert e["detected"] == "startup" and e["append_only"] == "edited", e
    assert e["severity"] == "critical", e
    d.assert_quiet(about(log), since=d.start_index, control=control_file())
    d.stop()


def test_check_config_validates_append_only(fim):
    fim.write_config(watch={"append_only": "auth.log"})
    r = fim.cli("check-config")
    assert r.returncode == 2, r
    assert "[watch] append_only" in r.stderr and "absolute" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    fim.write_config(watch={"append_only": str(fim.root)})
    r = fim.cli("check-config")
    assert r.returncode == 2 and "is a directory" in r.stderr, r.stderr
    fim.write_config(watch={"append_only": "%s/*.log /var/log/wtmp" % fim.root})
    r = fim.cli("check-config", check=0)
    assert "append_only = %s/*.log /var/log/wtmp" % fim.root in r.stdout, r.stdout
