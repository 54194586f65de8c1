"""Issue 13, events that leave the host: every event's `sequence` (per host,
gap-free, from the database) and `host_id`; the id and sequence are committed
before a local sink sees the event; the `heartbeat` event; a clean stop is a
`warning`; the hash chain of the events file and `fimwatch verify-log`."""

import re
import sqlite3

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
