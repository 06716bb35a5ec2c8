"""Why a target's CRIU failed, where its log says nothing (target/receive.py)."""

import shutil
from collections import namedtuple

from livemig.target import receive

Usage = namedtuple("Usage", "total used free")


def test_a_criu_with_no_log_on_a_full_disk_is_said_to_have_failed_for_the_disk(tmp_path, monkeypatch):
    # the disk so full that CRIU could not write its log either: the pipe's breaking tells nothing
    monkeypatch.setattr(shutil, "disk_usage", lambda d: Usage(400 << 20, (400 << 20) - 4096, 4096))
    broke = ExceptionGroup("unhandled errors in a TaskGroup", [BrokenPipeError(32, "Broken pipe"),
                                                              ConnectionResetError(104, "reset")])
    assert receive._unlogged(broke, tmp_path) == ("No space left on device (the image directory's disk "
                                                  "has 4 KiB free)")


def test_otherwise_the_first_of_what_broke_the_pipe_is_said_not_the_group(tmp_path):
    broke = ExceptionGroup("unhandled errors in a TaskGroup", [BrokenPipeError(32, "Broken pipe"),
                                                              ConnectionResetError(104, "reset")])
    assert receive._unlogged(broke, tmp_path) == "[Errno 32] Broken pipe"
