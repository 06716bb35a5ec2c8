"""How commands and bytes reach a host: over SSH (transports.ssh), or on this host (transports.local).

A transport runs an argument list on its host, starts a long-lived process with
binary stdin/stdout (the agent), and opens byte streams to a UNIX socket there
(the agent's data streams). Both kinds offer exactly this interface.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:     # for the annotations alone
    from ..streams import Reader, Writer


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int | None      # None: the connection was lost before the command ended
    stdout: bytes
    stderr: bytes


class Process(Protocol):
    """A long-lived program on the transport's host (the agent), its stdio binary."""
    # read-only to its users (properties): each transport's own stream types stand for them
    @property
    def reader(self) -> Reader: ...     # its stdout
    @property
    def writer(self) -> Writer: ...     # its stdin

    async def wait(self) -> Completed: ...
    def kill(self) -> None: ...
    def running(self) -> bool: ...     # not ended, its stdio open


class Transport(Protocol):
    """How commands and bytes reach one host; see the module's doc."""
    host: str

    async def run(self, argv: Sequence[str], *, input: bytes | None = None,
                  timeout: float | None = None) -> Completed: ...
    async def start(self, argv: Sequence[str]) -> Process: ...
    async def open_unix(self, path: str) -> tuple[Reader, Writer]: ...
    async def close(self) -> None: ...


def link_errors() -> tuple[type[BaseException], ...]:
    """What a lost link raises mid-conversation, whatever the transport (asyncssh has errors
    of its own, such as ConnectionLost when keepalives go unanswered): for callers to tell
    a lost link from a bug."""
    errors: list[type[BaseException]] = [ConnectionError, EOFError]
    try:
        # asyncssh costs 130 ms, and a local transport needs none; ssh.py imports it quietly
        from .ssh import asyncssh
        errors.append(asyncssh.Error)
    except ImportError:     # no asyncssh, so no SSH transport: none of its errors can come
        pass
    return tuple(errors)
