"""Work done in another process's network namespace, by a thread of livemig's own: a socket
made there stays there (its packets are that namespace's) while livemig uses it from here."""

from __future__ import annotations

import asyncio
import ctypes
import os
import threading
from collections.abc import Callable
from typing import TypeVar

from . import host

_CLONE_NEWNET = 0x40000000
T = TypeVar("T")


async def run_in(pid: int, work: Callable[[], T]) -> T:
    """work() run in pid's network namespace (here, where pid shares this process's): in a
    thread of its own that ends with it (setns moves the calling thread alone, and a thread of
    a pool would stay there). What work raises is raised here."""
    if host.same_netns(pid):
        return await asyncio.to_thread(work)
    done: list[T] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
            try:
                if ctypes.CDLL(None, use_errno=True).setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {pid}'s network namespace")
            finally:
                os.close(fd)
            done.append(work())
        except BaseException as e:     # noqa: BLE001 - carried to the caller, raised there
            failed.append(e)

    def in_its_thread() -> None:
        t = threading.Thread(target=run, name="livemig-netns")
        t.start()
        t.join()

    await asyncio.to_thread(in_its_thread)
    if failed:
        raise failed[0]
    return done[0]
