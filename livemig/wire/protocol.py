"""The messages between the coordinator (source) and the agent (target), and how they are framed.

A frame is a 4-byte big-endian length and a UTF-8 JSON object whose "type" names
one of the message classes below; its other keys are that class's fields. Only
these types decode: no pickle, no eval, nothing from the wire chooses code to
run. The first exchange is Hello/Welcome: the coordinator says the versions of the
protocol it speaks, the agent answers the highest both speak (agree), or Failed when
they share none.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, dataclass_transform

from ..errors import LivemigError, ProtocolError

if TYPE_CHECKING:     # for the annotations alone: the messages need no zstd to load
    from .streams import Reader, Writer

# PROTOCOL_VERSION rises when a message changes; PROTOCOL_OLDEST rises only when the code that speaks
# the older one goes. No such code is kept yet: every message is written and read in the newest format
# alone, so both are the same version. Hello is read by every livemig from 16 on, whatever fields a
# newer one adds to it (_OPEN), so that the two always learn each other's versions.
PROTOCOL_VERSION = 26  # 26: Resume.packets, Resumed.given (what the clients sent while the workload was frozen: replay.py); 25: Container.own_network, HostFacts.parents_missing (a runc or crun container's own network namespace, made again on the target: runtimes/oci_networks.py); 24: Container.networks, HostFacts.podman_networks (a podman container's own network: can its address, and its connections, be the same on the target?); 23: TrialRestore, TrialRestored (trial.py: the workload's images restored before the freeze, thrown away); 22: Probe.unit, HostFacts.unit_state, Restore.journal_streams, InstallUnit, AdoptUnit (units.py: a workload systemd runs keeps its unit); 21: HostFacts.cpus and load (a drain places workloads by them); 20: a lazy dump's images may name the shared memory pre-copy sent (pages/shmem.py NAMED), for the target to place; ReceiveFiles.in_memory; 19: Probe.sized_files, HostFacts.file_sizes (a tree's files the target has at another size), HostFacts.unprivileged_uffd; 18: Probe.move_addresses, HostFacts.subnet_devices, Restore.move_addresses (service_address.py: the service address moves with the workload); 17: Probe.ports and mount_sources, HostFacts.ports_taken and mount_sources_missing (what the target's occupancy and storage would refuse the restore); 16: Hello.protocol_oldest (the coordinator's range: the agent answers the highest both speak in Welcome.protocol); 15: Probe.files, HostFacts.files_missing (a tree's files the target lacks), Restore.carried (those carried); 14: DropFiles (a measure of the link leaves nothing on the target); 13: a lazy dump's images may name the pages its processes share copy-on-write (pages/cow.py SHARED), for the target to complete; 12: HostFacts.nonlocal_bind and locks_taken, Probe.locked_files, Restore.tcp_established and file_locks; 11: a lazy restore's coordinator may rejoin it (RejoinPages), a successor take it over; 10: stop-and-copy into memory (a fill with no store yet); 9: a fill's Resume waits for every page on the host
PROTOCOL_OLDEST = 26
MAX_FRAME = 1 << 20   # control messages only: bulk data has streams of its own
_LEN = struct.Struct(">I")
_TYPES: dict[str, type] = {}
_PARTS: dict[str, type] = {}     # dataclasses carried inside messages, never sent alone
_OPEN = {"Hello"}     # read whatever fields a newer livemig added, which are left out
_T = TypeVar("_T")


# dataclass_transform: type checkers see each message as the frozen dataclass it is
@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def message(cls: type[_T]) -> type[_T]:
    """Register a dataclass as a message type, under its class name."""
    cls = dataclass(frozen=True)(cls)
    _TYPES[cls.__name__] = cls
    return cls


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def part(cls: type[_T]) -> type[_T]:
    """Register a dataclass that travels inside messages (a field's value)."""
    cls = dataclass(frozen=True)(cls)
    _PARTS[cls.__name__] = cls
    return cls


# --- handshake -------------------------------------------------------------------------------
@message
class Hello:
    protocol: int              # the newest version of the protocol the coordinator speaks
    livemig_version: str
    migration_id: str
    successor: bool = False    # take over the copy whose agent died, from its guard (TakeOver)
    protocol_oldest: int = 0   # the oldest it speaks; 0: protocol alone (a coordinator older than 16)

    @property
    def oldest(self) -> int:
        return self.protocol_oldest or self.protocol


@message
class Welcome:
    protocol: int          # the version agreed: the highest both speak, which every message after is in
    livemig_version: str
    work_dir: str          # the agent's private directory (0700) for this migration
    stream_socket: str     # a UNIX socket in work_dir where data streams connect


# --- preflight -------------------------------------------------------------------------------
@part
class Container:
    """A container: its runtime (runc, crun, podman), its name or ID, its OCI bundle's path
    (the same on both hosts; "" for podman) and podman's image."""
    runtime: str
    id: str
    bundle: str
    image: str = ""
    networks: dict[str, str] = field(default_factory=dict)   # podman: its own namespace's networks -> its address
    own_network: OwnNetwork | None = None    # runc, crun: its own network namespace (None: the host's)


@part
class NetLink:
    """A link of a container's own network namespace (runtimes/oci_networks.py): its name
    there, its kind as `ip -d link` says it (macvlan, ipvlan, veth...), its parent on the
    host (macvlan's, ipvlan's), its mode, MAC and MTU, and its global addresses
    (ADDRESS/PREFIX)."""
    name: str
    kind: str
    parent: str = ""
    mode: str = ""
    mac: str = ""
    mtu: int = 0
    addresses: list[str] = field(default_factory=list)


@part
class OwnNetwork:
    """A runc or crun container's own network namespace: its links but loopback, its routes
    (`ip route add` arguments, each; those its addresses make are left out), and whether its
    bundle has hooks, which its runtime runs at the restore too (prestart, createRuntime)."""
    links: list[NetLink] = field(default_factory=list)
    routes: list[list[str]] = field(default_factory=list)
    hooks: bool = False


@part
class PodmanNetwork:
    """A podman network as one host defines it (runtimes/podman_networks.py): its driver, its
    subnets and the interface it is on (macvlan's and ipvlan's parent, a bridge's own); and
    the container's address on it, as the source has it."""
    name: str
    driver: str
    subnets: list[str]
    interface: str
    interface_here: bool = True     # the host has that interface (a bridge podman makes: always)
    address: str = ""


@part
class Port:
    """A port the tree holds: a TCP socket listening, or a UDP one receiving, at an address
    ("0.0.0.0" and "::" for any). The restore binds it again, where nothing else may hold it."""
    proto: str          # "tcp" or "udp"
    ip: str
    port: int


@part
class JournalStream:
    """A stream to journald the tree writes to (a service's stdout and stderr): the target's
    restore gets one of its own in its place, said as systemd says it (journald's header)."""
    inode: int                  # the tree's end, as the images name it (--external unix[INODE])
    identifier: str             # SyslogIdentifier: what each line is logged as
    unit: str = ""              # the unit its lines are logged for
    priority: int = 30          # facility and level, as syslog has them (daemon.info)
    level_prefix: bool = True   # a line may begin with its own level (<3>...)


@part
class Unit:
    """The systemd service that runs the tree (units.py): the same unit takes it on the target."""
    name: str                   # e.g. "web.service"
    files: dict[str, str] = field(default_factory=dict)   # its definition: fragment and drop-ins, path -> text
    enabled: bool = False       # enabled here: enabled there once it runs there, disabled here
    cgroup: str = ""            # its cgroup (ControlGroup), the same on both hosts: a container is restored there
    container: str = ""         # a Quadlet's: the podman container it runs (its main process is conmon)


@message
class Probe:
    pids: list[int] = field(default_factory=list)   # PIDs the restored tree needs
    container: Container | None = None
    bundle_marker: str = ""       # a file the source put in the bundle: seen here = shared storage
    names: list[str] = field(default_factory=list)   # more names for the container (clones): free?
    locked_files: list[str] = field(default_factory=list)   # the tree holds locks on these: locked there?
    files: list[str] = field(default_factory=list)   # a tree's restore opens these by their path: there?
    sized_files: list[str] = field(default_factory=list)   # ...and checks these ones' size: how large there?
    ports: list[Port] = field(default_factory=list)  # a tree's restore binds these again: free there?
    mount_sources: list[str] = field(default_factory=list)   # a container's restore binds these in: there?
    move_addresses: list[str] = field(default_factory=list)  # ADDR/PREFIX to move here: on which interface?
    unit: str = ""                # the systemd unit that runs the tree: how is it here (units.state)?


@message
class HostFacts:
    hostname: str
    arch: str
    kernel: str
    criu_version: list[int]
    features: dict[str, bool]     # criu check --feature NAME -> passed
    free_bytes: int               # free space where images go
    mem_available: int
    pids_taken: list[int]
    runtime_version: str = ""     # the container's runtime here ("" when not installed)
    container_exists: bool = False
    bundle: str = ""              # the bundle's path here: "absent", "shared" or "exists"
    image_present: bool = False   # podman: the container's image is here
    runtime_facts: dict[str, str] = field(default_factory=dict)   # podman: what must match
    names_taken: list[str] = field(default_factory=list)   # of Probe's names, those in use here
    addresses: list[str] = field(default_factory=list)     # the IP addresses this host has
    nonlocal_bind: bool = False   # IPv4 sockets may bind to addresses it lacks (net.ipv4.ip_nonlocal_bind)
    locks_taken: list[str] = field(default_factory=list)   # of Probe's locked_files, those locked here
    files_missing: list[str] = field(default_factory=list)   # of Probe's files, those not here
    file_sizes: dict[str, int] = field(default_factory=dict)   # of Probe's sized_files, those here: their size
    unprivileged_uffd: bool = False   # vm.unprivileged_userfaultfd: a task in a user namespace may open one
    ports_taken: list[str] = field(default_factory=list)     # of Probe's ports, those held here, each said
    mount_sources_missing: list[str] = field(default_factory=list)   # of Probe's mount_sources, those not here
    subnet_devices: dict[str, str] = field(default_factory=dict)   # Probe's move_addresses -> the interface
                                                                    # on their subnet here ("": none)
    cpus: int = 0                 # CPUs livemig may run on here (a drain places workloads by them)
    load: float = 0.0             # the load average over the last minute: how many of them are busy
    unit_state: str = ""          # Probe's unit here: "no systemd", "absent", or its ActiveState
    podman_networks: list[PodmanNetwork] = field(default_factory=list)   # the Probe's container's, as
                                                                          # defined here (those it has)
    parents_missing: list[str] = field(default_factory=list)   # of the Probe's container's own links'
                                                                # parents, the interfaces this host lacks


@message
class CpuinfoCheck:
    """Can this CPU run what the source's does? The source's cpuinfo.img comes on stream."""
    stream: str


@message
class CpuinfoResult:
    ok: bool
    message: str = ""


# --- images ------------------------------------------------------------------------------------
@message
class OpenPageServer:
    """Start `criu page-server` into image directory `dir`, fed by data stream `stream`."""
    dir: str
    stream: str
    parent: str | None = None     # the previous round's directory, for --prev-images-dir


@message
class AwaitPageServer:
    """Wait until the page server of dir has stored everything and exited."""
    dir: str


@message
class PageServerDone:
    dir: str
    bytes_in: int                 # bytes that arrived on the wire (compressed)
    bytes_out: int                # bytes handed to CRIU


@message
class StorePages:
    """Pre-copy by page hashes (pagehash.py): pages arrive on data stream `stream`, as
    postcopy's PAGES frames in one zstd stream, for the store (shadow.py)."""
    stream: str


@message
class PagesStored:
    pages: int                    # pages this round brought
    held: int                     # pages the store holds now


@message
class ReceiveFiles:
    """Files of image directory `dir` arrive on data stream `stream` (streams.send_files);
    dir is created, linked to parent, when no page server made it, in memory of its own of
    in_memory bytes where that is not 0 and the target has room (workdirs.in_memory)."""
    dir: str
    stream: str
    parent: str | None = None
    in_memory: int = 0


@message
class SendPagemaps:
    """Send back the pagemaps of image directory dir on data stream stream (with its pages
    files as empty files of the same names): a lazy final dump on the source decides what
    its parent holds from its local parent images, and without them it would serve every
    page lazily instead of only the last dirty set."""
    dir: str
    stream: str


@message
class FilesReceived:
    dir: str
    files: int
    bytes: int


@message
class DropFiles:
    """Image directory dir goes, with what is in it: the bytes of a measure of the link
    (session.measure_link), which would take room the move needs."""
    dir: str


@message
class FilesDropped:
    dir: str


@message
class ReceiveTree:
    """A directory tree (an OCI bundle) arrives on stream as a tar archive, extracted into
    path, which must not exist yet, or be the one this migration created. Before it is
    extracted, the paths listed in deleted (relative to path: what an earlier pass sent
    and is gone since) are removed, never through a link."""
    path: str
    stream: str
    deleted: list[str] = field(default_factory=list)


@message
class LoadImage:
    """podman: a `podman save` archive arrives on stream, for `podman load`."""
    stream: str


@message
class TreeReceived:
    path: str
    bytes: int


# --- restore, commit, rollback -----------------------------------------------------------------
@message
class Restore:
    dir: str
    lazy_stream: str | None = None    # post-copy: the stream to the source's lazy page server
    fault_stream: str | None = None   # post-copy: the pages faults wait for, on a connection of their own
    container: Container | None = None   # restore through this runtime (else CRIU directly)
    replica: bool = False   # a clone: the original runs on, so a replica never outlives its coordinator
    fill: bool = False      # every page lands here before the copy may run, and goes in while it
                            # runs: pre-copy by hashes' unchanged ones from the store, the rest
                            # pushed (the lazy stream is no post-copy then)
    rejoin: str | None = None   # once the copy runs, the coordinator may come back on a stream by this name
    rejoin_within: float = 0.0  # seconds it has to, after the page stream broke
    # what the tree's dump carried, which its restore must ask CRIU for too (a container's runtime
    # restores with its own configuration): without them CRIU restores the images all the same,
    # and the connections come back closed, the locks not held
    tcp_established: bool = False
    file_locks: bool = False
    carried: str = ""       # an image directory of files only the source had, placed before the restore (carried.py)
    # ADDR/PREFIX -> the interface it goes on here before the restore, announced once the copy runs
    # (service_address.py); with tcp_established, no reset leaves it until then
    move_addresses: dict[str, str] = field(default_factory=dict)
    journal_streams: list[JournalStream] = field(default_factory=list)   # given streams of this host's journal
    unit: Unit | None = None    # a Quadlet's container: restored into its unit's cgroup (units.py)


@message
class TrialRestore:
    """Before the freeze: restore image directory dir (a tree's, without its pages) in
    namespaces of its own, stopped, and throw it away (trial.py); the directory goes with it."""
    dir: str
    tcp_established: bool = False
    file_locks: bool = False
    carried: str = ""       # files only the source has, placed for the trial and taken away after it
    addresses: list[str] = field(default_factory=list)   # the tree binds these: on the trial's loopback
    sockets: list[str] = field(default_factory=list)     # the paths of the Unix sockets it binds
    journal_inodes: list[int] = field(default_factory=list)   # its streams to journald (external in the images)
    container: Container | None = None     # restored through this runtime (else CRIU directly), as the trial's


@message
class TrialRestored:
    ok: bool
    reason: str = ""        # CRIU's first error, as a sentence
    detail: str = ""        # CRIU's error lines
    seconds: float = 0.0


@message
class InstallUnit:
    """Before the freeze: the unit's definition written here where this host has no such unit
    (units.install); taken away again if the move is undone."""
    unit: Unit


@message
class AdoptUnit:
    """The copy runs, whole: its unit here takes it as its own (units.adopt). Answered by
    Adopted, whose warnings say what could not be done (the copy runs on all the same)."""
    unit: Unit


@message
class Adopted:
    warnings: list[str] = field(default_factory=list)


@message
class TakeOver:
    """A successor's first request: the dead agent's copy, its pages' images in dir, becomes
    ours; its coordinator may come back on the stream rejoin, within rejoin_within."""
    dir: str
    rejoin: str
    rejoin_within: float


@message
class RejoinPages:
    """The coordinator is back (on the rejoin stream) after the page stream broke: the copy's
    pages come on these streams now."""
    lazy_stream: str
    fault_stream: str | None = None


@message
class PagesRejoined:
    missing: list[list[int]]    # [pid, vaddr, pages]: what the copy still lacks, a span per lazy range


@message
class Restored:
    pid: int
    restore_seconds: float


@message
class Resume:
    """The source is gone: let the restored tree run, and give it what its clients sent
    while it was frozen (replay.py: base64, each an IP packet)."""
    packets: list[str] = field(default_factory=list)


@message
class Resumed:
    pids: list[int]
    given: int = 0      # of Resume's packets, those given to the copy


@message
class AwaitLazy:
    """Wait until post-copy has brought every page over."""


@message
class LazyDone:
    """Post-copy: every page has arrived; the target no longer depends on the source."""
    pages_fetched: int            # placed in the copy
    requests: int = 0             # the copy's page faults
    requests_waited: int = 0      # faults whose page had to be asked for
    pages_known: int = 0          # placed from the store of pre-copy by hashes


@message
class SettlePostcopy:
    """Post-copy failed on the source's side: end it now. A copy that has every page runs
    on; one that lacks pages is killed (before its uffds are let go, so that it never reads
    a missing page as zeros)."""


@message
class PostcopySettled:
    whole: bool          # the target's copy has every page and runs; else it is gone
    detail: str = ""
    ran: bool = False    # it ran (and, gone, is lost: the source's copy waits for the operator)


@message
class AskVerdict:
    """`livemig recover`: how did post-copy of migration migration_id end on this host?"""
    migration_id: str


@message
class Verdict:
    migration_id: str
    state: str           # "whole" (the copy runs), "killed" (it is gone, never having run),
                         # "lost" (it is gone, after it ran), "serving" (post-copy
                         # under way), "none" (no post-copy of that migration here); and, of an
                         # agent that died unheard: "abandoned" (it and its guard are gone: the
                         # detail says whether the copy is), "restarted" (the host restarted since)
    detail: str = ""


@message
class ForgetVerdict:
    """`livemig recover` acted on the verdict: it may go."""
    migration_id: str


@message
class SettleOrphan:
    """`livemig recover`, after a stop-and-copy whose coordinator vanished between the
    target's restore and its resume: the restored copy, left stopped, is the workload
    (resume: the source gave its copy up) or is not (the source's runs on: kill it)."""
    migration_id: str
    resume: bool


@message
class OrphanSettled:
    state: str           # "resumed", "killed", "running" (resumed before the coordinator
                         # vanished, and runs), "none" (nothing of that migration here), "gone"
                         # (restored, never run, and no more: a restart), "ended" (it ran, and is
                         # no more: the detail says why)
    detail: str = ""


@message
class Abort:
    """Roll back: kill whatever was restored, delete the images."""


@message
class Aborted:
    logs: str = ""       # where this host kept CRIU's logs of the failed move ("": it had none)


@message
class Finish:
    """The migration is over (moved or rolled back): delete the images, and stop."""


@message
class Done:
    pass


@message
class Failed:
    """The agent could not do what it was asked."""
    phase: str
    message: str
    detail: str = ""


def agree(oldest: int, newest: int, ours: tuple[int, int] = (PROTOCOL_OLDEST, PROTOCOL_VERSION)) -> int | None:
    """The version of the protocol to speak with a peer that speaks oldest to newest: the
    highest that both it and we (ours: oldest, newest) speak; None when there is none."""
    best = min(newest, ours[1])
    return best if best >= max(oldest, ours[0]) else None


def spoken(oldest: int = PROTOCOL_OLDEST, newest: int = PROTOCOL_VERSION) -> str:
    """A range of versions, as messages and --version say it."""
    return f"wire protocol {newest}" if oldest == newest else f"wire protocols {oldest}-{newest}"


def mismatch(hello: object, version: str) -> str:
    """The agent's answer to a Hello whose versions it does not speak (or to what is no Hello):
    both ranges, both livemig versions, and what meets the skew."""
    said = (f"the coordinator (livemig {hello.livemig_version}) speaks {spoken(hello.oldest, hello.protocol)}"
            if isinstance(hello, Hello) else f"the coordinator began with {type(hello).__name__}, not a Hello")
    return (f"protocol mismatch: {said}, this agent (livemig {version}) speaks {spoken()}: install the same "
            "livemig on both hosts, or drop --no-bootstrap (without it the target runs the coordinator's own)")


def _plain(value: Any) -> Any:
    """JSON-ready: messages nested in messages keep their "type", so they decode as themselves."""
    if dataclasses.is_dataclass(value):
        return {"type": type(value).__name__,
                **{f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _typed(obj: dict) -> Any:
    # whatever the wire says: a name that is no type's stays a plain dict; an unhashable one
    # is malformed (TypeError, which decode() reports)
    name: Any = obj.get("type")
    cls = _TYPES.get(name) or _PARTS.get(name)
    if cls is None:
        return obj
    del obj["type"]
    if name in _OPEN:
        known = {f.name for f in dataclasses.fields(cls)}
        obj = {k: v for k, v in obj.items() if k in known}
    return cls(**obj)


def encode(msg: Any) -> bytes:
    if type(msg).__name__ not in _TYPES:
        raise ProtocolError(f"not a protocol message: {msg!r}")
    body = json.dumps(_plain(msg)).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"message too large: {len(body)} bytes")
    return _LEN.pack(len(body)) + body


def decode(body: bytes) -> Any:
    try:
        msg = json.loads(body, object_hook=_typed)
        if type(msg).__name__ not in _TYPES:
            raise KeyError("type")
        return msg
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        # RecursionError: nested deeper than the decoder goes (a peer's doing, never ours)
        raise ProtocolError(f"malformed message: {e}: {body[:200]!r}") from None


async def read_message(reader: Reader) -> Any:
    try:
        (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
        if size > MAX_FRAME:
            raise ProtocolError(f"frame of {size} bytes exceeds the limit of {MAX_FRAME}")
        return decode(await reader.readexactly(size))
    except asyncio.IncompleteReadError:
        raise EOFError("the peer closed the connection") from None


async def write_message(writer: Writer, msg: Any) -> None:
    writer.write(encode(msg))
    await writer.drain()


class Channel:
    """Request/response over one framed stream: one request in flight at a time."""

    def __init__(self, reader: Reader, writer: Writer):
        self.reader, self.writer = reader, writer
        self._lock = asyncio.Lock()
        self._owed = 0

    async def request(self, msg: Any, reply_type: type[_T]) -> _T:
        async with self._lock:
            # Sent before the replies still owed are read: a rollback's Abort must reach the
            # peer while it still works on a request whose caller was cancelled (the agent
            # cuts that one short), not after it.
            self._owed += 1     # from here on the peer owes a reply, whatever becomes of us
            await write_message(self.writer, msg)
            while self._owed > 1:   # replies to requests whose callers were cancelled: not ours
                await read_message(self.reader)
                self._owed -= 1
            reply = await read_message(self.reader)
            self._owed -= 1
        if isinstance(reply, Failed):
            raise RemoteFailure(reply)
        if not isinstance(reply, reply_type):
            raise ProtocolError(f"expected {reply_type.__name__} in reply to {type(msg).__name__}, "
                                f"got {type(reply).__name__}")
        return reply


class RemoteFailure(LivemigError):
    """The agent answered Failed: what it could not do, in the phase it names (None if it
    named none). The source turns it into the error class of that phase, with the host
    (source/session.remote_error); until then, failed is the agent's answer as it came."""

    def __init__(self, failed: Failed):
        super().__init__(failed.message, phase=failed.phase or None, detail=failed.detail or None)
        self.failed = failed

    def __str__(self) -> str:
        # the agent's words alone, as before it was a LivemigError: callers quote them inside
        # messages of their own, which say the phase and the host themselves
        return self.message
