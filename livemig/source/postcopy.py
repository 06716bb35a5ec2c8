"""Post-copy and fills, the source's side: the target's copy runs before it has every
page, and the source's copy waits, frozen, until it has them all.

Post-copy: the lazy dump's pages are read here (pages.push.Pusher) and pushed at
wire speed, a fault's first. A fill: every page is on the target's host before its copy
runs (crossed at the final dump, or held since pre-copy by hashes), and goes in from its
memory. Either way, once the running copy has every page the source's copy goes.

A link that breaks meanwhile is made again (rejoin.py): the copy waits for its pages, and
gets them on the fresh link. If that fails, the target decides who runs on (settle): its
agent kills a copy that lacks pages before they could read as zeros, and the source
follows its verdict; while nobody knows, the source's copy stays stopped: never two copies
running.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from .. import proc
from ..errors import ConnectionFailed, Phase, TargetLost, Unresolved
from ..options import WAITS
from ..pages import postcopy as pages
from ..pages import push
from ..pages.pagemap import Range
from ..progress import Stepping
from ..service_address import put_back
from ..wire import protocol as p
from ..wire.transports import link_errors
from . import fresh_agent, recovery, rejoin
from .failures import why
from .local import by_pid
from .move import Move
from .session import token
from .testpoints import stop_for_tests


async def start_pages(m: Move, ranges: list[Range], fill: bool) -> str | None:
    """Before the restore: the relay that serves the lazy dump's pages to the target. The
    name of the stream post-copy's faults come on, if it got one of its own."""
    pusher = m.pusher = push.Pusher(ranges, m.options.compression_level, known=m.known)
    pusher.read_in_place({v: pid for pid, v in by_pid(m.w).items()})
    m.rejoin_token = token()
    faults, fault_token = None, None
    if fill:
        # nothing runs there yet: every page goes at once
        pusher.start_pushing(fill=True)
    else:
        fault_token = token()
        faults, why_not = await m.to.fault_stream(fault_token)
        if faults is None:
            fault_token = None
            m.report.warnings.append(f"no second connection for post-copy's faults ({why_not}): "
                                     "they share the pushed pages' stream")
    m.relay = asyncio.create_task(m.to.push_pages(await m.final.lazy_pages(), m.lazy_token, faults, pusher))
    return fault_token


async def postcopy(m: Move, running_at: float) -> None:
    """The target's copy runs; every page it has not got yet goes now, at wire speed."""
    pusher = _pusher(m)
    pusher.start_pushing()
    if m.ticker:
        m.ticker.pages_since, m.ticker.pages = running_at, pusher.progress
    done, pushed, whole_at = await _until_whole(m)
    r = m.report
    r.postcopy_seconds = whole_at - running_at
    r.postcopy_pages, r.postcopy_pages_on_demand = done.pages_fetched, pushed.pages_on_demand
    r.postcopy_requests, r.postcopy_requests_waited = done.requests, done.requests_waited


async def fill(m: Move, running_at: float) -> None:
    """The target's copy runs, every page of the final dump on its host (came over the
    link before it ran, or held since pre-copy by hashes), and they go in now, a
    fault's first, from its own memory. Until it has them all, the source's copy
    waits, stopped, as in post-copy."""
    m.progress(Stepping(Phase.FILL, "placing the rest of the pages from the target's memory"))
    _, pushed, whole_at = await _until_whole(m)
    r = m.report
    r.fill_seconds, r.pages_known = whole_at - m.restored_at, pushed.pages_known
    r.fill_while_running_seconds = whole_at - running_at
    r.postcopy_pages_on_demand = pushed.pages_on_demand


def _pusher(m: Move) -> push.Pusher:
    if m.pusher is None:
        raise ConnectionFailed("no page relay was started", phase=m.phase, host=m.target)
    return m.pusher


async def _until_whole(m: Move) -> tuple[p.LazyDone, pages.Pushed, float]:
    """Post-copy's or a fill's end: once the running copy has every page, the source's
    copy goes, and with it the record. What each side counted, and when it was whole."""
    done, pushed = await _pages_in(m)
    whole_at = time.monotonic()
    stop_for_tests("whole")
    m.report.warnings += await m.w.finish_lazy(m.final)
    recovery.drop(m.work)     # nothing left to recover: before the target forgets too
    # A lazy dump's stats image holds zeroed counters: count what crossed the wire
    # (the pages the target held, a fill only named).
    rnd = m.report.rounds[-1]
    rnd.pages_written = pushed.pages_pushed + pushed.pages_on_demand - pushed.pages_known
    rnd.bytes_raw, rnd.bytes_wire = pushed.sent.raw, pushed.sent.wire
    if pushed.criu_gone:
        m.report.warnings.append("CRIU's lazy dump here ended before the target had every page; "
                                 "the rest were read in the frozen tree, which it left stopped")
    return done, pushed, whole_at


async def _pages_in(m: Move) -> tuple[p.LazyDone, pages.Pushed]:
    """Until the target's copy has every page: what each side counted (the pushes of every
    link together). A link that breaks meanwhile is made again (reconnect)."""
    while True:
        try:
            done, pushed = await _pages_on_link(m)
            return done, rejoin.together([*m.pushed_before, pushed])
        except rejoin.LinkBroke as e:
            await rejoin.reconnect(m, e.cause)


async def _pages_on_link(m: Move) -> tuple[p.LazyDone, pages.Pushed]:
    """Until the target's copy has every page, on the link in use."""
    relay = m.relay
    if relay is None:
        raise ConnectionFailed("no page relay was started", phase=m.phase, host=m.target)
    # Either side may fail first; across a cut link the agent's answer never comes.
    awaiting = asyncio.ensure_future(m.to.request(p.AwaitLazy(), p.LazyDone))
    try:
        await asyncio.wait({awaiting, relay}, return_when=asyncio.FIRST_EXCEPTION)
        broke = relay.exception() if relay.done() and not relay.cancelled() else None
        if broke is not None:
            # the stream broke here because the agent failed there, most often: its reason
            # is the one to tell, if it comes
            await asyncio.wait({awaiting}, timeout=WAITS.agent_reason)
            if awaiting.done() and not awaiting.cancelled():
                reason = awaiting.exception()
                if isinstance(reason, p.RemoteFailure):
                    raise reason
            if isinstance(broke, (pages.PageStreamError, OSError, EOFError)):
                if m.rejoin_token and (isinstance(broke, pages.LinkLost) or not isinstance(broke, pages.PageStreamError)):
                    raise rejoin.LinkBroke(broke)
                raise ConnectionFailed(f"the page stream to {m.target} broke: {why(broke)}",
                                       phase=m.phase, host=m.target) from None
            raise broke
        try:
            return await awaiting, await relay
        except link_errors() as e:      # the agent's connection broke first
            if m.rejoin_token:
                raise rejoin.LinkBroke(e) from None
            raise
    finally:
        if not awaiting.done():
            awaiting.cancel()
        elif not awaiting.cancelled():
            awaiting.exception()     # seen: the relay's failure, which came first, is the one told


async def settle(m: Move, cause: BaseException) -> bool:
    """Post-copy failed after the commit. The source's copy, stopped since the final dump,
    has every page; the target's may not. The target decides, the source follows. True:
    the target's copy was whole, and runs on (moved)."""
    await proc.kill(m.final.proc)     # its CRIU, which would resume the tree on its way out
    await m.stop_relay()
    copy = m.rec.source_copy
    whole, ran, why_not = await _target_verdict(m)
    if whole is None:
        m.report.outcome = "unresolved"
        m.report.warnings.append(f"how the target's copy ended is not settled ({why_not})")
        raise Unresolved(f"{m.lazy_phase} lost its link to {m.target} ({why(cause)}); the workload "
                         "is stopped here, whole as of the final dump", phase=m.phase, host=m.target,
                         hint=f"once {m.target} answers, run `livemig recover` here: it takes the page stream up "
                              f"if the copy there still waits (it gives up {m.options.reconnect_timeout:.0f} s after "
                              f"the link broke), else settles what is left; `livemig recover --target-lost` if "
                              f"{m.target} is gone for good") from None
    if whole:
        m.report.warnings += await copy.end()
        m.report.warnings.append(f"{m.lazy_phase} failed after the target had every page "
                                 f"({why(cause)}); its copy runs on")
    elif ran:
        raise _target_lost(m, cause, why_not)
    else:
        m.report.warnings += await put_back(m.addresses_taken)   # the copy never ran there
        m.report.warnings += await copy.resume(m.work / "final")     # (its CRIU, killed, left the network locked)
        await m.give_back()
        m.report.outcome = "rolled back"
    recovery.drop(m.work)
    await _forget_verdict(m)
    return whole


def _target_lost(m: Move, cause: BaseException, detail: str) -> TargetLost:
    """The target's copy ran and is gone: the source's stays stopped, and its record, for
    the operator to decide (the commit point: switchover.commit_lazy)."""
    ran = m.rec.target_ran_for()
    m.report.outcome, m.report.target_ran_seconds = "target lost", ran
    return TargetLost(f"{m.lazy_phase} failed ({why(cause)}) after the copy on {m.target} ran, for up to "
                      f"{ran:.1f} s; it is gone{f' ({detail})' if detail else ''}. The workload is stopped "
                      "here, whole as of its final dump; livemig never runs it again by itself: what the "
                      "copy there did and answered would be undone", phase=m.phase, host=m.target,
                      hint="`livemig recover --target-lost` runs it here again from its final dump, "
                           "losing what the other copy did")


async def _forget_verdict(m: Move) -> None:
    """The target's verdict is ours now: it may go (Finish), through a fresh connection if
    its agent is gone."""
    # the agent is gone, or mute: a fresh connection tells its successor below
    with contextlib.suppress(Exception, TimeoutError):
        async with asyncio.timeout(WAITS.verdict_forgotten):
            await m.to.finish()
        return
    # the verdict is ours already: one the target keeps is a small file, forgotten in time
    with contextlib.suppress(Exception, TimeoutError):
        async with asyncio.timeout(WAITS.target_verdict):
            await fresh_agent.forget_verdict(m.target, m.id, m.to.connector, m.options)


async def _target_verdict(m: Move) -> tuple[bool | None, bool, str]:
    """Is the target's copy whole (it runs on) or gone, and did it run? Its agent says, if
    it is still there; else the verdict it (or its guard, if it was killed) left says,
    through a fresh connection. (None, True, why) when neither answers in time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAITS.target_verdict
    try:
        async with asyncio.timeout(WAITS.target_verdict):
            settled = await m.to.request(p.SettlePostcopy(), p.PostcopySettled)
        return settled.whole, settled.ran, settled.detail if not settled.whole else ""
    except (Exception, TimeoutError) as e:  # noqa: BLE001 (told; the verdict is asked afresh below)
        first = why(e)
    while loop.time() < deadline:
        try:
            async with asyncio.timeout(max(deadline - loop.time(), 0.1)):
                state, detail = await fresh_agent.ask_target(m.target, m.id, m.to.connector, m.options)
        except (Exception, TimeoutError) as e:  # noqa: BLE001 (told, as the reason nobody knows)
            return None, True, f"{first}; then {why(e)}"
        if state in ("whole", "killed", "lost"):
            return state == "whole", state != "killed", "" if state == "whole" else detail
        if state in ("abandoned", "restarted"):      # its agent died unheard: nobody there settles it now
            return None, True, f"{first}; then: {detail}"
        await asyncio.sleep(WAITS.target_verdict_poll)    # "serving": its agent is settling it now
    return None, True, first
