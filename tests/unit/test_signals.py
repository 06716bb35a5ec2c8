"""Ctrl-C and SIGTERM around the work the CLI runs (interrupts.run): the first cancels it, so
that its rollback runs; a second is ignored while it rolls back; one that comes after
the work ended leaves its outcome as it was."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest

from livemig import interrupts
from livemig.errors import LivemigError


def _signal_soon(sig: int, after: float) -> None:
    threading.Timer(after, os.kill, (os.getpid(), sig)).start()


async def _rolls_back(log: list[str], signals: int = 1) -> str:
    """Waits to be cancelled, then rolls back (shielded, as the coordinator does),
    with more signals coming meanwhile."""
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        async def rollback():
            for _ in range(signals - 1):
                os.kill(os.getpid(), signal.SIGINT)
                await asyncio.sleep(0.05)
            log.append("rolled back")
        await asyncio.shield(rollback())
        raise
    return "not interrupted"


def test_ctrl_c_cancels_the_work_and_is_told_as_an_interrupt():
    log: list[str] = []
    _signal_soon(signal.SIGINT, 0.1)
    with pytest.raises(KeyboardInterrupt):
        interrupts.run(_rolls_back(log))
    assert log == ["rolled back"]


def test_a_second_ctrl_c_does_not_cut_the_rollback_short(capsys):
    log: list[str] = []
    _signal_soon(signal.SIGINT, 0.1)
    with pytest.raises(KeyboardInterrupt):
        interrupts.run(_rolls_back(log, signals=3))
    assert log == ["rolled back"]
    assert capsys.readouterr().err.count("still putting things back") == 1


def test_sigterm_is_told_as_terminated():
    log: list[str] = []
    _signal_soon(signal.SIGTERM, 0.1)
    with pytest.raises(interrupts.Terminated):
        interrupts.run(_rolls_back(log))
    assert log == ["rolled back"]


def test_work_that_handles_the_cancel_keeps_its_result():
    async def finishes_anyway() -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            return "moved"      # the coordinator's "moved all the same"
        return "never"
    _signal_soon(signal.SIGINT, 0.1)
    assert interrupts.run(finishes_anyway()) == "moved"


def _signal_once_done(task: asyncio.Task, sig: int) -> None:
    """In a thread of the loop's executor, which the loop's shutdown waits for: sig the moment
    task has ended, then a while longer, so that the signal lands in the shutdown whatever
    the machine's speed."""
    def wait_then_signal() -> None:
        while not task.done():
            time.sleep(0.001)
        os.kill(os.getpid(), sig)
        time.sleep(0.3)
    asyncio.get_running_loop().run_in_executor(None, wait_then_signal)


def test_a_ctrl_c_after_the_work_ended_leaves_its_outcome():
    async def done_with_a_thread_still_running() -> str:
        _signal_once_done(asyncio.current_task(), signal.SIGINT)
        return "moved"
    assert interrupts.run(done_with_a_thread_still_running()) == "moved"


def test_a_failure_stays_a_failure_when_a_ctrl_c_follows_it():
    async def fails() -> None:
        _signal_once_done(asyncio.current_task(), signal.SIGINT)
        raise LivemigError("restore failed")
    with pytest.raises(LivemigError, match="restore failed"):
        interrupts.run(fails())


def test_an_interrupt_while_the_work_tidies_up_leaves_its_outcome_and_the_tidying_whole():
    # a move done, its connections closing: what it ended as is told, not "terminated"
    log: list[str] = []

    async def tidy() -> None:
        await asyncio.sleep(0.3)
        log.append("tidied")

    async def moved_then_tidied() -> str:
        try:
            return "moved"
        finally:
            if await interrupts.to_the_end(tidy()):
                log.append("interrupted meanwhile")
    _signal_soon(signal.SIGTERM, 0.1)
    assert interrupts.run(moved_then_tidied()) == "moved"
    assert log == ["tidied", "interrupted meanwhile"]


def test_a_sigterm_once_the_work_ended_does_not_kill_the_process_before_it_tells_the_outcome():
    before = signal.getsignal(signal.SIGTERM)
    try:
        assert interrupts.run(asyncio.sleep(0, "moved")) == "moved"
        os.kill(os.getpid(), signal.SIGTERM)    # the loop is closed: by default, this would kill
        time.sleep(0.05)
    finally:
        signal.signal(signal.SIGTERM, before)


def test_an_interrupt_once_the_target_s_copy_ran_is_told_why_it_waits():
    from livemig.interrupts import uncancellable
    told: list[str] = []

    async def copy_made_whole() -> str:
        await asyncio.sleep(0.3)
        return "whole"

    async def commit() -> str:
        whole = asyncio.ensure_future(copy_made_whole())
        try:
            await uncancellable(whole, told=lambda: told.append("waiting for every page"))
        except asyncio.CancelledError:
            return f"moved all the same ({whole.result()})"
        return "not interrupted"
    _signal_soon(signal.SIGINT, 0.1)
    assert interrupts.run(commit()) == "moved all the same (whole)"
    assert told == ["waiting for every page"]
