"""The link breaks while the target's copy runs: it is made again, and the copy gets the
rest of its pages on the fresh one, as QEMU's postcopy recovery does.

Once the target's copy runs (post-copy's commit point), going back would undo what it
answered, and giving it up leaves the workload down until an operator acts. So a link that
breaks then (cut, reset, or silent for WAITS.page_stream_stall) is reached again, backing
off, for up to the options' reconnect_timeout: the copy's faults on missing pages wait
meanwhile, its guard holding its uffds. The target's agent takes its coordinator back on
the stream socket of its work directory, under the rejoin token the Restore gave
(target/coordinator.py); it drops the old link, says what the copy still lacks
(RejoinPages), and its placer takes the pages of a fresh push on fresh streams, the pages
its faults wait for first. The push reads every page in the frozen tree here: CRIU's lazy
dump ended with the old link.

Either end of the move may take the stream up: the coordinator that lost its link
(reconnect), or `livemig recover` once the coordinator itself is gone (take_up), from what
the record kept. Where the target answers and its agent is gone (killed), its guard holds
the copy for a successor (target/guard.py): a fresh agent takes the copy over (TakeOver),
and, knowing nothing of what the dead one had placed, is pushed every page the copy may
lack.
"""

from __future__ import annotations

import asyncio
import time

from ..errors import ConnectionFailed, LivemigError
from ..options import WAITS
from ..pages import postcopy as pages
from ..pages import push
from ..pages.pagemap import Range
from ..progress import Reconnected, Reconnecting
from ..wire import protocol as p
from ..wire.transports import link_errors
from .failures import why
from .local import by_pid
from .move import Move
from .session import AgentGone, TargetSession, token


class LinkBroke(LivemigError):
    """The link broke under the page stream, and no reason came from the agent: it may be
    there still, its copy waiting for us."""

    def __init__(self, cause: BaseException):
        super().__init__(why(cause))
        self.cause = cause    # told, should the link not be made again


async def reconnect(m: Move, cause: BaseException) -> None:
    """The link to the target broke while its copy runs: reach the target again, backing
    off, for up to reconnect_timeout; its agent takes us back, and what its copy still lacks
    is pushed on the fresh link (m.relay). Raises ConnectionFailed when the target could not
    be reached in time, AgentGone (or the agent's refusal) when it was and nothing waits
    for us there: settle() then asks what became of the copy."""
    lost_at = time.monotonic()
    await m.stop_relay()
    if m.pusher is not None:
        m.pushed_before.append(m.pusher.stats)
    within = m.options.reconnect_timeout
    m.progress(Reconnecting(m.target, why(cause), within))
    loop = asyncio.get_running_loop()
    deadline, delay, last = loop.time() + within, WAITS.reconnect_first_retry, cause
    unreached: tuple[type[BaseException], ...] = (LivemigError, OSError, TimeoutError, *link_errors())
    gone_since = None
    while True:
        try:
            async with asyncio.timeout(max(deadline - loop.time(), 0.01)):
                pusher, missing, m.relay = await pushed_again(m.to, m.rejoin_token, m.options.compression_level,
                                                              by_pid(m.w), fault_link=True, within=within)
            break
        except AgentGone as e:
            # the target answered, and nobody waits for us there (settle asks how the copy ended),
            # unless a dead agent's guard is a moment late to wait for a successor
            gone_since = gone_since or loop.time()
            if loop.time() - gone_since > WAITS.successor_appears:
                raise
            last = e
        except p.RemoteFailure:
            raise        # the agent refused: it says why
        except unreached as e:
            last = e     # not there yet: each try until the time is up, the last one said
        if loop.time() + delay >= deadline:
            raise ConnectionFailed(f"the link to {m.target} broke ({why(cause)}) and could not be made again "
                                   f"within {within:g} s ({why(last)})", phase=m.phase, host=m.target)
        await asyncio.sleep(delay)
        delay = min(delay * 2, WAITS.reconnect_longest_retry)
    m.pusher = pusher
    if m.ticker:
        m.ticker.pages = pusher.progress
    away = time.monotonic() - lost_at
    m.report.reconnects += 1
    m.report.reconnect_seconds += away
    m.progress(Reconnected(m.target, away, sum(r.pages for r in missing)))


async def pushed_again(to: TargetSession, rejoin_token: str, level: int, tree: dict[int, int],
                       fault_link: bool, within: float) -> tuple[push.Pusher, list[Range], asyncio.Task[pages.Pushed]]:
    """One try: a fresh connection, the agent rejoined (or a successor of a dead one), and
    the push of what its copy lacks started, read in tree (PID here -> PID in the dump): the
    pusher, what it pushes, and the task that does. fault_link: the faults' pages on a
    connection of their own. within: how long the copy waits for us, should the link
    break again."""
    try:
        await to.rejoin(rejoin_token)
    except AgentGone:
        # its agent died: a successor takes the copy over from its guard, if that waits for one
        await to.succeed(rejoin_token, within)
    faults, fault_token = None, token()
    if fault_link:
        to.open_fault_link()
        faults, _ = await to.fault_stream(fault_token)    # none: faults share the pushing stream
    lazy_token = token()
    rejoined = await to.request(p.RejoinPages(lazy_token, fault_token if faults else None), p.PagesRejoined)
    missing = [Range(pid, vaddr, n) for pid, vaddr, n in rejoined.missing]
    pusher = push.Pusher(missing, level)
    pusher.read_in_place({v: pid for pid, v in tree.items()})
    pusher.start_pushing()
    relay = asyncio.create_task(to.push_more(lazy_token, faults, pusher) if missing else _nothing(pusher))
    return pusher, missing, relay


async def _nothing(pusher: push.Pusher) -> pages.Pushed:
    return pusher.stats      # the copy lacked nothing by the time we came back


async def take_up(to: TargetSession, rejoin_token: str, level: int, tree: dict[int, int], within: float) -> int:
    """`livemig recover`, its coordinator gone: the page stream taken up where it stopped,
    until the target's copy has every page (how many it still lacked). Raises AgentGone
    when nobody waits there."""
    _, missing, relay = await pushed_again(to, rejoin_token, level, tree, fault_link=False, within=within)
    try:
        await to.request(p.AwaitLazy(), p.LazyDone)
        await relay
    finally:
        if not relay.done():
            relay.cancel()
    return sum(r.pages for r in missing)


def together(pushes: list[pages.Pushed]) -> pages.Pushed:
    """What every link's push sent, as one."""
    total = pages.Pushed()
    for one in pushes:
        total.sent.raw += one.sent.raw
        total.sent.wire += one.sent.wire
        total.pages_pushed += one.pages_pushed
        total.pages_on_demand += one.pages_on_demand
        total.pages_known += one.pages_known
        total.criu_gone = total.criu_gone or one.criu_gone
    return total
