"""The bundle's second pass: what was deleted is computed from listings and removed, and
nothing outside the bundle can be named."""

import asyncio
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from livemig.errors import CommandFailed
from livemig.runtimes import bundle
from livemig.source import bundles
from livemig.wire import streams


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


def test_a_symlink_in_the_middle_of_a_deleted_path_is_never_followed(tmp_path):
    # the container swapped rootfs/x for a link to /etc: x/passwd must not reach /etc/passwd
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("keep")
    root = tmp_path / "b"
    (root / "rootfs").mkdir(parents=True)
    os.symlink(etc, root / "rootfs/x")
    bundle.remove_deleted(root, ["rootfs/x/passwd", "rootfs/x"])
    assert (etc / "passwd").read_text() == "keep"
    assert not os.path.lexists(root / "rootfs/x")      # the link itself was the bundle's: it goes


def test_a_deleted_directory_goes_with_what_it_still_holds_here(tmp_path):
    root = tmp_path / "b"
    (root / "rootfs/d/e").mkdir(parents=True)
    (root / "rootfs/d/e/f").write_text("x")
    bundle.remove_deleted(root, ["rootfs/d"])
    assert not (root / "rootfs/d").exists() and (root / "rootfs").is_dir()


class _Session:
    """The target's end of a bundle's passes, here: each push is extracted into target;
    before the first, once the source has looked at its tree, during() runs (what the
    container does meanwhile: the second pass is made with the container stopped)."""

    def __init__(self, target: Path, during):
        self.target, self.during, self.facts = target, during, None

    async def push(self, send, request, reply_type):
        self.during()
        self.during = lambda: None
        msg = request("tok")
        a, b = socket.socketpair()
        ours, theirs = await streams.socket_streams(a), await streams.socket_streams(b)
        async with asyncio.TaskGroup() as tg:
            sending = tg.create_task(send(ours[1]))
            tg.create_task(bundle.receive(theirs[0], self.target, msg.deleted))   # as the agent does
        return None, sending.result()


def _move(tmp_path, src: Path, during=lambda: None):
    (tmp_path / "work").mkdir()
    target = tmp_path / "target"
    target.mkdir()
    w = SimpleNamespace(bundle=lambda: src)
    m = SimpleNamespace(w=w, to=_Session(target, during), options=SimpleNamespace(compression_level=1),
                        work=tmp_path / "work", report=SimpleNamespace(bundle_bytes_wire=0),
                        progress=lambda e: None, bundle_copied_at=None, bundle_sent=set())
    return m, target


async def _two_passes(m, between=lambda: None) -> None:
    """The pre-copy, between() (the container runs on, then stops), the second pass."""
    await bundles.precopy_bundle(m)
    between()
    await bundles.send_changes(m)


async def test_a_file_made_and_sent_in_the_first_pass_then_deleted_does_not_stay(tmp_path):
    src = tmp_path / "src"
    (src / "rootfs").mkdir(parents=True)
    (src / "rootfs/kept").write_text("k")

    m, target = _move(tmp_path, src, lambda: (src / "rootfs/late").write_text("made after the first "
                                                                              "listing, before the tar"))
    await _two_passes(m, lambda: (src / "rootfs/late").unlink())
    assert (target / "rootfs/kept").read_text() == "k"
    assert not (target / "rootfs/late").exists()


def _swap_for_link(d: Path, to: Path) -> None:
    for f in d.iterdir():
        f.unlink()
    d.rmdir()
    os.symlink(to, d)


@pytest.mark.parametrize("when", ["during the first tar", "between the passes"])
async def test_a_directory_swapped_for_a_link_to_etc_deletes_nothing_there(tmp_path, when):
    # during the first tar: listed a directory, sent a link; between the passes: sent a
    # directory with its files, a link at the second (tar cannot put it over them)
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("keep")
    src = tmp_path / "src"
    (src / "rootfs/x").mkdir(parents=True)
    (src / "rootfs/x/passwd").write_text("the container's")
    swap = lambda: _swap_for_link(src / "rootfs/x", etc)
    if when == "during the first tar":
        m, target = _move(tmp_path, src, swap)
        await _two_passes(m)
    else:
        m, target = _move(tmp_path, src)
        await _two_passes(m, swap)
    assert (etc / "passwd").read_text() == "keep"
    assert os.readlink(target / "rootfs/x") == str(etc)


async def test_a_directory_and_a_file_that_swap_kinds_between_the_passes_arrive_as_they_are(tmp_path):
    src = tmp_path / "src"
    (src / "rootfs/d").mkdir(parents=True)
    (src / "rootfs/d/f").write_text("1")
    (src / "rootfs/file").write_text("x")

    def between():
        (src / "rootfs/d/f").unlink()
        (src / "rootfs/d").rmdir()
        (src / "rootfs/d").write_text("now a file")
        (src / "rootfs/file").unlink()
        (src / "rootfs/file").mkdir()
        (src / "rootfs/file/in").write_text("now a directory")
    m, target = _move(tmp_path, src)
    await _two_passes(m, between)
    assert (target / "rootfs/d").read_text() == "now a file"
    assert (target / "rootfs/file/in").read_text() == "now a directory"


@pytest.mark.parametrize("name", ["new\nline", "back\\slash", "caf\u00e9", os.fsdecode(b"bad\xff\x01"), "sp ace\"q"])
async def test_odd_names_sent_then_deleted_go(tmp_path, name):
    src = tmp_path / "src"
    (src / "rootfs").mkdir(parents=True)
    (src / "rootfs" / name).write_text("x")

    m, target = _move(tmp_path, src)
    await _two_passes(m, lambda: (src / "rootfs" / name).unlink())
    assert os.listdir(target / "rootfs") == []


class _HeldWriter:
    """A stream whose first drain waits until the test lets it go: tar, its pipe full, stops
    in the middle of the file it reads, for as long as the test needs."""

    def __init__(self):
        self.held, self.go, self.data = asyncio.Event(), asyncio.Event(), bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        self.held.set()
        await self.go.wait()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        pass


async def _sent_while_a_file_grows(root: Path, running: bool):
    big = root / "rootfs" / "count"
    big.parent.mkdir(parents=True)
    big.write_bytes(os.urandom(16 << 20))        # far more than tar's pipe holds
    out = _HeldWriter()
    sending = asyncio.create_task(bundle.send(root, out, running=running))
    await out.held.wait()                        # tar is in the middle of the file, blocked
    with big.open("ab") as f:
        f.write(b"the container counts on")      # as a running container does
    out.go.set()
    return await sending


async def test_a_file_the_running_container_changes_while_tar_reads_it_is_sent_all_the_same(tmp_path):
    meter = await _sent_while_a_file_grows(tmp_path, running=True)
    assert meter.raw > 16 << 20                  # the file went (the frozen pass sends it again)


async def test_a_file_that_changes_while_the_frozen_pass_reads_it_fails_that_pass(tmp_path):
    with pytest.raises(CommandFailed, match="file changed as we read it"):
        await _sent_while_a_file_grows(tmp_path, running=False)
