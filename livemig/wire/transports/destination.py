"""A target as ssh(1) names it: `[user@]host` or `ssh://[user@]host[:port]`.

The host may be an alias of the ssh config (its HostName, User, Port, ProxyJump apply), a
name, or an address (an IPv6 one in brackets in the URI form). A user or a port given here
wins over the config's, as on ssh's command line. Parsed without asyncssh, so that bad input
is refused before anything is loaded or reached.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from ...errors import UsageError

# what a user or host may hold: no spaces, no control characters, nothing ssh would take as an option
_WORD = re.compile(r"[^\s@/\x00-\x1f\x7f-][^\s@/\x00-\x1f\x7f]*")


@dataclass(frozen=True)
class Destination:
    host: str
    user: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> Destination:
        if text.startswith("ssh://"):
            rest = text.removeprefix("ssh://").removesuffix("/")
            user, at, where = rest.rpartition("@")
            host, port = _host_and_port(where, text)
            return cls._made(host, unquote(user) if at else None, port, text)
        user, at, host = text.rpartition("@")
        if host.count(":") == 1:       # (an IPv6 address has more)
            raise UsageError(f"not an ssh destination: {text!r}",
                             hint=f"a port goes in ssh://{text}, or in --port")
        return cls._made(host, user if at else None, None, text)

    @classmethod
    def _made(cls, host: str, user: str | None, port: int | None, text: str) -> Destination:
        if not host or not _WORD.fullmatch(host) or (user is not None and not _WORD.fullmatch(user)):
            raise UsageError(f"not an ssh destination: {text!r}",
                             hint="[user@]host, or ssh://[user@]host[:port]")
        return cls(host, user, port)

    def with_port(self, port: int | None) -> Destination:
        """-p/--port's: the destination's own port, if it names one, must be the same."""
        if port is None:
            return self
        if not 0 < port < 65536:
            raise UsageError(f"not a port: {port}")
        if self.port is not None and self.port != port:
            raise UsageError(f"two ports for {self.host}: {self.port} in the destination, {port} in --port")
        return Destination(self.host, self.user, port)

    @property
    def text(self) -> str:
        """As a record keeps it, for `livemig recover` to reach the same host the same way."""
        if self.port is None:
            return f"{self.user}@{self.host}" if self.user else self.host
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ssh://{self.user + '@' if self.user else ''}{host}:{self.port}"


def _host_and_port(where: str, text: str) -> tuple[str, int | None]:
    if where.startswith("["):      # [IPv6 address], [IPv6 address]:port
        host, _, after = where[1:].partition("]")
        port = after.removeprefix(":") if after.startswith(":") else ("" if not after else "x")
    else:
        host, colon, port = where.partition(":")
        port = port if colon else ""
    if port == "":
        return host, None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"not an ssh destination: {text!r} (its port)", hint="ssh://[user@]host[:port]")
    return host, int(port)
