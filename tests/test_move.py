"""livemig move --pid in the namespaced lab: real CRIU, real sshd, a workload whose state must survive.

The lab's kernel has no soft-dirty tracking, so here auto means pre-copy by userfaultfd's
write-protection (wptrack.py), its pages sent by digest (pagehash.py); CRIU's pre-copy by
soft-dirty, and hybrid, are proven in the VM lab.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from livemig.options import RATES
from tests.held import end_if_held, go_on, wait_stopped
from tests.lab import WORKLOAD
from tests.waiting import eventually

pytestmark = pytest.mark.lab

MIB = 256


def move(lab, pid: int, *args: str, check: bool = True):
    res = lab.run("a", ["livemig", "move", "--pid", str(pid), "--json", *args, "b"], check=False, timeout=600)
    if check:
        assert res.returncode == 0, res.stderr.decode()
        return json.loads(res.stdout)
    return res


def leftovers(lab) -> dict:
    """Image directories and CRIU processes on both hosts: a finished migration leaves none."""
    return lab.leftovers()


def assert_moved_intact(lab, work, before: dict, report: dict) -> None:
    after = work.query("b", wait=10)
    assert after["host"] == "b" and after["pid"] == work.pid == report["target_pid"]
    assert after["counter"] > before["counter"]            # it went on counting, from where it was
    check = work.query("b", "verify")
    assert (check["bad_pages"], check["pages"]) == (0, work.mib * 256)
    assert lab.run("a", ["kill", "-0", str(work.pid)], check=False).returncode != 0   # one copy only
    assert leftovers(lab) == {"a": ([], []), "b": ([], [])}
    assert report["outcome"] == "moved" and report["downtime_seconds"] > 0


def assert_still_on_source(lab, work, before: dict) -> None:
    """Rolled back: it counts on on a from where it was, memory intact; nothing of it on b,
    no images or CRIU anywhere."""
    time.sleep(0.3)
    now = work.query("a")
    assert now["host"] == "a" and now["counter"] > before["counter"]
    assert work.query("a", "verify")["bad_pages"] == 0
    # (not "no PID work.pid on b": in a long run b's own processes come to take PIDs that high)
    on_b = lab.text("b", ["sh", "-c", f"tr '\\0' ' ' < /proc/{work.pid}/cmdline 2>/dev/null || true"])
    assert "memcounter" not in on_b, on_b
    assert leftovers(lab) == {"a": ([], []), "b": ([], [])}


@pytest.mark.parametrize("flags, into", [((), "target memory"), (("--no-fill",), "image files")],
                         ids=["into memory", "into image files"])
def test_stopcopy_moves_a_counting_workload_with_its_memory(lab, flags, into):
    work = lab.start_workload("a", mib=MIB, dirty_mibps=8, pid=4401 if flags else 4399)
    before = work.query("a")
    report = move(lab, work.pid, "--mode", "stopcopy", *flags)
    assert (report["mode"], report["pages_into"]) == ("stopcopy", into)
    # into memory: every page crossed before the copy ran, and went in while it ran; only
    # CRIU's restore itself may have faulted on a page before it came (its stack, say)
    assert (report["fill_while_running_seconds"] > 0) == (not flags)
    assert report["postcopy_pages_on_demand"] <= 16
    [final] = report["rounds"]
    assert final["kind"] == "dump" and final["pages_written"] >= MIB * 256, report
    # the pages were compressed on the wire: the workload's memory is half text
    assert final["bytes_wire"] < final["bytes_raw"] * 0.8
    assert_moved_intact(lab, work, before, report)
    lab.run("b", ["kill", str(work.pid)])


def test_postcopy_restores_first_and_brings_every_page_after(lab):
    # it writes in its first 32 MiB only: however long the push takes, its faults stay there
    work = lab.start_workload("a", mib=MIB, dirty_mibps=8, pid=4402, hot_mib=32)
    before = work.query("a")
    report = move(lab, work.pid, "--mode", "postcopy")
    assert report["mode"] == "postcopy"
    assert report["postcopy_pages"] >= MIB * 256
    # pushed while the target ran, not fetched fault by fault
    assert report["postcopy_seconds"] > 0
    assert report["postcopy_pages_on_demand"] < report["postcopy_pages"] / 4
    assert report["postcopy_requests_waited"] <= report["postcopy_requests"]
    # faults had their own connection: no fallback to the pushing stream
    assert not [w for w in report["warnings"] if "second connection" in w]
    # the downtime, part by part, in order, adds up to the whole
    parts = report["downtime_parts"]
    assert [d["name"] for d in parts] == ["dump", "images", "restore", "resume"]
    assert all(d["seconds"] > 0 for d in parts)
    assert sum(d["seconds"] for d in parts) == pytest.approx(report["downtime_seconds"], abs=1e-6)
    assert report["restore_seconds"] < parts[2]["seconds"]     # CRIU's restore, inside its part
    assert_moved_intact(lab, work, before, report)
    lab.run("b", ["kill", str(work.pid)])


def test_postcopy_leaves_lazy_what_criu_wrote_whole_for_a_stack_pointer_on_a_page_boundary(lab):
    # a thread waits with its stack pointer on a page boundary: CRIU 4.2's lazy dump writes every
    # page of the process into the images then (pages/relazy.py); they must follow lazily as
    # ever, not cross while it is frozen
    work = lab.start_workload("a", mib=MIB, dirty_mibps=8, pid=4409, port=7797, hot_mib=32, aligned_sp=True)
    before = work.query("a")
    report = move(lab, work.pid, "--mode", "postcopy")
    said = {k: report[k] for k in ("relazied_bytes", "image_files_bytes", "postcopy_pages", "warnings",
                                   "images_in_memory_bytes", "expected_downtime_seconds")}
    assert report["image_files_bytes"] < 8 << 20, said      # what a dump of it holds but its pages
    assert report["relazied_bytes"] >= MIB << 20, said
    assert report["postcopy_pages"] >= MIB * 256, said
    # foreseen (the thread waits so): CRIU's writing it counted in the estimate, into memory of its own
    assert report["images_in_memory_bytes"] >= MIB << 20, said
    assert report["expected_downtime_seconds"] >= (MIB << 20) / RATES.criu_writes_memory, said
    assert_moved_intact(lab, work, before, report)
    lab.run("b", ["kill", str(work.pid)])


def test_postcopy_moves_a_family_that_forks_while_its_pages_arrive(lab):
    # Three processes with memory of their own, the root forking a child every 0.2 s that
    # checks every page it inherited: after the resume those children fault through uffds
    # of their own (placer.py's fork events), and one is usually alive at the dump. What the
    # root shares with that one copy-on-write crosses in the images instead, to stay shared
    # (pages/cow.py): every page comes one way or the other
    work = lab.start_workload("a", mib=64, dirty_mibps=8, pid=4460, port=7860, children=2, fork_every=0.2)
    ports = [7860, 7861, 7862]
    before = {port: work.query("a", port=port) for port in ports}
    report = move(lab, work.pid, "--mode", "postcopy")
    said = {k: report[k] for k in ("postcopy_pages", "shared_sent_bytes", "shared_kept_bytes", "rounds", "warnings",
                                   "carried_files", "pages_into")}
    assert report["postcopy_pages"] + report["shared_sent_bytes"] // 4096 >= 3 * 64 * 256, said
    for port in ports:
        after = work.query("b", port=port, wait=10)
        assert after["host"] == "b" and after["counter"] > before[port]["counter"]
        assert work.query("b", "verify", port=port)["bad_pages"] == 0
    # a few more checks, after every page arrived
    moved = work.query("b", port=7860)["fork_checks"]
    root = eventually(lambda: work.query("b", port=7860), lambda r: r["fork_checks"] >= moved + 3)
    assert root["fork_checks"] > before[7860]["fork_checks"] + 3 and root["fork_failures"] == 0
    pids = [str(before[port]["pid"]) for port in ports]
    assert all(lab.run("a", ["kill", "-0", pid], check=False).returncode != 0 for pid in pids)   # one copy, on b
    assert lab.run("b", ["kill", "-0", *pids], check=False).returncode == 0
    assert leftovers(lab) == {"a": ([], []), "b": ([], [])}
    lab.run("b", ["kill", *pids])


def test_auto_picks_precopy_by_write_protection_here_and_says_why(lab):
    work = lab.start_workload("a", mib=64, pid=4403)
    before = work.query("a")
    res = lab.run("a", ["livemig", "move", "--pid", str(work.pid), "b"], timeout=600)
    assert b"mode precopy: by write-protection: this kernel has no soft-dirty, and userfaultfd's" in res.stderr
    assert res.stdout.decode().startswith("moved: PID 4403 a -> b, mode precopy")
    after = work.query("b", wait=10)
    assert after["counter"] > before["counter"]
    lab.run("b", ["kill", str(work.pid)])


def test_precopy_by_write_protection_sends_only_what_changed_and_runs_the_copy_once_all_is_on_its_host(lab):
    # no soft-dirty here: the kernel's userfaultfd write-protection tells which pages were
    # written since a round, and the final, lazy dump's pages that the target's store holds
    # as they are are only named, never sent again, most of them not even read. It writes in
    # its first 32 MiB only: what a round finds changed is bounded by that, however long the
    # rounds take on this machine
    work = lab.start_workload("a", mib=MIB, dirty_mibps=8, pid=4405, hot_mib=32)
    before = work.query("a")
    t0 = time.time()
    report = move(lab, work.pid, "--mode", "precopy")
    assert report["mode"] == "precopy" and report["precopy_tracking"] == "write-protect", report
    # what it never wrote after the first round, the final pass did not read (the hot 32 MiB
    # is at most an eighth of it)
    assert report["pages_vouched"] >= MIB * 256 * 7 / 8 * 0.9, report
    *rounds, final = report["rounds"]
    assert len(rounds) >= 2 and {r["kind"] for r in rounds} == {"hashes"} and final["kind"] == "dump"
    assert rounds[0]["pages_written"] >= MIB * 256                  # everything, while it ran
    assert rounds[1]["pages_written"] < rounds[0]["pages_written"] / 4   # then what it wrote meanwhile
    # the final sent what changed since the last round, and named the rest
    assert report["pages_known"] >= MIB * 256 * 0.8
    assert final["pages_written"] < MIB * 256 / 4
    assert final["bytes_raw"] < MIB * 2**20 / 4
    # the copy ran once the changed pages were there, and was filled from the target's own
    # memory while it ran: no page came from the source after the resume (the restore's own
    # fault on one page may ask the source before the fill has named that page, as in
    # tests/unit/test_placer.py)
    assert report["fill_seconds"] > report["fill_while_running_seconds"] > 0
    assert report["postcopy_seconds"] == 0 and report["postcopy_pages_on_demand"] <= 1
    # one stall, from the freeze to the resume
    lived = work.stall_between("b", t0)
    assert report["downtime_seconds"] >= lived - 0.02
    assert_moved_intact(lab, work, before, report)
    lab.run("b", ["kill", str(work.pid)])


def test_the_downtime_livemig_reports_is_the_one_the_workload_lived(lab):
    work = lab.start_workload("a", mib=64, dirty_mibps=4, pid=4404)
    t0 = time.time()
    report = move(lab, work.pid, "--mode", "stopcopy")
    lived = work.stall_between("b", t0)
    # livemig measures from just before the freeze until the target runs: it may only
    # overstate what the workload saw, by little (a tick of the workload, a round trip)
    assert lived > 0.05
    assert report["downtime_seconds"] >= lived - 0.02
    assert report["downtime_seconds"] <= lived + 0.25
    lab.run("b", ["kill", str(work.pid)])


def _restore_fails(lab, work, *args: str) -> subprocess.CompletedProcess:
    """A move whose restore fails: the workload's port taken on b once the preflight passed
    (before it, the preflight refuses the move: tests/test_occupied.py), and let go after."""
    mover = lab.popen("a", ["env", "LIVEMIG_TEST_STOP_AT=restore", "livemig", "move", *args, "--mode", "stopcopy",
                            "--pid", str(work.pid), "b"],
                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    squatter = None
    try:
        stopped = wait_stopped(lab, mover, "restore")
        squatter = lab.start_workload("b", mib=1, pid=4505, port=work.port)
        go_on(lab, mover, stopped)
        out, err = mover.communicate(timeout=600)
    finally:
        end_if_held(lab, mover)
        if squatter is not None:
            lab.run("b", ["kill", str(squatter.pid)])
            lab.run("b", ["sh", "-c", f"while kill -0 {squatter.pid}; do sleep 0.05; done"], check=False)
    return subprocess.CompletedProcess(mover.args, mover.returncode, out, err)


def test_a_failed_restore_rolls_back_and_the_source_goes_on(lab):
    work = lab.start_workload("a", mib=64, dirty_mibps=4, pid=4405, port=7790)
    before = work.query("a")
    res = _restore_fails(lab, work, "--json")
    assert res.returncode == 6
    err = res.stderr.decode().strip().splitlines()[0]
    assert err.startswith("livemig: restore on b:") and "Address already in use" in err
    report = json.loads(res.stdout)
    assert report["outcome"] == "rolled back" and report["failed_phase"] == "restore"
    assert_still_on_source(lab, work, before)     # nothing of it left on b
    # CRIU's logs outlive the images, on both hosts, private; the report says where
    [(h1, here), (h2, there)] = [x.split(":", 1) for x in report["logs"]]
    assert (h1, h2) == ("a", "b") and here.endswith("-source") and there.endswith("-target")
    assert "final-dump.log" in lab.text("a", ["ls", here]).split()
    assert "final-restore.log" in lab.text("b", ["ls", there]).split()
    assert lab.text("b", ["stat", "-c", "%a", there, f"{there}/final-restore.log"]).split() == ["700", "600"]
    # and -v prints what in them explains it
    res = _restore_fails(lab, work, "-v")
    err = res.stderr.decode()
    assert res.returncode == 6 and "CRIU's logs: a:/var/lib/livemig/logs/" in err, err
    # (a lazy final dump, the default stop-and-copy's, logs no error of its own: the restore's say it)
    assert "Error (criu/files.c" in err and "-v prints" not in err, err
    lab.run("a", ["kill", str(work.pid)])


def test_a_pid_taken_on_the_target_stops_in_preflight_touching_nothing(lab):
    work = lab.start_workload("a", mib=16, pid=4406, port=7791)
    squatter = lab.start_workload("b", mib=1, pid=4406, port=7792)
    before = work.query("a")
    res = move(lab, work.pid, check=False)
    assert res.returncode == 3
    assert b"preflight on b: PIDs 4406 are in use" in res.stderr
    assert work.query("a")["stalls"] == before["stalls"]     # never frozen
    assert leftovers(lab) == {"a": ([], []), "b": ([], [])}
    lab.run("a", ["kill", str(work.pid)])
    lab.run("b", ["kill", str(squatter.pid)])


def test_a_socket_bound_to_an_address_the_target_lacks_stops_in_preflight_touching_nothing(lab):
    # CRIU's restore would bind it again at 198.18.0.1, which only a has: it would fail
    # after the freeze and the dump. Preflight says so first.
    work = lab.start_workload("a", mib=16, pid=4407, port=7793, bind=lab.address("a"))
    def stalls() -> list:
        return json.loads(lab.text("a", ["python3", WORKLOAD, "query", "get", "--port", "7793",
                                         "--host", lab.address("a")]))["stalls"]
    before = stalls()
    res = move(lab, work.pid, check=False)
    assert res.returncode == 3, res.stderr
    assert (b"preflight on b: the workload listens on 198.18.0.1:7793, which the target does not have"
            in res.stderr), res.stderr
    assert stalls() == before     # never frozen
    assert leftovers(lab) == {"a": ([], []), "b": ([], [])}
    lab.run("a", ["kill", str(work.pid)])


@pytest.mark.parametrize("args, code, message", [
    (["--pid", "99999", "b"], 3, b"livemig: preflight: no process with PID 99999"),
    (["--pid", "WORKLOAD", "nosuchhost"], 4, b"livemig: preflight on nosuchhost: cannot connect over ssh"),
    (["--pid", "WORKLOAD", "--mode", "hybrid", "b"], 3, b"hybrid needs dirty-page tracking"),
    (["--pid", "x", "b"], 2, b"invalid int value"),
    # what must never move is refused before either host is touched
    (["--pid", "1", "b"], 3, b"livemig: preflight: PID 1 is this host's init: it cannot move"),
])
def test_bad_input_gets_one_clear_line_and_its_exit_code(lab, args, code, message):
    work = lab.start_workload("a", mib=1, pid=4408, port=7795) if "WORKLOAD" in args else None
    try:
        argv = [str(work.pid) if a == "WORKLOAD" and work else a for a in args]
        res = lab.run("a", ["livemig", "move", *argv], check=False, timeout=120)
        assert res.returncode == code, res.stderr.decode()
        assert message in res.stderr
        assert leftovers(lab) == {"a": ([], []), "b": ([], [])}
    finally:
        if work:
            lab.run("a", ["kill", str(work.pid)])


def test_check_runs_the_preflight_alone(lab):
    res = lab.run("a", ["livemig", "check", "--json", "b"])
    data = json.loads(res.stdout)
    assert data["ok"] and data["mode"] == "precopy"
    names = [c["name"] for c in data["checks"]]
    assert {"criu on target", "criu versions", "architecture", "strategy", "CPU features", "agent on target"} <= set(names)
    refused = lab.run("a", ["livemig", "check", "--mode", "hybrid", "b"], check=False)
    assert refused.returncode == 3 and b"FAIL strategy" in refused.stdout
    assert leftovers(lab) == {"a": ([], []), "b": ([], [])}


@pytest.mark.parametrize("point,sig", [("transfer", "INT"), ("restore", "INT"), ("restore", "TERM")])
def test_ctrl_c_or_sigterm_rolls_back_and_the_source_goes_on(lab, point, sig):
    # the move held where the interrupt is to come (frozen and dumped, nothing sent; the
    # images on the target, not restored): it comes there however fast the machine
    work = lab.start_workload("a", mib=512, dirty_mibps=8, pid=4410 + len(point) + len(sig), port=7794)
    before = work.query("a")
    mover = lab.popen("a", ["env", f"LIVEMIG_TEST_STOP_AT={point}", "livemig", "move", "--pid", str(work.pid),
                            "--mode", "stopcopy", "b"],
                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stopped = wait_stopped(lab, mover, point)
        lab.run("a", ["kill", f"-{sig}", *stopped])
        go_on(lab, mover, stopped)
        t0 = time.monotonic()
        _out, err = mover.communicate(timeout=300)
    finally:
        end_if_held(lab, mover)
    assert mover.returncode == {"INT": 130, "TERM": 143}[sig], err.decode()
    # CRIU let go by itself (page stream cut, or the hook's verdict), not through the last
    # resort of killing it after 60 s
    assert time.monotonic() - t0 < 45
    assert {"INT": b"interrupted", "TERM": b"terminated"}[sig] + b": rolled back, the workload runs on the source" in err
    assert_still_on_source(lab, work, before)
    lab.run("a", ["kill", str(work.pid)])


def test_the_config_file_and_environment_set_the_mode_and_a_flag_wins(lab):
    lab.run("a", ["sh", "-c", ("mkdir -p /root/.config/livemig && "
                  "printf 'mode = \"postcopy\"\\n' > /root/.config/livemig/config.toml")])
    try:
        work = lab.start_workload("a", mib=16, pid=4420)
        before = work.query("a")
        shown = json.loads(lab.text("a", ["livemig", "config", "--json"]))
        assert shown["settings"]["mode"] == {"value": "postcopy", "from": "/root/.config/livemig/config.toml"}
        report = move(lab, work.pid)                     # no --mode: the file's
        assert report["mode"] == "postcopy" and report["mode_reason"] == "as requested"
        assert_moved_intact(lab, work, before, report)
        # the environment over the file, a flag over both
        res = lab.run("b", ["env", "LIVEMIG_MODE=warp", "livemig", "move", "--pid", str(work.pid), "a"],
                      check=False)
        assert res.returncode == 2 and res.stderr.decode().strip() == \
            "livemig: LIVEMIG_MODE: 'warp' is not a mode (auto, precopy, postcopy, hybrid, stopcopy)"
        res = lab.run("b", ["env", "LIVEMIG_MODE=postcopy", "livemig", "move", "--pid", str(work.pid),
                            "--mode", "stopcopy", "--json", "a"], check=False, timeout=600)
        assert res.returncode == 0, res.stderr.decode()
        assert json.loads(res.stdout)["mode"] == "stopcopy"
        assert work.query("a", wait=10)["host"] == "a"
        lab.run("a", ["kill", str(work.pid)])
    finally:
        lab.run("a", ["rm", "-rf", "/root/.config/livemig"], check=False)


def test_dry_run_prints_the_plan_and_changes_nothing(lab):
    work = lab.start_workload("a", mib=64, pid=4421)
    before = work.query("a")
    plan = move(lab, work.pid, "--dry-run")
    assert plan["mode"] == "precopy" and "write-protection" in plan["mode_reason"]
    assert plan["precopy_tracking"] == "write-protect"
    # the zstd level a move would choose, measured as it would measure it; or the one set
    assert plan["compression_level"] in (1, 3, 6, 9)
    assert plan["compression_reason"].startswith(f"zstd level {plan['compression_level']}: the link carries")
    assert move(lab, work.pid, "--dry-run", "--compression-level", "6")["compression_reason"] == \
        "zstd level 6: set by --compression-level or the configuration"
    plan = move(lab, work.pid, "--dry-run", "--mode", "stopcopy")
    assert plan["memory_bytes"] >= 64 * 2**20 and plan["processes"] == 1
    assert plan["link_bytes_per_s"] > 0 and plan["copy_seconds"] > 0
    # stop-and-copy: all of it frozen, as it compresses (memcounter's pages do, to about half: the
    # copy time is for incompressible bytes), and what no page takes (options.RATES.per_tree)
    assert RATES.per_tree < plan["expected_downtime_seconds"] < RATES.per_tree + plan["copy_seconds"]
    assert set(plan["expected_downtime_by_mode"]) == {"precopy", "postcopy", "stopcopy"}
    assert plan["expected_downtime_by_mode"]["stopcopy"] == plan["expected_downtime_seconds"]
    assert plan["shared_memory_bytes"] == 0 and plan["max_downtime_seconds"] is None
    assert_still_on_source(lab, work, before)
    text = lab.text("a", ["livemig", "move", "--dry-run", "--mode", "postcopy", "--pid", str(work.pid), "b"])
    assert text.startswith(f"would move: PID {work.pid} a -> b, mode postcopy (as requested)")
    # a dry run fails as the move would, with its exit code
    res = lab.run("a", ["livemig", "move", "--dry-run", "--pid", "99999", "b"], check=False)
    err = res.stderr.decode()
    assert res.returncode == 3 and err.startswith("livemig: preflight: no process with PID 99999")
    assert err.count("\n") == 1
    assert_still_on_source(lab, work, before)
    lab.run("a", ["kill", str(work.pid)])


FAMILY_MODES = {"stopcopy": ("--mode", "stopcopy"), "stopcopy into image files": ("--mode", "stopcopy", "--no-fill"),
                "postcopy": ("--mode", "postcopy"), "precopy by write-protection": ("--mode", "precopy")}


@pytest.mark.parametrize("i, flags", list(enumerate(FAMILY_MODES.values())), ids=list(FAMILY_MODES))
def test_a_family_that_forks_all_the_time_moves_whole_in_every_mode(lab, i, flags):
    # The root forks a child every 0.2 s that checks the memory it inherited, lingers as long
    # and exits: a zombie until the next fork reaps it. The tree is read afresh each round and
    # at the freeze, so the children forked meanwhile are moved, and stopped, killed or resumed
    # with the rest. The cap makes the move last seconds (32 MiB of pages, half of them text,
    # at 4 MiB/s): children are forked during it, pre-copy's first round included, by
    # construction rather than by the machine's speed.
    pid, port = 4910 + 20 * i, 7870 + i
    work = lab.start_workload("a", mib=32, dirty_mibps=2, pid=pid, port=port, fork_every=0.2)
    before = work.query("a")
    # (level 1 pinned: capped, a move would choose one that sends far less: wire/compression.py)
    report = move(lab, pid, *flags, "--max-bandwidth", "4M", "--compression-level", "1")
    if "precopy" in flags:
        assert report["rounds"][0]["kind"] == "hashes" and report["rounds"][0]["seconds"] > 1
    moved = work.query("b", wait=10)
    after = eventually(lambda: work.query("b"), lambda r: r["fork_checks"] >= moved["fork_checks"] + 3)  # more, on b
    assert after["host"] == "b" and after["pid"] == pid and after["counter"] > before["counter"]
    assert after["fork_checks"] > before["fork_checks"] + 3 and after["fork_failures"] == 0
    assert work.query("b", "verify")["bad_pages"] == 0
    # nothing of the family is left on a, the children forked during the move included
    family = ["pgrep", "-f", f"memcounter.py run .*--port {port} "]
    assert lab.run("a", family, check=False).stdout == b""
    assert lab.run("b", family, check=False).stdout.split()
    assert leftovers(lab) == {"a": ([], []), "b": ([], [])}
    lab.run("b", ["kill", str(pid)])
