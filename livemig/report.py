"""What a migration did, for people (summary()) and for scripts (to_json()).

Every field of these reports says what it holds in its doc comment (`#:`, Sphinx's, above the
field or after it on its line): the JSON Schemas give the same text as its description
(contract.py), and a unit test holds every field to having one.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime


def now() -> str:
    """A report's timestamps: UTC, ISO 8601, to the millisecond."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _described(runtime: str, pid: int | str, container: str = "") -> str:
    """What was (or would be) moved, as a summary names it."""
    return f"PID {pid}" if runtime == "process" else f"{runtime} container {container or pid}"


def _trial_line(trial: str, freeze: float | None, restore: float | None) -> str:
    """The trial restore's own line: how it went, and the freeze it cost (never in the downtime)."""
    took = "" if freeze is None else f"; the workload stood still {freeze * 1000:.0f} ms for it (not in the downtime)"
    there = "" if restore is None else f", restored there in {restore * 1000:.0f} ms"
    return f"  trial restore: {trial}{there}{took}"


def _closing(warnings: list[str], error: str, phase: str) -> list[str]:
    """A summary's last lines (a move's, a clone's, a plan's): its warnings, then its error."""
    return [f"  warning: {w}" for w in warnings] + ([f"  error in {phase}: {error}"] if error else [])



def format_rate(rate: float) -> str:
    """A rate as the report prints it: MiB/s (or KiB/s below one)."""
    return f"{rate / (1 << 20):.1f} MiB/s" if rate >= 1 << 20 else f"{rate / 1024:.0f} KiB/s"


@dataclass
class RoundReport:
    """One pass of pages: a pre-copy round or the final dump."""
    #: "pre-dump" (CRIU's pre-copy round, by soft-dirty), "hashes" (read by livemig and sent by digest,
    #: pagehash.py: precopy_tracking says how changed pages were found)
    #: or "dump" (the final dump)
    kind: str
    #: pages the pass sent (a lazy final dump's: those pushed or asked for, less those the target held)
    pages_written: int = 0
    bytes_raw: int = 0            #: what went into the page stream, before compression
    bytes_wire: int = 0           #: what crossed the network, compressed
    frozen_seconds: float = 0.0   #: how long CRIU kept the workload frozen
    seconds: float = 0.0          #: the round from start to last byte delivered
    throttle: int = 0             #: auto-converge: % off the workload's CPU during the round

    @property
    def compression_ratio(self) -> float:
        return self.bytes_raw / self.bytes_wire if self.bytes_wire else 1.0


@dataclass
class ThrottleStep:
    """Auto-converge slowed the workload after a round that did not converge."""
    after_round: int              #: the round (from 1) that did not converge
    percent: int                  #: off its baseline: the CPU it used while pre-copy ran unthrottled
    baseline_cpus: float          #: that baseline, in CPUs
    quota_cpus: float             #: the CPU it was allowed from then on, until the final dump


@dataclass
class DowntimePart:
    """One stretch of the downtime, from the freeze to the target's copy running, in order."""
    #: "dump": the freeze and CRIU's dump (a lazy one's with what the tree shares copy-on-write, put into
    #: the images); "images": the images that are not pages, to the target; "restore": CRIU's restore there,
    #: with the requests around it; "resume": the commit and the target's copy set running, or for a fill
    #: "pages and resume", since the target waits there for the pages still on their way
    name: str
    seconds: float                #: how long it took


@dataclass
class Report:
    """What `livemig move` did (printed on failure too, and after a Ctrl-C's or SIGTERM's rollback)."""
    pid: int                      #: the root of the tree (a container's init)
    source: str                   #: this host's name
    target: str                   #: the target, as it was named (`[user@]host` or `ssh://[user@]host[:port]`)
    #: the move's own (its work directories', its record's): `livemig recover` names it
    migration_id: str = ""
    started_at: str = ""          #: UTC, ISO 8601 (now())
    ended_at: str = ""            #: UTC, ISO 8601
    runtime: str = "process"      #: what checkpointed it: "process" (CRIU directly), "runc", "crun" or "podman"
    workload: str = ""            #: what the user named: a PID or a container
    mode: str = ""                #: the strategy used
    mode_reason: str = ""         #: why that one
    #: "moved"; "rolled back" (it runs on the source again); "failed" (the source was never touched);
    #: "unresolved" (exit code 7: `livemig recover` settles it); "exited" (exit code 8: the workload ended
    #: by itself); "target lost" (exit code 9, with target_ran_seconds)
    outcome: str = "failed"
    rounds: list[RoundReport] = field(default_factory=list)   #: each pre-copy round, then the final dump
    precopy_stop_reason: str = ""     #: why pre-copy stopped its rounds (policy.StopReason's words); "": none ran
    #: how pre-copy found changed pages: "soft-dirty", "write-protect" (userfaultfd's, where there is no
    #: soft-dirty) or "page hashes"
    precopy_tracking: str = ""
    #: auto-converge: "" (no pre-copy), "ready", "off" (--no-throttle), "unavailable: why"
    throttle: str = ""
    throttle_steps: list[ThrottleStep] = field(default_factory=list)   #: each time it throttled harder
    pages_known: int = 0          #: pre-copy by hashes: pages the final dump only named (the target held them)
    #: write-protect tracking: of those, the pages not even read at the final pass (not written since sent)
    pages_vouched: int = 0
    #: where the final dump's pages went first: "target memory" (a fill: pre-copy by hashes, stop-and-copy into
    #: memory), "image files", "post-copy"
    pages_into: str = ""
    fill_seconds: float = 0.0     #: a fill: every page into the copy, from its restore on
    fill_while_running_seconds: float = 0.0   #: of which after the copy ran (all pages on its host then)
    final_dump_frozen_seconds: float = 0.0    #: how long CRIU kept the workload frozen for the final dump
    image_files_bytes: int = 0    #: images other than pages, sent after the dump
    #: a lazy final dump's pages that CRIU wrote into its images though it means to leave them lazy (a stack
    #: pointer on a page boundary: pages/relazy.py), taken out of them: they follow as its other lazy pages do
    relazied_bytes: int = 0
    #: a lazy final dump's pages the tree's processes share copy-on-write, put into the images to stay shared
    #: (pages/cow.py), counted once per process
    shared_kept_bytes: int = 0
    #: of those, the ones whose bytes crossed with the images; the target held the rest, or read them from the
    #: parent's image
    shared_sent_bytes: int = 0
    bundle_bytes_wire: int = 0    #: a container's bundle: pre-copy and changes (both passes), compressed
    image_bytes_wire: int = 0     #: podman: the container's image, sent when the target lacked it
    restore_seconds: float = 0.0  #: the restore on the target: CRIU's, or the runtime's (and its pause)
    #: from just before the freeze on the source to the tree running on the target
    downtime_seconds: float = 0.0
    #: the last estimate made before the freeze (source/downtime.py); None: the move ended before it made one
    expected_downtime_seconds: float | None = None
    #: a bare tree's files the target lacked, carried there while it was frozen (carried.py, docs/modes.md)
    carried_files: list[str] = field(default_factory=list)
    carried_bytes: int = 0        #: what they held, sent while the tree was frozen
    #: the trial restore before the freeze (--trial; trial.py): "passed", "failed: why" or "not tried: why";
    #: "": none asked for
    trial: str = ""
    #: the workload stood still this long for the trial (its CRIU dump's run, an upper bound), apart from
    #: downtime_seconds, which never counts it; None: no trial
    trial_freeze_seconds: float | None = None
    trial_restore_seconds: float | None = None   #: the target's trial restore, thrown away; None: none
    #: the systemd service that ran the tree, handed over: the same unit runs it on the target (units.py)
    unit: str = ""
    #: the service addresses that moved with it (--move-address), each "ADDR/PREFIX: interface on
    #: source to interface on target"
    moved_addresses: list[str] = field(default_factory=list)
    #: TCP segments the workload's clients sent while it was frozen, given to the copy that ran next as it
    #: resumed (replay.py): their answers came then, not at their next retransmission
    packets_replayed: int = 0
    #: the tree's shared memory (anonymous shared, memfd, SysV), which CRIU writes into image files at the freeze
    #: in every mode (host.shared_memory_bytes)
    shared_memory_bytes: int = 0
    #: of it, what the target held as it was at the freeze (pre-copy by hashes sent it: pages/shmem.py), which
    #: did not cross while the workload was frozen
    shared_memory_named_bytes: int = 0
    #: the final dump's images were in memory of this size at most, not on the image root's disk (0: on it)
    images_in_memory_bytes: int = 0
    downtime_parts: list[DowntimePart] = field(default_factory=list)   #: where the downtime went, in order
    total_seconds: float = 0.0    #: the move from start to end
    target_pid: int = 0           #: the tree's root on the target (0: it was never restored)
    postcopy_pages: int = 0          #: pages placed in the target's copy after the resume
    postcopy_seconds: float = 0.0    #: target running -> it had every page
    target_ran_seconds: float = 0.0  #: "target lost": how long, at most, the target's lost copy ran
    reconnects: int = 0              #: times the link broke while the target's copy ran, and was made again
    reconnect_seconds: float = 0.0   #: how long, all together, the copy's missing pages had no link to come on
    postcopy_pages_on_demand: int = 0    #: sent ahead of the push's order, because a fault waited
    postcopy_requests: int = 0       #: the copy's page faults
    postcopy_requests_waited: int = 0    #: of those, waited for their page to be asked for
    max_bandwidth_bytes_per_s: int | None = None   #: the cap on what the move sent (--max-bandwidth); None: none
    wire_bytes: int = 0              #: what the move sent to the target, every stream together
    compression_level: int = 0       #: the zstd level of the move's streams (0: none chosen, zstd's default)
    #: why that level: set by the user, or what the link and a sample of the workload's memory measured
    compression_reason: str = ""
    peak_wire_bytes_per_s: float = 0.0   #: the most it sent over any one second (options.SIZES.capped_window)
    source_peak_rss_bytes: int = 0   #: the livemig process here, at its peak
    source_cpu_seconds: float = 0.0  #: livemig here and what it ran (CRIU, the runtime)
    #: what went wrong but did not stop it, and each check passed with --force
    warnings: list[str] = field(default_factory=list)
    error: str = ""               #: why it failed, in one line: its phase, host and hint too ("": it did not)
    failed_phase: str = ""        #: the phase that failed (errors.Phase's names)
    #: HOST:DIR where a failed move's CRIU logs were kept, this host's first
    logs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for r, rd in zip(self.rounds, d["rounds"]):
            rd["compression_ratio"] = round(r.compression_ratio, 2)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self) -> str:
        lines = [f"{self.outcome}: {_described(self.runtime, self.pid, self.workload)} {self.source} -> {self.target}, mode {self.mode}"
                 + (f" ({self.mode_reason})" if self.mode_reason else "")]
        if self.trial:
            lines.append(_trial_line(self.trial, self.trial_freeze_seconds, self.trial_restore_seconds))
        for i, r in enumerate(self.rounds, 1):
            lines.append(f"  {r.kind} {i}: {r.pages_written} pages, {r.bytes_raw / 2**20:.1f} MiB -> "
                         f"{r.bytes_wire / 2**20:.1f} MiB on the wire (x{r.compression_ratio:.1f}), "
                         f"frozen {r.frozen_seconds * 1000:.0f} ms, {r.seconds:.2f} s")
        if self.throttle_steps:
            lines.append("  auto-converge: " + ", ".join(f"{s.percent} % after round {s.after_round}"
                                                         for s in self.throttle_steps)
                         + f" (of {self.throttle_steps[0].baseline_cpus:.2f} CPU); lifted at the final dump")
        if self.precopy_stop_reason:
            lines.append(f"  pre-copy stopped: {self.precopy_stop_reason}")
        if self.fill_seconds:
            known = (f"{self.pages_known} of {self.pages_known + self.rounds[-1].pages_written} unchanged since "
                     "pre-copy, " if self.precopy_tracking else f"{self.rounds[-1].pages_written}, ")
            lines.append(f"  final pages: {known}placed from the target's memory; all in {self.fill_seconds:.2f} s, "
                         f"{self.fill_while_running_seconds:.2f} s of it while the copy ran")
        if self.outcome == "moved":
            expected = ("" if self.expected_downtime_seconds is None else
                        f"expected {self.expected_downtime_seconds * 1000:.0f} ms, ")
            lines.append(f"  downtime {self.downtime_seconds * 1000:.0f} ms ({expected}restore "
                         f"{self.restore_seconds * 1000:.0f} ms), total {self.total_seconds:.2f} s; "
                         f"now PID {self.target_pid} on {self.target}"
                         + (f"; bundle {self.bundle_bytes_wire / 2**20:.1f} MiB on the wire"
                            if self.bundle_bytes_wire else "")
                         + (f"; image {self.image_bytes_wire / 2**20:.1f} MiB on the wire"
                            if self.image_bytes_wire else ""))
        if self.outcome == "moved" and self.downtime_parts:
            lines.append("  downtime, part by part: " + ", ".join(
                f"{d.name} {d.seconds * 1000:.0f} ms" for d in self.downtime_parts))
        if self.wire_bytes:
            lines.append(f"  on the wire: {self.wire_bytes / 2**20:.1f} MiB, at most "
                         f"{format_rate(self.peak_wire_bytes_per_s)} over a second"
                         + (f" (capped at {format_rate(self.max_bandwidth_bytes_per_s)})"
                            if self.max_bandwidth_bytes_per_s else "")
                         + (f", zstd level {self.compression_level}" if self.compression_level else ""))
        if self.postcopy_seconds:
            mib = self.postcopy_pages * 4096 / 2**20
            lines.append(f"  post-copy: {mib:.1f} MiB in {self.postcopy_seconds:.2f} s after the resume "
                         f"({mib / self.postcopy_seconds:.0f} MiB/s); {self.postcopy_requests_waited} of "
                         f"{self.postcopy_requests} faults waited, {self.postcopy_pages_on_demand} pages "
                         "sent on demand")
        return "\n".join(lines + _closing(self.warnings, self.error, self.failed_phase or "migration"))


@dataclass
class Replica:
    """One replica of a clone."""
    host: str                     #: the host it runs on, as it was named
    name: str                     #: its container's name there
    pid: int = 0                  #: its init, on that host
    restore_seconds: float = 0.0  #: its restore there (podman's, with its pause)
    bytes_wire: int = 0           #: the checkpoint (and image) sent to that host, compressed


@dataclass
class CloneReport:
    """What `livemig clone` did: one checkpoint of the original, replicas of it elsewhere."""
    source: str                   #: this host's name
    workload: str                 #: the original: the container the user named
    migration_id: str = ""        #: the clone's own, as its work directories are named
    started_at: str = ""          #: UTC, ISO 8601 (now())
    ended_at: str = ""            #: UTC, ISO 8601
    runtime: str = "podman"       #: what checkpointed the original (podman alone clones)
    outcome: str = "failed"       #: "cloned" or "failed" (then no replica runs; the original does)
    replicas: list[Replica] = field(default_factory=list)   #: every replica, on every host, in order
    frozen_seconds: float = 0.0   #: how long the original stood still for its checkpoint (CRIU's figure)
    checkpoint_seconds: float = 0.0   #: the whole checkpoint command, the original running after
    pages_written: int = 0        #: the pages in the checkpoint (CRIU's count)
    checkpoint_bytes: int = 0     #: the archive, uncompressed
    total_seconds: float = 0.0    #: the clone from start to end
    warnings: list[str] = field(default_factory=list)   #: what went wrong but did not stop it
    error: str = ""               #: why it failed, in one line: its phase, host and hint too ("": it did not)
    failed_phase: str = ""        #: the phase that failed (errors.Phase's names)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self) -> str:
        hosts = sorted({r.host for r in self.replicas})
        lines = [(f"{self.outcome}: {self.runtime} container {self.workload} on {self.source} -> "
                  f"{len(self.replicas)} replica(s) on {', '.join(hosts)}")]
        if self.outcome == "cloned":
            lines.append(f"  the original stood still {self.frozen_seconds * 1000:.0f} ms and runs on; "
                         f"checkpoint {self.pages_written} pages, {self.checkpoint_bytes / 2**20:.1f} MiB; "
                         f"total {self.total_seconds:.2f} s")
            for r in self.replicas:
                lines.append(f"  {r.name} on {r.host}: PID {r.pid}, restored in {r.restore_seconds * 1000:.0f} ms")
        return "\n".join(lines + _closing(self.warnings, self.error, self.failed_phase or "clone"))


@dataclass
class Plan:
    """What `livemig move --dry-run` found: the preflight passed, and this would happen."""
    workload: str                 #: what the user named: a PID or a container
    runtime: str                  #: what would checkpoint it: "process" (CRIU directly), "runc", "crun" or "podman"
    source: str                   #: this host's name
    target: str                   #: the target, as it was named
    mode: str                     #: the strategy the move would use
    mode_reason: str              #: why that one
    processes: int                #: the processes in the tree
    memory_bytes: int             #: resident memory of the tree
    #: measured through the real stream path, incompressible bytes; within the cap, if there is one
    link_bytes_per_s: float
    copy_seconds: float           #: memory_bytes at that rate: an upper bound
    expected_downtime_seconds: float   #: in the mode chosen (source/downtime.py tells what it counts)
    expected_rounds: str          #: how many pre-copy rounds to expect, in words
    note: str                     #: what the mode would do, and what the downtime depends on, in words
    warnings: list[str] = field(default_factory=list)   #: what the preflight let pass but said
    max_bandwidth_bytes_per_s: int | None = None   #: --max-bandwidth, which the link rate is held to
    shared_memory_bytes: int = 0     #: what goes through image files at the freeze in every mode
    max_downtime_seconds: float | None = None      #: --max-downtime: the promise; None: none made
    #: the downtime expected in each mode that runs here (seconds, by mode)
    expected_downtime_by_mode: dict[str, float] = field(default_factory=dict)
    #: pre-copy: how it would find changed pages, "soft-dirty", "write-protect" or "page hashes" ("": no pre-copy)
    precopy_tracking: str = ""
    compression_level: int = 0    #: the zstd level the move would use (chosen as a move chooses it)
    compression_reason: str = ""  #: why that level
    target_memory_available_bytes: int = 0   #: the target's MemAvailable, as its preflight found it
    target_cpus: int = 0          #: CPUs on the target (0: its livemig did not say)
    target_load: float = 0.0      #: the target's load average over the last minute
    trial: str = ""               #: the trial restore (trial.py): "passed", or "not tried: why" (one that failed refuses)
    trial_freeze_seconds: float | None = None    #: the workload stood still this long for it (None: not tried)
    trial_restore_seconds: float | None = None   #: the target's trial restore, thrown away

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self) -> str:
        by_mode = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in self.expected_downtime_by_mode.items())
        lines = [f"would move: {_described(self.runtime, self.workload)} {self.source} -> {self.target}, mode {self.mode} ({self.mode_reason})",
                 (f"  {self.processes} process(es), {self.memory_bytes / 2**20:.1f} MiB resident; link "
                  f"{self.link_bytes_per_s / 2**20:.0f} MiB/s (incompressible"
                  + (", capped by --max-bandwidth" if self.max_bandwidth_bytes_per_s else "")
                  + f"), so at most {self.copy_seconds:.1f} s to copy it"),
                 (f"  pre-copy rounds: {self.expected_rounds}; downtime: about "
                  f"{self.expected_downtime_seconds * 1000:.0f} ms"),
                 f"  {self.note}"]
        if self.trial:
            lines.append(_trial_line(self.trial, self.trial_freeze_seconds, self.trial_restore_seconds))
        if self.compression_reason:
            lines.append(f"  {self.compression_reason}")
        if by_mode:
            lines.append(f"  downtime by mode: {by_mode}" + (
                f" (--max-downtime {self.max_downtime_seconds * 1000:.0f} ms: a mode over it is refused "
                "before the freeze)" if self.max_downtime_seconds is not None else ""))
        return "\n".join(lines + _closing(self.warnings, "", ""))


@dataclass
class CheckRow:
    """One of the preflight's checks."""
    name: str                     #: what it checks ("criu on target", "memory", "agent on target"...)
    ok: bool                      #: it passed
    detail: str                   #: what it found
    hint: str = ""                #: how to fix it, for a check that failed ("": nothing to say)


@dataclass
class CheckReport:
    """What `livemig check HOST` found: the preflight's checks against HOST, and the mode auto would take."""
    host: str                     #: the target asked, as it was named
    ok: bool                      #: every check passed: a move there would pass its preflight
    mode: str                     #: the mode a move would take (--mode, else auto's choice); "": none can run
    mode_reason: str              #: why that one, or why none
    checks: list[CheckRow] = field(default_factory=list)   #: every check, in the order a user should fix them


@dataclass
class Failure:
    """A command that failed before it had a report of its own (bad arguments, a host not
    reached, a PID that is not there): what `--json` prints instead."""
    error: str                    #: the message, as the line on stderr says it
    failed_phase: str             #: the phase (Phase's names), "usage" for bad arguments, or ""
    host: str = ""                #: where it failed, when that is known
    hint: str = ""                #: what to do about it
    outcome: str = "failed"       #: always "failed", as a report that failed says
