"""Reading what CRIU leaves behind, and the command lines livemig gives it."""

import os
import struct

import pytest

from livemig import criu
from livemig.runtimes import process


def test_a_real_stats_dump_reads_as_crit_shows_it():
    # written by criu 4.2.1 in the lab; `crit show` printed the values asserted below
    data = bytes.fromhex("4059105506330957290000000a2708b70110ff880418dff70220c5cb02289f9001300038"
                         "b58f0140004800500858086000680070 00".replace(" ", ""))
    st = criu.parse_stats(data)
    assert st == criu.DumpStats(freezing_time=183e-6, frozen_time=66687e-6, memdump_time=48095e-6,
                                memwrite_time=42437e-6, pages_scanned=18463, pages_skipped_parent=0,
                                pages_written=18357, pages_lazy=0)


def test_restore_stats():
    body = bytes([0x08, 0x00, 0x10, 0x00, 0x18, 0x64, 0x20, 0xE8, 0x07, 0x28, 0x05])  # 1..5
    entry = bytes([0x12, len(body)]) + body
    data = bytes.fromhex("4059105506330957") + len(entry).to_bytes(4, "little") + entry
    assert criu.parse_stats(data) == criu.RestoreStats(forking_time=100e-6, restore_time=1000e-6, pages_restored=5)


@pytest.mark.parametrize("data", [b"", b"garbage!" * 3, bytes.fromhex("4059105506330957ff000000")])
def test_not_a_stats_image(data):
    with pytest.raises(ValueError):
        criu.parse_stats(data)


def test_version():
    assert criu.parse_version("Version: 4.2.1\n") == (4, 2, 1)
    assert criu.parse_version("Version: 4.2\nGitID: v4.2") == (4, 2)
    with pytest.raises(ValueError):
        criu.parse_version("criu: command not found")


def test_log_errors_puts_the_cause_first_and_drops_the_noise():
    log = """(00.1) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted
(00.2) 4300: Error (criu/sk-inet.c:1059): inet: Can't bind inet socket (id 18): Address already in use
(00.3) 4300: Error (criu/files.c:1221): Unable to open fd=3 id=0x12
(00.4) Error (criu/cr-restore.c:1269): 4300 killed by signal 9: Killed
(00.5) Error (criu/cr-restore.c:2331): Restoring FAILED."""
    errors = criu.log_errors(log)
    assert len(errors) == 2 and "Address already in use" in errors[0]


def test_the_final_dump_is_held_by_the_hook_and_lazy_leaves_the_source_stopped():
    plain = criu.dump(42, "/d", ps_fd=7, hook="/h", parent=None, lazy=False, opts=criu.Options())
    assert plain[:5] == ["criu", "dump", "-t", "42", "-D"]
    assert "--page-server" in plain and "--action-script" in plain and "--leave-stopped" not in plain
    lazy = criu.dump(42, "/d", ps_fd=7, hook="/h", parent="../pre-2", lazy=True,
                     opts=criu.Options(tcp_established=True))
    # --page-server with --lazy-pages would make CRIU close the socket before serving
    assert "--page-server" not in lazy and {"--lazy-pages", "--leave-stopped", "--tcp-established"} <= set(lazy)
    assert lazy[lazy.index("--prev-images-dir") + 1] == "../pre-2" and "--track-mem" in lazy


def test_a_tree_with_nothing_to_lock_is_not_locked_by_nftables_while_it_is_frozen():
    args = {"ps_fd": 7, "hook": "/h", "parent": None, "lazy": True}
    alone = criu.dump(42, "/d", opts=criu.Options(), nothing_to_lock=True, **args)
    assert alone[alone.index("--network-lock") + 1] == "iptables"
    # its own namespace, or connections CRIU must lock: the configured method stays
    assert "--network-lock" not in criu.dump(42, "/d", opts=criu.Options(), **args)
    assert "--network-lock" not in criu.dump(42, "/d", opts=criu.Options(tcp_established=True),
                                             nothing_to_lock=True, **args)


def test_connections_not_asked_to_move_are_closed_by_the_dump_and_its_restore_alike():
    args = {"ps_fd": 7, "hook": "/h", "parent": None, "lazy": False}
    # a client that connected just as the workload froze must not fail the move
    assert "--tcp-close" in criu.dump(42, "/d", opts=criu.Options(), **args)
    assert "--tcp-close" in criu.restore("/d", "/d/pid", lazy=False, opts=criu.Options())
    moved = criu.Options(tcp_established=True)
    assert "--tcp-close" not in criu.dump(42, "/d", opts=moved, **args)
    assert "--tcp-close" not in criu.restore("/d", "/d/pid", lazy=False, opts=moved)


def test_restore_is_detached_and_stopped():
    argv = criu.restore("/d", "/d/pid", lazy=True, opts=criu.Options())
    assert {"--restore-detached", "--leave-stopped", "--lazy-pages"} <= set(argv)


def test_the_line_that_says_why_a_command_failed_skips_the_warnings_around_it():
    from livemig.proc import why
    err = (b'time="2026" level=warning msg="Using cgroups-v1 which is deprecated"\n'
           b'[conmon:e]: Failed to fork the create command Resource temporarily unavailable\n'
           b'Error: conmon failed: exit status 1\n')
    assert why(err) == "Error: conmon failed: exit status 1"
    assert why(b"criu: no such file\n\n") == "criu: no such file"
    assert why(b"") == "no error output"


def test_a_container_s_final_dump_skips_in_flight_connections_and_closes_the_rest_by_its_config():
    assert criu.connections_config(criu.Options()) == "skip-in-flight\ntcp-close\n"
    assert criu.connections_config(criu.Options(tcp_established=True)) == "skip-in-flight\n"
    assert criu.restored_config(criu.Options()).splitlines() == ["leave-stopped", "tcp-close"]
    # established connections moving, the restore takes them as they are
    assert criu.restored_config(criu.Options(tcp_established=True, file_locks=True)).splitlines() == [
        "leave-stopped", "file-locks"]


def _varint(n: int) -> bytes:
    out = b""
    while True:
        out += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
        n >>= 7
        if not n:
            return out


def _core(task_state: int | None) -> bytes:
    """A core-PID.img as CRIU writes it: magics, then one CoreEntry (mtype 1, tc 3 with its
    task_state 1; a thread's core has no tc)."""
    entry = b"\x08" + _varint(1)          # mtype = 1 (x86-64)
    if task_state is not None:
        tc = b"\x08" + _varint(task_state) + b"\x10" + _varint(0)       # task_state, exit_code
        entry += b"\x1a" + _varint(len(tc)) + tc
    return struct.pack("<III", 0x54564319, 0x55053847, len(entry)) + entry


def test_the_tasks_a_dump_found_stopped_are_read_from_its_core_images(tmp_path):
    # alive (1), stopped (3), a zombie (2, CRIU's TASK_DEAD), a thread's core (no tc)
    for pid, state in ((3001, 1), (3002, 3), (3003, 3), (3006, 2), (3005, None)):
        (tmp_path / f"core-{pid}.img").write_bytes(_core(state))
    assert criu.parse_task_state(_core(3)) == 3 and criu.parse_task_state(_core(None)) is None
    assert criu.stopped_tasks(tmp_path) == {3002, 3003}
    with pytest.raises(ValueError):
        criu.parse_task_state(b"not a core image")
    # a zombie's core as criu 4.2.1 wrote it in the lab (exit code 7, "python3")
    zombie = bytes.fromhex("19435654473805551800000008011a14080210800e1800200028003207707974686f6e33")
    assert criu.parse_task_state(zombie) == 2


def test_the_run_a_dump_was_names_its_network_lock():
    run_id = b"3e90675a-3cc5-4fba-92aa-0123456789ab"
    entry = bytes([0x08, 0x02]) + bytes([13 << 3 | 2, len(run_id)]) + run_id      # img_version, dump_criu_run_id
    image = struct.pack("<II", 0x58313116, len(entry)) + entry      # as CRIU 4.2.1 writes it: one magic
    assert criu.parse_run_id(image) == run_id.decode()
    bare = struct.pack("<II", 0x58313116, 2) + bytes([0x08, 0x02])
    assert criu.parse_run_id(bare) is None
    with pytest.raises(ValueError):
        criu.parse_run_id(b"\0" * 16)


async def test_a_host_without_nft_is_told_not_failed(tmp_path, monkeypatch):
    # a rollback goes on without nft (a Debian host with CRIU's library and no nft command):
    # the table, if any, is said to stay, never a failure of the rollback itself
    run_id = b"3e90675a-3cc5-4fba-92aa-0123456789ab"
    entry = bytes([13 << 3 | 2, len(run_id)]) + run_id
    (tmp_path / "inventory.img").write_bytes(struct.pack("<II", 0x58313116, len(entry)) + entry)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert "nft" in (await process.unlock_network(tmp_path) or "")
    assert await process.unlock_after_lazy([os.getpid()], tmp_path) == []    # no connection taken: nothing asked
