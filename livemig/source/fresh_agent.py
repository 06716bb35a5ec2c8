"""The target asked through a fresh agent of its own, in a session of its own: for a move
whose own agent is gone (killed, or its link cut), by the coordinator settling it and by
`livemig recover`. A fresh agent's start sweeps what a dead one left; the verdicts the
target's agents wrote (target/verdicts.py) say how a copy there ended."""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

from ..options import WAITS, Options
from ..wire import protocol as p
from .session import Connector, TargetSession, migration_id

R = TypeVar("R")


async def ask_agent(target: str, msg: Any, reply_type: type[R], connect: Connector, options: Options) -> R:
    """One request to a fresh agent on target, in a session of its own."""
    session = TargetSession(target, connect, options, migration_id())
    try:
        await session.open()
        return await session.request(msg, reply_type)
    finally:
        await session.close()


async def ask_target(target: str, migration: str, connect: Connector, options: Options) -> tuple[str, str]:
    """The verdict the target's agents left for migration: (state, detail)."""
    verdict = await ask_agent(target, p.AskVerdict(migration), p.Verdict, connect, options)
    return verdict.state, verdict.detail


async def forget_verdict(target: str, migration: str, connect: Connector, options: Options) -> None:
    await ask_agent(target, p.ForgetVerdict(migration), p.Done, connect, options)


async def undo_on_target(target: str, migration: str, connect, options, within: float) -> bool:
    """A rollback the move's own agent did not hear (killed, or its link cut): through a
    fresh agent, whose start sweeps what a dead agent left, the copy restored there (never
    resumed: nothing was committed) goes, and the verdict with it. Its agent may still be
    tidying up for a moment (\"try again\"). True: done."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            async with asyncio.timeout(max(deadline - loop.time(), 0.1)):
                await ask_agent(target, p.SettleOrphan(migration, resume=False), p.OrphanSettled, connect, options)
                await forget_verdict(target, migration, connect, options)
            return True
        except p.RemoteFailure as e:
            if "try again" not in str(e) or loop.time() >= deadline:
                return False
        except (Exception, TimeoutError):  # noqa: BLE001 (not heard, however: recover settles it later)
            return False
        await asyncio.sleep(WAITS.recover_retry_poll)
