"""A failed move's CRIU logs outlive its images: kept private, named by round, pruned."""

import dataclasses
import os
import time

from livemig import logs


def test_the_logs_are_kept_private_and_the_images_are_not(tmp_path):
    work = tmp_path / "root" / "20261123-000000-abcd-source"
    (work / "pre-1").mkdir(parents=True)
    (work / "final").mkdir()
    (work / "pre-1" / "pre-dump.log").write_text("(00.1) pie: done\n")
    (work / "final" / "dump.log").write_text("(00.2) Error (criu/mem.c:1): cannot read pages\n")
    (work / "final" / "pages-1.img").write_bytes(b"secret" * 100)
    kept = logs.keep(work, str(tmp_path / "root"), "20261123-000000-abcd-source")
    assert sorted(os.listdir(kept)) == ["final-dump.log", "pre-1-pre-dump.log"]
    assert oct(os.stat(kept).st_mode & 0o777) == "0o700" and oct(os.stat(kept.parent).st_mode & 0o777) == "0o700"
    assert all(os.stat(kept / f).st_mode & 0o077 == 0 for f in os.listdir(kept))
    assert logs.excerpt(kept) == ["final-dump.log: (00.2) Error (criu/mem.c:1): cannot read pages"]


def test_nothing_is_kept_without_logs_and_only_the_newest_failures_stay(tmp_path, monkeypatch):
    assert logs.keep(tmp_path / "gone", str(tmp_path), "x") is None
    monkeypatch.setattr(logs, "SIZES", dataclasses.replace(logs.SIZES, logs_kept=2))
    for i in range(3):
        work = tmp_path / f"w{i}"
        work.mkdir()
        (work / "restore.log").write_text("Error\n")
        kept = logs.keep(work, str(tmp_path), f"m{i}")
        os.utime(kept, (time.time() + i, time.time() + i))
    assert sorted(os.listdir(tmp_path / "logs")) == ["m1", "m2"]
