"""Files only the source has, carried for the restore (livemig/carried.py): packed as they
are, placed where they were and never over what is there, and taken away on an undo."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from livemig import carried
from livemig.errors import LivemigError


@pytest.fixture
def source(tmp_path):
    d = tmp_path / "src"
    (d / "logs").mkdir(parents=True)
    log = d / "logs" / "app.log"
    log.write_bytes(b"line 1\nline 2\n")
    os.chmod(log, 0o640)
    os.utime(log, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    work = d / "cwd"
    work.mkdir(mode=0o750)
    return log, work


def _moved(tmp_path, paths: list[str]) -> list[str]:
    """paths as they would be on the target: under tmp_path/target, same shape."""
    return [str(tmp_path / "target") + p for p in paths]


def test_what_is_packed_is_placed_as_it_was_and_an_undo_takes_it_all_away(tmp_path, source):
    log, work = source
    packed = tmp_path / "images" / "carried"
    (tmp_path / "images").mkdir()
    total = carried.pack([str(log), str(work)], packed)
    assert total == 14
    # the target's paths: the manifest's, moved under tmp_path/target (no directory on the way there yet)
    manifest = json.loads((packed / carried.MANIFEST).read_text())
    for entry, there in zip(manifest, _moved(tmp_path, [str(log), str(work)])):
        entry["path"] = there
    (packed / carried.MANIFEST).write_text(json.dumps(manifest))
    made = carried.place(packed)
    placed_log, placed_dir = _moved(tmp_path, [str(log), str(work)])
    assert Path(placed_log).read_bytes() == b"line 1\nline 2\n"
    st = os.stat(placed_log)
    assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o640, 1_700_000_000_000_000_000)
    assert stat.S_IMODE(os.stat(placed_dir).st_mode) == 0o750
    assert str(tmp_path / "target") in made           # a directory on the way, made, is undone too
    carried.remove(made)
    assert not (tmp_path / "target").exists()


def test_a_file_the_target_has_is_never_written_over_and_nothing_placed_stays(tmp_path, source):
    log, _ = source
    packed = tmp_path / "carried"
    carried.pack([str(log)], packed)
    before = log.read_bytes()
    log.write_bytes(b"the target's own")
    manifest = json.loads((packed / carried.MANIFEST).read_text())
    manifest.insert(0, {**manifest[0], "path": str(tmp_path / "new" / "first.log")})
    (packed / carried.MANIFEST).write_text(json.dumps(manifest))
    (packed / "1").write_bytes(before)      # the entries' copies, by their place in it
    (packed / "0").write_bytes(b"first")
    with pytest.raises(LivemigError, match="File exists"):
        carried.place(packed)
    assert log.read_bytes() == b"the target's own"
    assert not (tmp_path / "new").exists()            # what it made before it stopped is gone


@pytest.mark.parametrize("path", ["relative.log", "/proc/1/environ", "/var/log/../../etc/x", "/sys/kernel/x"])
def test_a_path_that_is_not_one_to_write_is_refused(tmp_path, path):
    packed = tmp_path / "carried"
    packed.mkdir()
    (packed / "0").write_bytes(b"x")
    (packed / carried.MANIFEST).write_text(json.dumps([{"path": path, "kind": "file", "mode": 0o600, "uid": 0,
                                                        "gid": 0, "mtime_ns": 0, "size": 1}]))
    with pytest.raises(LivemigError, match="not one to write"):
        carried.place(packed)


def test_sizes_leave_out_what_is_gone():
    assert carried.sizes(["/nonexistent/x", "/"]) == {"/": 0}
