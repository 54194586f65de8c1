"""Recursive watching: new directories, moved trees, renamed directories,
a recreated root, symlinks (never followed), excluded directories (no watch)."""

import os
import shutil
import subprocess

import pytest

from conftest import control_file, is_event, tree_watch_count, wait_until, write

FILE_EVENTS = {"created", "modified", "attributes", "deleted", "moved"}


def test_mkdir_p_then_touch_race_in_one_shell_command(fim):
    d = fim.daemon()
    subprocess.run("mkdir -p a/b/c && touch a/b/c/x", shell=True, check=True, cwd=str(fim.root))
    x = fim.root / "a" / "b" / "c" / "x"
    d.wait_for(is_event("created", x, kind="file"))
    for sub in ("a", "a/b", "a/b/c"):
        d.wait_for(is_event("created", fim.root / sub, kind="dir"))
    # the new directories are watched now: a later change is seen in real time
    write(x, "later\n")
    d.wait_for(is_event("modified", x, detected="realtime"))
    d.stop()


def test_tight_python_loop_of_new_dirs_and_files(fim):
    d = fim.daemon()
    leaves = []
    for i in range(10):
        leaf = fim.root / ("p%d" % i) / "q" / "r"
        os.makedirs(leaf)
        leaves.append(write(leaf / "f", "v%d\n" % i))
    for f in leaves:
        d.wait_for(is_event("created", f))
    for f in leaves:
        write(f, "changed\n")
    for f in leaves:
        d.wait_for(is_event("modified", f))
    d.stop()


def test_tree_moved_in_from_outside_then_edited(fim):
    src = fim.outside / "site"
    files = []
    for sub in ("", "css", "js/lib", "js/lib/deep"):
        (src / sub).mkdir(parents=True, exist_ok=True)
        files.append(write(src / sub / "index.txt", "v1 %s\n" % sub))
    d = fim.daemon()
    dst = fim.root / "site"
    os.rename(src, dst)
    moved = [dst / f.relative_to(src) for f in files]
    for f in moved:
        d.wait_for(is_event("created", f))
    target = dst / "js" / "lib" / "deep" / "index.txt"
    m = d.mark()
    write(target, "v2\n")
    e = d.wait_for(is_event("modified", target), since=m)
    assert e["detected"] == "realtime", e
    # nothing may still refer to the outside location
    assert not [e for e in d.events() if str(src) in e.get("path", "")]
    d.stop()


def test_renamed_directory_keeps_paths_right(fim):
    (fim.root / "dir" / "sub").mkdir(parents=True)
    write(fim.root / "dir" / "sub" / "f.txt", "one\n")
    d = fim.daemon()
    os.rename(fim.root / "dir", fim.root / "dir2")
    m = d.mark()
    new = fim.root / "dir2" / "sub" / "f.txt"
    write(new, "two\n")
    e = d.wait_for(lambda e: e.get("event") == "modified" and "f.txt" in e.get("path", ""),
                   since=m)
    assert e["path"] == str(new), "expected the new path %s, got %s" % (new, e)
    # and a file created later under the renamed dir
    n2 = write(fim.root / "dir2" / "sub" / "g.txt")
    d.wait_for(is_event("created", n2))
    d.stop()


def test_directory_rename_is_a_moved_event(fim):
    (fim.root / "olddir").mkdir()
    write(fim.root / "olddir" / "f.txt")
    d = fim.daemon()
    os.rename(fim.root / "olddir", fim.root / "newdir")
    e = d.wait_for(is_event("moved", fim.root / "newdir"))
    assert e["from"] == str(fim.root / "olddir"), e
    assert e["kind"] == "dir", e
    d.stop()


def test_tree_moved_out_is_deleted(fim):
    (fim.root / "leaving" / "sub").mkdir(parents=True)
    a = write(fim.root / "leaving" / "a.txt")
    b = write(fim.root / "leaving" / "sub" / "b.txt")
    d = fim.daemon()
    os.rename(fim.root / "leaving", fim.outside / "left")
    for p in (a, b):
        d.wait_for(is_event("deleted", p))
    # changes at the new place outside the tree are not ours any more
    m = d.mark()
    write(fim.outside / "left" / "sub" / "b.txt", "changed outside\n")
    d.assert_quiet(lambda e: "left" in e.get("path", ""), since=m, control=control_file())
    d.stop()


def test_watched_root_removed_and_recreated_is_watched_again(fim):
    write(fim.root / "f.txt")
    d = fim.daemon()
    shutil.rmtree(fim.root)
    d.wait_for(is_event("deleted", fim.root / "f.txt"))
    fim.root.mkdir()
    p = write(fim.root / "after.txt", "back\n")
    d.wait_for(lambda e: e.get("path") == str(p) and e.get("event") == "created", timeout=30)
    m = d.mark()
    write(p, "changed again\n")
    d.wait_for(is_event("modified", p), since=m)
    d.stop()


def test_symlink_retarget_is_an_attributes_event_with_target(fim):
    write(fim.root / "t1", "one\n")
    write(fim.root / "t2", "two\n")
    link = fim.root / "current"
    os.symlink("t1", link)
    d = fim.daemon()
    os.unlink(link)                 # what `ln -sf t2 current` does
    os.symlink("t2", link)
    e = d.wait_for(lambda e: e.get("path") == str(link) and e.get("event") in FILE_EVENTS)
    assert e["event"] == "attributes", e
    assert "target" in e["changes"], e
    assert e["kind"] == "symlink", e
    d.stop()


def test_symlink_to_outside_is_never_followed(fim):
    outdir = fim.outside / "dir"
    outdir.mkdir()
    outfile = write(fim.outside / "secret.txt", "outside\n")
    os.symlink(str(outdir), fim.root / "link-to-dir")
    os.symlink(str(outfile), fim.root / "link-to-file")
    d = fim.daemon()
    m = d.mark()
    write(outfile, "changed outside\n")
    write(outdir / "new.txt", "new outside\n")
    d.assert_quiet(lambda e: e.get("event") in FILE_EVENTS
                   and ("link-to" in e.get("path", "") or str(fim.outside) in e.get("path", "")),
                   since=m, control=control_file())
    d.stop()
    # and a scan does not follow them either
    r = fim.cli("scan", "--no-alert")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.inotify
def test_excluded_directories_get_no_watch(fim):
    fim.write_config(watch={"exclude": "*.swp cachedir/"})
    for i in range(20):
        (fim.root / "cachedir" / ("c%d" % i)).mkdir(parents=True)
    (fim.root / "keep" / "a").mkdir(parents=True)
    (fim.root / "keep" / "b").mkdir(parents=True)
    d = fim.daemon()
    n = tree_watch_count(d)
    # tree, keep, keep/a, keep/b (+1 allowed for watching the root's parent)
    assert 4 <= n <= 5, "daemon holds %d inotify watches for 4 watched dirs" % n
    # positive control: non-excluded new dirs are counted
    for name in ("x", "y", "z"):
        (fim.root / "keep" / name).mkdir()
    wait_until(lambda: tree_watch_count(d) == n + 3, timeout=10,
               what="3 more watches (have %d)" % tree_watch_count(d))
    # a new dir under the excluded one gets no watch and no event
    m = d.mark()
    (fim.root / "cachedir" / "new").mkdir()
    write(fim.root / "cachedir" / "new" / "f")
    d.assert_quiet(lambda e: "cachedir" in e.get("path", ""), since=m, control=control_file())
    assert tree_watch_count(d) == n + 3
    d.stop()


def test_watched_root_moved_away_is_deleted_and_rewatched_when_back(fim):
    (fim.root / "sub").mkdir()
    f = write(fim.root / "sub" / "f.txt")
    d = fim.daemon()
    away = fim.outside / "tree.old"
    os.rename(fim.root, away)
    d.wait_for(is_event("deleted", f), timeout=20)
    m = d.mark()
    write(away / "sub" / "f.txt", "changed where nobody watches\n")
    fim.root.mkdir()
    p = write(fim.root / "new.txt")
    d.wait_for(is_event("created", p), since=m, timeout=90)
    assert not d.matching(lambda e: str(away) in e.get("path", "")), d.events()
    m = d.mark()
    write(p, "v2\n")
    d.wait_for(is_event("modified", p), since=m)
    d.stop()


def test_configured_path_that_is_a_symlink_to_a_directory(fim):
    """Debian 12 has merged /usr: /bin -> usr/bin. An admin who lists /bin must get
    /usr/bin watched (the configured path is resolved once; symlinks inside the
    tree are still never followed)."""
    real = fim.root / "usr-bin"
    real.mkdir()
    tool = write(real / "ls", "ELF v1\n")
    link = fim.base / "bin"
    os.symlink(str(real), link)
    fim.write_config(watch={"paths": str(link)})
    r = fim.cli("check-config")
    assert r.returncode == 0, r.stderr
    warned = "symlink" in (r.stdout + r.stderr).lower()
    d = fim.daemon()
    write(tool, "ELF trojan\n")
    try:
        d.wait_for(lambda e: e.get("event") == "modified"
                   and e.get("path") in (str(tool), str(link / "ls")), timeout=5)
    except AssertionError:
        raise AssertionError("paths = %s (a symlink to a directory): a change inside is "
                             "never reported%s" % (link, "" if warned else
                                                   ", and check-config says nothing"))
    d.stop()
