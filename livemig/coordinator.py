"""The migration itself, phase by phase, on the source host.

    preflight -> pre-copy rounds -> final dump -> transfer -> restore -> commit | rollback

The commit point is CRIU's post-dump action script (hook.py): after the final
dump CRIU waits there with the workload frozen. Only once the target has
restored the tree (stopped) does the coordinator record "committed" in its
journal and let the hook exit 0, upon which CRIU kills the source; then the
target's tree is resumed. Any failure before that point makes the hook exit
non-zero, and CRIU resumes the source where it was.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import socket
import time
from pathlib import Path

from . import __version__, criu, host, hook, policy, preflight, proc, protocol as p, streams
from .errors import (ConnectionFailed, DumpError, LivemigError, Phase, PreflightError, RestoreError)
from .options import Mode, Options
from .report import Report, RoundReport

NOT_IMAGES = {"stats-dump", "parent"}


def _token() -> str:
    return secrets.token_hex(8)


class Migration:
    def __init__(self, pid: int, target: str, options: Options, transport_factory, progress=None):
        self.pid, self.target, self.options = pid, target, options
        self._connect = transport_factory
        self.progress = progress or (lambda event, **kw: None)
        self.id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
        self.report = Report(pid=pid, source=socket.gethostname(), target=target)
        self.transport = None
        self.agent: p.Channel | None = None
        self.agent_proc = None
        self.welcome: p.Welcome | None = None
        self.work = Path(options.image_root) / f"{self.id}-source"
        self.hook: hook.HookServer | None = None
        self.dump: asyncio.subprocess.Process | None = None
        self.dump_socket: socket.socket | None = None
        self.relay: asyncio.Task | None = None
        self.lazy_token = ""
        self.source_pids: list[int] = []
        self.round_dirs: list[str] = []
        self.committed = False

    # --- the whole ---------------------------------------------------------------------------
    async def run(self) -> Report:
        t0 = time.monotonic()
        phase = Phase.PREFLIGHT
        try:
            mode = await self.preflight()
            if mode in (Mode.PRECOPY, Mode.HYBRID):
                phase = Phase.PRECOPY
                await self.precopy_rounds(lazy_final=mode is Mode.HYBRID)
            phase = Phase.FINAL_DUMP
            lazy = mode in (Mode.POSTCOPY, Mode.HYBRID)
            await self.final_dump(lazy)
            phase = Phase.TRANSFER
            await self.transfer()
            phase = Phase.RESTORE
            await self.restore(lazy)
            phase = Phase.COMMIT
            await self.commit(lazy)
            self.report.outcome = "moved"
            return self.report
        except BaseException as e:
            self.report.failed_phase = phase
            self.report.error = str(e) if isinstance(e, LivemigError) else (
                "interrupted" if isinstance(e, (KeyboardInterrupt, asyncio.CancelledError)) else repr(e))
            if isinstance(e, LivemigError):
                e.phase = e.phase or phase
                e.report = self.report
            if not self.committed:
                await asyncio.shield(self.rollback())
                # "failed": stopped before the source was touched; "rolled back": it was, and resumed
                self.report.outcome = "rolled back" if self.dump is not None else "failed"
            raise
        finally:
            self.report.total_seconds = time.monotonic() - t0
            await asyncio.shield(self.close())

    # --- preflight: nothing on the source is touched ------------------------------------------
    async def preflight(self) -> Mode:
        if os.geteuid() != 0:
            raise PreflightError("livemig must run as root (CRIU needs it)")
        if not os.path.exists(f"/proc/{self.pid}"):
            raise PreflightError(f"no process with PID {self.pid}")
        self.source_pids = pids = host.process_tree(self.pid)
        local, remote = await self._probe_both(pids)
        rows, mode, why = preflight.compare(local, remote, self.options.mode.value, pids=pids,
                                            need_bytes=host.resident_bytes(pids))
        self._raise_first_failure(rows)
        self._raise_first_failure([await self._check_cpu()])
        self.report.mode, self.report.mode_reason = mode, why
        if mode in (Mode.PRECOPY.value, Mode.HYBRID.value) and host.huge_pages_in_use(pids):
            self.report.warnings.append("the workload's memory uses transparent huge pages: pre-copy "
                                        "resends whole 2 MiB pages (set THP to madvise, or use MADV_NOHUGEPAGE)")
        self.progress("mode", mode=mode, reason=why)
        return Mode(mode)

    async def inspect(self) -> tuple[list[preflight.Check], str, str]:
        """The preflight alone, every row of it, for `livemig check`; touches no workload."""
        try:
            local, remote = await self._probe_both([])
            rows, mode, why = preflight.compare(local, remote, self.options.mode.value)
            if all(r.ok for r in rows[:3]):
                rows.append(await self._check_cpu())
            return rows, mode, why
        finally:
            await self.close()

    async def _probe_both(self, pids: list[int]) -> tuple[p.HostFacts, p.HostFacts]:
        Path(self.options.image_root).mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.options.image_root, 0o700)
        self.work.mkdir(mode=0o700)
        self.progress("connect", host=self.target)
        self.transport = await self._connect(self.target)
        await self._start_agent()
        local = await host.probe(pids, str(self.work))
        remote = await self.agent.request(p.Probe(pids=pids), p.HostFacts)
        return local, remote

    def _raise_first_failure(self, rows: list[preflight.Check]) -> None:
        for row in rows:
            if not row.ok:
                raise PreflightError(row.detail, host=self.target if row.on_target else None,
                                     hint=row.hint or None)

    async def _start_agent(self) -> None:
        argv = [*self.options.agent_command, "agent", "--image-root", self.options.image_root]
        self.agent_proc = await self.transport.start(argv)
        self.agent = p.Channel(self.agent_proc.reader, self.agent_proc.writer)
        try:
            await p.write_message(self.agent_proc.writer, p.Hello(p.PROTOCOL_VERSION, __version__, self.id))
            welcome = await p.read_message(self.agent_proc.reader)
        except (EOFError, ConnectionError, p.ProtocolError):
            done = await self.agent_proc.wait()
            err = done.stderr.decode(errors="replace").strip().splitlines()
            why = err[-1] if err else f"exit status {done.returncode}"
            raise PreflightError(f"cannot start the livemig agent: {why}", host=self.target,
                                 hint="is livemig installed there, and CRIU?") from None
        if isinstance(welcome, p.Failed):
            raise PreflightError(welcome.message, host=self.target)
        self.welcome = welcome

    async def _check_cpu(self) -> preflight.Check:
        """CRIU's cpuinfo check: the restore that "works", then dies of SIGILL on a CPU with
        fewer features, is the migration failure users report most."""
        d = self.work / "cpuinfo"
        d.mkdir(mode=0o700)
        await proc.run(criu.cpuinfo_dump(str(d)), phase=Phase.PREFLIGHT)
        tok = _token()
        sending = asyncio.create_task(self._send_files(tok, d, ["cpuinfo.img"]))
        result = await self.agent.request(p.CpuinfoCheck(stream=tok), p.CpuinfoResult)
        await sending
        return preflight.Check("CPU features", result.ok,
                               "the target's CPU has every feature of this one" if result.ok else
                               f"the target's CPU lacks features the workload may use: {result.message}")

    # --- pre-copy rounds: pages stream while the workload runs --------------------------------
    async def precopy_rounds(self, lazy_final: bool) -> None:
        limits = policy.Limits(max_downtime=self.options.max_downtime, max_rounds=self.options.max_rounds,
                               thp_always=host.huge_pages_in_use(self.source_pids))
        stats: list[policy.RoundStats] = []
        while True:
            n = len(self.round_dirs) + 1
            name, parent = f"pre-{n}", (self.round_dirs[-1] if self.round_dirs else None)
            local = self.work / name
            local.mkdir(mode=0o700)
            tok = _token()
            await self.agent.request(p.OpenPageServer(dir=name, stream=tok, parent=parent), p.Done)
            t0 = time.monotonic()
            ours, theirs = socket.socketpair()
            try:
                argv = criu.pre_dump(self.pid, str(local), theirs.fileno(),
                                     f"../{parent}" if parent else None, self.options.criu)
                dumping = await proc.start(argv, stdout=asyncio.subprocess.DEVNULL, pass_fds=[theirs.fileno()])
            finally:
                theirs.close()
            try:
                relayed = await self._relay(ours, tok)
                rc = await dumping.wait()
            finally:
                await proc.kill(dumping)
                ours.close()
            if rc != 0:
                raise DumpError(_criu_failure("criu pre-dump", rc, local / "pre-dump.log"), phase=Phase.PRECOPY)
            await self.agent.request(p.AwaitPageServer(dir=name), p.PageServerDone)
            seconds = time.monotonic() - t0
            if lazy_final:
                await self._fetch_pagemaps(name, local)
            st = criu.read_stats(local / "stats-dump") or criu.DumpStats()
            self.round_dirs.append(name)
            self.report.rounds.append(RoundReport("pre-dump", st.pages_written, relayed.sent.raw,
                                                  relayed.sent.wire, st.frozen_time, seconds))
            stats.append(policy.RoundStats(st.pages_written, relayed.sent.wire, seconds))
            decision = policy.decide(stats, limits)
            self.progress("round", n=n, pages=st.pages_written, wire=relayed.sent.wire,
                          seconds=seconds, expected_downtime=decision.expected_downtime)
            if decision.stop:
                self.report.precopy_stop_reason = decision.reason.value
                return

    async def _fetch_pagemaps(self, name: str, local: Path) -> None:
        tok = _token()
        reader, _ = await self._stream(tok)
        receiving = asyncio.create_task(streams.receive_files(reader, local))
        await self.agent.request(p.SendPagemaps(dir=name, stream=tok), p.FilesReceived)
        await receiving

    # --- final dump: the workload freezes here --------------------------------------------------
    async def final_dump(self, lazy: bool) -> None:
        parent = self.round_dirs[-1] if self.round_dirs else None
        local = self.work / "final"
        local.mkdir(mode=0o700)
        self.hook = await hook.HookServer.start(self.work)
        tok = _token()
        if not lazy:
            await self.agent.request(p.OpenPageServer(dir="final", stream=tok, parent=parent), p.Done)
        ours, theirs = socket.socketpair()
        self.dump_socket = ours
        argv = criu.dump(self.pid, str(local), ps_fd=theirs.fileno(), hook=str(self.hook.script),
                         parent=f"../{parent}" if parent else None, lazy=lazy, opts=self.options.criu)
        self.progress("dump")
        try:
            self.dump = await proc.start(argv, stdout=asyncio.subprocess.DEVNULL, pass_fds=[theirs.fileno()],
                                         env=proc.environ(**self.hook.environment()))
        finally:
            theirs.close()
        self.lazy_token = tok
        if not lazy:
            self.relay = asyncio.create_task(self._relay(ours, tok))
        exited = asyncio.create_task(self.dump.wait())
        await asyncio.wait({self.hook.post_dump, exited}, return_when=asyncio.FIRST_COMPLETED)
        if not self.hook.post_dump.done():
            raise DumpError(_criu_failure("criu dump", self.dump.returncode, local / "dump.log"))
        exited.cancel()
        if lazy:
            self.hook.proceed()
        rnd = RoundReport("dump", seconds=self.hook.post_dump.result() - self.hook.frozen_at)
        if self.relay:
            relayed = await self.relay
            await self.agent.request(p.AwaitPageServer(dir="final"), p.PageServerDone)
            rnd.bytes_raw, rnd.bytes_wire = relayed.sent.raw, relayed.sent.wire
        self.report.rounds.append(rnd)

    # --- transfer: the images that are not pages --------------------------------------------
    async def transfer(self) -> None:
        local = self.work / "final"
        names = sorted(f.name for f in local.iterdir()
                       if f.is_file() and not f.is_symlink() and not f.name.endswith(".log")
                       and f.name not in NOT_IMAGES)
        tok = _token()
        parent = self.round_dirs[-1] if self.round_dirs else None
        sending = asyncio.create_task(self._send_files(tok, local, names))
        got = await self.agent.request(p.ReceiveFiles(dir="final", stream=tok, parent=parent), p.FilesReceived)
        meter = await sending
        self.report.image_files_bytes = got.bytes
        self.progress("transfer", files=got.files, bytes=got.bytes, wire=meter.wire)

    # --- restore: the target brings the tree back, stopped ---------------------------------------
    async def restore(self, lazy: bool) -> None:
        if lazy:
            self.relay = asyncio.create_task(self._relay(self.dump_socket, self.lazy_token))
        self.progress("restore")
        try:
            restored = await self.agent.request(
                p.Restore(dir="final", lazy_stream=self.lazy_token if lazy else None), p.Restored)
        except p.RemoteFailure as e:
            raise RestoreError(e.failed.message, host=self.target, detail=e.failed.detail) from None
        self.report.target_pid, self.report.restore_seconds = restored.pid, restored.restore_seconds

    # --- commit: the one place where the source is given up ---------------------------------
    async def commit(self, lazy: bool) -> None:
        if lazy:
            # From the target's first instruction on, it is the workload: never resume the source.
            self.hook.mark_committed()
            self.committed = True
        else:
            self.hook.commit()             # durable first: a crash from here on means "moved"
            self.committed = True
            rc = await self.dump.wait()    # CRIU kills the source and exits
            if rc != 0:
                self.report.warnings.append(f"criu dump exited {rc} after the commit")
        resumed = await self.agent.request(p.Resume(), p.Resumed)
        self.report.downtime_seconds = time.monotonic() - self.hook.frozen_at
        self.progress("running", pids=resumed.pids)
        if lazy:
            done = await self.agent.request(p.AwaitLazy(), p.LazyDone)
            self.report.postcopy_pages = done.pages_fetched
            await self.dump.wait()
            relayed = await self.relay
            _signal_tree(self.source_pids, signal.SIGKILL)   # left stopped by the lazy dump
            # A lazy dump's stats image holds zeroed counters: count what crossed the wire.
            rnd = self.report.rounds[-1]
            rnd.pages_written, rnd.bytes_raw, rnd.bytes_wire = \
                done.pages_fetched, relayed.sent.raw, relayed.sent.wire
        st = None if lazy else criu.read_stats(self.work / "final" / "stats-dump")
        if st:
            self.report.rounds[-1].pages_written = st.pages_written
            self.report.rounds[-1].frozen_seconds = st.frozen_time
            self.report.final_dump_frozen_seconds = st.frozen_time
        await self.agent.request(p.Finish(), p.Done)

    # --- rollback: the source goes on, the target forgets ------------------------------------
    async def rollback(self) -> None:
        lazy_served = self.hook is not None and self.hook.post_dump.done() and not self.hook.waiting
        if self.hook and self.hook.waiting:
            self.hook.rollback()           # CRIU resumes the source
        elif self.dump and self.dump.returncode is None:
            # Still dumping: cut its page stream, and CRIU fails the dump and resumes the source.
            await self._stop_relay()
            self.dump_socket.close()
        if self.dump and self.dump.returncode is None:
            try:
                async with asyncio.timeout(60):
                    await self.dump.wait()
            except TimeoutError:
                # Never seen; CRIU's ptrace detach on exit lets the frozen tasks go on.
                await proc.kill(self.dump)
        if self.agent:
            try:
                async with asyncio.timeout(30):
                    await self.agent.request(p.Abort(), p.Done)
                    await self.agent.request(p.Finish(), p.Done)
            except (Exception, TimeoutError):
                pass   # the agent kills what it restored when we vanish
        await self._stop_relay()
        if lazy_served:
            # The lazy dump ends (its client gone) leaving the source stopped: let it run again.
            if self.dump and self.dump.returncode is None:
                self.dump_socket.close()
                await self.dump.wait()
            _signal_tree(self.source_pids, signal.SIGCONT)

    async def _stop_relay(self) -> None:
        if self.relay and not self.relay.done():
            self.relay.cancel()
            try:
                await self.relay
            except BaseException:
                pass

    async def close(self) -> None:
        await self._stop_relay()
        if self.hook:
            await self.hook.close()
        if self.dump_socket:
            self.dump_socket.close()
        if self.agent_proc:
            try:
                self.agent_proc.writer.write_eof()
            except Exception:
                pass
            try:
                async with asyncio.timeout(10):
                    await self.agent_proc.wait()
            except Exception:   # TimeoutError included
                self.agent_proc.kill()
        if self.transport:
            await self.transport.close()
        shutil.rmtree(self.work, ignore_errors=True)

    # --- streams to the agent ------------------------------------------------------------------
    async def _stream(self, tok: str):
        reader, writer = await self.transport.open_unix(self.welcome.stream_socket)
        writer.write(tok.encode() + b"\n")
        await writer.drain()
        return reader, writer

    async def _relay(self, sock: socket.socket, tok: str) -> streams.Relay:
        """Join CRIU's end of a socketpair to the agent's data stream tok, both ways."""
        return await streams.relay(await streams.socket_streams(sock), await self._stream(tok),
                                   self.options.compression_level)

    async def _send_files(self, tok: str, directory: Path, names: list[str]) -> streams.Meter:
        _, writer = await self._stream(tok)
        return await streams.send_files(directory, names, writer, self.options.compression_level)


def _signal_tree(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _criu_failure(what: str, rc: int | None, log: Path) -> str:
    try:
        errors = criu.log_errors(log.read_text(errors="replace"), limit=2)
    except OSError:
        errors = []
    return f"{what} exited {rc}" + (f": {errors[0]}" if errors else "")


def _ssh(options: Options):
    from transports.ssh import SshTransport

    async def connect(target: str):
        return await SshTransport.connect(target, timeout=options.connect_timeout)
    return connect


async def migrate(pid: int, target: str, options: Options = Options(), *, progress=None,
                  transport_factory=None) -> Report:
    """Move the process tree rooted at pid to target; return the report, or raise a
    LivemigError naming the phase that failed (the workload then runs on the source)."""
    try:
        return await Migration(pid, target, options, transport_factory or _ssh(options), progress).run()
    except (ConnectionError, EOFError) as e:
        raise ConnectionFailed(f"lost the connection to the agent ({e or type(e).__name__})",
                               host=target) from None


async def check(target: str, options: Options = Options(), *, transport_factory=None):
    """The preflight checks against target alone: (rows, strategy, why)."""
    return await Migration(0, target, options, transport_factory or _ssh(options)).inspect()
