"""Pre-copy by userfaultfd write-protection (livemig/pages/wptrack.py) in the namespaced lab,
whose kernel has no soft-dirty: real CRIU and real processes that fork, map, unmap and drop
pages while their writes are tracked, every page verified on the target.

The link is capped in each test so that pre-copy's rounds last seconds, whatever this
machine's speed: the forks and remaps happen during them by construction (at zstd level 1, the
pages at half their size: capped, a move would choose a level that sends far less)."""

from __future__ import annotations

import json

import pytest

from tests.waiting import eventually

pytestmark = pytest.mark.lab


def move(lab, pid: int, *args: str) -> dict:
    res = lab.run("a", ["livemig", "move", "--pid", str(pid), "--json", *args, "b"], check=False, timeout=600)
    assert res.returncode == 0, res.stderr.decode()
    return json.loads(res.stdout)


def assert_watched(report: dict) -> None:
    """Pre-copy ran rounds by write-protection, and no process of the tree fell back to hashes."""
    assert report["mode"] == "precopy" and report["precopy_tracking"] == "write-protect", report
    assert len([r for r in report["rounds"] if r["kind"] == "hashes"]) >= 2, report["rounds"]
    assert not [w for w in report["warnings"] if "compared by page hashes" in w], report["warnings"]


def test_a_family_with_children_that_forks_all_the_time_moves_whole_every_process_watched(lab):
    # A root and two children with memory of their own (ports P+1, P+2); the root forks a
    # child every 0.2 s that checks the memory it inherited and exits. Every process the
    # rounds find is watched from its first round on, the forked ones included.
    pid, port = 4960, 7890
    work = lab.start_workload("a", mib=32, dirty_mibps=2, pid=pid, port=port, children=2, fork_every=0.2)
    ports = [port, port + 1, port + 2]
    before = {p: work.query("a", port=p) for p in ports}
    report = move(lab, pid, "--max-bandwidth", "6M", "--compression-level", "1")
    assert_watched(report)
    assert report["pages_vouched"] > 0
    after = eventually(lambda: work.query("b", wait=10),
                       lambda r: r["fork_checks"] >= before[port]["fork_checks"] + 3)
    assert after["fork_failures"] == 0
    for p in ports:
        after = work.query("b", port=p, wait=10)
        assert after["host"] == "b" and after["counter"] > before[p]["counter"]
        assert work.query("b", "verify", port=p)["bad_pages"] == 0
    assert lab.run("a", ["pgrep", "-f", f"memcounter.py run .*--port {port} "], check=False).stdout == b""
    lab.run("b", ["kill", str(pid)])


def test_a_process_that_maps_unmaps_and_drops_pages_during_precopy_comes_out_as_it_went_in(lab):
    # Every 50 ms, by turns: a scratch MiB unmapped and mapped afresh (often at the same
    # address, a new mapping the watch has not registered), or one of its pages dropped
    # (MADV_DONTNEED) and read (the zero page, mapped with no write the kernel counts). A
    # move that trusted what it saw unwritten would bring back stale pages.
    work = lab.start_workload("a", mib=64, dirty_mibps=2, pid=4970, port=7895, remap_every=0.05)
    before = work.query("a")
    report = move(lab, work.pid, "--max-bandwidth", "6M", "--compression-level", "1")
    assert_watched(report)
    after = work.query("b", wait=10)
    assert after["host"] == "b" and after["counter"] > before["counter"]
    check = work.query("b", "verify")
    assert (check["bad_pages"], check["pages"]) == (0, 64 * 256)
    assert lab.run("a", ["kill", "-0", str(work.pid)], check=False).returncode != 0
    lab.run("b", ["kill", str(work.pid)])


def test_a_stopped_process_of_the_tree_is_compared_by_hash_and_the_move_says_so(lab):
    # A family's child stopped (SIGSTOP): it cannot be made to run a system call, so its pages
    # are compared by content, said in one warning; it moves stopped, the rest watched.
    pid, port = 4980, 7900
    work = lab.start_workload("a", mib=16, pid=pid, port=port, children=1)
    child = int(lab.text("a", ["pgrep", "-f", f"memcounter.py run .*--port {port} ", "-P", str(pid)]).split()[0])
    lab.run("a", ["kill", "-STOP", str(child)])
    report = move(lab, pid, "--mode", "precopy")
    assert report["precopy_tracking"] == "write-protect"
    said = [w for w in report["warnings"] if "compared by page hashes" in w]
    assert len(said) == 1 and said[0].endswith("it is stopped"), report["warnings"]
    assert lab.text("b", ["ps", "-o", "stat=", "-p", str(child)]).startswith("T")
    lab.run("b", ["kill", "-CONT", str(child)])
    assert work.query("b", "verify", port=port + 1, wait=10)["bad_pages"] == 0
    assert work.query("b", "verify")["bad_pages"] == 0
    lab.run("b", ["kill", str(pid)])
    lab.run("b", ["kill", str(child)], check=False)


def test_no_write_protect_pre_copies_by_page_hashes_running_nothing_in_the_workload(lab):
    # The operator's choice where running a system call in the workload is not wanted: the
    # rounds and the final pass read all of its memory, and the copy is as whole.
    work = lab.start_workload("a", mib=64, dirty_mibps=2, pid=4990, port=7905)
    report = move(lab, work.pid, "--no-write-protect")
    assert report["mode"] == "precopy" and "by page hashes" in report["mode_reason"]
    assert report["precopy_tracking"] == "page hashes" and report["pages_vouched"] == 0
    assert report["pages_known"] > 0
    assert work.query("b", "verify", wait=10)["bad_pages"] == 0
    lab.run("b", ["kill", str(work.pid)])
