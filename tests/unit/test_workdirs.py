"""Work directories held by a lock while their owner lives, and swept once it died
(workdirs.py): real directories and real flock(2) locks, owners in child processes."""

from __future__ import annotations

import os
import signal

from livemig import workdirs


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
