"""A workload systemd runs (livemig/units.py) and the Unix sockets that say where a tree's
streams go (livemig/unixsockets.py): the logic, on real sockets and processes where it reads
them. The hand-over itself, with systemd, is proven in the lab (tests/test_units.py)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import tarfile
import time

import pytest

from livemig import journal, units, unixsockets
from livemig.errors import LivemigError, PreflightError
from livemig.runtimes import podman
from livemig.wire.protocol import JournalStream, Unit


def _child_holding(sk: socket.socket) -> int:
    """A child process that holds sk (and nothing else of ours) until killed."""
    pid = os.fork()
    if pid == 0:
        try:
            os.closerange(3, sk.fileno())
            os.closerange(sk.fileno() + 1, 1024)
            time.sleep(60)
        finally:
            os._exit(0)
    while len(os.listdir(f"/proc/{pid}/fd")) > 4:     # until it holds sk alone (and 0, 1, 2)
        time.sleep(0.005)
    return pid


@pytest.fixture
def reaped():
    pids: list[int] = []
    yield pids
    for pid in pids:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


class Connected:
    """A listener at path, and a child process holding the one stream connected to it (and
    nothing else of ours); the listener's end of it stays open here, as a server's would."""

    def __init__(self, path: str, reaped: list[int]):
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)
        self.served, _ = self.listener.accept()
        self.inode = os.fstat(client.fileno()).st_ino
        reaped.append(child := _child_holding(client))
        client.close()
        self.child = child

    def close(self) -> None:
        self.served.close()
        self.listener.close()


def test_a_stream_whose_other_end_is_outside_the_tree_is_found_with_its_peer_s_name(tmp_path, reaped):
    path = str(tmp_path / "listener")
    c = Connected(path, reaped)
    inner_a, inner_b = socket.socketpair()      # both ends here: not outward from here
    [(mine, theirs)] = unixsockets.outward([c.child])
    assert mine.inode == c.inode and theirs.name == path
    assert theirs.inode == os.fstat(c.served.fileno()).st_ino and mine.peer == theirs.inode
    # the server's side, seen from here: the child holds its other end
    assert [t.inode for _, t in unixsockets.outward([os.getpid()]) if t.inode == c.inode] == [c.inode]
    for sk in (inner_a, inner_b, c):
        sk.close()


def test_journal_streams_are_carried_said_as_systemd_says_them_and_any_other_stream_is_refused(
        tmp_path, reaped, monkeypatch):
    monkeypatch.setattr(journal, "JOURNAL_STDOUT", str(tmp_path / "stdout"))
    journald = Connected(journal.JOURNAL_STDOUT, reaped)
    [stream] = asyncio.run(journal.streams([journald.child], None))
    assert stream == JournalStream(journald.inode, _argv0(journald.child), "", 30, True)
    assert journal.dump_flags([stream]) == [f"--external=unix[{journald.inode}]"]
    db = Connected(str(tmp_path / "db.sock"), reaped)
    with pytest.raises(PreflightError, match=f"Unix stream connection to {tmp_path}/db.sock"):
        asyncio.run(journal.streams([db.child], None))
    db.close()
    journald.close()


def _argv0(pid: int) -> str:
    return os.path.basename(open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[0].decode())


def test_the_target_s_journal_stream_opens_with_systemd_s_header_and_replaces_the_source_s(tmp_path, monkeypatch):
    path = str(tmp_path / "stdout")
    monkeypatch.setattr(journal, "JOURNAL_STDOUT", path)
    streams = [JournalStream(4242, "ticker", "tick.service", journal._priority({"SyslogLevel": "notice"}), False)]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen()
        [sk] = journal.opened(streams)
        try:
            served, _ = listener.accept()
            with served:
                assert served.recv(100) == b"ticker\ntick.service\n29\n0\n0\n0\n0\n"     # daemon.notice
            assert journal.restore_flags(streams, [sk]) == [f"--inherit-fd=fd[{sk.fileno()}]:socket:[4242]"]
        finally:
            sk.close()
    with pytest.raises(LivemigError, match="cannot open a stream to this host's journal"):
        journal.opened(streams)      # no journal listens there now


def test_priority_is_facility_and_level_as_syslog_has_them():
    assert journal._priority({}) == 30                                              # daemon.info
    assert journal._priority({"SyslogFacility": "local3", "SyslogLevel": "err"}) == (19 << 3) | 3
    assert journal._priority({"SyslogFacility": "nonsense", "SyslogLevel": "nonsense"}) == 30


@pytest.mark.parametrize("cgroup, who", [
    ("0::/kubepods.slice/kubepods-besteffort.slice/cri-containerd-1.scope", "Kubernetes (the kubelet)"),
    ("0::/system.slice/docker-0123456789abcdef.scope", "docker"),
    ("4:memory:/docker/0123456789abcdef\n0::/", "docker"),
    ("0::/system.slice/crio-0123456789abcdef.scope", "CRI-O"),
    ("0::/kubepods/besteffort/pod1/0123456789abcdef", "Kubernetes (the kubelet)"),
    ("0::/system.slice/containerd.service", "containerd"),
    ("0::/system.slice/memc.service", None),
    ("0::/user.slice/user-0.slice/session-3.scope", None),
    ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/web.service",
     "the systemd of user 1000 (systemctl --user)"),
    ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-term-1.scope", None),
    ("0::/user.slice/user-1000.slice/user@1000.service/init.scope", None),
    ("0::/system.slice/my-dockerish-app.service", None),
    ("0::/dockerfile-builder", None),
    ("0::/system.slice/docker-compose-web.service", None),
])
def test_another_supervisor_is_named_from_the_cgroups(cgroup, who):
    found = units.foreign(cgroup)
    assert (found[0] if found else None) == who


@pytest.mark.parametrize("name, ok", [
    ("memc.service", True), ("getty@tty1.service", True), (r"a\x2db.service", True),
    ("../etc.service", False), ("memc.socket", False), ("memc", False), ("/etc/memc.service", False),
    ("", False), ("-x.service", True),
])
def test_only_a_service_s_plain_name_goes_into_paths_and_argv(name, ok):
    if ok:
        assert units.checked(name) == name
    else:
        with pytest.raises(LivemigError, match="not a service's plain name"):
            units.checked(name)


def test_a_definition_is_written_only_under_systemd_s_directories_and_never_over_a_file(tmp_path, monkeypatch):
    reloads = []

    async def absent(name: str) -> str:
        return "absent"

    async def reload(phase: str) -> None:
        reloads.append(phase)
    monkeypatch.setattr(units, "state", absent)
    monkeypatch.setattr(units, "_reload", reload)
    systemd_dir = f"{tmp_path}/systemd/system/"
    monkeypatch.setattr(units, "_DEFINITIONS", (systemd_dir,))
    unit = Unit("memc.service", {f"{systemd_dir}memc.service": "[Service]\nExecStart=/bin/true\n",
                                 f"{systemd_dir}memc.service.d/10-env.conf": "[Service]\nEnvironment=A=1\n"})
    written = asyncio.run(units.install(unit))
    assert (tmp_path / "systemd/system/memc.service.d/10-env.conf").read_text() == "[Service]\nEnvironment=A=1\n"
    assert oct((tmp_path / "systemd/system/memc.service").stat().st_mode & 0o777) == "0o644"
    asyncio.run(units.uninstall(written))
    assert not (tmp_path / "systemd").exists() and reloads == ["restore", "rollback"]

    for bad in ("/etc/passwd", f"{systemd_dir}../../x.service"):
        with pytest.raises(LivemigError, match="not one to write"):
            asyncio.run(units.install(Unit("memc.service", {bad: "x"})))
    (tmp_path / "systemd/system").mkdir(parents=True)
    (tmp_path / "systemd/system/memc.service").write_text("theirs")
    with pytest.raises(LivemigError, match="cannot write memc.service's definition"):
        asyncio.run(units.install(Unit("memc.service", {f"{systemd_dir}memc.service": "ours"})))
    assert (tmp_path / "systemd/system/memc.service").read_text() == "theirs"


def test_a_checkpoint_archive_loses_its_cgroup_parent_in_place_the_rest_untouched(tmp_path):
    archive = tmp_path / podman.ARCHIVE
    config = {"cgroupParent": "/libpod_parent", "cgroupsMode": "split", "name": "web1"}
    pages = os.urandom(10000)
    with tarfile.open(archive, "w") as tar:
        for name, data in (("config.dump", json.dumps(config, indent=1).encode()), ("checkpoint/pages-1.img", pages)):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    size = archive.stat().st_size
    podman.without_cgroup_parent(archive)
    assert archive.stat().st_size == size
    with tarfile.open(archive) as tar:
        assert json.loads(tar.extractfile("config.dump").read()) == {**config, "cgroupParent": ""}
        assert tar.extractfile("checkpoint/pages-1.img").read() == pages
    podman.without_cgroup_parent(archive)       # none left: nothing to do
