"""When a move fails: which failure is the one to tell, how it is told, and what is undone.

Before the commit the source's copy resumes where it was and the target forgets
(rollback). From the commit on nothing is rolled back: post-copy's failures are settled
by the target's verdict (postcopy.py), a stop-and-copy whose resume failed leaves the
target's copy stranded for `livemig recover`, and once moved an interrupt only cuts the
tidying short.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator

from ..errors import (
    ConnectionFailed,
    LivemigError,
    Phase,
    Unresolved,
    WorkloadExited,
    record_failure,
)
from ..options import WAITS
from ..report import Report
from ..service_address import put_back
from ..wire import protocol as p
from ..wire.transports import link_errors
from . import fresh_agent, owners
from .move import Move
from .session import remote_error


def primary(e: BaseException) -> BaseException:
    """The failure that a TaskGroup's exception group stands for: an interrupt; else what
    the agent said (a full disk there breaks our stream too, and that is not the cause);
    else livemig's own error before a lost link; else the first."""
    if not isinstance(e, BaseExceptionGroup):
        return e
    leaves = list(_leaves(e))
    for kind in ((KeyboardInterrupt, asyncio.CancelledError), p.RemoteFailure, LivemigError):
        for x in leaves:
            if isinstance(x, kind) and not isinstance(x, ConnectionFailed):
                return x
    return leaves[0]


def _leaves(e: BaseException) -> Iterator[BaseException]:
    if isinstance(e, BaseExceptionGroup):
        for x in e.exceptions:
            yield from _leaves(x)
    else:
        yield e


def lost_link(e: BaseException, target: str, phase: str | None = None) -> ConnectionFailed:
    return ConnectionFailed(f"lost the connection to the agent ({e or type(e).__name__})", phase=phase, host=target)


def why(e: BaseException) -> str:
    if isinstance(e, p.RemoteFailure):
        return e.failed.message
    return str(e) or type(e).__name__


def named(e: BaseException, phase: str, target: str) -> BaseException:
    """A failure as the user is told it: the agent's, or a lost link, as livemig's error
    in the phase under way."""
    if isinstance(e, p.RemoteFailure):
        return remote_error(e, phase, target)
    if isinstance(e, link_errors()):
        return lost_link(e, target, phase)
    return e


def stranded(m: Move, cause: BaseException) -> Unresolved:
    """Stop-and-copy's resume failed after the source's copy was given up: the target's,
    restored and stopped, is the only copy. Its agent keeps it (as an orphan, if the
    agent lost us), and `livemig recover` resumes it."""
    m.report.outcome = "unresolved"
    mine = "is gone" if m.w.gone_at_release else "was given up, and stands here paused"
    return Unresolved(f"the target's copy was restored but not resumed ({why(cause)}); the source's copy "
                      f"{mine}", phase=Phase.COMMIT, host=m.target,
                      hint="run `livemig recover` here: it resumes the copy on the target")


def rolled_back(m: Move, cause: BaseException) -> BaseException:
    """The error a post-copy settled by the source's copy ends in."""
    if isinstance(cause, (KeyboardInterrupt, asyncio.CancelledError)):
        return cause          # the CLI says "interrupted: rolled back"
    # whatever broke, it broke the page stream: a lost connection, to scripts (exit code 4)
    what = "the target's copy could not be resumed" if m.phase == Phase.COMMIT else f"{m.lazy_phase} failed"
    return ConnectionFailed(f"{what} ({why(cause)}): the target's copy is gone, and the workload runs "
                            "here again from its final dump", phase=m.phase, host=m.target)


async def rollback(m: Move, cause: BaseException) -> None:
    """The source goes on, the target forgets. Should the source's copy not run again (its
    runtime refusing its restore), the rest is undone all the same, and the move ends
    unresolved, its record kept: `livemig recover` runs it again once that is mended."""
    m.lift_throttle()
    # the service addresses back before the copy runs again, its sockets bound to them
    m.report.warnings += await put_back(m.addresses_taken)
    unresumed: LivemigError | None = None
    if m.workload is not None:
        # The target's copy, if any, is stopped: it runs only after the commit.
        try:
            m.report.warnings += await m.workload.resume(m.dump, m.stop_relay)
        except LivemigError as e:       # said once the rest is undone (below), with the cause
            unresumed = e
        else:
            await m.give_back()
    await owners.unhold(m)      # (its unit as it was, the workload running on here)
    kept = await m.to.abort()
    # announced again once the target let go of them (its abort took them off there)
    m.report.warnings += await put_back(m.addresses_taken, announce_only=True)
    m.report.moved_addresses = []       # back where they were
    if kept:
        m.report.logs.append(f"{m.target}:{kept}")
    if kept is None and await fresh_agent.undo_on_target(m.target, m.id, m.to.connector, m.options, WAITS.target_verdict):
        kept = ""      # heard by a fresh agent: nothing of the move is left there
    if kept is None and m.phase in (Phase.RESTORE, Phase.COMMIT):
        # The target may hold a restored copy, stopped (it never runs without our Resume):
        # the record stays, for `livemig recover` to remove it once the target answers.
        m.rec.source_resumed = True
        m.save_record()
        m.report.warnings.append(f"{m.target} did not answer the rollback and may hold a stopped copy: "
                                 f"`livemig recover` here removes it once {m.target} answers")
    await m.stop_relay()
    if unresumed is not None:
        m.report.outcome = "unresolved"      # the record stays (Migration.close)
        said = Unresolved(f"{why(cause)}; rolling back, the workload could not run here again: {unresumed.message}",
                          phase=Phase.ROLLBACK, hint="mend that, then run `livemig recover` here: it runs the "
                                                     "workload here again, as it was frozen")
        record_failure(said, Phase.ROLLBACK, m.report)
        raise said


async def exited_by_itself(m: Move, e: BaseException) -> WorkloadExited | None:
    """Not livemig's doing, and nothing to roll back to: the workload exited during the
    move. The error to tell instead of e, if so."""
    if not (isinstance(e, LivemigError) and m.original and await m.original.exited()):
        return None
    m.report.outcome = "exited"
    return WorkloadExited(f"the workload exited by itself during the move ({e.message})",
                          phase=e.phase, host=m.report.source)


async def moved_all_the_same(m: Move, e: BaseException, tidy: Callable[[], Awaitable[None]]) -> Report:
    """Ctrl-C or SIGTERM once the move was done: there is nothing to roll back, and
    the workload runs on the target. Said as such (exit code 0), never as a rollback."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        task.uncancel()
    what = "interrupted" if isinstance(e, KeyboardInterrupt) else "cancelled"
    m.report.warnings.append(f"{what} after the move was done: the workload runs on {m.target}")
    # the move is done and said so; tidying cut short by the link or time leaves nothing to undo
    with contextlib.suppress(Exception, TimeoutError):
        async with asyncio.timeout(WAITS.target_verdict):
            await tidy()
    m.report.outcome = "moved"
    return m.report
