"""Work directories held by a lock while their owner lives, and swept once it died
(workdirs.py): real directories and real flock(2) locks, owners in child processes."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import time

from livemig import workdirs
from livemig.target.copy import Copy
from livemig.target.receive import Images
from livemig.target.stage import Stages
from livemig.target.workspace import Workspace


def _owned_by_a_child(root, name: str):
    """A directory made and held by a child process, which then waits: (pid, path)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        workdirs.make(root, root / name)
        os.write(w, b"x")
        signal.pause()
        os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"x"
    os.close(r)
    return pid, root / name


def _killed(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def test_a_directory_whose_owner_lives_stays_and_one_whose_owner_was_killed_goes(tmp_path):
    alive, kept = _owned_by_a_child(tmp_path, "m1")
    dead, swept = _owned_by_a_child(tmp_path, "m2")
    (swept / "final").mkdir()
    (swept / "final" / "pages-1.img").write_bytes(b"secret")
    _killed(dead)
    try:
        assert workdirs.sweep(tmp_path) == ["m2"]
        assert kept.is_dir() and not swept.exists()
    finally:
        _killed(alive)


def test_a_marker_keeps_a_dead_owner_s_directory_for_recover_but_not_its_memory_images(tmp_path):
    for marker in workdirs.MARKERS:
        dead, d = _owned_by_a_child(tmp_path, f"m-{marker}")
        (d / marker).write_text("{}")
        (d / "final").mkdir()
        (d / "final" / "pages-1.img").write_bytes(b"secret")
        _killed(dead)
    assert workdirs.sweep(tmp_path) == []
    for marker in workdirs.MARKERS:
        d = tmp_path / f"m-{marker}"
        assert (d / marker).exists() and not (d / "final").exists()


def test_what_livemig_did_not_make_is_never_swept(tmp_path):
    (tmp_path / "logs").mkdir()                 # kept CRIU logs: no lock file
    (tmp_path / "x.verdict").write_text("killed\n")
    link = tmp_path / "elsewhere"
    os.symlink("/", link)
    assert workdirs.sweep(tmp_path) == []
    assert (tmp_path / "logs").is_dir() and (tmp_path / "x.verdict").exists() and link.is_symlink()


def test_a_held_directory_is_released_with_its_owner_s_release(tmp_path):
    held = workdirs.make(tmp_path / "root", tmp_path / "root" / "m")
    assert oct(os.stat(tmp_path / "root").st_mode & 0o777) == "0o700"
    assert workdirs.sweep(tmp_path / "root") == []          # we live, and hold it
    held.release()
    assert workdirs.sweep(tmp_path / "root") == ["m"]


def test_a_sweep_in_the_instant_a_directory_is_made_leaves_it_to_its_maker(tmp_path, monkeypatch):
    # another agent's sweep, run just before the maker takes its lock: the directory is
    # not a dead owner's, and must not go
    real = fcntl.flock
    swept: list[list[str] | None] = []

    def sweep_first(fd, op):
        if not swept:
            swept.append(None)          # the sweep's own flock goes straight through
            swept[0] = workdirs.sweep(tmp_path)
        real(fd, op)
    monkeypatch.setattr(workdirs.fcntl, "flock", sweep_first)
    held = workdirs.make(tmp_path, tmp_path / "m")
    try:
        assert swept == [[]] and (tmp_path / "m" / workdirs.LOCK).is_file()
        assert workdirs.sweep(tmp_path) == []         # and it is held
    finally:
        held.release()


def test_a_sweep_that_locks_a_lock_file_already_swept_leaves_the_new_directory_there(tmp_path, monkeypatch):
    # two sweeps of one dead owner's directory: the second locks the old .owner, unlinked
    # by the first, while a new owner has made the directory again under the same name
    dead, d = _owned_by_a_child(tmp_path, "m")
    _killed(dead)
    real = fcntl.flock
    alive: list[int] = []

    def meanwhile(fd, op):
        if not alive:
            alive.append(0)
            shutil.rmtree(d)                                    # the first sweep
            alive[0], _ = _owned_by_a_child(tmp_path, "m")      # and the new owner
        real(fd, op)
    monkeypatch.setattr(workdirs.fcntl, "flock", meanwhile)
    try:
        assert workdirs.sweep(tmp_path) == []
        assert (d / workdirs.LOCK).is_file()
    finally:
        _killed(alive[0])



def _agent_killed_after_making_a_bundle(root, tree):
    """An agent that made a bundle's tree (ReceiveTree) and was killed outright."""
    pid = os.fork()
    if pid == 0:
        try:
            ws = Workspace.make(root, "m1")
            Images(ws, Copy(Stages())).tree(str(tree))
        finally:
            os._exit(0)          # killed: nothing of its own cleanup runs
    os.waitpid(pid, 0)


def test_a_bundle_an_agent_killed_outright_made_goes_with_its_directory(tmp_path, short_root):
    tree = tmp_path / "ctr" / "bundle"
    _agent_killed_after_making_a_bundle(short_root / "root", tree)
    assert tree.is_dir()
    assert workdirs.sweep(short_root / "root") == ["m1"]
    assert not tree.exists()          # a later move may bring it again


def test_a_tree_at_that_path_made_since_by_someone_else_stays(tmp_path, short_root):
    tree = tmp_path / "ctr" / "bundle"
    _agent_killed_after_making_a_bundle(short_root / "root", tree)
    tree.rmdir()
    time.sleep(0.05)        # change times are as coarse as the clock's tick
    tree.mkdir()            # maybe under the same inode number
    assert workdirs.sweep(short_root / "root") == ["m1"] and tree.is_dir()


def test_a_bundle_that_an_orphan_marker_keeps_stays(tmp_path, short_root):
    tree = tmp_path / "ctr" / "bundle"
    _agent_killed_after_making_a_bundle(short_root / "root", tree)
    (short_root / "root" / "m1" / "ORPHANED.json").write_text("{}")    # the restored copy's: recover's
    assert workdirs.sweep(short_root / "root") == [] and tree.is_dir()


def _mounted(d) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == os.path.realpath(d) for line in f)


def test_images_in_memory_are_a_private_tmpfs_unmounted_before_their_directory_goes(tmp_path):
    held = workdirs.make(tmp_path / "root", tmp_path / "root" / "m-source")
    final = tmp_path / "root" / "m-source" / "final"
    final.mkdir(mode=0o700)
    try:
        assert workdirs.in_memory(final, 1 << 20)
        assert _mounted(final) and os.statvfs(final).f_blocks * os.statvfs(final).f_frsize == 1 << 20
        assert os.stat(final).st_mode & 0o777 == 0o700
        (final / "pages-1.img").write_bytes(b"x" * 4096)
        workdirs.remove(tmp_path / "root" / "m-source", images_only=True)     # a record would stay
        assert not _mounted(final) and not final.exists() and (tmp_path / "root" / "m-source").exists()
        final.mkdir()
        assert workdirs.in_memory(final, 1 << 20)
        workdirs.remove(tmp_path / "root" / "m-source")
        assert not _mounted(final) and not (tmp_path / "root" / "m-source").exists()
    finally:
        workdirs.unmount_under(tmp_path)
        held.release()


def test_a_dead_owner_s_images_in_memory_are_unmounted_and_swept(tmp_path):
    pid, d = _owned_by_a_child(tmp_path, "m-source")
    (d / "final").mkdir()
    try:
        assert workdirs.in_memory(d / "final", 1 << 20)
        _killed(pid)
        assert workdirs.sweep(tmp_path) == ["m-source"]
        assert not _mounted(d / "final") and not d.exists()
    finally:
        workdirs.unmount_under(tmp_path)
