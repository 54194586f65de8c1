"""The shipped example config works as-is, SPEC's config (with its inline
comments) parses, and the script runs on every Python >= 3.9 on the machine."""

import glob
import os
import re
import shutil
import subprocess

import pytest

from conftest import FIMWATCH, REPO, describe, is_event, write

EXAMPLE = REPO / "fimwatch.conf.example"

# SPEC.md's config block, verbatim but for the paths of this test.
SPEC_CONFIG = """\
[fimwatch]
state_dir = @STATE@   # baseline.db, alert spool, pause state
hostname =                       # default: the machine's FQDN
settle = 500ms                   # quiet time before a burst on one path becomes one event
hash_max_size = 256M             # larger files: metadata only, noted in the event
scan_interval = 24h              # full verification scan in the daemon; 0 = never

[watch]
paths = @ROOT@
exclude = *.swp *.swx *~ .#* 4913 /etc/mtab /var/www/**/cache/**
scan_only =                      # checked by scans only (e.g. NFS mounts)

[severity]                       # first matching level wins; default: warning
critical = /etc/passwd /etc/shadow /etc/group /etc/gshadow /etc/sudoers /etc/sudoers.d/** \
/etc/ssh/** /etc/pam.d/** /etc/systemd/system/** /etc/cron*/** /etc/ld.so.preload /usr/bin/** \
/usr/sbin/** /usr/local/bin/** /usr/local/sbin/**
info =

[syslog]
enabled = no
address = /dev/log               # a unix datagram socket path, or host:port for UDP
facility = authpriv
min_severity = info

[email]
enabled = no
to = root
from =                           # default: fimwatch@HOSTNAME
sendmail = /usr/sbin/sendmail
min_severity = warning
max_per_hour = 12                # beyond this, one digest per hour

[webhook]                        # more than one: [webhook NAME]
enabled = no
url =
format = json                    # json | slack | ... (each documented)
secret =                         # HMAC-SHA256 of the body in X-Fimwatch-Signature: sha256=HEX
min_severity = warning
timeout = 10s

[log]
events_file = @EVENTS@   # empty = off
"""


def test_spec_config_block_parses(fim):
    text = (SPEC_CONFIG.replace("@STATE@", str(fim.state_dir))
            .replace("@ROOT@", str(fim.root)).replace("@EVENTS@", str(fim.events_file)))
    fim.write_config(text)
    proc = fim.cli("check-config")
    assert proc.returncode == 0, describe(proc)
    assert str(fim.root) in proc.stdout


def test_example_config_is_valid_as_is(fim):
    if not EXAMPLE.exists():
        pytest.skip("fimwatch.conf.example not written yet")
    fim.write_config(EXAMPLE.read_text())
    proc = fim.cli("check-config")
    assert proc.returncode == 0, describe(proc)


def test_example_config_runs_with_its_paths_pointed_at_a_temp_tree(fim):
    if not EXAMPLE.exists():
        pytest.skip("fimwatch.conf.example not written yet")
    text = EXAMPLE.read_text()
    text = re.sub(r"(?m)^state_dir = .*$", "state_dir = %s" % fim.state_dir, text)
    text = re.sub(r"(?m)^paths = .*$", "paths = %s" % fim.root, text)
    text = re.sub(r"(?m)^events_file = .*$", "events_file = %s" % fim.events_file, text)
    text = re.sub(r"(?m)^settle = .*$", "settle = 100ms", text)
    text = re.sub(r"(?ms)^(\[syslog\].*?^)enabled = yes", r"\1enabled = no", text)
    fim.write_config(text)
    d = fim.daemon()
    p = write(fim.root / "example.txt")
    d.wait_for(is_event("created", p))
    d.stop()


def other_pythons():
    """Python interpreters >= 3.9 on this machine besides the one running pytest."""
    found = {}
    candidates = [shutil.which("python3.%d" % minor) for minor in range(9, 15)]
    candidates += glob.glob("/root/.pyenv/versions/3.*/bin/python3")
    candidates += ["/usr/bin/python3"]
    for exe in candidates:
        if not exe or not os.access(exe, os.X_OK):
            continue
        try:
            out = subprocess.run([exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out and tuple(int(x) for x in out.split(".")) >= (3, 9):
            found.setdefault(out, exe)
    return sorted(found.items(), key=lambda kv: tuple(int(x) for x in kv[0].split(".")))


PYTHONS = other_pythons()


@pytest.mark.parametrize("version,python", PYTHONS or [("none", None)],
                         ids=[v for v, _ in PYTHONS] or ["none"])
def test_runs_on_every_python_from_3_9(fim, tmp_path, version, python):
    if python is None:
        pytest.skip("no other Python >= 3.9 on this machine")
    # inotify_simple is one pure-Python module: lend it to that interpreter
    import inotify_simple
    lib = tmp_path / "pylib"
    lib.mkdir()
    shutil.copy(inotify_simple.__file__, lib / "inotify_simple.py")
    env = {"PYTHONPATH": str(lib), "PYTHONNOUSERSITE": "1"}
    proc = fim.cli("check-config", python=python, env=env)
    assert proc.returncode == 0, describe(proc)
    d = fim.daemon(python=python, env=env)
    p = write(fim.root / "py.txt")
    d.wait_for(is_event("created", p))
    d.stop()
    write(p, "changed\n")
    proc = fim.cli("scan", "--no-alert", "--json", python=python, env=env)
    assert proc.returncode == 1 and str(p) in proc.stdout, describe(proc)


def test_script_is_self_contained():
    """Standard library + inotify_simple only (SPEC)."""
    import ast
    import sys
    tree = ast.parse(FIMWATCH.read_text(), feature_version=(3, 9))
    stdlib = set(sys.stdlib_module_names) if hasattr(sys, "stdlib_module_names") else None
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    if stdlib is not None:
        extra = sorted(m for m in imported if m not in stdlib and m != "inotify_simple")
        assert not extra, "imports outside the standard library: %s" % extra
