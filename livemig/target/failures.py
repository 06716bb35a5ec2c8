"""How the agent fails. Every error raised on the target side is an AgentFailure, a
LivemigError that names its phase: the loop answers it as Failed(phase, message, detail),
which the coordinator reports or rolls back on."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from .. import criu
from ..errors import LivemigError, Phase

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class AgentFailure(LivemigError):
    """A request the agent could not carry out, in phase; detail: CRIU's log lines, say."""

    def __init__(self, phase: str, message: str, detail: str = ""):
        super().__init__(message, phase=phase, detail=detail)


def checked_name(name: str, what: str) -> str:
    """name, if it is a plain name: it becomes a path under the image root, or a runtime's argv."""
    if not _NAME.match(name or ""):
        raise AgentFailure(Phase.PREFLIGHT, f"refusing {what} {name!r}: not a plain name")
    return name


@contextlib.contextmanager
def failing_as(phase: str, what: str) -> Iterator[None]:
    """Any error in the block (an OSError, a command that did not start) as an AgentFailure
    of phase, "what: why"; a cancellation, and an AgentFailure, as they are."""
    try:
        yield
    except AgentFailure:
        raise
    except Exception as e:
        raise AgentFailure(phase, f"{what}: {reason(e)}") from e


def reason(e: BaseException) -> str:
    """What an error says, without the phase an AgentFailure's str() puts before it (a
    verdict's detail reads as it did when the message alone was the error)."""
    if isinstance(e, AgentFailure):
        return e.message
    return str(e) or type(e).__name__


def logged_errors(log: Path) -> list[str]:
    """The errors CRIU wrote in log (none if there is no log to read)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        text = ""       # CRIU never got as far as its log: the caller says why otherwise
    return criu.log_errors(text)


async def reap(tasks: Iterable[asyncio.Task | asyncio.Future]) -> None:
    """Wait for each task to end, whatever it ends with. Safe to ignore: each one's failure
    was already answered (AwaitLazy, AwaitPageServer) or settled inside it (_place_pages
    settles its copy on any exception), and this is the way out, where nobody is left to
    tell (a cancellation of the caller, during cleanup, must not stop the cleanup either)."""
    for task in tasks:
        with contextlib.suppress(BaseException):    # see above: answered, or settled, already
            await task
