"""The bundle's second pass: what was deleted is computed from listings and removed, and
nothing outside the bundle can be named."""

import os
from pathlib import Path

import pytest

from livemig.errors import CommandFailed
from livemig.runtimes import bundle


def test_listing_and_deletions_round_trip(tmp_path):
    root = tmp_path / "b"
    (root / "rootfs/etc").mkdir(parents=True)
    (root / "rootfs/etc/hosts").write_text("x")
    (root / "rootfs/tmp").mkdir()
    (root / "rootfs/tmp/gone").write_text("y")
    os.symlink("/etc/passwd", root / "rootfs/link")       # links are listed, never followed
    before = bundle.listing(root)
    assert before == {"rootfs", "rootfs/etc", "rootfs/etc/hosts", "rootfs/tmp", "rootfs/tmp/gone", "rootfs/link"}
    (root / "rootfs/tmp/gone").unlink()
    (root / "rootfs/tmp").rmdir()
    deleted = sorted(before - bundle.listing(root))
    assert deleted == ["rootfs/tmp", "rootfs/tmp/gone"]

    copy = tmp_path / "copy"
    (copy / "rootfs/tmp").mkdir(parents=True)
    (copy / "rootfs/tmp/gone").write_text("y")
    bundle.remove_deleted(copy, deleted)                  # children before their directory
    assert not (copy / "rootfs/tmp").exists() and (copy / "rootfs").is_dir()


@pytest.mark.parametrize("bad", ["../outside", "/etc/passwd", "rootfs/../../outside"])
def test_a_deletion_outside_the_bundle_is_refused(tmp_path, bad):
    (tmp_path / "outside").write_text("keep")
    root = tmp_path / "b"
    root.mkdir()
    with pytest.raises(CommandFailed):
        bundle.remove_deleted(root, [bad])
    assert (tmp_path / "outside").read_text() == "keep"


def test_mounts_under_finds_proc_in_root_only():
    assert "/proc" in bundle.mounts_under(Path("/"))
    assert bundle.mounts_under(Path("/nonexistent-livemig")) == []
