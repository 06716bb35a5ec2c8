"""How a command is stopped: Ctrl-C and SIGTERM (systemd, timeout, kill) cancel the work
once, so that its rollback runs; one that comes again while it rolls back is ignored, and
one that comes after the work ended (while it tidies up: to_the_end; or as its outcome is
told) changes nothing.

The CLI runs every move and clone through run(); the errors here are what it tells.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .errors import ExitCode, LivemigError

T = TypeVar("T")


class Terminated(LivemigError):
    """SIGTERM (systemd, timeout, kill): rolled back like Ctrl-C. Its message and exit code
    are what the CLI says of it ("livemig: terminated", 143), wherever it is caught."""
    exit_code = ExitCode.TERMINATED

    def __init__(self, message: str = "terminated", **kw: Any):
        super().__init__(message, **kw)


class Interrupted(LivemigError):
    """Ctrl-C, raised from the work's task (a KeyboardInterrupt raised there would cut
    the event loop's own shutdown short) and told as a KeyboardInterrupt outside it."""
    exit_code = ExitCode.INTERRUPTED

    def __init__(self, message: str = "interrupted", **kw: Any):
        super().__init__(message, **kw)


class _Ended:
    """What the work ended in, kept for a signal that comes after it ended."""

    def __init__(self):
        self.done, self.result, self.error = False, None, None

    def outcome(self):
        if self.error is not None:
            raise self.error
        return self.result


async def _stoppable(coro, ended: _Ended):
    """Ctrl-C and SIGTERM cancel the work once, so that its rollback runs. One that comes
    again while it rolls back is ignored: a second cancel would cut the rollback short,
    and leave the workload stopped on both hosts. One that comes after the work ended
    changes nothing: a finished move is not told as interrupted."""
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    got: list[int] = []

    def stop(sig: int) -> None:
        if ended.done:
            return
        if got:
            if len(got) == 1:
                print("livemig: still putting things back; `livemig recover` is there if it is killed",
                      file=sys.stderr)
            got.append(sig)
            return
        got.append(sig)
        if task is not None:     # (a coroutine's own task: always)
            task.cancel()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop, sig)
    try:
        ended.result = await coro
        return ended.result
    except asyncio.CancelledError as e:
        if not got:
            raise
        stopped = Interrupted() if got[0] == signal.SIGINT else Terminated()
        stopped.report = getattr(e, "report", None)     # what the work had done, and undone
        stopped.phase = getattr(stopped.report, "failed_phase", None) or None
        ended.error = stopped
        raise stopped from e
    except BaseException as e:
        ended.error = e
        raise
    finally:
        ended.done = True


async def terminable(coro: Awaitable[T]) -> T:
    """The API's own: SIGTERM (systemd, timeout) rolls the work back as in the CLI, and
    raises Terminated with its report, where the program left SIGTERM to its default (death,
    which would leave a move half done) and this is its main thread's loop. A program that
    handles SIGTERM itself keeps its handler (the CLI's run() is one)."""
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    if task is None or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return await coro
    got: list[bool] = []

    def stop() -> None:
        if not got:       # once: a second would cut the rollback short
            got.append(True)
            task.cancel()
    try:
        loop.add_signal_handler(signal.SIGTERM, stop)
    except (ValueError, RuntimeError, NotImplementedError):
        return await coro    # not the main thread's loop (or no signals there): SIGTERM is the program's
    try:
        return await coro
    except asyncio.CancelledError as e:
        if not got:
            raise
        task.uncancel()
        stopped = Terminated()
        stopped.report = getattr(e, "report", None)     # what the work had done, and undone
        stopped.phase = getattr(stopped.report, "failed_phase", None) or None
        raise stopped from e
    finally:
        loop.remove_signal_handler(signal.SIGTERM)      # (which puts the default back)


async def uncancellable(coro: Awaitable[T], told: Callable[[], None] | None = None) -> T:
    """coro's result; a cancellation (Ctrl-C) that comes meanwhile waits until it is done
    (told, if given, is called then: the user hears why the interrupt does not end it)."""
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if task.done():
            raise
        if told is not None:
            told()
        await task
        raise


async def to_the_end(coro: Awaitable[T]) -> bool:
    """Run coro (a move's or a clone's tidying, once it ended, whichever way) to its end,
    whatever interrupt comes meanwhile (uncancellable); True if one came. It is taken back
    (the task uncancelled): the work ended before it, as it did, and is told so. Shielded
    only, the interrupt would end the work as "terminated" with its outcome unsaid (a move
    done, told as rolled back)."""
    me = asyncio.current_task()
    try:
        await uncancellable(coro)
        return False
    except asyncio.CancelledError:
        if me is None or not me.cancelling():      # not an interrupt: the tidying itself was cancelled
            raise
        me.uncancel()
        return True


def _after_the_end(signum: int, frame: object) -> None:
    """SIGTERM once the work ended and its loop closed (which puts back the default, death):
    the outcome is known and about to be told, and stays as it was."""


def run(coro):
    """coro's result, run in an event loop of its own (uvloop's where there is one), Ctrl-C
    and SIGTERM stopping it as _stoppable says: an interrupt raises KeyboardInterrupt, a
    SIGTERM Terminated, each carrying the report of what was undone."""
    ended = _Ended()
    try:
        try:
            import uvloop  # optional: made the loop here, where it is chosen
            run = uvloop.run if hasattr(uvloop, "run") else asyncio.run
        except ImportError:     # no uvloop: asyncio's own loop runs the same code, a little slower
            run = asyncio.run
        return run(_stoppable(coro, ended))
    except KeyboardInterrupt:
        if ended.done and not isinstance(ended.error, Interrupted):
            return ended.outcome()      # it came as the loop shut down, the work's outcome known
        raise
    except Interrupted as e:
        told = KeyboardInterrupt()
        told.report = getattr(e, "report", None)
        raise told from None
    finally:
        if ended.done:
            # Its outcome is told next, then the process exits: a SIGTERM meanwhile would
            # kill it unsaid. (A Ctrl-C then raises KeyboardInterrupt, caught above, or by
            # the CLI, where it is told as the interrupt it is.)
            signal.signal(signal.SIGTERM, _after_the_end)
