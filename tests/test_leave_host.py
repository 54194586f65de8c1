"""Issue 13, events that leave the host: every event's `sequence` (per host,
gap-free, from the database) and `host_id`; the id and sequence are committed
before a local sink sees the event; the `heartbeat` event; a clean stop is a
`warning`; the hash chain of the events file and `fimwatch verify-log`."""

import json
import os
import re
import sqlite3
import time

import fimwatch
from conftest import is_event, write
from test_state import db_events


# ---------------------------------------------------------------------------
# 1. identity: sequence and host_id; committed before any local sink sees it
# ---------------------------------------------------------------------------

class Spy:
    """A local sink that records, for each event it gets, whether its row was
    already committed (read through a second connection)."""
    name = "spy"

    def __init__(self, db_path):
        self.db_path = db_path
        self.seen = []

    def wants(self, ev):
        return True

    def send(self, ev, line):
        conn = sqlite3.connect(self.db_path)
        try:
            row = conn.execute("SELECT seq FROM events WHERE id=?", (ev["id"],)).fetchone()
        finally:
            conn.close()
        self.seen.append((ev["id"], ev["sequence"], row))


def test_local_sinks_see_an_event_only_once_it_is_committed(fim):
    cfg = fimwatch.load_config(str(fim.conf), check_perms=False)
    store = fimwatch.Store(cfg.state_dir)
    d = fimwatch.Dispatcher(cfg, store, channels=False)
    spy = Spy(store.path)
    d.local.append(spy)
    evs = [d.emit(fimwatch.new_event("h", "test", "info")) for _ in range(3)]
    assert spy.seen == [], "a sink saw an event before its commit"
    store.commit_turn()
    assert [s[0] for s in spy.seen] == [e["id"] for e in evs]
    for _id, seq, row in spy.seen:
        assert row == (seq,), "the sink ran before the row was committed: %r" % (row,)
    assert [e["sequence"] for e in evs] == [evs[0]["sequence"] + i for i in range(3)]
    d.close(0)
    store.close()


def test_sequence_is_gap_free_across_restart_kill_and_one_shot_commands(fim):
    d = fim.daemon()
    write(fim.root / "a.txt", "a\n")
    d.wait_for(is_event("created", str(fim.root / "a.txt")))
    d.stop()
    write(fim.root / "b.txt", "b\n")
    assert fim.cli("scan").returncode == 1            # a one-shot draws from the same series
    fim.cli("pause", "--for", "1m", check=0)
    fim.cli("resume", check=0)
    d = fim.daemon()
    write(fim.root / "c.txt", "c\n")
    d.wait_for(is_event("created", str(fim.root / "c.txt")))
    d.kill()
    d = fim.daemon()
    d.wait_for(lambda e: e.get("event") == "started" and e.get("unclean"))
    d.stop()
    evs = fim.events()
    seqs = [e["sequence"] for e in evs]
    assert sorted(seqs) == list(range(1, len(seqs) + 1)), seqs     # no gap, none twice
    assert seqs == sorted(seqs), "events file out of sequence order: %s" % seqs
    ids = {e["host_id"] for e in evs}
    assert len(ids) == 1 and re.match(r"^[0-9a-f]{32}$", ids.pop()), ids
    recorded = {e["id"]: e["sequence"] for e in db_events(fim)}
    assert {e["id"]: e["sequence"] for e in evs} == recorded
    assert list(evs[0])[:3] == ["id", "sequence", "host_id"]


def test_host_id_combines_machine_id_and_install_id(tmp_path):
    mid = tmp_path / "machine-id"
    mid.write_text("0123456789abcdef0123456789abcdef\n")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    ha = fimwatch.host_identity(str(a), str(mid))
    assert ha == fimwatch.host_identity(str(a), str(mid))        # stable (install.id kept)
    assert (a / "install.id").read_text().strip()
    assert fimwatch.host_identity(str(b), str(mid)) != ha         # a clone, installed again
    mid.write_text("fedcba9876543210fedcba9876543210\n")
    assert fimwatch.host_identity(str(a), str(mid)) != ha         # another machine-id
    assert "0123456789abcdef" not in ha


# ---------------------------------------------------------------------------
# 3. heartbeat and silence
# ---------------------------------------------------------------------------

def test_heartbeat_carries_counts_and_the_last_sequence(fim):
    fim.write_config(fimwatch={"heartbeat": "1s"})
    d = fim.daemon()
    p = write(fim.root / "x.txt")
    created = d.wait_for(is_event("created", str(p)))
    hb = d.wait_for(lambda e: e.get("event") == "heartbeat" and
                    e["sequence"] > created["sequence"], timeout=10)
    assert hb["severity"] == "info" and hb["interval"] == 1.0, hb
    assert hb["last_sequence"] == hb["sequence"] - 1
    assert hb["baseline_entries"] >= 1 and hb["watches"] >= 1, hb
    assert set(hb["events_24h"]) == {"info", "notice", "warning", "critical"}, hb
    beats = d.wait_for(is_event("heartbeat"), count=3, timeout=10) and \
        d.matching(is_event("heartbeat"))
    gaps = [b - a for a, b in zip([fimwatch.event_epoch(e) for e in beats],
                                  [fimwatch.event_epoch(e) for e in beats[1:]])]
    assert all(0.5 < g < 3.0 for g in gaps), gaps
    d.stop()


def test_heartbeat_zero_is_off_and_limits_are_checked(fim):
    fim.write_config(fimwatch={"heartbeat": "0"})
    assert fim.cli("check-config").returncode == 0
    fim.write_config(fimwatch={"heartbeat": "500ms"})
    r = fim.cli("check-config")
    assert r.returncode == 2 and "heartbeat" in r.stderr and "0 (off)" in r.stderr, r.stderr


def test_clean_stop_is_a_warning_that_reaches_webhooks_unless_an_upgrade(fim):
    from alerts_helpers import WebhookServer, body_is
    srv = WebhookServer().start()
    try:
        fim.write_config(webhook={"enabled": "yes", "url": srv.url(), "format": "json",
                                  "min_severity": "warning", "retry_min": "1s"})
        d = fim.baseline()
        stopped = d.matching(is_event("stopped"))[-1]
        assert stopped["severity"] == "warning" and stopped["reason"] == "stopped", stopped
        d = fim.daemon()
        got = srv.wait(body_is("stopped", severity="warning"))[0].json()
        assert got["id"] == stopped["id"] and got["sequence"] == stopped["sequence"]
        (fim.state_dir / "upgrading").write_text("")          # what install.sh leaves
        d.stop()
        stopped = d.matching(is_event("stopped"))[-1]
        assert stopped["severity"] == "notice" and stopped["reason"] == "upgrade", stopped
        assert not (fim.state_dir / "upgrading").exists()
    finally:
        srv.stop()


# ---------------------------------------------------------------------------
# 4. the events file's hash chain and verify-log
# ---------------------------------------------------------------------------

def chained_file(fim, n_files=6, rotate=False):
    """A daemon writes events (with `pause` writing between them: two
    writers), optionally across a logrotate-style rename; stopped after."""
    d = fim.daemon()
    for i in range(n_files):
        p = write(fim.root / ("f%d.txt" % i), "%d\n" % i)
        d.wait_for(is_event("created", str(p)))
        if i == 2:
            fim.cli("pause", "--for", "1m", check=0)
            fim.cli("resume", check=0)
        if rotate and i == 3:
            os.rename(fim.events_file, str(fim.events_file) + ".1")
            time.sleep(1.2)                 # the sink looks for a new inode once a second
    d.stop()
    return d


def verify(fim, *files):
    return fim.cli("verify-log", *[str(f) for f in files])


def test_verify_log_intact_across_two_writers_and_a_logrotate(fim):
    chained_file(fim, rotate=True)
    rotated = str(fim.events_file) + ".1"
    assert os.path.getsize(rotated) and os.path.getsize(fim.events_file)
    # rotated while the daemon is down: a one-shot command starts the new file,
    # and only the database knows where the chain stood
    time.sleep(0.05)
    os.rename(fim.events_file, str(fim.events_file) + "-2")
    fim.cli("pause", "--for", "1m", check=0)
    assert fim.events()[0]["chain_n"] > 1
    r = verify(fim)                      # default: the file and its logrotate copies
    assert r.returncode == 0 and r.stdout.startswith("intact:"), r.stdout + r.stderr
    assert "matches the state database" in r.stdout, r.stdout
    lines = [json.loads(x) for f in (rotated, str(fim.events_file) + "-2")
             for x in open(f)] + fim.events()
    assert [e["chain_n"] for e in lines] == list(range(1, len(lines) + 1))
    assert {"paused", "resumed"} <= {e["event"] for e in lines}
    # the current file alone is intact too (its first line is the anchor)
    assert verify(fim, fim.events_file).returncode == 0


def rewrite(path, fn):
    raw = open(path, "rb").read().splitlines(keepends=True)
    open(path, "wb").write(b"".join(fn(raw)))


def test_verify_log_names_a_deleted_an_edited_and_a_reordered_line(fim):
    chained_file(fim)
    good = open(fim.events_file, "rb").read()
    path = str(fim.events_file)

    rewrite(path, lambda ls: ls[:3] + ls[4:])
    r = verify(fim)
    assert r.returncode == 1 and "1 line(s) removed before %s:4" % path in r.stdout, r.stdout

    open(path, "wb").write(good)
    rewrite(path, lambda ls: ls[:2] + [ls[2].replace(b'"testhost"', b'"otherhost"')] + ls[3:])
    r = verify(fim)
    assert r.returncode == 1 and "edited: %s:3" % path in r.stdout, r.stdout

    open(path, "wb").write(good)
    rewrite(path, lambda ls: ls[:4] + [ls[5], ls[4]] + ls[6:])
    r = verify(fim)
    assert r.returncode == 1 and "reordered: %s:5" % path in r.stdout, r.stdout

    open(path, "wb").write(good)
    rewrite(path, lambda ls: ls[:-2])          # the tail cut: only the database knows
    r = verify(fim)
    assert r.returncode == 1 and "2 line(s) removed at the end" in r.stdout, r.stdout

    open(path, "wb").write(good)
    assert verify(fim).returncode == 0


def test_heartbeat_carries_the_chain_head(fim):
    fim.write_config(fimwatch={"heartbeat": "1s"})
    d = fim.daemon()
    hb = d.wait_for(is_event("heartbeat"), timeout=10)
    before = [e for e in fim.events() if e["chain_n"] < hb["chain_n"]]
    assert hb["chain_head"]["n"] == before[-1]["chain_n"] == hb["chain_n"] - 1
    assert hb["chain_prev"] == hb["chain_head"]["sha256"]
    d.stop()


def test_a_lost_baseline_does_not_restart_the_sequence(fim):
    d = fim.baseline()
    last = fim.events()[-1]["sequence"]
    for p in fim.state_dir.iterdir():
        if p.name.startswith("baseline."):
            p.unlink()
    d = fim.daemon()
    lost = d.wait_for(is_event("baseline_lost"))
    assert lost["sequence"] == last + 1, (lost, last)
    d.stop()
    assert verify(fim).returncode == 0          # the chain goes on from the file's tail


# ---------------------------------------------------------------------------
# 2. RFC 5424 syslog and the journald native protocol
# ---------------------------------------------------------------------------

def parse_journal(data):
    """The journald native protocol (systemd.io/JOURNAL_NATIVE_PROTOCOL):
    KEY=VALUE\\n, or KEY\\n + 64-bit LE length + VALUE + \\n."""
    out, i = {}, 0
    while i < len(data):
        nl = data.index(b"\n", i)
        key = data[i:nl]
        if b"=" in key:
            k, v = key.split(b"=", 1)
            out[k.decode()] = v.decode()
            i = nl + 1
            continue
        n = int.from_bytes(data[nl + 1:nl + 9], "little")
        out[key.decode()] = data[nl + 9:nl + 9 + n].decode()
        assert data[nl + 9 + n:nl + 10 + n] == b"\n"
        i = nl + 10 + n
    return out


def recv_until(sock, want, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            data = sock.recv(1 << 20)
        except OSError:
            break
        if want in data:
            return data
    raise AssertionError("nothing containing %r arrived" % want)


def test_journald_native_fields_and_rfc5424_structured_data(fim, tmp_path):
    import socket
    jpath = str(tmp_path / "journal.sock")
    jsock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    jsock.bind(jpath)
    usock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    usock.bind(("127.0.0.1", 0))
    try:
        fim.write_config(journal={"enabled": "yes", "socket": jpath},
                         syslog={"enabled": "yes", "format": "rfc5424", "min_severity": "info",
                                 "address": "127.0.0.1:%d" % usock.getsockname()[1]})
        d = fim.daemon()
        p = write(fim.root / "with space ].txt", "x\n")
        ev = d.wait_for(is_event("created", str(p)))
        j = parse_journal(recv_until(jsock, ev["id"].encode()))
        assert j["FIMWATCH_ID"] == ev["id"] and j["FIMWATCH_SEQUENCE"] == str(ev["sequence"])
        assert j["FIMWATCH_HOST_ID"] == ev["host_id"] and j["FIMWATCH_PATH"] == str(p)
        assert j["PRIORITY"] == "4" and j["SYSLOG_IDENTIFIER"] == "fimwatch"
        assert re.match(r"^[0-9a-f]{32}$", j["MESSAGE_ID"])
        assert json.loads(j["FIMWATCH_JSON"]) == {k: v for k, v in ev.items()
                                                  if not k.startswith("chain_")}
        assert j["MESSAGE"].startswith("warning created ")
        started = d.started
        assert j["MESSAGE_ID"] != fimwatch.message_id("started") == \
            fimwatch.message_id(started["event"])
        raw = recv_until(usock, ev["id"].encode()).decode()
        m = re.match(r'^<(\d+)>1 (\S+) testhost fimwatch (\d+) created '
                     r'\[fimwatch@32473 ([^\]]|\\\])*\] warning created ', raw)
        assert m and m.group(2) == ev["time"] and int(m.group(3)) == d.pid, raw
        assert 'id="%s" sequence="%d" host_id="%s"' % (ev["id"], ev["sequence"],
                                                       ev["host_id"]) in raw, raw
        assert 'path="%s"' % str(p).replace("]", "\\]") in raw, raw
        d.stop()
    finally:
        jsock.close()
        usock.close()


# ---------------------------------------------------------------------------
# 2. ECS: names, types and allowed values from ECS's own generated table
# ---------------------------------------------------------------------------

ECS = json.load(open(os.path.join(os.path.dirname(__file__), "ecs_fields.json")))
ECS_PY = {"keyword": str, "constant_keyword": str, "wildcard": str, "match_only_text": str,
          "long": int, "date": str, "boolean": bool}


def leaves(doc, prefix=""):
    for k, v in doc.items():
        if isinstance(v, dict) and k != "fimwatch":
            yield from leaves(v, prefix + k + ".")
        else:
            yield prefix + k, v


def check_ecs(doc):
    for name, value in leaves(doc):
        if name in ("fimwatch", "fimwatch_cut", "chain_n", "chain_prev"):
            continue                                   # our namespace: custom fields
        assert name in ECS["fields"], "%s is not an ECS field" % name
        typ = ECS["fields"][name]
        for v in value if isinstance(value, list) else [value]:
            assert isinstance(v, ECS_PY[typ]) and not isinstance(v, bool) or typ == "boolean", \
                "%s=%r is not an ECS %s" % (name, v, typ)
            if typ == "date":
                assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3})?Z$", v), (name, v)
        if name in ECS["allowed_values"]:
            vals = value if isinstance(value, list) else [value]
            assert set(vals) <= set(ECS["allowed_values"][name]), (name, value)


def test_ecs_events_file_validates_and_keeps_lines_under_8k(fim):
    fim.write_config(log={"events_file": str(fim.events_file), "format": "ecs"},
                     fimwatch={"diff_paths": "%s/**" % fim.root, "diff_max_size": "64K"})
    big = fim.root / "big.conf"
    write(big, "".join("line %d of the old text %s\n" % (i, "o" * 60) for i in range(400)))
    d = fim.daemon(wait=False)
    evs = lambda: [json.loads(x) for x in open(fim.events_file)] \
        if fim.events_file.exists() else []                       # noqa: E731
    started = lambda: [e for e in evs() if e["event"]["action"] == "started"]  # noqa: E731
    from conftest import wait_until
    wait_until(started, timeout=20, what="started")
    write(big, "".join("line %d of the NEW text %s\n" % (i, "n" * 60) for i in range(400)))
    write(fim.root / "small.txt", "x\n")
    got = wait_until(lambda: [e for e in evs() if e.get("file", {}).get("name") == "small.txt"],
                     timeout=10, what="small.txt")[0]
    d.proc.terminate()         # not d.stop(): it looks for a fimwatch-format 'stopped'

    d.proc.wait(timeout=20)
    lines = open(fim.events_file, "rb").read().splitlines()
    docs = [json.loads(x) for x in lines]
    assert max(len(x) for x in lines) < 8192, max(len(x) for x in lines)
    for doc in docs:
        check_ecs(doc)
    mod = [x for x in docs if x.get("file", {}).get("name") == "big.conf"][0]
    assert mod["event"]["action"] == "updated" and mod["event"]["type"] == ["change"], mod
    assert "[cut by fimwatch:" in mod["fimwatch"]["diff"] and mod["fimwatch_cut"] is True
    assert got["event"]["action"] == "created"
    assert got["file"]["path"] == str(fim.root / "small.txt")
    recorded = {e["id"]: e["sequence"] for e in db_events(fim)}
    assert all(recorded[x["event"]["id"]] == x["event"]["sequence"] for x in docs)
    assert [x["event"]["action"] for x in docs][-1] == "stopped"
    assert fim.cli("verify-log").returncode == 0
    print("\naverage ECS line: %d bytes" % (sum(map(len, lines)) / len(lines)))
