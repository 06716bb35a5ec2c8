"""The migration itself, phase by phase, on the source host.

    preflight -> pre-copy rounds -> final dump -> transfer -> restore -> commit | rollback

What is moved (a process tree, a runc or crun container) is a Workload
(runtimes/): it runs the dumps and owns the commit point. After the final dump
the source stays frozen; the target restores the workload stopped (paused); only
then is the source released (killed), and the target's copy resumed. Any failure
before that point resumes the source where it was, and the target forgets.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import time
from pathlib import Path

from .. import addresses, criu, host, logs, proc, runtimes, workdirs
from ..wire import bandwidth, protocol as p, streams
from ..runtimes import bundle
from ..pages import frames, pagehash, pagemap, postcopy
from . import policy, preflight, recovery, throttle
from ..errors import (ConnectionFailed, DumpError, LivemigError, Phase, PreflightError, Unresolved, UsageError,
                      WorkloadExited, record_failure)
from ..options import Mode, Options
from ..progress import Connecting, Copied, ModeChosen, RoundDone, Running, Stepping, Throttled, Ticker, quiet
from ..report import DowntimePart, Plan, Report, RoundReport
from ..runtimes import podman
from ..runtimes.held import HeldCopy
from ..runtimes.process import criu_failure
from .session import TargetSession, migration_id, remote_error, ssh_connector, token
from ..wire.transports import link_errors


class Migration:
    def __init__(self, what: int | str, target: str, options: Options, transport_factory, progress=None):
        """what: a PID (a process tree) or a container's name or ID."""
        self.what, self.target, self.options = what, target, options
        self.phase = Phase.PREFLIGHT     # the phase under way: what an error names
        self.ticker = Ticker(progress) if progress else None
        self.progress = self.ticker.tell if self.ticker else quiet
        self.id = migration_id()
        self.report = Report(pid=what if isinstance(what, int) else 0, source=socket.gethostname(), target=target)
        self.to = TargetSession(target, transport_factory, options, self.id)
        self.work = Path(options.image_root) / f"{self.id}-source"
        self.workload: runtimes.Workload | None = None
        self.spec: p.Container | None = None     # the container as the target will know it
        self.dump: runtimes.DumpRun | None = None
        self.relay: asyncio.Task | None = None
        self.lazy_token = ""
        self.pusher: postcopy.Pusher | None = None
        self.tracker: pagehash.Tracker | None = None   # pre-copy by page hashes: what the target holds
        # the final dump's pages go into the target's memory, and into the copy as it runs:
        # pre-copy by hashes, and stop-and-copy where the target has room
        self.fills = False
        self.throttle: throttle.Throttle | None = None  # auto-converge's hold on the workload's CPU
        self.held: workdirs.Held | None = None     # self.work, ours while we live
        self.round_dirs: list[str] = []
        self.bundle_copied_at: float | None = None    # the bundle's pre-copy started then
        self.bundle_listing: set[str] = set()
        self.committed = False
        self.record: recovery.Record | None = None    # kept on disk while post-copy may fail
        self.finished = False      # the agent was told the end (Finish)
        self.moved = False         # the target's copy runs whole, the source's is gone: nothing to undo
        self.keep_record = False   # the target did not hear the rollback: recover finishes it
        self.original: HeldCopy | None = None
        self.restored_at = 0.0
        self.dumped_at = self.images_at = 0.0     # the downtime's parts end at these

    # --- the whole ---------------------------------------------------------------------------
    async def run(self) -> Report:
        t0 = time.monotonic()
        self.phase = Phase.PREFLIGHT
        cap = bandwidth.Cap(self.options.max_bandwidth)
        capping = bandwidth.current.set(cap)     # every stream the move opens from here on
        self.report.max_bandwidth_bytes_per_s = self.options.max_bandwidth
        try:
            try:
                async with self.ticker.running() if self.ticker else contextlib.nullcontext():
                    await self._phases()
            except BaseException as e:
                # named here, where the phase and the report are known
                raise self._named(primary(e)) from None
            self.report.outcome = "moved"
            return self.report
        except BaseException as e:
            if self.moved and isinstance(e, (KeyboardInterrupt, asyncio.CancelledError)):
                return await self._moved_all_the_same(e)
            record_failure(e, self.phase, self.report)
            if not self.committed:
                await asyncio.shield(self.rollback())
                # "failed": stopped before the source was touched; "rolled back": it was, and resumed
                self.report.outcome = "rolled back" if self.dump is not None else "failed"
                if isinstance(e, LivemigError) and self.original and await self.original.exited():
                    # not livemig's doing, and nothing to roll back to: said as such
                    self.report.outcome = "exited"
                    gone = WorkloadExited(f"the workload exited by itself during the move ({e.message})",
                                          phase=e.phase, host=self.report.source)
                    record_failure(gone, self.phase, self.report)
                    raise gone from None
            raise
        finally:
            self.report.total_seconds = time.monotonic() - t0
            await asyncio.shield(self.close())
            self.report.source_peak_rss_bytes, self.report.source_cpu_seconds = host.own_usage()
            self.report.wire_bytes, self.report.peak_wire_bytes_per_s = cap.sent, cap.peak()
            bandwidth.current.reset(capping)

    def _named(self, e: BaseException) -> BaseException:
        """A failure as the user is told it: the agent's, or a lost link, as livemig's error
        in the phase under way."""
        if isinstance(e, p.RemoteFailure):
            return remote_error(e, self.phase, self.target)
        if isinstance(e, link_errors()):
            return lost_link(e, self.target, self.phase)
        return e

    async def _phases(self) -> None:
        mode = await self.preflight()
        if mode in (Mode.POSTCOPY, Mode.HYBRID):
            self.to.open_fault_link()
        self.phase = Phase.PRECOPY
        await self.precopy_image()
        await self.precopy_bundle()
        if mode in (Mode.PRECOPY, Mode.HYBRID):
            await self.precopy_rounds(lazy_final=mode is Mode.HYBRID)
        self.phase = Phase.FINAL_DUMP
        # A fill ends in a lazy dump too: its pages stay in the frozen source and are read
        # from there (pre-copy by hashes: the target's store holds most of them, only the
        # changed ones cross, the rest are named); the copy runs once all are on the
        # target's host, and is filled from its memory while it runs. Its failures are
        # post-copy's: the source's copy waits, stopped, until the target's is whole.
        fill = self.fills
        lazy = mode in (Mode.POSTCOPY, Mode.HYBRID) or fill
        self.report.pages_into = "target memory" if fill else "post-copy" if lazy else "image files"
        # From the final dump on, a coordinator killed outright may leave the source's copy
        # stopped, or the target's: this record is how `livemig recover` finds them.
        self.record = recovery.Record.mine(self.id, self.target, self.workload, lazy,
                                           bundle_moves=self.bundle_copied_at is not None)
        self.record.save(self.work)
        stop_for_tests("final-dump")
        await self.final_dump(lazy)
        self.phase = Phase.TRANSFER
        await self.transfer()
        self.phase = Phase.RESTORE
        await self.restore(lazy, fill)
        self.phase = Phase.COMMIT
        await self.commit(lazy, fill)

    # --- preflight: nothing on the source is touched ------------------------------------------
    async def preflight(self) -> Mode:
        if os.geteuid() != 0:
            raise PreflightError("livemig must run as root (CRIU needs it)")
        w = self.workload = await runtimes.resolve(self.what, self.options.runtime, self.options.criu, self.work)
        self.report.runtime, self.report.workload = w.kind, w.name
        self.report.pid = w.root_pid
        pids = w.pids()
        self.original = HeldCopy.of(w)    # to tell, on failure, whether it exited by itself
        memory = host.resident_bytes(pids)
        self.spec = target_spec(w, self.options.name)
        local, remote = await self._probe_both(pids if w.kind == "process" else [], self.spec)
        rows, mode, why = preflight.compare(local, remote, self.options.mode.value, pids=pids,
                                            need_bytes=memory, container=self.spec, held=addresses.held(pids))
        self.report.warnings += preflight.enforce(rows, self.target, self.options.force)
        preflight.enforce([await self._check_cpu()], self.target)
        self.report.mode, self.report.mode_reason = mode, why
        if mode in (Mode.PRECOPY.value, Mode.HYBRID.value):
            if local.features.get("mem_dirty_track"):
                self.report.precopy_tracking = "soft-dirty"
            else:
                self.report.precopy_tracking = "page hashes"
                self.tracker = pagehash.Tracker()
                self.fills = True
            self.report.throttle = self._find_throttle(pids)
        elif mode == Mode.STOPCOPY.value:
            self.fills, into = policy.stopcopy_fills(self.options.fill, w.kind, local.features,
                                                     remote.features, remote.mem_available, memory)
            self.report.mode_reason = why = f"{why}; {into}"
        if self.report.precopy_tracking == "soft-dirty" and host.huge_pages_in_use(pids):
            # (page hashes compare 4 KiB pages whatever backs them)
            self.report.warnings.append("the workload's memory uses transparent huge pages: pre-copy "
                                        "resends whole 2 MiB pages (set THP to madvise, or use MADV_NOHUGEPAGE)")
        self.progress(ModeChosen(mode, why, memory))
        return Mode(mode)

    def _find_throttle(self, pids: list[int]) -> str:
        """Auto-converge's state before pre-copy, as the report says it."""
        if not self.options.throttle:
            return "off"
        try:
            what = f"PID {pids[0]}" if self.workload.kind == "process" else \
                f"{self.workload.kind} container {self.workload.name}"
            self.throttle = throttle.Throttle(throttle.find(pids), pids, self.work, what)
        except throttle.Unavailable as e:
            return f"unavailable: {e}"
        except (OSError, ValueError) as e:
            return f"unavailable: cannot read its cgroup ({e})"
        return "ready"

    async def dry_run(self) -> Plan:
        """The preflight and a measure of the link, and what the move would do: nothing is
        dumped, paused or changed on either host."""
        try:
            try:
                mode = await self.preflight()
                link = await self.to.measure_link(self.work)
            except p.RemoteFailure as e:
                raise remote_error(e, self.phase, self.target) from None
            except LivemigError as e:
                e.phase = e.phase or self.phase     # named as the move's would be
                raise
            w = self.workload
            memory = host.resident_bytes(w.pids())
            limits = policy.Limits(max_downtime=self.options.max_downtime,
                                   max_rounds=min(self.options.max_rounds, w.max_rounds or self.options.max_rounds))
            if self.options.max_bandwidth:
                link = min(link, self.options.max_bandwidth)    # the move would send no faster
            est = policy.estimate(mode.value, memory, link, limits)
            r = self.report
            return Plan(workload=str(self.what), runtime=r.runtime, source=r.source, target=self.target,
                        mode=r.mode, mode_reason=r.mode_reason, processes=len(w.pids()),
                        memory_bytes=memory, link_bytes_per_s=link, copy_seconds=est.copy_seconds,
                        expected_downtime_seconds=est.downtime, expected_rounds=est.rounds, note=est.note,
                        warnings=r.warnings, max_bandwidth_bytes_per_s=self.options.max_bandwidth)
        finally:
            await self.close()

    async def inspect(self) -> tuple[list[preflight.Check], str, str]:
        """The preflight alone, every row of it, for `livemig check`; touches no workload."""
        try:
            local, remote = await self._probe_both([], None)
            rows, mode, why = preflight.compare(local, remote, self.options.mode.value)
            if all(r.ok for r in rows[:3]):
                rows.append(await self._check_cpu())
            return rows, mode, why
        finally:
            await self.close()

    async def _probe_both(self, pids: list[int], container: p.Container | None = None
                          ) -> tuple[p.HostFacts, p.HostFacts]:
        self.held = make_work_dir(self.options.image_root, self.work) or self.held
        self.progress(Connecting(self.target))
        await self.to.open()
        stop_for_tests("connected")
        local = await local_facts(pids, self.work, container)
        marker = None
        if container is not None and container.bundle:
            # Seen from the target, this file means the bundle is on storage both share.
            marker = Path(container.bundle) / f"livemig-{self.id}.probe"
            marker.touch(mode=0o600)
        try:
            self.to.facts = await self.to.request(
                p.Probe(pids=pids, container=container, bundle_marker=marker.name if marker else ""), p.HostFacts)
        finally:
            if marker:
                marker.unlink(missing_ok=True)
        return local, self.to.facts

    async def _check_cpu(self) -> preflight.Check:
        return await self.to.check_cpu(await local_cpuinfo(self.work))

    # --- pre-copy: files and pages go while the workload runs -----------------------------------
    async def precopy_image(self) -> None:
        """A container's image (podman's), if the target lacks it, before anything stops."""
        w = self.workload
        if w.image is None or self.to.facts.image_present:
            return
        meter = await self.to.load_image(w)
        self.report.image_bytes_wire = meter.wire
        self.progress(Copied("image", meter.raw, meter.wire))

    async def precopy_bundle(self) -> None:
        """A container's bundle, unless the target shares it: all of it now, the rest frozen."""
        root = self.workload.bundle()
        if root is None or self.to.facts.bundle == "shared":
            return
        self.bundle_copied_at = time.time()
        self.bundle_listing = bundle.listing(root)
        meter = await self._send_tree(root, None, [])
        self.report.bundle_bytes_wire += meter.wire
        self.progress(Copied("bundle", meter.raw, meter.wire))

    async def _send_tree(self, root: Path, newer_than: float | None, deleted: list[str]) -> streams.Meter:
        _, meter = await self.to.push(
            lambda w: bundle.send(root, w, self.options.compression_level, newer_than),
            lambda tok: p.ReceiveTree(path=str(root), stream=tok, deleted=deleted), p.TreeReceived)
        return meter

    async def precopy_rounds(self, lazy_final: bool) -> None:
        w = self.workload
        max_rounds = min(self.options.max_rounds, w.max_rounds or self.options.max_rounds)
        limits = policy.Limits(max_downtime=self.options.max_downtime, max_rounds=max_rounds,
                               thp_always=self.tracker is None and host.huge_pages_in_use(w.pids()),
                               # podman keeps one pre-checkpoint: no round to throttle for
                               throttling=policy.Throttling() if self.throttle and max_rounds > 1 else None,
                               max_bandwidth=self.options.max_bandwidth)
        stats: list[policy.RoundStats] = []
        started: list[float] = []
        percent = 0          # auto-converge's throttle on the workload, in % of its CPU
        if limits.throttling:
            self.throttle.begin()
        while True:
            n = len(stats) + 1
            if n == 1:
                stop_for_tests("round")
            if self.tracker is not None:
                st, sent, seconds, t0 = await self._hashed_round(started)
            else:
                st, sent, seconds, t0 = await self._predump_round(n, lazy_final, started)
            if self.original.root_gone():
                # pages read in a tree that is gone (its root: a container's init); run()
                # tells it as the workload's own doing. (/proc, not the runtime: every round)
                raise LivemigError("its root process is gone", phase=Phase.PRECOPY)
            self.report.rounds[-1].throttle = percent
            stats.append(policy.RoundStats(st.pages_written, sent.wire, seconds))
            decision = policy.decide(stats, limits, percent)
            # what this round wrote, the workload dirtied since the round before began
            dirtied = st.pages_written * policy.PAGE_SIZE / (t0 - started[-2]) if n > 1 else None
            self.progress(RoundDone(n, st.pages_written, sent.wire, seconds, decision.bandwidth, dirtied,
                                    decision.expected_downtime, limits.max_downtime))
            if decision.throttle != percent:
                if self._throttle_to(decision.throttle, n):
                    percent = decision.throttle
                else:
                    limits = dataclasses.replace(limits, throttling=None)
                    decision = policy.decide(stats, limits, percent)
            if decision.stop:
                self.report.precopy_stop_reason = decision.reason.value
                if (decision.reason in (policy.StopReason.DIVERGING, policy.StopReason.STALLED,
                                        policy.StopReason.MAX_ROUNDS)
                        and decision.expected_downtime > limits.max_downtime
                        and self.report.throttle.startswith("unavailable")):
                    self.report.warnings.append("pre-copy did not converge, and auto-converge could not slow the "
                                                f"workload: {self.report.throttle}")
                return

    def _throttle_to(self, percent: int, after_round: int) -> bool:
        """One auto-converge step; False (and the throttle lifted) if the cgroup refused it."""
        try:
            s = self.throttle.set(percent, after_round)
        except OSError as e:
            self._lift_throttle()
            self.report.throttle = f"unavailable: its cgroup refused a CPU quota ({e})"
            return False
        self.report.throttle_steps.append(s)
        self.progress(Throttled(s.after_round, s.percent, s.baseline_cpus, s.quota_cpus))
        if len(self.report.throttle_steps) == 1:
            stop_for_tests("throttled")
        return True

    def _lift_throttle(self) -> None:
        """At switchover, and on every way out: the workload's CPU quota as it was."""
        if self.throttle is None:
            return
        try:
            self.throttle.release()
        except OSError as e:
            self.report.warnings.append(f"could not lift the CPU throttle of the workload's cgroup "
                                        f"{self.throttle.cg.quota_dir}: {e}")

    async def _hashed_round(self, started: list[float]):
        """One round of pre-copy by hashes: every page of the tree whose content changed
        since the target got it (all of them, the first time), into the target's store.
        (its stats, what it sent, seconds, start), as _predump_round."""
        meter, tracker, level = streams.Meter(), self.tracker, self.options.compression_level
        t0 = time.monotonic()
        started.append(t0)

        async def send(writer) -> int:
            out, pages = streams.CompressedWriter(writer, meter, level), 0
            for pid, vpid in _by_pid(self.workload).items():
                try:
                    for run in tracker.scan(pid, vpid):
                        await out.write(frames.frame(frames.PAGES, run.vpid, run.vaddr, run.pages)
                                        + run.data, flush=False)
                        pages += run.pages
                except (FileNotFoundError, ProcessLookupError):
                    continue      # it exited: the final dump knows what became of it
            await out.write(frames.frame(frames.PUSHED_ALL, 0, 0, pages), flush=True)
            await out.close()
            return pages

        stored, pages = await self.to.push(send, lambda tok: p.StorePages(stream=tok), p.PagesStored)
        if stored.held != tracker.pages:
            # found now, not at the fill: the final dump would name pages the target lacks
            raise LivemigError(f"the target's store holds {stored.held} pages of the {tracker.pages} pre-copy "
                               "sent it", phase=Phase.PRECOPY, host=self.target)
        seconds = time.monotonic() - t0
        self.report.rounds.append(RoundReport("hashes", pages, meter.raw, meter.wire, 0.0, seconds))
        return criu.DumpStats(pages_written=pages), meter, seconds, t0

    async def _predump_round(self, n: int, lazy_final: bool, started: list[float]):
        """One round of CRIU's pre-dump (soft-dirty): (its stats, what it sent, seconds, start)."""
        w = self.workload
        name, parent = f"pre-{n}", (self.round_dirs[-1] if self.round_dirs else None)
        local = self.work / name
        local.mkdir(mode=0o700)
        tok = token()
        if w.streams_pages:
            await self.to.request(p.OpenPageServer(dir=name, stream=tok, parent=parent), p.Done)
        t0 = time.monotonic()
        started.append(t0)
        run = await w.pre_dump(local, parent)
        easing = None
        if self.throttle is not None and self.throttle.current is not None:
            easing = asyncio.create_task(self.throttle.eased_while_held(w.root_pid, run.proc.wait()))
        try:
            sock = await run.pages()
            relayed = await self.to.relay(sock, tok) if sock else None
            rc = await run.proc.wait()
            err = await run.proc.stderr.read() if rc else b""
            if easing is not None:
                await easing
        finally:
            await proc.kill(run.proc)
            run.close()
            if easing is not None and not easing.done():
                easing.cancel()
                await asyncio.wait({easing})
        if rc != 0:
            raise DumpError(criu_failure(f"{w.kind} pre-dump", rc, run.log, err), phase=Phase.PRECOPY)
        if w.streams_pages:
            await self.to.request(p.AwaitPageServer(dir=name), p.PageServerDone)
            sent = relayed.sent
        else:
            sent = await self.to.send_images(name, parent, local)
        seconds = time.monotonic() - t0
        if lazy_final:
            await self._fetch_pagemaps(name, local)
        st = w.stats(local) or criu.DumpStats()
        self.round_dirs.append(name)
        self.report.rounds.append(RoundReport("pre-dump", st.pages_written, sent.raw,
                                              sent.wire, st.frozen_time, seconds))
        return st, sent, seconds, t0

    async def _fetch_pagemaps(self, name: str, local: Path) -> None:
        tok = token()
        reader, _ = await self.to.stream(tok)
        receiving = asyncio.create_task(streams.receive_files(reader, local))
        await self.to.request(p.SendPagemaps(dir=name, stream=tok), p.FilesReceived)
        await receiving

    # --- final dump: the workload freezes here --------------------------------------------------
    async def final_dump(self, lazy: bool) -> None:
        w = self.workload
        parent = self.round_dirs[-1] if self.round_dirs else None
        local = self.work / "final"
        local.mkdir(mode=0o700)
        tok = self.lazy_token = token()
        streaming = w.streams_pages and not lazy
        if streaming:
            await self.to.request(p.OpenPageServer(dir="final", stream=tok, parent=parent), p.Done)
        self.progress(Stepping(Phase.FINAL_DUMP, "final dump"))
        # switchover: auto-converge's throttle goes the moment the freeze begins
        lifting = None if self.throttle is None or self.throttle.current is None else \
            asyncio.create_task(self.throttle.released_once_held(w.root_pid, FREEZE_WAIT))
        try:
            self.dump = await w.final_dump(local, parent, lazy)
            if streaming:
                self.relay = asyncio.create_task(self._relay_when_connected(self.dump, tok))
            try:
                dumped_at = await w.dumped(self.dump, lazy)
            except DumpError as e:
                # CRIU here sees only a broken pipe; the page server there knows why (a full disk...)
                raise (await self._page_server_failure(e) if streaming else e) from None
        finally:
            if lifting is not None:
                lifting.cancel()        # done by now, unless the dump failed first: it releases
                await asyncio.wait({lifting})
        self.dumped_at = dumped_at
        # The record names the tree as it was frozen (children forked in pre-copy too), not
        # as it was before the freeze: what recover stops, resumes or ends.
        self.record.source_copy = HeldCopy.of(w, self.record.source_copy.bundle != "")
        self.record.save(self.work)
        rnd = RoundReport("dump", seconds=dumped_at - self.dump.frozen_at)
        if streaming:
            relayed = await self.relay
            await self.to.request(p.AwaitPageServer(dir="final"), p.PageServerDone)
            rnd.bytes_raw, rnd.bytes_wire = relayed.sent.raw, relayed.sent.wire
        self.report.rounds.append(rnd)

    async def _page_server_failure(self, dump_error: DumpError) -> LivemigError:
        """The target's page server's own failure, if it failed: the cause of dump_error."""
        try:
            async with asyncio.timeout(5):
                await self.to.request(p.AwaitPageServer(dir="final"), p.PageServerDone)
        except p.RemoteFailure as e:
            return remote_error(e, Phase.FINAL_DUMP, self.target)
        except (Exception, TimeoutError):
            pass
        return dump_error

    async def _relay_when_connected(self, run: runtimes.DumpRun, tok: str) -> streams.Relay:
        sock = await run.pages()
        if sock is None:
            raise DumpError(criu_failure(f"{self.workload.kind} dump", run.proc.returncode, run.log))
        return await self.to.relay(sock, tok)

    # --- transfer: the images that are not pages --------------------------------------------
    async def transfer(self) -> None:
        """The images that are not streamed pages; and a bundle's files changed since its pre-copy."""
        w = self.workload
        parent = self.round_dirs[-1] if self.round_dirs else None
        stop_for_tests("transfer")
        async with asyncio.TaskGroup() as tg:
            images = tg.create_task(self.to.send_images("final", parent, self.work / "final"))
            if self.bundle_copied_at is not None:
                root = w.bundle()
                now = bundle.listing(root)
                tree = tg.create_task(self._send_tree(root, self.bundle_copied_at,
                                                      sorted(self.bundle_listing - now)))
        meter = images.result()
        if not w.streams_pages:
            # crun wrote the pages among the images: they crossed here, with the rest
            rnd = self.report.rounds[-1]
            rnd.bytes_raw, rnd.bytes_wire = meter.raw, meter.wire
        if self.bundle_copied_at is not None:
            self.report.bundle_bytes_wire += tree.result().wire
        self.report.image_files_bytes = meter.raw
        self.images_at = time.monotonic()
        self.progress(Copied("images", meter.raw, meter.wire))

    # --- restore: the target brings the tree back, stopped ---------------------------------------
    async def restore(self, lazy: bool, fill: bool = False) -> None:
        stop_for_tests("restore")
        fault_token = None
        if lazy:
            try:
                ranges = pagemap.lazy_ranges(self.work / "final")
            except (OSError, pagemap.PagemapError) as e:
                ranges = []
                self.report.warnings.append(f"cannot read the dump's pagemaps ({e}): post-copy "
                                            "fetches pages only when the target asks")
            self.pusher = postcopy.Pusher(ranges, self.options.compression_level, known=self.tracker)
            self.pusher.read_in_place({v: pid for pid, v in _by_pid(self.workload).items()})
            faults = None
            if fill:
                # nothing runs there yet: every page goes at once
                self.pusher.start_pushing(fill=True)
            else:
                fault_token = token()
                faults, why_not = await self.to.fault_stream(fault_token)
                if faults is None:
                    fault_token = None
                    self.report.warnings.append(f"no second connection for post-copy's faults ({why_not}): "
                                                "they share the pushed pages' stream")
            self.relay = asyncio.create_task(
                self.to.push_pages(await self.dump.lazy_pages(), self.lazy_token, faults, self.pusher))
        self.progress(Stepping(Phase.RESTORE, "restoring on the target"))
        restored = await self.to.request(
            p.Restore(dir="final", lazy_stream=self.lazy_token if lazy else None,
                      fault_stream=fault_token, container=self.spec, fill=fill), p.Restored)
        self.report.target_pid, self.report.restore_seconds = restored.pid, restored.restore_seconds
        self.restored_at = time.monotonic()
        stop_for_tests("restored")

    # --- fill: the rest of the pages go in from the target's memory while the copy runs --------
    async def fill(self, running_at: float) -> None:
        """The target's copy runs, every page of the final dump on its host (came over the
        link before it ran, or held since pre-copy by hashes), and they go in now, a
        fault's first, from its own memory. Until it has them all, the source's copy
        waits, stopped, as in post-copy."""
        self.progress(Stepping(Phase.FILL, "placing the rest of the pages from the target's memory"))
        _, pushed, whole_at = await self._until_whole()
        r = self.report
        r.fill_seconds, r.pages_known = whole_at - self.restored_at, pushed.pages_known
        r.fill_while_running_seconds = whole_at - running_at
        r.postcopy_pages_on_demand = pushed.pages_on_demand

    async def _pages_in(self) -> tuple[p.LazyDone, postcopy.Pushed]:
        """Until the target's copy has every page: what each side counted."""
        # Either side may fail first; across a cut link the agent's answer never comes.
        awaiting = asyncio.ensure_future(self.to.request(p.AwaitLazy(), p.LazyDone))
        try:
            await asyncio.wait({awaiting, self.relay}, return_when=asyncio.FIRST_EXCEPTION)
            if self.relay.done() and not self.relay.cancelled() and self.relay.exception():
                broke = self.relay.exception()
                # the stream broke here because the agent failed there, most often: its reason
                # is the one to tell, if it comes
                await asyncio.wait({awaiting}, timeout=REASON_SECONDS)
                if awaiting.done() and not awaiting.cancelled() and isinstance(awaiting.exception(),
                                                                               p.RemoteFailure):
                    raise awaiting.exception()
                if isinstance(broke, (postcopy.PageStreamError, OSError, EOFError)):
                    raise ConnectionFailed(f"the page stream to {self.target} broke: {_why(broke)}",
                                           phase=self.phase, host=self.target) from None
                raise broke
            return await awaiting, await self.relay
        finally:
            if not awaiting.done():
                awaiting.cancel()
            elif not awaiting.cancelled():
                awaiting.exception()     # seen: the relay's failure, which came first, is the one told

    # --- commit: the one place where the source is given up ---------------------------------
    async def commit(self, lazy: bool, fill: bool = False) -> None:
        w = self.workload
        self.committed = True              # from here on the target's copy is the workload
        self.record.committed = True       # on disk before the source's copy goes
        self.record.save(self.work)
        if lazy:
            try:
                self.report.warnings += await _uncancellable(w.release(self.dump, lazy))
                stop_for_tests("released")
                # a fill's copy is resumed once every page is on its host (the agent waits)
                running_at = await self._resume_target(lazy=not fill)
                stop_for_tests("running")
                if fill:
                    self.phase = Phase.FILL
                    await self.fill(running_at)
                else:
                    self.phase = Phase.POSTCOPY
                    await self.postcopy(running_at)
            except BaseException as e:
                if not await asyncio.shield(self.settle_postcopy(e)):
                    raise self._rolled_back(e) from None
        else:
            await _uncancellable(self._switch_over())
        st = None if lazy else w.stats(self.work / "final")
        if st:
            self.report.rounds[-1].pages_written = st.pages_written
            self.report.rounds[-1].frozen_seconds = st.frozen_time
            self.report.final_dump_frozen_seconds = st.frozen_time
        self.moved = True      # from here on nothing undoes the move: an interrupt only cuts its tidying short
        await self._after_move()

    async def _switch_over(self) -> None:
        """Stop-and-copy's commit, once marked: the source's copy goes, the target's runs.
        Nothing cuts it short: cut between the two, it would leave the only copy stopped
        (an interrupt then ends a move that is done)."""
        self.report.warnings += await self.workload.release(self.dump, False)
        stop_for_tests("released")
        try:
            await self._resume_target()
        except BaseException as e:
            raise self._stranded(e) from None
        recovery.drop(self.work)
        self.moved = True

    async def _after_move(self) -> None:
        """The target's copy runs, whole, and the source's is gone: what is left is tidying."""
        if not self.finished:
            self.finished = True     # before: a request cut short is never sent twice
            await self.to.request(p.Finish(), p.Done)
        self._remove_source_bundle()

    async def _moved_all_the_same(self, e: BaseException) -> Report:
        """Ctrl-C or SIGTERM once the move was done: there is nothing to roll back, and
        the workload runs on the target. Said as such (exit code 0), never as a rollback."""
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            task.uncancel()
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else "cancelled"
        self.report.warnings.append(f"{what} after the move was done: the workload runs on {self.target}")
        with contextlib.suppress(Exception, TimeoutError):
            async with asyncio.timeout(SETTLE_SECONDS):
                await self._after_move()
        self.report.outcome = "moved"
        return self.report

    async def _resume_target(self, lazy: bool = False) -> float:
        resumed = await self.to.request(p.Resume(), p.Resumed)
        running_at = time.monotonic()
        self.report.downtime_seconds = running_at - self.dump.frozen_at
        # a fill's Resume waits, on the target, for the pages still on their way
        marks = [("dump", self.dumped_at), ("images", self.images_at), ("restore", self.restored_at),
                 ("pages and resume" if self.fills else "resume", running_at)]
        since = self.dump.frozen_at
        for name, at in marks:
            self.report.downtime_parts.append(DowntimePart(name, at - since))
            since = at
        self.progress(Running(resumed.pids, lazy))
        return running_at

    def _stranded(self, cause: BaseException) -> Unresolved:
        """Stop-and-copy's resume failed after the source's copy was given up: the target's,
        restored and stopped, is the only copy. Its agent keeps it (as an orphan, if the
        agent lost us), and `livemig recover` resumes it."""
        self.report.outcome = "unresolved"
        return Unresolved(f"the target's copy was restored but not resumed ({_why(cause)}); the source's copy "
                          "is gone", phase=Phase.COMMIT, host=self.target,
                          hint="run `livemig recover` here: it resumes the copy on the target")

    async def settle_postcopy(self, cause: BaseException) -> bool:
        """Post-copy failed after the commit. The source's copy, stopped since the final dump,
        has every page; the target's may not. The target decides (its agent kills a copy that
        lacks pages before the pages could read as zeros), the source follows, and while
        nobody knows, the source's copy stays stopped: never two copies running. True: the
        target's copy was whole, and runs on (moved)."""
        await proc.kill(self.dump.proc)     # its CRIU, which would resume the tree on its way out
        await self._stop_relay()
        copy = self.record.source_copy
        whole, why_not = await self._target_verdict()
        if whole is None:
            self.report.outcome = "unresolved"
            self.report.warnings.append(f"the target did not say how its copy ended ({why_not})")
            raise Unresolved(f"{self._lazy_phase()} lost its link to {self.target} ({_why(cause)}); the workload "
                             "is stopped here, whole as of the final dump", phase=self.phase, host=self.target,
                             hint=f"{self.target} kills its copy within {postcopy.STALL_SECONDS:.0f} s of silence; "
                                  f"then run `livemig recover` here, or `livemig recover --target-lost` if "
                                  f"{self.target} is gone for good") from None
        if whole:
            self.report.warnings += await copy.end()
            self.report.warnings.append(f"{self._lazy_phase()} failed after the target had every page "
                                        f"({_why(cause)}); its copy runs on")
        else:
            await copy.resume()
            self.report.outcome = "rolled back"
        recovery.drop(self.work)
        await self._forget_verdict()
        return whole

    async def _forget_verdict(self) -> None:
        """The target's verdict is ours now: it may go (Finish), through a fresh connection if
        its agent is gone."""
        self.finished = True
        try:
            async with asyncio.timeout(10):
                await self.to.request(p.Finish(), p.Done)
            return
        except (Exception, TimeoutError):
            pass
        with contextlib.suppress(Exception, TimeoutError):
            async with asyncio.timeout(SETTLE_SECONDS):
                await recovery.forget_verdict(self.target, self.id, self.to.connector, self.options)

    async def _target_verdict(self) -> tuple[bool | None, str]:
        """Is the target's copy whole (it runs on) or gone? Its agent says, if it is still
        there; else the verdict it (or its guard, if it was killed) left says, through a
        fresh connection. (None, why) when neither answers in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE_SECONDS
        try:
            async with asyncio.timeout(SETTLE_SECONDS):
                settled = await self.to.request(p.SettlePostcopy(), p.PostcopySettled)
            return settled.whole, ""
        except (Exception, TimeoutError) as e:
            why = _why(e)
        while loop.time() < deadline:
            try:
                async with asyncio.timeout(max(deadline - loop.time(), 0.1)):
                    state, _ = await recovery.ask_target(self.target, self.id, self.to.connector, self.options)
            except (Exception, TimeoutError) as e:
                return None, f"{why}; then {_why(e)}"
            if state in ("whole", "killed"):
                return state == "whole", ""
            await asyncio.sleep(1)    # "serving": its agent is settling it now
        return None, why

    def _rolled_back(self, cause: BaseException) -> BaseException:
        """The error a post-copy settled by the source's copy ends in."""
        if isinstance(cause, (KeyboardInterrupt, asyncio.CancelledError)):
            return cause          # the CLI says "interrupted: rolled back"
        # whatever broke, it broke the page stream: a lost connection, to scripts (exit code 4)
        what = "the target's copy could not be resumed" if self.phase == Phase.COMMIT else \
            f"{self._lazy_phase()} failed"
        return ConnectionFailed(f"{what} ({_why(cause)}): the target's copy is gone, and the workload runs "
                                "here again from its final dump", phase=self.phase, host=self.target)

    def _lazy_phase(self) -> str:
        return "filling the copy" if self.fills else "post-copy"

    async def postcopy(self, running_at: float) -> None:
        """The target's copy runs; every page it has not got yet goes now, at wire speed."""
        self.pusher.start_pushing()
        if self.ticker:
            self.ticker.pages_since, self.ticker.pages = running_at, self.pusher.progress
        done, pushed, whole_at = await self._until_whole()
        r = self.report
        r.postcopy_seconds = whole_at - running_at
        r.postcopy_pages, r.postcopy_pages_on_demand = done.pages_fetched, pushed.pages_on_demand
        r.postcopy_requests, r.postcopy_requests_waited = done.requests, done.requests_waited

    async def _until_whole(self) -> tuple[p.LazyDone, postcopy.Pushed, float]:
        """Post-copy's or a fill's end: once the running copy has every page, the source's
        copy goes, and with it the record. What each side counted, and when it was whole."""
        done, pushed = await self._pages_in()
        whole_at = time.monotonic()
        stop_for_tests("whole")
        await self.workload.finish_lazy(self.dump)
        recovery.drop(self.work)     # nothing left to recover: before the target forgets too
        # A lazy dump's stats image holds zeroed counters: count what crossed the wire
        # (the pages the target held, a fill only named).
        rnd = self.report.rounds[-1]
        rnd.pages_written = pushed.pages_pushed + pushed.pages_on_demand - pushed.pages_known
        rnd.bytes_raw, rnd.bytes_wire = pushed.sent.raw, pushed.sent.wire
        if pushed.criu_gone:
            self.report.warnings.append("CRIU's lazy dump here ended before the target had every page; "
                                        "the rest were read in the frozen tree, which it left stopped")
        return done, pushed, whole_at

    def _remove_source_bundle(self) -> None:
        """The bundle moved with the container, unless shared; a tree with mounts in it
        may hold someone else's data, and stays."""
        root = self.workload.bundle()
        if root is None or self.bundle_copied_at is None:
            return
        if bundle.mounts_under(root):
            self.report.warnings.append(f"the bundle {root} stays here: file systems are mounted in it")
            return
        shutil.rmtree(root, ignore_errors=True)

    # --- rollback: the source goes on, the target forgets ------------------------------------
    async def rollback(self) -> None:
        self._lift_throttle()
        if self.workload is not None:
            # The target's copy, if any, is stopped: it runs only after the commit.
            await self.workload.resume(self.dump, self._stop_relay)
        kept = await self.to.abort()
        if kept:
            self.report.logs.append(f"{self.target}:{kept}")
        if kept is None and await recovery.undo_on_target(self.target, self.id, self.to.connector, self.options,
                                                          SETTLE_SECONDS):
            kept = ""      # heard by a fresh agent: nothing of the move is left there
        if kept is None and self.phase in (Phase.RESTORE, Phase.COMMIT):
            # The target may hold a restored copy, stopped (it never runs without our Resume):
            # the record stays, for `livemig recover` to remove it once the target answers.
            self.record.source_resumed = True
            self.record.save(self.work)
            self.keep_record = True
            self.report.warnings.append(f"{self.target} did not answer the rollback and may hold a stopped copy: "
                                        f"`livemig recover` here removes it once {self.target} answers")
        await self._stop_relay()

    async def _stop_relay(self) -> None:
        if self.relay is None:
            return
        if not self.relay.done():
            self.relay.cancel()
        try:
            await self.relay
        except BaseException:
            pass     # the failure that counts was told already: this one followed from it

    async def close(self) -> None:
        self._lift_throttle()
        await self._stop_relay()
        if self.workload:
            await self.workload.close()
        await self.to.close()
        if self.report.failed_phase and self.report.outcome != "moved":
            kept = logs.keep(self.work, self.options.image_root, f"{self.id}-source")
            if kept:
                self.report.logs.insert(0, f"{self.report.source}:{kept}")
        if self.report.outcome == "unresolved" or self.keep_record:
            # the memory images go; the record stays, for `livemig recover`
            for d in self.work.iterdir():
                if d.is_dir():
                    shutil.rmtree(d, ignore_errors=True)
        else:
            shutil.rmtree(self.work, ignore_errors=True)
        if self.held is not None:
            self.held.release()


SETTLE_SECONDS = 15.0    # for the target to say how its copy ended, once post-copy failed
REASON_SECONDS = 5.0     # for the agent to say why, once its page stream broke
FREEZE_WAIT = 10.0       # for the final dump's freeze to begin (CRIU's first start in a VM: 4.2 s)
STOP_FOR_TESTS = "LIVEMIG_TEST_STOP_AT"


def stop_for_tests(point: str) -> None:
    """Fault injection for the lab's tests: with LIVEMIG_TEST_STOP_AT=point the coordinator
    stops itself there (SIGSTOP), for a test to act at that exact instant (then SIGKILL or
    SIGCONT it). The points, in a move's order: "connected" (preflight: the target's agent
    answers, nothing probed yet), "round" (the first pre-copy round about to begin), "throttled"
    (auto-converge's first step taken), "final-dump" (about to freeze the workload),
    "transfer" (frozen and dumped, no image sent), "restore" (the images on the target,
    not restored), "restored" (the target's copy restored, the source's not given up),
    "released" (the source's copy given up, the target's not yet resumed), "running"
    (post-copy or a fill: the target's copy resumed, pages still to come) and "whole" (the
    running copy has every page, the source's copy waits, stopped)."""
    if os.environ.get(STOP_FOR_TESTS) == point:
        os.kill(os.getpid(), signal.SIGSTOP)


async def _uncancellable(coro):
    """coro's result; a cancellation (Ctrl-C) that comes meanwhile waits until it is done."""
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if task.done():
            raise
        await task
        raise


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


def _leaves(e: BaseException):
    if isinstance(e, BaseExceptionGroup):
        for x in e.exceptions:
            yield from _leaves(x)
    else:
        yield e


def lost_link(e: BaseException, target: str, phase: str | None = None) -> ConnectionFailed:
    return ConnectionFailed(f"lost the connection to the agent ({e or type(e).__name__})", phase=phase, host=target)


def _why(e: BaseException) -> str:
    if isinstance(e, p.RemoteFailure):
        return e.failed.message
    return str(e) or type(e).__name__


def _by_pid(w: runtimes.Workload) -> dict[int, int]:
    """The tree's processes (PID here -> PID in the dump, in its root's PID namespace)."""
    out = {}
    with contextlib.suppress(OSError, ValueError):
        level = len(pagehash.ns_pids(w.root_pid)) - 1
        for pid in w.pids():
            with contextlib.suppress(OSError, ValueError):
                out[pid] = pagehash.vpid_of(pid, level)
    return out


def make_work_dir(image_root: str, work: Path) -> workdirs.Held | None:
    """This host's private image directory for one move or clone, under a private root,
    held while we live (None: it was made already). What moves killed outright left
    there goes first."""
    workdirs.sweep(image_root)
    if work.exists():
        return None
    return workdirs.make(image_root, work)


async def local_facts(pids: list[int], work: Path, container: p.Container | None) -> p.HostFacts:
    """This host's facts for the preflight; with what podman says must match, for its containers."""
    local = await host.probe(pids, str(work))
    if container is not None and container.runtime == "podman":
        local = dataclasses.replace(local, runtime_facts=await podman.facts())
    return local


async def local_cpuinfo(work: Path) -> Path:
    """This CPU's features as CRIU records them, for the targets' cpuinfo check."""
    d = work / "cpuinfo"
    d.mkdir(mode=0o700)
    await proc.run(criu.cpuinfo_dump(str(d)), phase=Phase.PREFLIGHT)
    return d


def target_spec(w: runtimes.Workload, name: str | None) -> p.Container | None:
    """The container as the target's runtime will know it: renamed if the user says so."""
    spec = w.target_spec()
    if name is None:
        return spec
    if spec is None:
        raise UsageError("--name names a container; a process tree has no name to change")
    return dataclasses.replace(spec, id=name)


async def migrate(what: int | str, target: str, options: Options = Options(), *, progress=None,
                  transport_factory=None) -> Report:
    """Move a workload to target: what is a PID (the process tree rooted there) or the name
    or ID of a runc or crun container. Returns the report, or raises a LivemigError naming
    the phase that failed (the workload then runs on the source)."""
    try:
        return await Migration(what, target, options, transport_factory or ssh_connector(options), progress).run()
    except link_errors() as e:
        raise lost_link(e, target) from None


async def plan(what: int | str, target: str, options: Options = Options(), *, progress=None,
               transport_factory=None) -> Plan:
    """What migrate() would do, found by its preflight and a measure of the link; changes nothing."""
    try:
        return await Migration(what, target, options, transport_factory or ssh_connector(options),
                               progress).dry_run()
    except link_errors() as e:
        raise lost_link(e, target) from None


async def check(target: str, options: Options = Options(), *, transport_factory=None):
    """The preflight checks against target alone: (rows, strategy, why)."""
    return await Migration(0, target, options, transport_factory or ssh_connector(options)).inspect()
