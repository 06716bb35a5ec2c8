"""The migration itself, phase by phase, on the source host.

    preflight -> pre-copy rounds -> final dump -> transfer -> restore -> commit | rollback

What is moved (a process tree, a runc or crun container) is a Workload
(runtimes/): it runs the dumps and owns the commit point. After the final dump
the source stays frozen; the target restores the workload stopped (paused); only
then is the source released (killed), and the target's copy resumed. Any failure
before that point resumes the source where it was, and the target forgets.

This file is the sequence; each phase's mechanism has a module of its own beside it:
    move          what the phases share (the workload, the dump, the record, the downtime's marks)
    stages        where the move stands, and the steps allowed from there
    precopy       the rounds loop (one round: rounds; auto-converge's steps: autoconverge)
    bundles       a container's image and bundle
    switchover    final dump, transfer, restore, and the commit (stop-and-copy's; post-copy's)
    postcopy      post-copy and fills: the relay, the running copy's pages, the target's verdict
    failures      which failure is told, and how; rollback
    testpoints    where the lab's tests stop a move
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path

from .. import addresses, carried, host, interrupts, logs, runtimes, workdirs
from ..errors import LivemigError, Phase, PreflightError, StreamsRefused, record_failure
from ..options import Mode, Options
from ..pages import pagehash
from ..progress import Connecting, Event, ModeChosen
from ..report import Plan, Report, now
from ..runtimes.held import HeldCopy
from ..wire import bandwidth
from ..wire import protocol as p
from ..wire.transports import link_errors
from . import (
    autoconverge,
    bundles,
    compressing,
    downtime,
    failures,
    namespaces,
    owners,
    policy,
    recovery,
    switchover,
    trial_run,
)
from . import preflight as checks
from .failures import lost_link, primary
from .local import local_cpuinfo, local_facts, make_work_dir, target_spec
from .move import Move
from .precopy import precopy_rounds, shared_memory_first
from .session import Connector, remote_error, ssh_connector
from .stages import Stage
from .testpoints import stop_for_tests

DEFAULTS = Options()      # what a call that names no options runs with


class Migration:
    def __init__(self, what: int | str, target: str, options: Options, transport_factory: Connector,
                 progress: Callable[[Event], None] | None = None) -> None:
        """what: a PID (a process tree) or a container's name or ID."""
        self.m = Move(what, target, options, transport_factory, progress)

    # --- the whole ---------------------------------------------------------------------------
    async def run(self) -> Report:
        m = self.m
        t0 = time.monotonic()
        m.report.started_at = now()
        cap = bandwidth.Cap(m.options.max_bandwidth, m.options.bandwidth_share)
        capping = bandwidth.current.set(cap)     # every stream the move opens from here on
        m.report.max_bandwidth_bytes_per_s = m.options.max_bandwidth
        try:
            try:
                async with m.ticker.running() if m.ticker else contextlib.nullcontext():
                    await self._phases()
            except BaseException as e:  # noqa: BLE001 (re-raised, as the user is told it)
                # named here, where the phase and the report are known
                raise failures.named(primary(e), m.phase, m.target) from None
            m.report.outcome = "moved"
            return m.report
        except BaseException as e:
            if m.stages.moved and isinstance(e, (KeyboardInterrupt, asyncio.CancelledError)):
                return await failures.moved_all_the_same(m, e, lambda: switchover.after_move(m))
            record_failure(e, m.phase, m.report)
            if not m.stages.committed:
                m.stages.to(Stage.ROLLING_BACK)
                await asyncio.shield(failures.rollback(m, e))
                # "failed": stopped before the source was touched; "rolled back": it was, and resumed
                m.report.outcome = "rolled back" if m.dump is not None else "failed"
                gone = await failures.exited_by_itself(m, e)
                if gone is not None:
                    # not livemig's doing, and nothing to roll back to: said as such
                    record_failure(gone, m.phase, m.report)
                    raise gone from None
            raise
        finally:
            m.stop_watching()
            m.report.total_seconds = time.monotonic() - t0
            m.report.ended_at = now()
            if await interrupts.to_the_end(self.close()):
                m.report.warnings.append("interrupted while tidying up once the move ended: it ended as told")
            m.report.source_peak_rss_bytes, m.report.source_cpu_seconds = host.own_usage()
            m.report.wire_bytes, m.report.peak_wire_bytes_per_s = cap.sent, cap.peak()
            bandwidth.current.reset(capping)

    async def _phases(self) -> None:
        m = self.m
        mode = await self.preflight()
        if m.options.trial:
            m.stages.to(Stage.TRIAL)
            await trial_run.run(m)
        await compressing.choose(m)
        await downtime.foresee(m, mode)
        if mode in (Mode.POSTCOPY, Mode.HYBRID):
            m.to.open_fault_link()
        m.stages.to(Stage.PRECOPY)
        await self.precopy(mode)
        m.stages.to(Stage.FINAL_DUMP)
        # A fill ends in a lazy dump too: its pages stay in the frozen source and are read
        # from there (pre-copy by hashes: the target's store holds most of them, only the
        # changed ones cross, the rest are named); the copy runs once all are on the
        # target's host, and is filled from its memory while it runs. Its failures are
        # post-copy's: the source's copy waits, stopped, until the target's is whole.
        fill = m.fills
        lazy = mode in (Mode.POSTCOPY, Mode.HYBRID) or fill
        m.report.pages_into = "target memory" if fill else "post-copy" if lazy else "image files"
        # From the final dump on, a coordinator killed outright may leave the source's copy
        # stopped, or the target's: this record is how `livemig recover` finds them.
        m.record = recovery.Record.mine(m.id, m.target, m.workload, lazy, bundle_moves=m.bundle_copied_at is not None)
        m.save_record()
        await owners.hold(m)
        stop_for_tests("final-dump")
        await switchover.final_dump(m, lazy)
        await switchover.take_addresses(m)
        m.stages.to(Stage.TRANSFER)
        await switchover.transfer(m)
        m.stages.to(Stage.RESTORE)
        await switchover.restore(m, lazy, fill)
        await self.commit(lazy, fill)

    # --- preflight: nothing on the source is touched ------------------------------------------
    async def preflight(self) -> Mode:
        m = self.m
        if os.geteuid() != 0:
            raise PreflightError("livemig must run as root (CRIU needs it)", phase=Phase.PREFLIGHT)
        if m.options.criu.shell_job:
            raise PreflightError("--shell-job cannot move a tree to another host: CRIU restores a shell job "
                                 "only into the restoring process's own terminal, and livemig's agent on the "
                                 "target has none", phase=Phase.PREFLIGHT,
                                 hint="start the workload apart from the terminal (setsid, nohup, a service) "
                                      "and move that")
        if isinstance(m.what, int):
            checks.refuse_tree(m.what)      # before anything is made here or reached there
        w = m.workload = await runtimes.resolve(m.what, m.options.runtime, m.options.criu, m.work)
        m.report.runtime, m.report.workload, m.report.pid = w.kind, w.name, w.root_pid
        pids = w.pids()
        checks.refuse_traced(pids)
        checks.refuse_undumpable_handles(pids)
        namespaces.refuse_other_users_without_cap_sys_resource(pids)
        locked = host.locked_files(pids)
        checks.refuse_locks_unasked(locked, m.options.criu.file_locks)
        if w.kind != "process":
            checks.refuse_stopped_in_a_frozen_cgroup(pids)
        else:       # (a container's IPC namespace is its own, and its runtime's dump takes it)
            namespaces.refuse_sysv_shm_without_its_ipc_namespace(pids)
        m.original = HeldCopy.of(w)    # to tell, on failure, whether it exited by itself
        memory, shared = host.resident_bytes(pids), host.cow_shared_bytes(pids)
        m.spec = target_spec(w, m.options.name, m.options.criu.tcp_established)
        # (a container's paths are in its own mount namespace: not the target's to look at)
        tree = w.kind == "process"
        moving = await checks.addresses_to_move(m.options.move_addresses, pids)
        await owners.find(m, pids)
        reopened = host.reopened_files(pids) if tree else {}
        sized = {f: size for f, size in reopened.items() if size is not None}
        local, remote = await self._probe_both(p.Probe(
            pids=pids if tree else [], container=m.spec, locked_files=locked if tree else [],
            files=sorted(reopened), sized_files=list(sized), ports=addresses.ports(pids),
            mount_sources=w.mount_sources(), move_addresses=list(moving), unit=m.unit.name if m.unit else ""))
        if host.own_user_ns(pids):
            connected = m.options.criu.tcp_established and host.same_netns(pids[0]) and bool(addresses.connected(pids))
            remote, said = namespaces.in_a_user_namespace(m.options.mode.value, remote, connected)
            if said:
                m.caution(said)
        m.addresses = {a: (here, remote.subnet_devices.get(a, "")) for a, here in moving.items()}
        moved_rows, remote = checks.moved_address_rows(moving, remote)
        remote, m.report.carried_files, total = checks.carry(remote, m.options.carry_files_max)
        if m.report.carried_files:
            m.report.carried_bytes = total
            m.caution(carried.told(m.report.carried_files, total))
        if not m.options.write_protect:     # (--no-write-protect: by page hashes, as if it could not)
            local = dataclasses.replace(local, features={**local.features, host.WRITE_PROTECT: False})
        rows, mode, why = checks.compare(local, remote, m.options.mode.value, pids=pids, need_bytes=memory,
                                            container=m.spec, held=addresses.held(pids),
                                            keeps_connections=m.options.criu.tcp_established)
        rows += checks.resized_rows(sized, remote.file_sizes)
        owners.refuse(m, remote)
        # (what --move-address asks is said first: a refusal there is the answer to the flag)
        m.report.warnings += checks.enforce(moved_rows + rows, m.target, m.options.force)
        checks.enforce([await self._check_cpu()], m.target)
        # (a container's too: its dump closes them as a tree's does, criu.connections_config)
        connections = addresses.connected(pids)
        if connections and not m.options.criu.tcp_established:
            m.caution(checks.connections_closed(connections))
        m.report.mode, m.report.mode_reason = mode, why
        m.modes_here = [x.value for x in (Mode.PRECOPY, Mode.HYBRID, Mode.POSTCOPY, Mode.STOPCOPY)
                        if policy.runs_here(x.value, local.features, remote.features, w.kind)]
        if mode in (Mode.PRECOPY.value, Mode.HYBRID.value):
            if local.features.get("mem_dirty_track"):
                m.report.precopy_tracking = "soft-dirty"
            else:
                watching = bool(local.features.get(host.WRITE_PROTECT))
                m.report.precopy_tracking = "write-protect" if watching else "page hashes"
                m.tracker = pagehash.Tracker(watching=watching)
                m.fills = True
            m.report.throttle = autoconverge.find(m, pids)
        elif mode == Mode.STOPCOPY.value:
            m.fills, into = policy.stopcopy_fills(m.options.fill, w.kind, local.features, remote.features,
                                                  remote.mem_available, memory)
            m.report.mode_reason = why = f"{why}; {into}"
        elif mode == Mode.POSTCOPY.value:
            m.report.mode_reason = why = why + shared_memory_first(m, pids)
        # (a fill's shared pages were pre-copied, or cross with the rest before it runs: nothing to tell)
        if mode in (Mode.POSTCOPY.value, Mode.HYBRID.value) and policy.shares_much(shared, memory):
            m.caution(policy.shared_first(shared))
        if m.report.precopy_tracking == "soft-dirty" and host.huge_pages_in_use(pids):
            # (page hashes compare 4 KiB pages whatever backs them)
            m.report.warnings.append("the workload's memory uses transparent huge pages: pre-copy "
                                     "resends whole 2 MiB pages (set THP to madvise, or use MADV_NOHUGEPAGE)")
        m.progress(ModeChosen(mode, why, memory))
        return Mode(mode)

    async def dry_run(self, link: float | None = None) -> Plan:
        """The preflight and a measure of the link (link: measured already, by another plan to the
        same target), and what the move would do: nothing is dumped, paused or changed anywhere."""
        m = self.m
        capping = bandwidth.current.set(bandwidth.Cap(m.options.max_bandwidth))    # the measure too, as a move's
        try:
            try:
                mode = await self.preflight()
                await trial_run.run(m)      # (always: what it would trip on is what a dry run is for)
                link = m.link_bytes_per_s = link or await m.to.measure_link(m.work)
                await compressing.choose(m)     # (the link measured once: downtime.link_rate)
            except p.RemoteFailure as e:
                raise remote_error(e, m.phase, m.target) from None
            except LivemigError as e:
                e.phase = e.phase or m.phase     # named as the move's would be
                raise
            pids = m.w.pids()
            memory = host.resident_bytes(pids)
            if m.options.max_bandwidth:
                link = min(link, m.options.max_bandwidth)    # the move would send no faster
            ratio = downtime.wire_ratio(pids, m.options.compression_level)

            def estimate(mode: str) -> policy.Estimate:
                return downtime.estimate(m, mode, downtime.fills_in(m, mode), link, ratio)[0]
            r, there = m.report, m.to.facts
            assert there is not None      # (the preflight's answer from the target)
            r.shared_memory_bytes = host.shared_memory_bytes(pids)
            est = estimate(mode.value)
            return Plan(workload=str(m.what), runtime=r.runtime, source=r.source, target=m.target,
                        mode=r.mode, mode_reason=r.mode_reason, processes=len(pids),
                        memory_bytes=memory, link_bytes_per_s=link, copy_seconds=est.copy_seconds,
                        expected_downtime_seconds=est.downtime, expected_rounds=est.rounds, note=est.note,
                        warnings=r.warnings, max_bandwidth_bytes_per_s=m.options.max_bandwidth,
                        shared_memory_bytes=r.shared_memory_bytes, max_downtime_seconds=m.options.max_downtime,
                        expected_downtime_by_mode={x: estimate(x).downtime for x in m.modes_here},
                        precopy_tracking=r.precopy_tracking, compression_level=r.compression_level,
                        compression_reason=r.compression_reason, target_memory_available_bytes=there.mem_available,
                        target_cpus=there.cpus, target_load=there.load, **trial_run.told(r))
        finally:
            bandwidth.current.reset(capping)
            await self.close()

    async def inspect(self) -> tuple[list[checks.Check], str, str]:
        """The preflight alone, every row of it, for `livemig check`; touches no workload."""
        try:
            local, remote = await self._probe_both(p.Probe())
            rows, mode, why = checks.compare(local, remote, self.m.options.mode.value)
            if all(r.ok for r in rows[:3]):
                try:
                    rows.append(await self._check_cpu())     # its image goes on a data stream
                except StreamsRefused as e:
                    rows.append(checks.Check("data streams", False, e.message, e.hint or ""))
            rows.append(self.m.to.agent_check())
            return rows, mode, why
        finally:
            await self.close()

    async def _probe_both(self, asked: p.Probe) -> tuple[p.HostFacts, p.HostFacts]:
        """This host's facts, and the target's answers to asked (for the workload's PIDs, its
        container, files, ports and mounts; none of those for `livemig check`)."""
        m = self.m
        m.held = make_work_dir(m.options.image_root, m.work) or m.held
        m.progress(Connecting(m.target))
        await m.to.open()
        stop_for_tests("connected")
        local = await local_facts(asked.pids, m.work, container := asked.container)
        marker = None
        if container is not None and container.bundle:
            # Seen from the target, this file means the bundle is on storage both share.
            marker = Path(container.bundle) / f"livemig-{m.id}.probe"
            marker.touch(mode=0o600)
        try:
            facts = await m.to.request(dataclasses.replace(asked, bundle_marker=marker.name if marker else ""),
                                       p.HostFacts)
            m.to.facts = facts
        finally:
            if marker:
                marker.unlink(missing_ok=True)
        return local, facts

    async def _check_cpu(self) -> checks.Check:
        return await self.m.to.check_cpu(await local_cpuinfo(self.m.work))

    # --- pre-copy: files and pages go while the workload runs ------------------------------------
    async def precopy(self, mode: Mode) -> None:
        m = self.m
        await bundles.precopy_image(m)
        await bundles.precopy_bundle(m)
        if mode in (Mode.PRECOPY, Mode.HYBRID) or m.tracker is not None:     # (post-copy's shared memory)
            await precopy_rounds(m, lazy_final=mode is Mode.HYBRID)

    # --- commit: the one place where the source is given up ---------------------------------
    async def commit(self, lazy: bool, fill: bool = False) -> None:
        m = self.m
        m.stages.to(Stage.COMMIT)      # from here on the target's copy is the workload
        # On disk before the source's copy goes, and before CRIU's journal lets it go (hook.py):
        # killed between the two, CRIU resumes the source, and recover, reading both, too.
        m.rec.committed = True
        m.save_record()
        stop_for_tests("marked")
        if lazy:
            await switchover.commit_lazy(m, fill)
            m.stages.to(Stage.MOVED)
        else:
            await interrupts.uncancellable(switchover.switch_over(m))   # moved once it returns
            switchover.note_final_stats(m)
        # from here on nothing undoes the move: an interrupt only cuts its tidying short
        await switchover.after_move(m)

    # --- the end, whichever way: nothing of the move is left here -------------------------------
    async def close(self) -> None:
        m = self.m
        m.lift_throttle()
        await m.stop_relay()
        if m.workload:
            await m.workload.close()
        await m.to.close()
        if m.report.failed_phase and m.report.outcome != "moved":
            kept = logs.keep(m.work, m.options.image_root, f"{m.id}-source")
            if kept:
                m.report.logs.insert(0, f"{m.report.source}:{kept}")
        # the memory images go; unresolved, the record stays, for `livemig recover`
        workdirs.remove(m.work, images_only=m.report.outcome in ("unresolved", "target lost")
                        or (m.record is not None and m.record.source_resumed))
        if m.held is not None:
            m.held.release()


async def migrate(what: int | str, target: str, options: Options = DEFAULTS, *,
                  progress: Callable[[Event], None] | None = None,
                  transport_factory: Connector | None = None) -> Report:
    """Move a workload to target: what is a PID (the process tree rooted there) or the name
    or ID of a runc or crun container. Returns the report, or raises a LivemigError naming
    the phase that failed (the workload then runs on the source)."""
    try:
        return await Migration(what, target, options, transport_factory or ssh_connector(options), progress).run()
    except link_errors() as e:
        raise lost_link(e, target) from None


async def plan(what: int | str, target: str, options: Options = DEFAULTS, *,
               progress: Callable[[Event], None] | None = None,
               transport_factory: Connector | None = None, link: float | None = None) -> Plan:
    """What migrate() would do, found by its preflight and a measure of the link (link: its rate,
    measured already); changes nothing."""
    try:
        return await Migration(what, target, options, transport_factory or ssh_connector(options),
                               progress).dry_run(link)
    except link_errors() as e:
        raise lost_link(e, target) from None


async def check(target: str, options: Options = DEFAULTS, *,
                transport_factory: Connector | None = None) -> tuple[list[checks.Check], str, str]:
    """The preflight checks against target alone: (rows, strategy, why)."""
    return await Migration(0, target, options, transport_factory or ssh_connector(options)).inspect()
