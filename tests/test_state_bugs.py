"""Bugs found while breaking the state (issue: fail loud, keep watching):
`changes` is always a list, digests name every critical path first, the
config refuses `//` and absurd durations."""

import json
import socket
import sqlite3

import pytest

import fimwatch
from conftest import is_event, write


def test_verified_event_has_no_numeric_changes_and_reaches_syslog(fim, tmp_path):
    path = tmp_path / "devlog"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    try:
        fim.write_config(syslog={"enabled": "yes", "address": str(path),
                                 "facility": "authpriv", "min_severity": "info"})
        fim.baseline()
        write(fim.root / "changed-while-down.txt")
        d = fim.daemon()
        ev = d.wait_for(is_event("verified"), since=d.start_index)
        assert "changes" not in ev or isinstance(ev["changes"], list), ev
        assert ev["changes_found"] == 1, ev
        lines = []
        while not any(b" verified " in x for x in lines):
            lines.append(sock.recv(8192))
        line = [x for x in lines if b" verified " in x][0].decode()
        assert "severity" not in line and " info verified " in line, line
        r = fim.cli("events", "--since", "1h", check=0)
        assert "verified" in r.stdout, r.stdout
        d.stop()
    finally:
        sock.close()


def test_events_command_reads_old_numeric_changes(fim):
    fim.baseline()
    db = sqlite3.connect(str(fim.state_dir / "baseline.db"))
    old = {"id": "0" * 32, "time": "2026-12-01T00:00:00.000Z", "host": "testhost",
           "event": "verified", "severity": "info", "detected": "scan", "path": "",
           "changes": 7, "message": "comparison done"}
    db.execute("INSERT INTO events (id, t, severity, event, path, json) VALUES (?,?,?,?,?,?)",
               (old["id"], 4e9, "info", "verified", "", json.dumps(old)))
    db.commit()
    db.close()
    for args in (["events", "--since", "3650d"], ["events", "--since", "3650d", "--json"]):
        r = fim.cli(*args)
        assert r.returncode == 0, r.stderr
        assert "0" * 32 in r.stdout or "comparison done" in r.stdout, r.stdout
    assert "verified" in fimwatch.syslog_message(old)
    assert "changes=" not in fimwatch.syslog_message(old)


def test_digest_lists_every_critical_path_first():
    evs = [fimwatch.new_event("h", "modified", "warning", path="/w/%02d" % i) for i in range(60)]
    evs += [fimwatch.new_event("h", "modified", "notice", path="/n/%d" % i) for i in range(5)]
    evs.append(fimwatch.new_event("h", "modified", "critical", path="/etc/shadow"))
    evs += [fimwatch.new_event("h", "modified", "info", path="/i/%d" % i) for i in range(3)]
    dg = fimwatch.make_digest(evs, "h", limit=50)
    listed = dg["events"]
    assert listed[0]["path"] == "/etc/shadow"
    assert dg["severity"] == "critical"
    ranks = [fimwatch.SEV_RANK[e["severity"]] for e in listed]
    assert ranks == sorted(ranks, reverse=True)
    assert "/etc/shadow" in fimwatch.event_text(dg)
    # more criticals than the limit: every one is still named
    many = [fimwatch.new_event("h", "deleted", "critical", path="/c/%03d" % i) for i in range(80)]
    dg = fimwatch.make_digest(evs + many, "h", limit=50)
    named = {e["path"] for e in dg["events"]}
    assert {"/etc/shadow"} | {e["path"] for e in many} <= named


@pytest.mark.parametrize("section,key,value,needle", [
    ("watch", "paths", "//", "watching / is not supported"),
    ("watch", "paths", "///", "watching / is not supported"),
    ("fimwatch", "scan_interval", "9999999999d", "too long"),
    ("watch", "poll_interval", "9999999999d", "too long"),
])
def test_config_refuses_root_spellings_and_absurd_durations(fim, section, key, value, needle):
    fim.write_config(**{section: {key: value}})
    r = fim.cli("check-config")
    assert r.returncode == 2, r.stdout + r.stderr
    assert needle in r.stderr and key in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_double_slash_path_is_normalised(fim):
    fim.write_config(watch={"paths": "/" + str(fim.root)})
    r = fim.cli("check-config")
    assert r.returncode == 0, r.stderr
    assert "//" not in r.stdout.replace("://", ""), r.stdout


def test_pause_for_absurd_duration_is_a_usage_error(fim):
    fim.baseline()
    r = fim.cli("pause", "--for", "9999999999d")
    assert r.returncode == 2 and "too long" in r.stderr, r.stderr
