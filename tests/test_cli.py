"""One-shot commands and the config: check-config, config errors (exit 2,
one line naming file, line and key), scan, accept, events, status."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (FIMWATCH, REPO, clean_env, describe, is_event, needs_root, own_entries,
                      own_watches, render_config, write)


def config_lines(fim, **overrides):
    return render_config(fim.sections(**overrides)).splitlines()


def insert_after(lines, header, new_line):
    """Insert new_line right after [header]; return (text, its 1-based line number)."""
    i = lines.index("[%s]" % header)
    lines = lines[:i + 1] + [new_line] + lines[i + 1:]
    return "\n".join(lines) + "\n", i + 2


def assert_config_error(proc, conf, lineno=None, key=None):
    assert proc.returncode == 2, describe(proc)
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr, proc.stderr
    assert err.startswith("fimwatch: error:"), describe(proc)
    assert "\n" not in err, "more than one line on stderr:\n" + proc.stderr
    assert str(conf) in err, "error does not name the file: " + err
    if lineno is not None:
        assert re.search(r"(line\s*%d\b|:%d\b)" % (lineno, lineno), err), \
            "error does not name line %d: %s" % (lineno, err)
    if key is not None:
        assert key in err, "error does not name %r: %s" % (key, err)


# --- config errors -----------------------------------------------------------

BAD_VALUES = [
    ("unknown-key", "fimwatch", "setle = 100ms", "setle"),
    ("bad-duration", "fimwatch", "scan_interval = 5 minutes", "scan_interval"),
    ("bad-duration-unit", "fimwatch", "scan_interval = 10x", "scan_interval"),
    ("bad-size", "fimwatch", "hash_max_size = 12Q", "hash_max_size"),
    ("bad-bool", "syslog", "enabled = maybe", "enabled"),
    ("bad-severity", "syslog", "min_severity = loud", "min_severity"),
]


@pytest.mark.parametrize("command", ["check-config", "run", "scan"])
@pytest.mark.parametrize("label,section,line,key", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_config_error_names_file_line_and_key(fim, label, section, line, key, command):
    # drop the default line for that key, so the bad one is the only one
    lines = [x for x in config_lines(fim) if not x.startswith(key + " =")]
    text, lineno = insert_after(lines, section, line)
    fim.write_config(text)
    proc = fim.cli(command, timeout=30)
    assert_config_error(proc, fim.conf, lineno, key)


def test_unknown_section_is_an_error(fim):
    text = render_config(fim.sections()) + "\n[wacth]\npaths = /tmp\n"
    lineno = text.splitlines().index("[wacth]") + 1
    fim.write_config(text)
    assert_config_error(fim.cli("check-config"), fim.conf, lineno, "wacth")
    assert_config_error(fim.cli("run", timeout=30), fim.conf, lineno, "wacth")


@pytest.mark.parametrize("where", ["the-state-dir", "below-it"])
def test_a_watched_path_inside_state_dir_is_a_config_error(fim, where):
    """fimwatch never watches its state_dir (its own database): a path there
    would be watched empty, without a word. Said at once, one line, exit 2;
    the state_dir under a watched path (the usual layout) is fine."""
    inside = fim.state_dir if where == "the-state-dir" else fim.state_dir / "tree"
    inside.mkdir(parents=True, exist_ok=True)
    write(inside / "f", "x\n")
    sections = fim.sections()
    sections["watch"]["paths"] = "%s %s" % (fim.root, inside)
    fim.write_config(render_config(sections))
    for command in ("check-config", "run", "scan"):
        proc = fim.cli(command, timeout=30)
        assert_config_error(proc, fim.conf, key="paths")
        assert "inside state_dir" in proc.stderr, proc.stderr
    sections["watch"]["paths"] = str(fim.base)           # state_dir below it: fine
    fim.write_config(render_config(sections))
    proc = fim.cli("check-config", timeout=30)
    assert proc.returncode == 0, describe(proc)


def test_missing_config_file_is_exit_2(fim):
    missing = fim.base / "nope.conf"
    proc = fim.cli("--config", missing, "check-config", config=False)
    assert_config_error(proc, missing)


def test_config_from_environment_variable(fim):
    env = clean_env()
    env["FIMWATCH_CONFIG"] = str(fim.conf)
    proc = subprocess.run([sys.executable, str(FIMWATCH), "check-config"], cwd=str(REPO),
                          env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, describe(proc)
    assert str(fim.root) in proc.stdout


@needs_root
@pytest.mark.parametrize("what,mode", [("file", 0o602), ("file", 0o620),
                                       ("dir", 0o777), ("dir", 0o770)])
def test_config_writable_by_others_is_refused_as_root(fim, what, mode):
    target = fim.conf if what == "file" else fim.conf_dir
    os.chmod(target, mode)
    for command in ("run", "check-config"):
        proc = fim.cli(command, timeout=30)
        assert_config_error(proc, fim.conf)
    os.chmod(target, 0o600 if what == "file" else 0o700)
    assert fim.cli("check-config").returncode == 0


@needs_root
def test_config_owned_by_non_root_is_refused_as_root(fim):
    os.chown(fim.conf, 1, 1)
    assert_config_error(fim.cli("check-config"), fim.conf)


def test_check_config_prints_effective_settings(fim):
    proc = fim.cli("check-config")
    assert proc.returncode == 0, describe(proc)
    out = proc.stdout
    assert str(fim.root) in out, out
    assert str(fim.state_dir) in out, out
    assert "settle" in out, out
    assert "100ms" in out or "0.1" in out, out
    # defaults of keys the file does not set are shown too
    assert "min_severity" in out or "facility" in out, out


def _check_config_json(fim, *args):
    proc = fim.cli("check-config", "--json", *args)
    assert proc.returncode == 0, describe(proc)
    assert proc.stderr == "", describe(proc)
    return json.loads(proc.stdout)     # one object, nothing else on stdout


def _sysctl(name):
    with open("/proc/sys/fs/inotify/" + name) as f:
        return int(f.read())


def test_check_config_json_reflects_the_config(fim):
    """What install.sh asks instead of parsing the config: the watched paths
    (a symlinked one resolved, a missing one flagged), scan_only, the
    excludes, state_dir, events_file, and the watch estimate (one per
    directory, excluded directories get none) with the limit to set."""
    for d in ("a/b/c", "a/d", "skip/deep/er", "node/x"):
        (fim.root / d).mkdir(parents=True)
    real = fim.base / "real"
    (real / "sub").mkdir(parents=True)
    link = fim.base / "link"
    link.symlink_to(real)
    missing = fim.base / "missing"
    scan_only = fim.base / "scanned"
    scan_only.mkdir()
    exclude = "*.swp %s/skip/** node/" % fim.root
    fim.write_config(watch={"paths": "%s %s %s" % (fim.root, link, missing),
                            "exclude": exclude, "scan_only": str(scan_only)})
    js = _check_config_json(fim)
    assert js["config"] == str(fim.conf) and js["valid"] is True, js
    assert re.match(r"^\d+\.\d+", js["version"]), js
    assert js["state_dir"] == str(fim.state_dir), js
    assert js["events_file"] == str(fim.events_file), js
    assert js["roots"] == [
        {"configured": str(fim.root), "watched": str(fim.root), "exists": True},
        {"configured": str(link), "watched": str(real), "exists": True},
        {"configured": str(missing), "watched": str(missing), "exists": False},
    ], js
    assert js["scan_only"] == [str(scan_only)], js
    assert js["exclude"] == exclude.split(), js
    # tree, a, a/b, a/b/c, a/d (skip/** and node/ excluded) + real, real/sub
    # + one for the missing path
    assert js["watches_needed"] == 5 + 2 + 1, js
    assert js["max_user_watches"] == _sysctl("max_user_watches"), js
    assert js["max_user_instances"] == _sysctl("max_user_instances"), js
    rec = js["recommended_max_user_watches"]
    assert rec % 1024 == 0 and rec >= 8 * 1.5 + 8192, js
    assert js["recommended_max_user_instances"] >= 128, js

    # A config change shows: the program is what install.sh asks, every time.
    fim.write_config(watch={"paths": str(fim.root / "a"), "exclude": "", "scan_only": ""},
                     log={"events_file": ""})
    js = _check_config_json(fim)
    assert [r["configured"] for r in js["roots"]] == [str(fim.root / "a")], js
    assert js["exclude"] == [] and js["scan_only"] == [] and js["events_file"] is None, js
    assert js["watches_needed"] == 4, js     # a, b, c, d

    # Without --json the text output is what it was.
    proc = fim.cli("check-config", check=0)
    assert proc.stdout.startswith("# fimwatch "), proc.stdout
    assert "# watches needed: about 4 directories" in proc.stdout, proc.stdout


@pytest.mark.parametrize("bad", ["value", "section", "missing-file"])
def test_check_config_json_on_a_bad_config_prints_nothing(fim, bad):
    """install.sh relies on it: exit 2, the one-line error on stderr, and
    nothing on stdout (no half JSON object to parse)."""
    conf = fim.conf
    if bad == "value":
        fim.write_config(fimwatch={"settle": "soon"})
    elif bad == "section":
        fim.write_config(render_config(fim.sections()) + "[wacth]\npaths = /tmp\n")
    else:
        conf = fim.base / "nope.conf"
    proc = fim.cli("--config", conf, "check-config", "--json", config=False)
    assert_config_error(proc, conf)
    assert proc.stdout == "", describe(proc)


def test_check_config_json_root_walks_the_staged_tree(fim, tmp_path):
    """install.sh --root DIR sizes the limits for the staged system: the
    configured paths are looked up inside DIR (a symlink there points into
    DIR, not into this host), excludes match the target's paths."""
    stage = tmp_path / "stage"
    target = fim.base / "srv"          # the path as the target system sees it
    staged = Path(str(stage) + str(target))
    for d in ("one/two", "cache/x/y", "three"):
        (staged / d).mkdir(parents=True)
    (staged / "lib" / "deep").mkdir(parents=True)
    # /srv/web -> /srv/three inside the stage: absolute, so only right under DIR
    (staged / "web").symlink_to(str(target / "three"))
    (staged / "three" / "four").mkdir()
    fim.write_config(watch={"paths": "%s %s %s" % (target, target / "web", target / "gone"),
                            "exclude": "%s/cache/**" % target, "scan_only": ""})
    js = _check_config_json(fim, "--root", stage)
    assert js["root"] == str(stage), js
    assert js["roots"] == [
        {"configured": str(target), "watched": str(target), "exists": True},
        {"configured": str(target / "web"), "watched": str(target / "three"), "exists": True},
        {"configured": str(target / "gone"), "watched": str(target / "gone"), "exists": False},
    ], js
    # srv, one, two, three, four, lib, deep (cache/** excluded); three, four
    # again through web; 1 for the missing path
    assert js["watches_needed"] == 7 + 2 + 1, js
    # Without --root the host has none of it.
    js = _check_config_json(fim)
    assert [r["exists"] for r in js["roots"]] == [False, False, False], js
    assert js["watches_needed"] == 3, js
    # --root is only for --json, and must be a directory.
    for args in (("check-config", "--root", stage),
                 ("check-config", "--json", "--root", tmp_path / "nope")):
        proc = fim.cli(*args)
        assert proc.returncode == 2 and proc.stdout == "", describe(proc)
        assert proc.stderr.startswith("fimwatch: error:") and proc.stderr.count("\n") == 1, \
            describe(proc)


def test_help_on_every_command(fim):
    for command in ("run", "scan", "accept", "status", "check-config", "events"):
        proc = fim.cli(command, "--help")
        assert proc.returncode == 0, describe(proc)
        assert "usage" in proc.stdout.lower(), proc.stdout


def test_usage_error_is_exit_2_without_traceback(fim):
    proc = fim.cli("no-such-command")
    assert proc.returncode == 2, describe(proc)
    assert "Traceback" not in proc.stderr


# --- scan and accept -----------------------------------------------------------

def test_scan_exit_codes_and_json(fim):
    a = write(fim.root / "a.txt", "a1\n")
    b = write(fim.root / "b.txt", "b1\n")
    fim.baseline()
    r = fim.cli("scan", "--no-alert")
    assert r.returncode == 0, describe(r)
    write(a, "a2\n")
    os.unlink(b)
    c = write(fim.root / "c.txt")
    r = fim.cli("scan", "--no-alert", "--json")
    assert r.returncode == 1, describe(r)
    evs = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    got = {(e["event"], e["path"]) for e in evs}
    assert ("modified", str(a)) in got, got
    assert ("deleted", str(b)) in got, got
    assert ("created", str(c)) in got, got
    assert all(e["detected"] == "scan" for e in evs), evs
    # recorded: the next scan is clean
    r = fim.cli("scan", "--no-alert")
    assert r.returncode == 0, describe(r)


def test_scan_plain_output_names_the_changes(fim):
    a = write(fim.root / "a.txt", "a1\n")
    fim.baseline()
    write(a, "a2\n")
    r = fim.cli("scan", "--no-alert")
    assert r.returncode == 1, describe(r)
    assert "modified" in r.stdout and str(a) in r.stdout, r.stdout


def test_scan_writes_to_the_events_file(fim):
    a = write(fim.root / "a.txt", "a1\n")
    fim.baseline()
    write(a, "a2\n")
    assert fim.cli("scan").returncode == 1
    assert [e for e in fim.events() if is_event("modified", a)(e) and e["detected"] == "scan"]


def test_accept_path_then_scan_is_clean(fim):
    a = write(fim.root / "a.txt", "a1\n")
    b = write(fim.root / "b.txt", "b1\n")
    fim.baseline()
    write(a, "a2\n")
    write(b, "b2\n")
    r = fim.cli("accept", a)
    assert r.returncode == 0, describe(r)
    n_events = len(fim.events())
    r = fim.cli("scan", "--no-alert", "--json")
    assert r.returncode == 1, describe(r)
    paths = {json.loads(x)["path"] for x in r.stdout.splitlines() if x.strip()}
    assert paths == {str(b)}, paths
    write(b, "b3\n")
    r = fim.cli("accept")
    assert r.returncode == 0, describe(r)
    # accept alerts nobody: nothing new in the events file except scan's own lines
    assert not [e for e in fim.events()[n_events:] if e.get("path") == str(b)
                and e.get("detected") != "scan"]
    r = fim.cli("scan", "--no-alert")
    assert r.returncode == 0, describe(r)


def test_accept_of_a_path_outside_the_watched_paths_is_an_error(fim):
    fim.baseline()
    r = fim.cli("accept", "/nonexistent/elsewhere")
    assert r.returncode == 2, describe(r)
    assert r.stderr.startswith("fimwatch: error:"), describe(r)


# --- events and status ----------------------------------------------------------

def test_events_command_lists_recent_events(fim):
    d = fim.daemon()
    p = write(fim.root / "listed.txt")
    q = write(fim.root / "other.log")
    d.wait_for(is_event("created", p))
    d.wait_for(is_event("created", q))
    d.stop()
    r = fim.cli("events", "--json")
    assert r.returncode == 0, describe(r)
    evs = [json.loads(x) for x in r.stdout.splitlines() if x.strip()]
    assert [e for e in evs if is_event("created", p)(e)], r.stdout
    # newest last
    times = [e["time"] for e in evs]
    assert times == sorted(times), times
    r = fim.cli("events", "--json", "--path", "*.txt", "--since", "1h")
    assert r.returncode == 0, describe(r)
    paths = {json.loads(x).get("path") for x in r.stdout.splitlines() if x.strip()}
    assert str(p) in paths and str(q) not in paths, paths
    r = fim.cli("events")
    assert r.returncode == 0 and str(p) in r.stdout, describe(r)


def test_status_while_running_and_after_stop(fim):
    d = fim.daemon()
    r = fim.cli("status", "--json")
    assert r.returncode == 0, describe(r)
    st = json.loads(r.stdout)
    assert isinstance(st, dict), st
    text = json.dumps(st)
    assert "watch" in text, st
    r = fim.cli("status")
    assert r.returncode == 0, describe(r)
    d.stop()
    r = fim.cli("status", "--json")
    assert r.returncode == 1, describe(r)
    json.loads(r.stdout)
    r = fim.cli("status")
    assert r.returncode == 1, describe(r)


def test_status_after_kill_9_is_not_running(fim):
    d = fim.daemon()
    d.kill()
    r = fim.cli("status")
    assert r.returncode == 1, describe(r)


def test_missing_dependency_is_one_line_saying_how_to_install(fim):
    if os.path.exists("/usr/local/lib/fimwatch/inotify_simple.py"):
        pytest.skip("an installed private inotify_simple is on this machine")
    # -S: no site-packages, so no inotify_simple
    proc = subprocess.run([sys.executable, "-S", str(FIMWATCH), "--config", str(fim.conf), "run"],
                          cwd=str(REPO), env=clean_env(), capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2, describe(proc)
    err = proc.stderr.strip()
    assert err.startswith("fimwatch: error:") and "\n" not in err, describe(proc)
    assert "inotify_simple" in err and ("pip" in err or "apt" in err), err


@needs_root
def test_missing_privilege_is_one_line(fim):
    python = "/usr/bin/python3"
    if not os.path.exists(python) or not os.path.exists("/usr/bin/setpriv"):
        pytest.skip("needs /usr/bin/python3 and setpriv")
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           python, str(FIMWATCH), "--config", str(fim.conf), "check-config"],
                          cwd="/", env=clean_env(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, describe(proc)
    err = proc.stderr.strip()
    assert err.startswith("fimwatch: error:") and "\n" not in err, describe(proc)
    assert str(fim.conf) in err, err


@pytest.mark.parametrize("args", [("events", "--since", "5parsecs"), ("pause", "--for", "xyz"),
                                  ("scan", "--bogus"), ("status", "extra-arg")])
def test_bad_options_are_exit_2_one_line(fim, args):
    proc = fim.cli(*args)
    assert proc.returncode == 2, describe(proc)
    err = proc.stderr.strip()
    assert "Traceback" not in err and err.startswith("fimwatch: error:"), describe(proc)
    assert "\n" not in err, describe(proc)


def test_accept_takes_relative_paths_directories_and_deleted_files(fim):
    (fim.root / "sub").mkdir()
    a = write(fim.root / "sub" / "a", "1\n")
    b = write(fim.root / "b", "1\n")
    c = write(fim.root / "sub" / "c", "1\n")
    fim.baseline()
    write(a, "2\n")
    os.unlink(b)
    write(c, "2\n")
    proc = subprocess.run([sys.executable, str(FIMWATCH), "--config", str(fim.conf), "accept",
                           "b", "sub"], cwd=str(fim.root), env=clean_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, describe(proc)
    r = fim.cli("scan", "--no-alert")
    assert r.returncode == 0, describe(r)


@pytest.mark.inotify
def test_status_json_reports_what_spec_lists(fim):
    """watches vs the kernel limit, baseline entries and age, events in the last
    24 h by severity."""
    (fim.root / "sub").mkdir()
    for i in range(5):
        write(fim.root / "sub" / ("f%d" % i))
    d = fim.daemon()
    p = write(fim.root / "new.txt")
    d.wait_for(is_event("created", p))
    st = json.loads(fim.cli("status", "--json", check=0).stdout)
    assert st.get("running") is True, st
    assert st.get("pid") == d.pid, st
    assert st.get("watches") == 2 + own_watches(fim), st   # tree, sub + its own files
    with open("/proc/sys/fs/inotify/max_user_watches") as f:
        assert st.get("watch_limit") == int(f.read()), st
    # tree, sub, 5 files, new.txt + its own program, config, events file
    assert st.get("baseline_entries") == 8 + own_entries(fim), st
    assert isinstance(st.get("baseline_age_seconds"), (int, float)), st
    ev = st.get("events_24h", {})
    assert set(ev) >= {"critical", "warning", "notice", "info"}, st
    assert ev["warning"] >= 1, st
    d.stop()


def test_status_with_a_broken_config_still_says_whether_the_daemon_runs(fim):
    """Issue 15: a typo in the config must not hide whether the daemon (which
    keeps the config it started with) is running."""
    d = fim.daemon()
    good = fim.conf.read_text()
    fim.conf.write_text(good + "\n[watch]\nno_such_key = 1\n")
    r = fim.cli("status")
    assert r.returncode == 2, describe(r)
    assert r.stderr.startswith("fimwatch: error:") and r.stderr.count("\n") == 1, describe(r)
    assert r.stdout.startswith("fimwatch: running (pid %d)" % d.pid), describe(r)
    d.stop()
    r = fim.cli("status")
    assert r.returncode == 2 and r.stdout.startswith("fimwatch: NOT running"), describe(r)
