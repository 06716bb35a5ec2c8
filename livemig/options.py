"""Every tunable of a migration, in one place, with the names users see.

Each field of Options says what it sets in its doc comment (`#:`, Sphinx's, above the field or
after it on its line); a unit test holds every field to having one.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from enum import Enum

from . import criu


class Mode(str, Enum):
    """How a move's pages cross (docs/modes.md)."""
    AUTO = "auto"             #: chosen from what both hosts and the runtime support, and said why (source/policy.py)
    PRECOPY = "precopy"       #: pre-dump rounds while running, then a final dump of what is dirty
    POSTCOPY = "postcopy"     #: a lazy final dump: restore at once, pages follow on demand
    HYBRID = "hybrid"         #: pre-copy rounds, then a lazy final dump
    STOPCOPY = "stopcopy"     #: one final dump, streamed, restored


@dataclass(frozen=True)
class Options:
    """What a move (or a clone, a check, a recover) is asked to do: the flags' and the settings'
    values (config.py reads them from a file, the environment and the command line)."""
    mode: Mode = Mode.AUTO           #: the strategy (--mode); AUTO picks from what both hosts have, and says why
    #: Seconds the workload may stand still: a promise, kept or the move refused before the freeze
    #: (DowntimeRefused). None: none made; pre-copy aims at DOWNTIME_AIM, and a longer downtime is told.
    max_downtime: float | None = None
    max_rounds: int = 8              #: pre-copy rounds at most (auto-converge may add its steps)
    throttle: bool = True            #: auto-converge: slow the workload's CPU when pre-copy does not converge
    #: stop-and-copy pushes pages into the target's memory, placed as the copy runs (the source's copy waits,
    #: stopped, until every page is there); False: they go through image files, and the copy is whole before
    #: it runs
    fill: bool = True
    #: where there is no soft-dirty, pre-copy tracks writes by userfaultfd write-protection, each process of
    #: the workload made to run the system call that sets it up (ptrace; pages/wptrack.py); False: by page
    #: hashes, nothing run in the workload, the final pass reading all of its memory
    write_protect: bool = True
    #: with --tcp-established: what the workload's clients send while it is frozen is kept on the source and given
    #: to the copy that runs next, which answers it then, not at their next retransmission (replay.py); False: left to
    #: their retransmissions
    replay: bool = True
    #: zstd level for everything on the wire; 0: chosen per move from the link's rate and this CPU's
    #: (wire/compression.py; where a move does not choose, zstd's default, 3)
    compression_level: int = 0
    #: bytes a second one move sends at most, all its streams together (QEMU's max-bandwidth; bandwidth.py);
    #: None: no cap
    max_bandwidth: int | None = None
    #: what CRIU is asked to carry of the workload (criu.Options): --tcp-established, --file-locks and the like
    criu: criu.Options = field(default_factory=criu.Options)
    image_root: str = "/var/lib/livemig"   #: private image directories live here, on both hosts
    #: The target runs the coordinator's own livemig, brought over the ssh connection where it is
    #: not there yet (source/bootstrap.py), with target_python; False: the installed agent_command.
    bootstrap: bool = True
    target_python: str = "python3"   #: the Python that runs the livemig brought to the target
    agent_command: tuple[str, ...] = ("livemig",)   #: how to run an installed livemig on the target (no bootstrap)
    connect_timeout: float = 15.0    #: seconds to reach a host over SSH (connected and logged in), each time
    #: Once the target's copy runs, a broken link is reached again for this long (the copy waits on
    #: its missing pages meanwhile) before the copy is given up. Given up, the workload is down until
    #: an operator runs `livemig recover --target-lost`, so waiting costs less than giving up: five
    #: minutes outlast a switch's reload, an sshd restart or a routing change.
    reconnect_timeout: float = 300.0
    runtime: str | None = None       #: a container's runtime (runc, crun, podman); None: whichever knows it
    name: str | None = None          #: the container's name on the target; None keeps its name
    #: go on past mismatches that can only fail the restore (which rolls back): the podman version, network
    #: stack, kernel...; each is a warning in the report
    force: bool = False
    #: A bare tree's files the target lacks are carried over while it is frozen, up to this many
    #: bytes together (carried.py); more, and the move is refused in its preflight.
    carry_files_max: int = 64 << 20
    #: Before anything is frozen for the move, a trial restore on the target (trial.py): the tree's images
    #: without its pages, restored in namespaces of their own and thrown away; what CRIU trips on there
    #: refuses the move. Off by default: its freeze, some 100 ms per GiB, is over 50 ms at 2 GiB (a dry
    #: run takes it too, but for a tree with much shared memory: SIZES.trial_shared_most).
    trial: bool = False
    #: Service addresses (ADDR/PREFIX) that move with the workload (service_address.py): taken off
    #: the source after the freeze, put on the target's interface on their subnet before the restore,
    #: announced there once the copy runs; put back on the source by a rollback.
    move_addresses: tuple[str, ...] = ()
    #: A drain's move (source/drain.py): the file where the drain keeps this move's share of its
    #: --max-bandwidth (bytes a second, changed as moves start and end), read again as the move goes;
    #: "": the move's own max_bandwidth alone
    bandwidth_share: str = ""
    #: bytes a second the link to the target carries, measured already (a drain's plan: its share of
    #: it), taken instead of a measure of the move's own; None: measured
    link_rate: float | None = None

    def to_dict(self) -> dict:
        """As JSON holds it (from_dict reads it back): how a drain hands each move its options."""
        return {**asdict(self), "mode": self.mode.value}

    @classmethod
    def from_dict(cls, d: dict) -> Options:
        return cls(**{**d, "mode": Mode(d["mode"]), "criu": criu.Options(**d["criu"]),
                      "agent_command": tuple(d["agent_command"]), "move_addresses": tuple(d["move_addresses"])})

    @property
    def downtime_budget(self) -> float:
        """What pre-copy aims at: the promised downtime, or DOWNTIME_AIM where none was."""
        return DOWNTIME_AIM if self.max_downtime is None else self.max_downtime


DOWNTIME_AIM = 0.300     # seconds: QEMU's downtime-limit default, pre-copy's aim where no --max-downtime is given


# --- Internal limits ---------------------------------------------------------------------------
# Not options a user sets: how long livemig waits for each thing it waits on, and the sizes that
# shape its streams. Each lives here, once, under a name that says what it bounds; the comment
# says why the figure. The modules read them as WAITS.<name> and SIZES.<name>; a test that needs
# another figure passes it in where the code takes one (Placer's stall_seconds), or gives the module
# under test a copy of its own (dataclasses.replace), never changes these.

@dataclass(frozen=True)
class Waits:
    """Seconds. A wait that runs out is a failure of the thing waited for, said as such."""
    # -- the source
    trial_dump: float = 60.0              # for a trial's dump (trial.py): no pages are written, seconds at most
    freeze_start: float = 10.0            # for the final dump's freeze to begin (CRIU's first start in a VM: 4.2 s)
    page_server_reason: float = 5.0       # for the target's page server to say why, once the final dump broke
    agent_reason: float = 5.0             # for the agent to say why, once its page stream broke
    target_verdict: float = 15.0          # for the target to say how its copy ended, once post-copy failed
    target_verdict_poll: float = 1.0      # between asking a target whose agent is still settling its copy
    verdict_forgotten: float = 10.0       # for the agent to take Finish once its verdict is ours
    abort: float = 30.0                   # for the agent to undo its side of a move rolled back
    agent_exit: float = 10.0              # for the agent to exit once its input ended; then it is killed
    agent_brought: float = 60.0           # for livemig's zip (some 300 KiB) to reach a target and be unpacked
    agents_kept_unused: float = 30 * 86400.0   # an agent brought to a target and not run since is kept that long
                                               # (bootstrap.py: pruned as another is brought)
    reconnect_first_retry: float = 0.5    # before trying a broken link again; doubled at each try, up to
    reconnect_longest_retry: float = 10.0  # this: a link back after a blip is used at once, and a host down
    #                                      for minutes is not asked twenty times a second
    successor_appears: float = 3.0        # for a dead agent's guard to wait for a successor, once the agent's
    #                                      socket is found unanswered: it hears of the death at once, then
    #                                      writes a verdict (synced) before it listens
    recover_retry_poll: float = 0.5       # between asking a target that said "try again" (recover)
    throttle_hold_poll: float = 0.002     # between looks at whether the throttled workload is being frozen
    wp_inject: float = 2.0                # for a thread of the workload to stop, and to run each system call
    #                                      livemig has it make (pages/wptrack.py): a thread that does not is
    #                                      let go, and its process compared by hash instead
    wp_inject_poll: float = 0.0005        # between looks for that thread's stop: it takes some 100 us
    # -- the page stream (both ends)
    page_stream_stall: float = 30.0       # silence from the other end, pages still missing, before the link is
    #                                      called lost (a cut link is silent: TCP would wait minutes). Each end
    #                                      then settles alone: the target kills a copy that lacks pages, and the
    #                                      source keeps its copy stopped until it learns that
    page_stream_stall_poll: float = 1.0   # between looks for that silence
    page_stream_close: float = 10.0       # for the target to hang up first once every page is across
    postcopy_push_quiet: float = 0.02     # post-copy holds its push back after the resume until no fault came for
    postcopy_push_quiet_cap: float = 0.3  # this long, or this long after the resume. Pushed pages cost both hosts'
    #                                      CPUs, which the restore, the control messages and each fault's pages
    #                                      need. Measured side by side in the namespaced lab (3 reps, medians, idle
    #                                      workload): 16 MiB pushed during the restore and none held back after:
    #                                      268 ms of downtime at 64 MiB (223 ms seen by the app), 415 (375) at
    #                                      2 GiB; nothing pushed during the restore and a 20 ms quiet: 112 (138)
    #                                      and 281 (312); all of 2 GiB was across 0.8 s later
    uffd_busy_retry: float = 0.0005       # before trying again a page copy the kernel refused (EAGAIN)
    # -- the target
    stream_open: float = 60.0             # for the coordinator to open a stream the agent is waiting on
    linger_after_failed_postcopy: float = 60.0   # for the coordinator to settle a failed post-copy's copy
    rejoin_grace: float = 30.0            # past the coordinator's reconnect_timeout, for it to rejoin: its
    #                                      last try may start just before its time is up, and take connect_timeout
    lazy_pause: float = 10.0              # to pause a container restored with lazy pages. Its tasks are stopped
    #                                      and freeze at once; were they running (a runtime that kept CRIU's
    #                                      configuration from it), one waiting for a page could not freeze until
    #                                      the page landed, and cgroup v1's freezer gives up fast
    lazy_pause_poll: float = 0.05         # between those tries
    criu_exit_after_broken_pipe: float = 2.0     # for CRIU to write why its page pipe broke, before its log is read
    trial_restore: float = 60.0           # for a trial's restore (trial.py): without pages, a second or so
    container_delete: float = 60.0        # for a runtime's `delete --force` of a copy being undone
    unit_cgroup: float = 5.0              # for a unit's cgroup to take a restore: systemd may be removing
                                          # the one its unit left (a rollback's, the unit just ended)
    unit_cgroup_poll: float = 0.02        # between those tries
    # -- programs
    reap: float = 5.0                     # for a killed program's pipes to close before ours are (a stray child
    #                                      of its own may hold them as long as it lives)
    dump_exit: float = 60.0               # for CRIU to exit once its page stream is cut; then it is killed
    tree_stop: float = 0.5                # for a tree being killed to stop, task by task (proc.kill_tree), so
    tree_stop_poll: float = 0.002         # that none forks between the tree's reading and the kill


@dataclass(frozen=True)
class Sizes:
    """Bytes, pages (4 KiB) or counts: how much goes at once."""
    # -- post-copy's push. Without a fault stream a fault's pages wait behind whatever is already on its
    # way: one read from CRIU and the window of pages pushed but not yet taken in by the target. The
    # window then starts small, so that the burst of faults right after the resume waits milliseconds,
    # grows while no fault comes, to fill the link, and shrinks back at the next fault. With a fault
    # stream it starts as wide as it goes, and still shrinks at a fault: pages in flight keep both hosts'
    # CPUs busy, and a fault's page waits for a CPU too (measured, 1 rep: the longest stall of a workload
    # dirtying 100 MiB/s of 512 MiB went from 2.3-3.2 s to 1.3 s, every page there 4.2 s after the move
    # began, not 3.9 s).
    push_read_pages: int = 64                     # 256 KiB per read from CRIU
    push_window_pages: tuple[int, int] = (256, 4096)  # 1 MiB to 16 MiB pushed and not yet taken in
    # Filling a copy that does not run yet (pre-copy by hashes), no fault waits behind the push: it reads
    # a store slot at once (pagehash's unit, not a tunable), and its window is wide enough that
    # acknowledgements never hold the push back.
    fill_window_pages: int = 1 << 16              # 256 MiB in flight
    rejoin_runs: int = 8192                       # runs of pages a copy lacks, said at most when its link is made
    #                                               again (some 25 bytes each in the control message, whose limit
    #                                               is 1 MiB): past that, runs are joined across their smallest gaps
    fault_pages: int = 16                         # what the target asks for at once: a fault's neighbours come along
    #                                               (and the most the source serves for one fault)
    fill_named_pages: int = 1 << 15               # 128 MiB a watch vouches for, named in one frame (compare.planned):
    #                                               half the window, so that two are in flight and no acknowledgement holds the next back
    fill_compared_here_pages: int = 4096          # a fill's first 16 MiB (the smallest ranges, which the restore
    #                                               itself may touch) compared here, not by the forked comparer,
    #                                               which starts a moment later
    # A fill's copies at once, each in a thread (the kernel's copy, most of a fill, needs no GIL), while
    # the copy runs: one CPU is left to the copy, whose faults meanwhile wait for it and for this agent.
    # With both of the lab's two cores filling, a 64 MiB fill's workload stood still 7 to 23 ms longer
    # than the report's downtime (its own 10 ms tick is most of the 7); with one thread, 3 to 12 ms,
    # and the fill took no longer (118 against 121 ms, the copy running: tests/test_bandwidth.py).
    fill_threads: int = max(1, min(4, (os.cpu_count() or 2) - 1))
    # What the workload's clients send while it is frozen, given to the copy that runs next (replay.py):
    # at most this much crosses in the target's Resume (a control message: its frame's limit is 1 MiB, and
    # base64 takes a third more); the rest is left to the clients' retransmissions. The packet socket's
    # buffer holds each packet at its kernel size, some 1 KiB more than its bytes.
    replay_bytes: int = 512 << 10
    replay_socket_buffer: int = 8 << 20
    hash_read_pages: int = 256                    # 1 MiB per read of a process's memory (page hashes)
    # A fill holds every page in the target agent's store, then hands each to the copy and lets it go:
    # the workload's memory about once, and some slack for the pages in flight and the restore's own.
    fill_room: float = 1.25                       # times the pages' bytes the target must have free
    # From this share of a tree's resident memory on (its VmRSS summed: a shared page counts once
    # per process), what its processes share copy-on-write is said in post-copy's preflight: it
    # crosses before the copy runs, to stay shared (pages/cow.py). A pre-fork server shares most.
    cow_shared_least: float = 0.25
    # The pages a tree shares copy-on-write are read from its frozen memory into the images
    # (pages/cow.py) this many at a time: 2 MiB, as the rest of the source's reads.
    cow_read_pages: int = 512
    # Below this many bytes at the freeze (stop-and-copy's memory; else the shared memory CRIU writes
    # into image files), the downtime's estimate takes no measure of the link: under 16 MiB cost less
    # than the 16 MiB the measure sends, and a promised downtime is measured for whatever it is.
    frozen_least: int = 16 << 20
    # A lazy final dump's images go into memory of their own (switchover._in_memory) where the tree's
    # shared memory, which CRIU writes into them, and what it shares copy-on-write take this much at
    # least (1536 MiB of shared memory: 4.7 s onto the lab's disk, 1.5 s into memory); they get room for
    # a quarter more, and this much beside, but never over half the memory available.
    images_in_memory_least: int = 16 << 20
    images_in_memory_slack: int = 64 << 20
    # Pages read from the tree, spread over all it holds, and compressed as the streams do: what its
    # memory comes to on the wire, for the estimate of a mode without rounds to measure it. 4 MiB:
    # some 10 ms of reading and compressing.
    wire_sample_pages: int = 1024
    # The level is chosen (wire/compression.py) on a contiguous sample of the workload's memory, the
    # size of a high level's window so that what repeats a few MiB away counts: about 0.1 s of compressing
    # at the levels below. Under compression_least_bytes of memory the move is over before any level pays.
    compression_sample_bytes: int = 8 << 20
    compression_least_bytes: int = 64 << 20
    compression_levels: tuple[int, ...] = (1, 3, 6, 9)
    compression_gain: float = 1.1                 # a higher level must send 10 % more a second: its CPU is the workload's too
    # -- the trial restore (trial.py): CRIU's dump writes a tree's shared memory into its images while it
    # is frozen (some 300 MiB a second: RATES.criu_writes_images), lazy or not; over this much, a dry run
    # does not take the trial unless asked (--trial): 64 MiB, some 0.2 s of freeze
    trial_shared_most: int = 64 << 20
    # -- the wire
    stream_chunk: int = 1 << 20                   # bytes a stream reads and compresses at once
    ssh_window: int = 16 << 20                    # the receive window of our ssh channels (post-copy's
    #                                               and the replies' direction come back to us)
    ssh_max_packet: int = 128 << 10
    # What arrives compressed is inflated this many bytes of it at a time: zstd inflates at most
    # 32768-fold (an RLE block: 4 bytes for 128 KiB), so a peer's stream of zeros (1 MiB that
    # is 32 GiB) never lands in memory at once, whoever sent it; measured, 1 KiB pieces cost
    # 45 ms per 128 MiB against 31 ms for whole reads.
    inflate_piece: int = 1024
    inflate_ahead: int = 4 << 20                  # bytes inflated past what a reader asked for, at most
    #                                               (then a piece's more): one read's pieces at once
    capped_piece: int = 64 * 1024                 # bytes written at once under --max-bandwidth: what one
    #                                               window may overshoot by
    capped_ahead: float = 0.002                   # seconds: a piece due this soon goes now (no sleep per
    #                                               piece at high rates)
    capped_bucket: float = 0.25                   # seconds: the slots the rate reached is counted in
    capped_window: float = 1.0                    # seconds: the rate reached is the most sent over this long
    # -- what the target sends back: its pagemaps of a round (SendPagemaps), which the source's CRIU
    # reads as root. An entry is some 20 bytes: 256 MiB index 13 million runs of pages.
    pagemaps_most: int = 256 << 20                # bytes of them all, at most
    pagemaps_files_most: int = 1 << 16            # files, at most (two a process)
    # -- auto-converge
    throttle_max_period_us: int = 250_000         # a throttled task may wait this long to be frozen (not
    #                                               the kernel's 1 s period)
    throttle_min_cpus: float = 0.01               # a workload that seemed idle is still allowed this much
    # -- the copy's guard (target/guard.py)
    guard_message: int = 16 << 10                 # bytes of one message the agent tells it, at most: a path
    #                                               (4 KiB at most) and a few words; what is longer is refused
    # -- what is kept
    stderr_kept: int = 64 * 1024                  # bytes of a program's stderr kept for its error
    disk_full_below: int = 1 << 20                # bytes free under which a CRIU that logged nothing is said to have
    #                                               failed for a full disk (it could not write its log either)
    logs_kept: int = 20                           # failed moves' logs kept under the image root


    @property
    def inflated_most(self) -> int:
        """Bytes one piece may inflate to: a block per 4 bytes of it, and one the decoder held."""
        return (self.inflate_piece // 4 + 1) * (128 << 10)


@dataclass(frozen=True)
class Rates:
    """What the work at the freeze costs that no preflight times, for the downtime's estimate
    (source/downtime.py). Measured in the namespaced lab, a service with 1536 MiB of shared
    memory against the same with private memory, side by side in each mode (bench/shm.py,
    bench/results/2026-12-05T15-18-38-shm.json), the private one's parts taken off the shared
    one's. What the same sample spent, from one mode to the next, varied up to twice over (CRIU's
    dump shares two CPUs with the push of a fill): these are its middle."""
    # bytes a second CRIU's dump writes the tree's shared memory into image files, and its restore
    # reads them back into the copy (3.4 to 7.1 s, and 0.7 to 2.8 s, for 1536 MiB)
    criu_writes_images: float = 300 * 2**20
    # the same into memory of their own (host.images_in_memory: 0.8 to 2.9 s for 1536 MiB, the most where
    # the memory is fresh, as in bench/results/2026-12-06T14-10-08-shm.json)
    criu_writes_memory: float = 1024 * 2**20
    criu_reads_images: float = 700 * 2**20
    # seconds, whatever the memory: the freeze, CRIU's dump and restore of a tree's all but memory,
    # the requests around them and the resume (the private service: 0.12 s in post-copy, 0.24 to
    # 0.29 s with the dump's and the restore's image files)
    per_tree: float = 0.2
    # seconds a container's switchover costs beside its memory, by runtime: its pause and checkpoint,
    # its restore making its namespaces and mounts again, the source's copy deleted, its resume; of one
    # process on the host's network (python -m bench.switchover, three runs: bench/results/
    # 2026-12-07T10-28-26-switchover.json, 10-39-13 and 10-40-34: runc's memcounter 0.23 to 0.26 s in all,
    # crun's 0.49 to 0.71 with 0.25 of its memory's image files, podman's held server 0.42 to 0.59), the
    # largest measured and a fifth more: what errs low breaks a --max-downtime, and these two CPUs vary so
    per_container: dict[str, float] = field(default_factory=lambda: {"runc": 0.3, "crun": 0.35, "podman": 0.72})
    # seconds more for each process beyond the first, and for a network namespace of its own (its links
    # made again, kept quiet, deleted on the source: runc's held server 0.29 to 0.37 s; PostgreSQL's six
    # processes in a user and a network namespace of their own 0.56 to 0.63, where per_tree alone said 0.2)
    per_container_process: float = 0.06
    own_network: float = 0.1
    # seconds a switchover costs beside a trial's freeze and restore (downtime.switchover): its images
    # crossing, the requests around them, its resume (the same files: runc's memcounter at most 0.09)
    beside_trial: float = 0.1
    # bytes a second a fill goes through the frozen tree's private memory: pre-copy by hashes
    # compares every page with what the target holds, and the target places them in its copy
    # (0.50 s for 1536 MiB)
    fill: float = 3 * 2**30
    # bytes a second the same costs where pre-copy watched the writes (pages/wptrack.py): nothing is read,
    # but CRIU's lazy dump lists every page and the watch settles (bench/results/2026-12-06T10-27-50.json:
    # 273 ms of downtime at 2 GiB, 572 at 4 GiB; with per_tree, the rate that never estimates below either:
    # 400 and 600 ms)
    watched_fill: float = 10 * 2**30
    # bytes a second the shared memory pre-copy sent costs beside CRIU's writing it (pages/shmem.py): the
    # source compares the dump's pages with what the target holds, and the target puts them into the copy
    # before it runs (about 0.5 s, and 0.65 to 2.6 s, for 1536 MiB: bench/results/2026-12-06T14-10-08-shm.json)
    shared_named: float = 640 * 2**20


WAITS = Waits()
SIZES = Sizes()
RATES = Rates()
