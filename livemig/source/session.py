"""One target host as the coordinator sees it: the transport, the agent running there,
and the data streams that go beside the agent's requests.

A move has one session; a clone has one per target host, all fed from one checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from ..errors import (
    ConnectionFailed,
    DumpError,
    LivemigError,
    Phase,
    PreflightError,
    RestoreError,
    StreamsRefused,
)
from ..options import WAITS, Options
from ..pages import postcopy, push
from ..version import __version__
from ..wire import protocol as p
from ..wire import streams
from ..wire.transports import Process, Transport
from . import bootstrap
from .preflight import Check

NOT_IMAGES = {"stats-dump", "parent"}    # in an image directory, but not for the target
# what meets a skew of versions: the default brings this livemig to the target (bootstrap.py)
_SKEW = "install the same livemig on both hosts, or drop --no-bootstrap (without it the target runs this one's own)"


def token() -> str:
    return secrets.token_hex(8)


R = TypeVar("R")
T = TypeVar("T")
Connector = Callable[[str], Coroutine[Any, Any, Transport]]    # how a session reaches a host: its transport


def migration_id() -> str:
    """A move's or a clone's name on every host: its image directories are named after it."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"


class TargetSession:
    def __init__(self, target: str, connect: Connector, options: Options, migration_id: str) -> None:
        self.target, self.options, self.migration_id = target, options, migration_id
        self._connect = connect
        self.transport: Transport | None = None
        self.agent: p.Channel | None = None
        self.agent_proc: Process | None = None
        self.welcome: p.Welcome | None = None
        self.facts: p.HostFacts | None = None    # what the agent's Probe said
        self._fault_link: asyncio.Task | None = None
        self.ended = False     # the agent was told the end (Finish)

    @property
    def connector(self) -> Connector:
        """How this session reaches its target: for a fresh connection when the agent is gone."""
        return self._connect

    async def open(self, successor: bool = False) -> None:
        """successor: the agent takes over the copy of one that died (TakeOver next)."""
        transport = self.transport = await self._connect(self.target)
        o = self.options
        argv = (bootstrap.agent_argv(o.target_python, o.image_root) if o.bootstrap
                else [*o.agent_command, "agent", "--image-root", o.image_root])
        for brought in (False, True):
            agent = self.agent_proc = await transport.start(argv)
            self.agent = p.Channel(agent.reader, agent.writer)
            try:
                await p.write_message(agent.writer, p.Hello(p.PROTOCOL_VERSION, __version__, self.migration_id,
                                                            successor, protocol_oldest=p.PROTOCOL_OLDEST))
                welcome = await p.read_message(agent.reader)
                break
            except (EOFError, ConnectionError, p.ProtocolError):
                done = await agent.wait()
            if o.bootstrap and done.returncode == bootstrap.UNPACKED_MISSING and not brought:
                await self._bring_agent(transport)     # the first move here from this livemig
                continue
            err = done.stderr.decode(errors="replace").strip().splitlines()
            why = err[-1] if err else f"exit status {done.returncode}"
            # an installed agent older than wire protocol 16 fails on a Hello that says a range
            hint = _SKEW if "malformed message" in why else "is livemig installed there, and CRIU?"
            raise PreflightError(f"cannot start the livemig agent: {why}", host=self.target,
                                 hint=None if o.bootstrap else hint)
        if isinstance(welcome, p.Failed):
            raise PreflightError(welcome.message, host=self.target)
        if not isinstance(welcome, p.Welcome) or p.agree(welcome.protocol, welcome.protocol) is None:
            said = (f"agreed on wire protocol {welcome.protocol}, which this livemig does not speak ({p.spoken()})"
                    if isinstance(welcome, p.Welcome) else f"answered the Hello with {type(welcome).__name__}")
            raise PreflightError(f"the agent there {said}", host=self.target, hint=_SKEW)
        self.welcome = welcome

    @property
    def protocol(self) -> int:
        """The version of the wire protocol agreed with the agent (its Welcome's), which every
        message to it is in: what code that speaks more than one branches on. 0: no agent yet."""
        return self.welcome.protocol if self.welcome is not None else 0

    async def _bring_agent(self, transport: Transport) -> None:
        """This livemig, unpacked on the target for its agent (bootstrap.py)."""
        done = await transport.run(bootstrap.unpack_argv(self.options.target_python), input=bootstrap.packed()[1],
                                   timeout=WAITS.agent_brought)
        if done.returncode != 0:
            err = done.stderr.decode(errors="replace").strip().splitlines()
            raise PreflightError(f"cannot bring livemig's agent there: {err[-1] if err else done.returncode}",
                                 host=self.target, hint="--no-bootstrap runs the livemig installed there")

    async def rejoin(self, tok: str) -> None:
        """The link to the agent broke while its copy runs: a fresh connection to its host,
        and the agent's requests on the stream tok there (the agent takes it for its
        coordinator, come back). The old connection is let go, unread. Raises AgentGone
        when the host answers and the agent is no longer there."""
        if self.welcome is None:
            raise ConnectionFailed(f"no agent on {self.target} to rejoin", host=self.target)
        old, old_faults = self.transport, self._fault_link
        self.agent, self.agent_proc, self._fault_link = None, None, None
        if old is not None:
            # its peer is gone, or unreachable: closing it may wait for nobody, or fail
            with contextlib.suppress(Exception, TimeoutError):
                async with asyncio.timeout(WAITS.agent_exit):
                    await old.close()
        if old_faults is not None:
            old_faults.cancel()
            # cancelled just now, or it never connected: there is nothing left to close (as in close())
            with contextlib.suppress(BaseException):
                async with asyncio.timeout(WAITS.agent_exit):
                    await (await old_faults).close()
        transport = self.transport = await self._connect(self.target)
        try:
            reader, writer = await transport.open_unix(self.welcome.stream_socket)
        except (OSError, LivemigError) as e:
            raise AgentGone(f"the agent on {self.target} is gone ({e})", host=self.target) from None
        writer.write(tok.encode() + b"\n")
        await writer.drain()
        self.agent = p.Channel(reader, writer)

    async def succeed(self, tok: str, within: float, images: str = "final") -> None:
        """The agent is gone, its copy's guard waiting for a successor: a fresh agent takes
        the copy over, and takes us back on the stream tok should the link break again.
        Raises AgentGone if nothing waits there."""
        old = self.transport
        if old is not None:
            # the rejoin's connection, which found no agent: this one starts a fresh one
            with contextlib.suppress(Exception, TimeoutError):
                async with asyncio.timeout(WAITS.agent_exit):
                    await old.close()
        try:
            await self.open(successor=True)
        except PreflightError as e:
            raise AgentGone(f"nothing on {self.target} waits for a successor ({e.message})", host=self.target) from None
        await self.request(p.TakeOver(images, tok, within), p.Done)

    async def finish(self) -> None:
        """The move's end, told to the agent: it forgets what it kept for a rollback."""
        self.ended = True     # before: a request cut short is never sent twice
        await self.request(p.Finish(), p.Done)

    async def request(self, msg: Any, reply_type: type[R]) -> R:
        """msg to the agent, and its reply (a Failed one raised as p.RemoteFailure)."""
        return await self._channel.request(msg, reply_type)

    @property
    def _channel(self) -> p.Channel:
        if self.agent is None:
            raise ConnectionFailed(f"no connection to {self.target}'s agent", host=self.target)
        return self.agent

    async def stream(self, tok: str, transport: Transport | None = None) -> tuple[Any, Any]:
        """A data stream to the agent, named tok: (reader, writer); on transport, if
        given, else on the session's own connection."""
        on = transport or self.transport
        if on is None or self.welcome is None:
            raise ConnectionFailed(f"no connection to {self.target}'s agent for a data stream", host=self.target)
        try:
            reader, writer = await on.open_unix(self.welcome.stream_socket)
        except StreamsRefused:
            raise
        except ConnectionFailed as e:
            if self.agent_proc is not None and self.agent_proc.running():
                # the agent runs, and listens there: its sshd would not forward the stream
                raise StreamsRefused(f"sshd refused a stream to the agent, which runs ({e.detail or e.message})",
                                     host=self.target) from None
            raise
        writer.write(tok.encode() + b"\n")
        await writer.drain()
        return reader, writer

    def open_fault_link(self) -> None:
        """Start opening a second connection to the target, for post-copy's faults alone.
        On the first connection a fault's pages would queue behind megabytes of pushed
        pages in the same TCP stream; on their own connection the queue is always empty
        (QEMU's postcopy-preempt channel does the same). Opened ahead, so that the
        handshake is not paid while the workload is frozen."""
        if self._fault_link is None:
            self._fault_link = asyncio.create_task(self._connect(self.target))

    async def fault_stream(self, tok: str) -> tuple[tuple[Any, Any] | None, str]:
        """A data stream named tok on the fault link: (reader, writer), or None, and why not."""
        if self._fault_link is None:
            return None, "no fault link was opened"
        try:
            return await self.stream(tok, await self._fault_link), ""
        except (LivemigError, OSError) as e:
            return None, str(e)

    async def relay(self, sock: socket.socket, tok: str) -> streams.Relay:
        """Join CRIU's end of a socketpair to the agent's data stream tok, both ways."""
        criu_side = await streams.socket_streams(sock)
        return await streams.relay(criu_side, await self._stream_or_close(tok, criu_side),
                                   self.options.compression_level)

    async def push_pages(self, sock: socket.socket, tok: str, faults: tuple[Any, Any] | None,
                         pusher: push.Pusher) -> postcopy.Pushed:
        """Post-copy: pusher reads the lazy dump's page server on sock and feeds the agent's
        page server through data stream tok, and the pages a fault waits for through
        faults (a fault_stream), if there is one."""
        criu_side = await streams.socket_streams(sock)
        return await pusher.run(criu_side, await self._stream_or_close(tok, criu_side), faults)

    async def push_more(self, tok: str, faults: tuple[Any, Any] | None, pusher: push.Pusher) -> postcopy.Pushed:
        """After a rejoin: pusher sends what the copy still lacks on data stream tok (and
        faults' pages on faults), every page read in the frozen tree (CRIU's lazy dump
        ended with the old link)."""
        return await pusher.run(None, await self.stream(tok), faults)

    async def _stream_or_close(self, tok: str, criu_side: tuple[Any, Any]) -> tuple[Any, Any]:
        """Data stream tok; if it cannot be had, CRIU's side is closed now, so that CRIU sees
        its page stream end (the socket is the streams' alone: left to the garbage collector,
        it would stay open for as long as it pleases, and the rollback wait for CRIU)."""
        try:
            return await self.stream(tok)
        except BaseException:
            criu_side[1].close()
            raise

    async def push(self, send: Callable[[Any], Coroutine[Any, Any, T]], request: Callable[[str], Any],
                   reply_type: type[R]) -> tuple[R, T]:
        """send(writer) streams to the agent while it handles request(token), which names
        that stream: (the agent's reply, what was sent). A refused request stops the sending."""
        tok = token()
        _, writer = await self.stream(tok)
        sending = asyncio.create_task(send(writer))
        try:
            reply = await self.request(request(tok), reply_type)
        except BaseException:
            sending.cancel()
            raise
        # The agent has read the stream to its end; the sender may still be reaping what
        # produced it (tar): cancelling it now would fail a transfer that succeeded.
        return reply, await sending

    async def check_cpu(self, cpuinfo: Path) -> Check:
        """CRIU's cpuinfo check of the image in directory cpuinfo, there. The restore that
        "works", then dies of SIGILL on a CPU with fewer features, is the migration failure
        users report most."""
        level = self.options.compression_level
        result, _ = await self.push(lambda w: streams.send_files(cpuinfo, ["cpuinfo.img"], w, level),
                                    lambda tok: p.CpuinfoCheck(stream=tok), p.CpuinfoResult)
        return Check("CPU features", result.ok,
                     "the target's CPU has every feature of this one" if result.ok else
                     f"the target's CPU lacks features the workload may use: {result.message}")

    def agent_check(self) -> Check:
        """`livemig check`'s row of the agent that answered: its livemig, and the protocol agreed."""
        theirs = self.welcome.livemig_version if self.welcome is not None else "?"
        here = "" if theirs == __version__ else f" (livemig {__version__} here)"
        return Check("agent on target", True, f"livemig {theirs}{here}, wire protocol {self.protocol}")

    async def load_image(self, workload: Any) -> streams.Meter:
        """A container's image, into the target's podman."""
        _, meter = await self.push(lambda wr: workload.send_image(wr, self.options.compression_level),
                                   lambda tok: p.LoadImage(stream=tok), p.TreeReceived)
        return meter

    async def send_images(self, name: str, parent: str | None, local: Path, in_memory: int = 0) -> streams.Meter:
        """The files of image directory name, to the target's directory of the same name (in
        memory of in_memory bytes there, if not 0 and it has room). Pages are among them where
        CRIU wrote them here: a runtime that cannot stream them (crun, podman), or the few a lazy
        dump never serves lazily; and a lazy dump's shared memory."""
        names = sorted(f.name for f in local.iterdir()
                       if f.is_file() and not f.is_symlink() and not f.name.endswith(".log")
                       and f.name not in NOT_IMAGES)
        _, meter = await self.push(
            lambda w: streams.send_files(local, names, w, self.options.compression_level),
            lambda tok: p.ReceiveFiles(dir=name, stream=tok, parent=parent, in_memory=in_memory), p.FilesReceived)
        return meter

    async def measure_link(self, scratch: Path, size: int = 16 << 20) -> float:
        """Bytes per second through the path pages take (zstd, ssh, the agent), measured
        with random bytes: the rate for memory that does not compress."""
        d = scratch / "link-probe"
        d.mkdir(mode=0o700)
        (d / "random").write_bytes(os.urandom(size))
        t = time.monotonic()
        meter = await self.send_images("link-probe", None, d)
        rate = meter.wire / max(time.monotonic() - t, 1e-6)
        # the probe's bytes go on both hosts: they would take room the move's images need
        shutil.rmtree(d)
        await self.request(p.DropFiles(dir="link-probe"), p.FilesDropped)
        return rate

    async def abort(self) -> str | None:
        """Rollback's message: the agent undoes what it restored and ends. Where it kept
        CRIU's logs ("": none); None if it did not answer."""
        if not self.agent:
            return None
        agent = self.agent
        try:
            async with asyncio.timeout(WAITS.abort):
                aborted = await agent.request(p.Abort(), p.Aborted)
                await agent.request(p.Finish(), p.Done)
                return aborted.logs
        except (Exception, TimeoutError):  # noqa: BLE001 (whatever silenced it, the answer is the same)
            return None   # the agent keeps what it restored, stopped, when we vanish: recover settles it

    async def close(self) -> None:
        if self.agent_proc:
            # a pipe already broken: the agent is going, which is what the EOF asks of it
            with contextlib.suppress(Exception):
                self.agent_proc.writer.write_eof()
            try:
                async with asyncio.timeout(WAITS.agent_exit):
                    await self.agent_proc.wait()
            except Exception:  # noqa: BLE001 (TimeoutError included: whatever kept it, it is killed)
                self.agent_proc.kill()
        if self._fault_link is not None:
            self._fault_link.cancel()
            # cancelled just now, or it never connected: there is nothing left to close
            with contextlib.suppress(BaseException):
                await (await self._fault_link).close()
        if self.transport:
            await self.transport.close()


class AgentGone(ConnectionFailed):
    """The target answers, and its agent is no longer there to rejoin: what it left says
    how its copy ended."""


def remote_error(e: p.RemoteFailure, phase: str, target: str) -> LivemigError:
    """What the agent could not do, as the error class of the phase it failed in."""
    # a checkpoint the target could not store (its disk full...) failed like one not taken
    cls = {Phase.PREFLIGHT: PreflightError, Phase.FINAL_DUMP: DumpError, Phase.TRANSFER: DumpError,
           Phase.RESTORE: RestoreError}.get(e.failed.phase or phase, LivemigError)
    return cls(e.failed.message, phase=e.failed.phase or phase, host=target, detail=e.failed.detail or None)


def ssh_connector(options: Options) -> Connector:
    """How a session reaches its target by default: SSH, the user's own config applying."""
    # asyncssh costs 130 ms: loaded only when a session goes over SSH (a local transport needs none)
    from ..wire.transports.ssh import SshTransport

    async def connect(target: str) -> Transport:
        return await SshTransport.connect(target, timeout=options.connect_timeout)
    return connect
