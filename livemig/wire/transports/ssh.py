"""A host reached over SSH with asyncssh: the user's ~/.ssh/config and the system's
/etc/ssh/ssh_config, agent, keys, and known_hosts (~/.ssh/ and /etc/ssh/ssh_known_hosts).
The host is named as ssh names it: [user@]host or ssh://[user@]host[:port] (destination.py).

Host keys are always verified against known_hosts: an unknown or changed key
stops the connection. asyncssh (2.18 on) reads `UserKnownHostsFile none` in the
config as "verify nothing": livemig refuses such a config rather than obey it, and
passes the known_hosts files to asyncssh itself. Root's agent is never forwarded to
a target, whatever ForwardAgent says: a target is not trusted with the source's keys.
"""

from __future__ import annotations

import shlex
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

with warnings.catch_warnings():
    # asyncssh (2.24 too) names cryptography's DSA types as it loads, and cryptography 47 on
    # warns at each name: five lines on the stderr of every command, before its own one line.
    # livemig offers no DSA key (asyncssh's default algorithms leave ssh-dss out).
    warnings.filterwarnings("ignore", message="DSA is deprecated")
    import asyncssh

from ...errors import ConnectionFailed, StreamsRefused
from ...options import SIZES
from . import Completed
from .destination import Destination

# as ssh(1) reads them, in its order
CONFIGS = (Path("~/.ssh/config"), Path("/etc/ssh/ssh_config"))
KNOWN_HOSTS = (Path("~/.ssh/known_hosts"), Path("/etc/ssh/ssh_known_hosts"))

# AES-GCM first: on our machines it moved twice what chacha20-poly1305 did. The rest
# keep us working with an sshd that offers no GCM.
CIPHERS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
           "aes128-ctr", "aes256-ctr"]


class SshProcess:
    def __init__(self, p: asyncssh.SSHClientProcess[Any], argv: Sequence[str]):
        self._p, self._argv = p, tuple(argv)
        self.reader, self.writer = p.stdout, p.stdin

    async def wait(self) -> Completed:
        stderr = await self._p.stderr.read()
        r = await self._p.wait(check=False)
        return Completed(self._argv, r.returncode, b"", stderr or b"")

    def kill(self) -> None:
        self._p.close()

    def running(self) -> bool:
        return self._p.exit_status is None and not self._p.is_closing()


class SshTransport:
    def __init__(self, host: str, conn: asyncssh.SSHClientConnection):
        self.host, self._conn = host, conn

    @classmethod
    async def connect(cls, host: str, *, timeout: float = 15.0) -> SshTransport:
        """host: a destination as ssh takes it (destination.py)."""
        to = Destination.parse(host)
        given: dict[str, Any] = {k: v for k, v in (("username", to.user), ("port", to.port)) if v is not None}
        try:
            # the user's config and the system's, as ssh reads them (the first value found wins),
            # for the host, with what they may not change
            options = await asyncssh.SSHClientConnectionOptions.construct(
                config=[str(f.expanduser()) for f in CONFIGS if f.expanduser().is_file()] or (), host=to.host,
                encryption_algs=CIPHERS, compression_algs=None, connect_timeout=timeout,
                keepalive_interval=5, keepalive_count_max=3, agent_forwarding=False, **given)
            if options.known_hosts is None:
                raise ConnectionFailed("the ssh config says UserKnownHostsFile none, which turns host key "
                                       "checks off", host=host,
                                       hint="livemig always verifies host keys: name a known_hosts file there")
            # explicit, so that nothing read later turns the check off; none named: ssh's own two
            known = options.known_hosts or [str(f.expanduser()) for f in KNOWN_HOSTS if f.expanduser().is_file()]
            conn = await asyncssh.connect(to.host, options=options, known_hosts=known, agent_forwarding=False)
        except asyncssh.HostKeyNotVerifiable as e:
            raise ConnectionFailed(f"the host key is not trusted ({e.reason})", host=host,
                                   hint="check its fingerprint, then add it to ~/.ssh/known_hosts") from None
        except asyncssh.PermissionDenied as e:
            raise ConnectionFailed(f"ssh login refused ({e.reason})", host=host,
                                   hint="livemig needs key or agent login as root") from None
        except (OSError, asyncssh.Error, TimeoutError) as e:
            reason = getattr(e, "reason", None) or str(e) or type(e).__name__
            raise ConnectionFailed(f"cannot connect over ssh: {reason}", host=host) from None
        return cls(host, conn)

    async def run(self, argv: Sequence[str], *, input: bytes | None = None,
                  timeout: float | None = None) -> Completed:
        try:
            r = await self._conn.run(shlex.join(argv), input=input, encoding=None, check=False,
                                     timeout=timeout)
        except asyncssh.Error as e:
            raise ConnectionFailed(f"lost the ssh connection ({e.reason})", host=self.host) from None
        # encoding=None: asyncssh hands the output over as bytes
        return Completed(tuple(argv), r.returncode, cast(bytes, r.stdout or b""), cast(bytes, r.stderr or b""))

    async def start(self, argv: Sequence[str]) -> SshProcess:
        try:
            p = await self._conn.create_process(shlex.join(argv), encoding=None,
                                                window=SIZES.ssh_window, max_pktsize=SIZES.ssh_max_packet)
        except asyncssh.Error as e:
            raise ConnectionFailed(f"cannot start {argv[0]} ({e.reason})", host=self.host) from None
        return SshProcess(p, argv)

    async def open_unix(self, path: str) -> tuple[asyncssh.SSHReader[Any], asyncssh.SSHWriter[Any]]:
        try:
            return await self._conn.open_unix_connection(path, window=SIZES.ssh_window, max_pktsize=SIZES.ssh_max_packet)
        except asyncssh.ChannelOpenError as e:
            if e.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED:
                raise StreamsRefused(f"sshd refused a stream to {path} ({e.reason})", host=self.host) from None
            # the connection closed, or nobody listens there any more: the agent is gone
            raise ConnectionFailed(f"no stream to the agent ({e.reason}): it, or the connection, is gone",
                                   host=self.host, detail=e.reason) from None

    async def close(self) -> None:
        self._conn.close()
        await self._conn.wait_closed()
