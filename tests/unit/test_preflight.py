"""The preflight comparisons: each check fails for its own reason, in the order to fix them."""

import asyncio
import fcntl
import mmap
import os
import subprocess
import sys

import pytest

from livemig import host
from livemig.addresses import Bound
from livemig.errors import PreflightError
from livemig.source import preflight as checks
from livemig.source.preflight import compare
from livemig.wire.protocol import HostFacts


def facts(**kw) -> HostFacts:
    base = {"hostname": "h", "arch": "x86_64", "kernel": "6.12", "criu_version": [4, 2, 1],
                "features": {"mem_dirty_track": True, "uffd-noncoop": True}, "free_bytes": 10 << 30,
                "mem_available": 10 << 30, "pids_taken": []}
    return HostFacts(**{**base, **kw})


def failed(rows):
    return [r.name for r in rows if not r.ok]


def test_matching_hosts_pass_everything_and_pick_hybrid():
    rows, mode, _why = compare(facts(), facts(), "auto", pids=[42], need_bytes=1 << 30)
    assert failed(rows) == [] and mode == "hybrid"


def test_each_failure_is_its_own_row():
    rows, _, _ = compare(facts(), facts(criu_version=[4, 1], arch="aarch64", pids_taken=[42],
                                        free_bytes=1 << 20, mem_available=1 << 20),
                         "auto", pids=[42], need_bytes=1 << 30)
    assert failed(rows) == ["criu versions", "architecture", "PIDs free on target", "room for images", "memory"]
    pid_row = next(r for r in rows if r.name == "PIDs free on target")
    assert pid_row.detail == "PIDs 42 are in use" and "container" in pid_row.hint


def test_no_criu_on_the_target_says_so_first():
    rows, _, _ = compare(facts(), facts(criu_version=[], features={}), "auto")
    assert failed(rows)[0] == "criu on target"


def test_an_unsupported_strategy_fails_and_blames_no_target():
    rows, mode, _ = compare(facts(features={"mem_dirty_track": False, "uffd-noncoop": True}), facts(), "hybrid")
    [row] = [r for r in rows if not r.ok]
    assert row.name == "strategy" and not row.on_target and mode == ""


def test_a_container_adds_its_runtime_name_and_bundle_checks_and_no_pid_check():
    from livemig.wire.protocol import Container
    c = Container("runc", "web1", "/var/lib/ctr/web1")
    rows, mode, _ = compare(facts(), facts(runtime_version="1.1.15", bundle="absent"), "auto",
                            pids=[42], container=c)
    assert failed(rows) == [] and mode == "hybrid" and "PIDs free on target" not in [r.name for r in rows]
    rows, _, _ = compare(facts(), facts(runtime_version="", container_exists=True, bundle="exists"), "auto",
                         pids=[42], container=c)
    assert failed(rows) == ["runc on target", "container name free on target", "bundle on target"]
    rows, _, _ = compare(facts(), facts(runtime_version="1.21", bundle="shared"), "auto", container=c)
    assert "shared storage" in next(r.detail for r in rows if r.name == "bundle on target")


def test_crun_gets_no_lazy_strategy():
    from livemig.wire.protocol import Container
    c = Container("crun", "db1", "/b")
    rows, mode, why = compare(facts(), facts(runtime_version="1.21", bundle="absent"), "auto", container=c)
    assert (mode, why) == ("precopy", "crun cannot serve pages lazily")
    rows, mode, _ = compare(facts(), facts(runtime_version="1.21", bundle="absent"), "postcopy", container=c)
    assert mode == "" and "crun" in next(r.detail for r in rows if r.name == "strategy")


def test_podman_must_match_facts_and_the_kernel_fail_but_force_makes_them_warnings():
    import pytest

    from livemig.errors import PreflightError
    from livemig.source.preflight import enforce
    from livemig.wire.protocol import Container
    c = Container("podman", "web1", "", image="localhost/x:1")
    same = {"podman": "5.4.2", "OCI runtime": "crun", "network stack": "netavark", "cgroups": "v1"}
    rows, _, _ = compare(facts(runtime_facts=same), facts(runtime_version="5.4.2", runtime_facts=same,
                                                           image_present=True), "auto", container=c)
    assert failed(rows) == [] and enforce(rows, "b") == []
    there = {**same, "podman": "5.2.0", "network stack": "cni"}
    rows, _, _ = compare(facts(runtime_facts=same), facts(kernel="6.1", runtime_version="5.2.0",
                                                           runtime_facts=there), "auto", container=c)
    assert failed(rows) == ["same kernel", "same podman", "same network stack"]
    with pytest.raises(PreflightError) as e:
        enforce(rows, "b")
    assert str(e.value) == ("on b: same kernel: target 6.1, source 6.12 (the seeds' container migration "
                            "wants the same kernel on both hosts; or --force to go on)")
    warnings = enforce(rows, "b", force=True)
    assert [w.split(":")[1].strip() for w in warnings] == ["same kernel", "same podman", "same network stack"]


def test_force_never_passes_what_fails_after_the_commit():
    import pytest

    from livemig.errors import PreflightError
    from livemig.source.preflight import Check, enforce
    with pytest.raises(PreflightError, match="lacks"):
        enforce([Check("CPU features", False, "the target's CPU lacks features")], "b", force=True)
    rows, _, _ = compare(facts(), facts(arch="aarch64"), "auto")
    with pytest.raises(PreflightError, match="aarch64"):
        enforce(rows, "b", force=True)


def test_every_name_taken_on_the_target_is_named():
    from livemig.wire.protocol import Container
    c = Container("podman", "web1-clone-1", "", image="x")
    rows, _, _ = compare(facts(), facts(runtime_version="5.4.2", names_taken=["web1-clone-1", "web1-clone-3"]),
                         "stopcopy", container=c)
    row = next(r for r in rows if r.name == "container name free on target")
    assert not row.ok and row.detail == "podman there already has a container web1-clone-1, web1-clone-3"


def test_pre_copy_by_hashes_needs_the_memory_twice_on_the_target_and_auto_falls_back_without_it():
    src = facts(features={"mem_dirty_track": False, "uffd-noncoop": True})
    roomy = facts(features={"uffd-noncoop": True}, mem_available=3 << 30)
    tight = facts(features={"uffd-noncoop": True}, mem_available=(3 << 30) // 2)
    rows, mode, _ = compare(src, roomy, "auto", need_bytes=1 << 30)
    assert mode == "precopy" and "2048 MiB needed" in next(r for r in rows if r.name == "memory").detail
    rows, mode, why = compare(src, tight, "auto", need_bytes=1 << 30)
    assert mode == "stopcopy" and "twice over" in why and failed(rows) == []
    rows, mode, _ = compare(src, tight, "precopy", need_bytes=1 << 30)
    assert mode == "precopy" and failed(rows) == ["memory"]


def test_sockets_bound_to_an_address_the_target_lacks_fail_before_anything_is_touched():
    held = [Bound("198.18.0.1", 7000), Bound("fd00::1", 53)]
    rows, _, _ = compare(facts(), facts(addresses=["127.0.0.1", "198.18.0.2"]), "auto", pids=[42], held=held)
    row = next(r for r in rows if r.name == "addresses on target")
    assert failed(rows) == ["addresses on target"]
    assert row.detail == "the workload listens on 198.18.0.1:7000, [fd00::1]:53, which the target does not have"
    assert "0.0.0.0" in row.hint and not row.forceable
    rows, _, _ = compare(facts(), facts(addresses=["198.18.0.1", "fd00::1"]), "auto", pids=[42], held=held)
    assert failed(rows) == []
    # wildcard and loopback sockets are never held (addresses.held): no row at all
    rows, _, _ = compare(facts(), facts(), "auto", pids=[42], held=[])
    assert "addresses on target" not in [r.name for r in rows]


def test_a_socket_set_to_bind_anywhere_binds_where_criu_can_bind_it():
    # IPv6: CRIU binds every IPv6 socket with IP_FREEBIND set, so a freebind one binds anywhere
    v6, v4 = Bound("fd00::99", 53, freebind=True), Bound("198.19.99.99", 7001, freebind=True)
    rows, _, _ = compare(facts(), facts(addresses=["198.18.0.2"]), "auto", pids=[42], held=[v6])
    assert failed(rows) == []
    # IPv4: CRIU binds before it sets IP_FREEBIND again, so only ip_nonlocal_bind lets it
    rows, _, _ = compare(facts(), facts(addresses=["198.18.0.2"]), "auto", pids=[42], held=[v4, v6])
    row = next(r for r in rows if r.name == "addresses on target")
    assert failed(rows) == ["addresses on target"]
    assert row.detail == ("the workload listens on 198.19.99.99:7001, which the target does not have "
                          "(198.19.99.99:7001 set to bind anywhere (IP_FREEBIND), but CRIU binds an IPv4 "
                          "socket before it sets that again)")
    assert "net.ipv4.ip_nonlocal_bind=1" in row.hint
    rows, _, _ = compare(facts(), facts(addresses=["198.18.0.2"], nonlocal_bind=True), "auto", pids=[42],
                         held=[v4, v6])
    assert failed(rows) == []


def test_a_move_says_before_anything_is_touched_which_connections_its_copy_closes():
    one = checks.connections_closed([("127.0.0.1", 7870, "127.0.0.1", 40000)])
    assert one.startswith("the workload holds 1 established TCP connection (127.0.0.1:7870 with 127.0.0.1:40000)")
    assert "closed" in one and "connect again" in one
    many = checks.connections_closed([("198.18.0.1", 80, f"198.18.0.{i}", 5000 + i) for i in range(2, 7)]
                                     + [("::1", 443, "::1", 6000)])
    assert "6 established TCP connections (198.18.0.1:80 with 198.18.0.2:5002, 198.18.0.1:80 with 198.18.0.3:5003" in many
    assert "and 3 more" in many


HOLDS = "import fcntl, sys, time; f = open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_EX); print(1, flush=True); time.sleep(60)"


def test_a_lock_the_tree_holds_is_found_and_so_is_one_taken_where_it_would_be_restored(tmp_path):
    path = tmp_path / "locked"
    path.write_text("")
    free = tmp_path / "free"
    free.write_text("")
    holder = subprocess.Popen([sys.executable, "-c", HOLDS, str(path)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"1\n"
        assert host.locked_files([holder.pid]) == [str(path)]
        # seen from a host where the same file is locked (storage both share): the restore would wait
        assert host.locked_here(str(path)) and not host.locked_here(str(free))
        assert not host.locked_here(str(tmp_path / "absent"))
    finally:
        holder.kill()
        holder.wait()
    assert not host.locked_here(str(path))
    rows, _, _ = compare(facts(), facts(locks_taken=[str(path)]), "auto", pids=[42])
    row = next(r for r in rows if r.name == "locked files free on target")
    assert failed(rows) == ["locked files free on target"] and str(path) in row.detail and "for ever" in row.detail


def test_a_criu_older_than_livemig_works_with_is_refused_on_either_host_saying_why():
    rows, _, _ = compare(facts(criu_version=[3, 17]), facts(), "auto")
    [here] = [r for r in rows if r.name == "criu here"]
    assert not here.ok and not here.on_target and "vDSO" in here.hint and "4.0 or newer" in here.hint
    rows, _, _ = compare(facts(), facts(criu_version=[3, 17]), "auto")
    [there] = [r for r in rows if r.name == "criu on target"]
    assert not there.ok and there.on_target and "3.17" in there.detail
    rows, _, _ = compare(facts(criu_version=[4, 0]), facts(criu_version=[4, 0]), "auto")
    assert all(r.ok for r in rows if r.name.startswith("criu"))


def test_files_the_target_lacks_refuse_the_move_naming_them():
    missing = [f"/var/log/app-{i}.log" for i in range(7)]
    rows, _, _ = compare(facts(), facts(files_missing=missing), "auto")
    [row] = [r for r in rows if r.name == "files on target"]
    assert not row.ok and row.on_target and not row.forceable
    assert "/var/log/app-0.log" in row.detail and "and 2 more" in row.detail and "after the freeze" in row.detail
    rows, _, _ = compare(facts(), facts(), "auto")
    assert not [r for r in rows if r.name == "files on target"]


def test_a_host_without_criu_is_probed_and_says_criu_none(tmp_path, monkeypatch):
    # no criu on PATH: the probe reports no version (the row says "CRIU none"), never a crash
    monkeypatch.setenv("PATH", str(tmp_path))
    facts = asyncio.run(host.probe([], str(tmp_path)))
    assert facts.criu_version == [] and not any(facts.features.values())
    [row] = [r for r in compare(facts, facts, "auto")[0] if r.name == "criu here"]
    assert not row.ok and row.detail == "CRIU none", row


def test_ports_the_target_holds_and_mount_sources_it_lacks_refuse_the_move_naming_them():
    rows, _, _ = compare(facts(), facts(ports_taken=["7890/tcp on 0.0.0.0 held by nc (PID 12)"],
                                        mount_sources_missing=["/srv/only-a"]), "auto", pids=[42])
    assert failed(rows) == ["ports free on target", "mount sources on target"]
    ports, mounts = (r for r in rows if not r.ok)
    assert "7890/tcp on 0.0.0.0 held by nc (PID 12)" in ports.detail and not ports.forceable
    assert "/srv/only-a" in mounts.detail and not mounts.forceable
    with pytest.raises(PreflightError, match="7890/tcp"):     # --force passes neither: each fails the restore
        checks.enforce(rows, "b", force=True)


def test_the_files_whose_size_criu_checks_are_those_it_opens_again_but_a_log_appended_to(tmp_path):
    read, log, mapped = tmp_path / "read.dat", tmp_path / "app.log", tmp_path / "mapped.dat"
    for f, size in ((read, 10), (log, 20), (mapped, 4096)):
        f.write_bytes(b"x" * size)
    with open(read, "rb"), open(log, "a"), open(mapped, "r+b") as m, mmap.mmap(m.fileno(), 4096):
        m.close()       # held by its mapping alone
        reopened = host.reopened_files([os.getpid()])
    assert reopened[str(read)] == 10 and reopened[str(mapped)] == 4096
    assert reopened[str(log)] is None   # write-only, appending: CRIU does not check a log's size


def test_a_file_the_target_has_at_another_size_fails_the_preflight_unless_it_changes_here(tmp_path):
    same, other, growing = tmp_path / "same", tmp_path / "other", tmp_path / "growing"
    for f in (same, other, growing):
        f.write_bytes(b"x" * 10)
    here = {str(same): 10, str(other): 10, str(growing): 8}     # growing: 8 when first read, 10 now
    there = {str(same): 10, str(other): 12, str(growing): 10}
    [row] = checks.resized_rows(here, there)
    assert not row.ok and f"{other}: 10 bytes here, 12 there" in row.detail
    assert str(same) not in row.detail and str(growing) not in row.detail
    assert checks.resized_rows(here, {str(same): 10}) == []


@pytest.mark.parametrize("made, said", [("libc.syscall(323, os.O_CLOEXEC | 1)", "a userfaultfd"),
                                        ("libc.syscall(425, 4, ctypes.create_string_buffer(120))",
                                         "an io_uring instance")])
def test_a_tree_holding_what_criu_cannot_dump_is_refused_naming_it(made, said):
    script = f"import ctypes, os, sys; libc = ctypes.CDLL(None, use_errno=True); fd = {made}; print(fd, flush=True); " \
             "sys.stdin.read()"
    holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        fd = int(holder.stdout.readline())
        assert fd > 2
        with pytest.raises(PreflightError, match=rf"PID {holder.pid} holds {said} \(fd {fd}\), which CRIU cannot"):
            checks.refuse_undumpable_handles([holder.pid])
        checks.refuse_undumpable_handles([os.getpid()])      # this test holds none
    finally:
        holder.kill()
        holder.wait()


def test_a_tree_mapping_a_memfd_sealed_against_writes_is_refused_and_one_sealed_otherwise_is_not():
    script = ("import fcntl, mmap, os, sys; fd = os.memfd_create('held', os.MFD_ALLOW_SEALING); "
              "os.ftruncate(fd, 8192); fcntl.fcntl(fd, fcntl.F_ADD_SEALS, int(sys.argv[1])); "
              "m = mmap.mmap(fd, 8192, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ); print(1, flush=True); "
              "sys.stdin.read()")
    for seals, refused in ((fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW, True), (fcntl.F_SEAL_GROW, False)):
        holder = subprocess.Popen([sys.executable, "-c", script, str(seals)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline() == "1\n"
            if refused:
                with pytest.raises(PreflightError, match=rf"PID {holder.pid} maps a memfd sealed against writes "
                                                         r"\(/memfd:held\), which CRIU's restore"):
                    checks.refuse_undumpable_handles([holder.pid])
            else:
                checks.refuse_undumpable_handles([holder.pid])
        finally:
            holder.kill()
            holder.wait()
