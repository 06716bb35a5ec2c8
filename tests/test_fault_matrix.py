"""Issue 8's fault matrix, cell by cell, in the namespaced lab: every phase of a move, and
in each every fault, with the same promise checked afterwards.

The coordinator stops itself at the start of a phase (LIVEMIG_TEST_STOP_AT, source/testpoints.py's
fault injection), the test breaks something there, and lets it go on. Then, and after
`livemig recover` where the coordinator itself was killed: exactly one copy of the
workload runs (or none, where it exited by itself), counting on from where it was with
every page of its memory intact; nothing of the move is left on either host (image
directories, CRIU processes); and livemig's error names the phase that failed.

And the client's view (tests/clients.py): a client asks the workload for the next integer on
both hosts, over and over, from before the move until the cell has ended, and no answer it
got is ever given again. Once the target's copy has run (its Resume: post-copy's and a
fill's commit point), the move goes forward: a cut link is made again (source/rejoin.py), a
killed coordinator's page stream taken up by `livemig recover`. A failure that takes that
copy away (its agent killed) leaves the source's stopped: the move ends "target lost" (exit
code 9), and the workload runs again only when the operator says so (`livemig recover
--target-lost`): the test says it, after the client's view is checked.

The faults:
- cut: every SSH connection to the target cut (its sshd's session processes killed: the
  coordinator sees the connection close, the agent its input end);
- agent: the target's agent killed (SIGKILL);
- disk: the target's image root (a tmpfs of its own) filled to the brim;
- restore: the workload's PID taken on the target, so that its restore must fail;
- ctrl-c: the coordinator interrupted (SIGINT);
- sigkill: the coordinator killed outright (SIGKILL), then `livemig recover`;
- exits: the workload killed, which livemig cannot tell from exiting by itself.

The cells that cannot happen are not tests: they are in NOT_APPLICABLE, with why (the
docs/guarantees.md's "What can go wrong" says the same). Slower variants of some cells, with
larger workloads broken mid-stream, or a link dropped rather than cut, are in
test_postcopy_faults.py, test_fill_faults.py and test_stopcopy_faults.py.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass

import pytest

from tests.clients import Client
from tests.held import go_on, wait_stopped
from tests.test_postcopy_faults import said_by_livemig
from tests.test_stopcopy_faults import (
    assert_counts_on_whole,
    stat_of,
)

pytestmark = pytest.mark.lab

MIB, DIRTY = 32, 2


@dataclass(frozen=True)
class Point:
    """Where a fault is injected: the stop point, with the mode whose move passes it."""
    stop: str        # LIVEMIG_TEST_STOP_AT
    mode: str        # livemig move --mode
    phase: str       # the phase under way there, as livemig names it
    flags: tuple[str, ...] = ()


POINTS = {
    "preflight": Point("connected", "auto", "preflight"),
    "pre-copy": Point("round", "auto", "pre-copy"),
    "final dump": Point("final-dump", "auto", "final dump"),
    "transfer": Point("transfer", "auto", "transfer"),
    "restore": Point("restore", "auto", "restore"),
    "commit": Point("released", "auto", "commit"),
    "fill": Point("running", "auto", "fill"),
    # capped: its ~16 MiB of compressed pages take 8 s to cross at 2 MiB/s, against well under
    # a second to restore and resume, so the fault lands with pages still to come on any machine
    # (uncapped, a fast one had them all on the target before the stop, and moved)
    # (level 1 pinned: capped, a move would choose one that sends far less: wire/compression.py)
    "post-copy": Point("running", "postcopy", "post-copy", ("--max-bandwidth", "2M", "--compression-level", "1")),
    # stop-and-copy into image files: its pages go through the target's page server, and
    # its copy is resumed only after the commit mark (the source's copy gone by then)
    "final dump, files": Point("final-dump", "stopcopy", "final dump", ("--no-fill",)),
    "transfer, files": Point("transfer", "stopcopy", "transfer", ("--no-fill",)),
    "restore, files": Point("restore", "stopcopy", "restore", ("--no-fill",)),
    "commit, files": Point("restored", "stopcopy", "commit", ("--no-fill",)),
    "committed, files": Point("released", "stopcopy", "commit", ("--no-fill",)),
}
FAULTS = ["cut", "agent", "disk", "restore", "ctrl-c", "sigkill", "exits"]

# (phase, fault): why the cell cannot happen
NOT_APPLICABLE = {
    **{(ph, "restore"): "the restore is over: the copy holds its PID"
       for ph in ("commit", "fill", "post-copy", "commit, files", "committed, files")},
    **{(ph, "exits"): "the workload is frozen from the final dump on: it cannot exit by itself"
       for ph in ("transfer", "restore", "commit", "fill", "post-copy", "transfer, files", "restore, files",
                  "commit, files", "committed, files")},
}
CELLS = [(ph, f) for ph in POINTS for f in FAULTS if (ph, f) not in NOT_APPLICABLE]


@dataclass(frozen=True)
class Outcome:
    code: int              # livemig move's exit code (-9: killed)
    runs_on: str           # "a", "b", or "" (nowhere: it exited)
    failed_phase: str      # the phase the error names ("" when the move was done)
    by_the_operator: bool = False   # the target's copy ran and was lost: the source's runs again
                                    # only by `livemig recover --target-lost`


def run_cell(lab, phase: str, fault: str, index: int, image_root) -> Outcome:
    point = POINTS[phase]
    pid, port = 4900 + index, 7900 + index
    if fault == "disk":
        image_root(160)            # room for the images at the preflight; filled later
    work = lab.start_workload("a", mib=MIB, dirty_mibps=DIRTY, pid=pid, port=port)
    before = work.query("a")
    with Client(lab, port) as client:
        code, runs_on, failed, lost = _cell(lab, point, fault, pid, port, work)
    assert not client.errors and not client.is_alive(), client.errors    # it asked all along, and stopped
    assert not client.taken_back(), f"answers taken back: {client.taken_back()}; all: {client.said()}"
    assert client.answers and client.answers[0].host == "a"
    if lost:
        # the client's view is whole; now the operator's word, and what it costs
        assert stat_of(lab, "a", pid)[:1] in ("T", "t") and stat_of(lab, "b", pid) == "", "not stopped, or not alone"
        res = lab.run("a", ["livemig", "recover", "--target-lost", "--json"], check=False, timeout=120)
        [settled] = json.loads(res.stdout)["settled"]
        assert res.returncode == 0 and settled["outcome"] == "rolled back", settled
        assert "is lost" in settled["detail"], settled
        assert lab.text("a", ["livemig", "recover"]).strip() == "nothing to recover here"
        runs_on = where_it_runs(lab, work)
    if runs_on:
        assert_counts_on_whole(work, runs_on, before)
    assert_nothing_left(lab)
    return Outcome(code, runs_on, failed, lost)


def _cell(lab, point: Point, fault: str, pid: int, port: int, work, what: tuple[str, ...] = ()
          ) -> tuple[int, str, str, bool]:
    """The move, broken at point by fault, and `livemig recover` where it is wanted: the exit
    code, where the workload runs, the phase that failed, and whether the target's copy ran
    and was lost (the source's then waits, stopped, for the operator's word). what: the
    container to move, if not the tree at pid."""
    mover = lab.popen("a", ["env", f"LIVEMIG_TEST_STOP_AT={point.stop}", "livemig", "move", "--json",
                            "--mode", point.mode, *point.flags, *(what or ("--pid", str(pid))), "b"],
                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stopped = wait_stopped(lab, mover, point.stop)
    squatter = None
    if fault == "cut":
        lab.run("b", ["pkill", "-KILL", "-x", "sshd-session"])
    elif fault == "agent":
        lab.run("b", ["pkill", "-KILL", "-f", "livemig agent"])
    elif fault == "disk":
        lab.run("b", ["sh", "-c", "head -c 200M /dev/zero > /var/lib/livemig/filler"], check=False)
    elif fault == "restore":
        squatter = lab.start_workload("b", mib=1, pid=pid, port=port + 50)
    elif fault == "ctrl-c":
        lab.run("a", ["kill", "-INT", *stopped])
    elif fault == "sigkill":
        lab.run("a", ["kill", "-KILL", *stopped])
    elif fault == "exits":
        lab.run("a", ["kill", "-KILL", str(pid)])
    go_on(lab, mover, stopped)
    out, err = mover.communicate(timeout=300)
    said = err.decode()
    code = mover.returncode
    with said_by_livemig(said):
        # livemig's own lines only (with --json, its error): no traceback, nothing Python says
        # of a descriptor closed twice ("Exception ignored in: <_io.FileIO [closed]>")
        assert "Traceback" not in said and "Exception ignored" not in said
        assert not [line for line in said.splitlines() if line and not line.startswith(("livemig", " "))]
        if squatter:
            lab.run("b", ["kill", "-KILL", str(squatter.pid)])
        if fault == "disk":
            lab.run("b", ["rm", "-f", "/var/lib/livemig/filler"])
        failed = ""
        if fault == "sigkill":
            code = -9
        lost = code == 9
        if fault == "sigkill" or code == 7:     # unresolved: recover settles it (exit code 7)
            settled = recover_until_settled(lab)
            said += f"\nrecover: {settled}"
            lost = settled.startswith("target lost")
        if fault != "sigkill":
            report = json.loads(out)
            failed = report.get("failed_phase") or ""
            if failed:
                # one line, naming the phase (and the host, where it failed there)
                first = [line for line in said.splitlines() if line.startswith("livemig: ")][-1]
                assert first.startswith(f"livemig: {failed}"), first
        runs_on = "" if lost else where_it_runs(lab, work)
    return code, runs_on, failed, lost


def recover_until_settled(lab, within: float = 120) -> str:
    """`livemig recover`, again while the target still settles its copy ("try again"), as
    an operator would; then once more, which must find nothing, unless the target's copy
    ran and is lost (exit code 9): that waits for the operator's word (--target-lost)."""
    deadline = time.monotonic() + within
    while True:
        res = lab.run("a", ["livemig", "recover", "--json"], check=False, timeout=120)
        settled = json.loads(res.stdout).get("settled", [])      # (a Failure has none)
        if res.returncode in (0, 9) or time.monotonic() > deadline or not any(
                "try again" in s["detail"] for s in settled):
            assert res.returncode in (0, 9), (res.stdout.decode(), res.stderr.decode())
            break
        time.sleep(2)
    if res.returncode == 9:
        assert [s["outcome"] for s in settled] == ["target lost"], settled
    else:
        assert lab.text("a", ["livemig", "recover"]).strip() == "nothing to recover here"
    return "; ".join(f"{s['outcome']}: {s['detail']}" for s in settled) or "nothing to recover"


def where_it_runs(lab, work) -> str:
    """The host whose copy answers; a copy left stopped is found by the promise's check."""
    hosts = [h for h in ("a", "b") if stat_of(lab, h, work.pid)[:1] not in ("", "T", "t", "Z")]
    assert len(hosts) <= 1, "two copies run: " + "; ".join(
        f"{h}: {lab.text(h, ['ps', '-o', 'pid=,stat=,args=', '-p', str(work.pid)], check=False).strip()}"
        for h in hosts)
    if hosts:
        other = "b" if hosts[0] == "a" else "a"
        assert stat_of(lab, other, work.pid) == "", f"a copy on {other} is left {stat_of(lab, other, work.pid)}"
        return hosts[0]
    for h in ("a", "b"):
        assert stat_of(lab, h, work.pid) == "", f"a copy on {h} is left {stat_of(lab, h, work.pid)}"
    return ""


def assert_nothing_left(lab) -> None:
    # An agent whose connection was cut tidies up by itself, once it reads the end of it.
    deadline = time.monotonic() + 30
    while (left := lab.leftovers()) != {"a": ([], []), "b": ([], [])} and time.monotonic() < deadline:
        time.sleep(1)
    assert left == {"a": ([], []), "b": ([], [])}, f"left behind: {left}"


def _row(phase: str, **cells: Outcome | tuple[Outcome, ...]) -> dict:
    return {(phase, fault.replace("_", "-")): o if isinstance(o, tuple) else (o,) for fault, o in cells.items()}


def _renamed(row: dict, phase: str) -> dict:
    return {(phase, fault): o for (_, fault), o in row.items()}


A, B, NOWHERE = "a", "b", ""
MOVED, KILLED = Outcome(0, B, ""), Outcome(-9, A, "")


TRANSFER = _row("transfer", cut=Outcome(4, A, "transfer"), agent=Outcome(4, A, "transfer"),
                disk=Outcome(5, A, "transfer"), restore=Outcome(6, A, "restore"),
                ctrl_c=Outcome(130, A, "transfer"), sigkill=KILLED)
RESTORE = _row("restore", cut=Outcome(4, A, "restore"), agent=Outcome(4, A, "restore"),
               disk=Outcome(6, A, "restore"), restore=Outcome(6, A, "restore"),
               ctrl_c=Outcome(130, A, "restore"), sigkill=KILLED)
# What each cell must end in (docs/guarantees.md's "What can go wrong" says the same). A fault
# often shows in the phase after the one it was injected in: a final dump needs no link
# (its pages stay on the source until the copy asks), the images do. The fill's copy has
# every page on its host when it runs; the fault may land before or after it is whole.
EXPECTED = {
    **_row("preflight", cut=Outcome(4, A, "preflight"), agent=Outcome(4, A, "preflight"),
           disk=Outcome(3, A, "preflight"), restore=Outcome(3, A, "preflight"),
           ctrl_c=Outcome(130, A, "preflight"), sigkill=KILLED, exits=Outcome(8, NOWHERE, "pre-copy")),
    **_row("pre-copy", cut=Outcome(4, A, "pre-copy"), agent=Outcome(4, A, "pre-copy"),
           disk=Outcome(5, A, "transfer"), restore=Outcome(6, A, "restore"),
           ctrl_c=Outcome(130, A, "pre-copy"), sigkill=KILLED, exits=Outcome(8, NOWHERE, "pre-copy")),
    **_row("final dump", cut=Outcome(4, A, "transfer"), agent=Outcome(4, A, "transfer"),
           disk=Outcome(5, A, "transfer"), restore=Outcome(6, A, "restore"),
           ctrl_c=Outcome(130, A, "final dump"), sigkill=KILLED, exits=Outcome(8, NOWHERE, "final dump")),
    **TRANSFER, **RESTORE,
    # (a Ctrl-C that lands here is heard once the Resume is on its way: then it waits for the fill)
    **_row("commit", cut=Outcome(4, A, "commit"), agent=Outcome(4, A, "commit"), disk=MOVED,
           ctrl_c=MOVED, sigkill=KILLED),
    # The target's copy has run (the fill's and post-copy's commit point, its Resume): its answers
    # stand, and the move goes forward. A cut link is made again and the copy gets the rest of
    # its pages on the fresh one (a fill's copy, every page on its host, needs none); a Ctrl-C
    # waits for the copy to be whole; a coordinator killed, `livemig recover` takes its page
    # stream up; its agent killed, a successor takes the copy over from the agent's guard,
    # which holds its uffds meanwhile.
    **_row("fill", cut=MOVED, agent=MOVED, disk=MOVED, ctrl_c=MOVED, sigkill=Outcome(-9, B, "")),
    **_row("post-copy", cut=MOVED, agent=MOVED, disk=MOVED, ctrl_c=MOVED, sigkill=Outcome(-9, B, "")),
    # its pages stream to the target's page server during the final dump
    **_row("final dump, files", cut=Outcome(4, A, "final dump"), agent=Outcome(4, A, "final dump"),
           disk=Outcome(5, A, "transfer"), restore=Outcome(6, A, "restore"),
           ctrl_c=Outcome(130, A, "final dump"), sigkill=KILLED, exits=Outcome(8, NOWHERE, "final dump")),
    **_renamed(TRANSFER, "transfer, files"), **_renamed(RESTORE, "restore, files"),   # the same
    # restored, not committed: the commit needs no link, and is done before the resume
    # finds the fault; then the target's copy, the only one, waits for `livemig recover`
    # (exit code 7), which resumes it. Ctrl-C waits for the commit it lands in to end.
    **_row("commit, files", cut=Outcome(7, B, "commit"), agent=Outcome(7, B, "commit"), disk=MOVED,
           ctrl_c=MOVED, sigkill=KILLED),
    **_row("committed, files", cut=Outcome(7, B, "commit"), agent=Outcome(7, B, "commit"), disk=MOVED,
           ctrl_c=MOVED, sigkill=Outcome(-9, B, "")),
}


def test_every_cell_of_the_matrix_is_tested_or_said_why_not():
    assert set(EXPECTED) == set(CELLS)
    assert len(CELLS) + len(NOT_APPLICABLE) == len(POINTS) * len(FAULTS)


@pytest.mark.parametrize("phase, fault", CELLS, ids=[f"{ph}-{f}" for ph, f in CELLS])
def test_the_cell_ends_with_one_whole_copy_and_nothing_left(lab, small_image_root, phase, fault):
    outcome = run_cell(lab, phase, fault, CELLS.index((phase, fault)), small_image_root)
    assert outcome in EXPECTED[(phase, fault)], outcome


# A runc container's post-copy: runc's lazy dump serves its pages, which livemig reads in the
# frozen container; the same faults end as a process tree's (memcounter in a runc container,
# on the host's network, so that the client asks it as it asks a tree).
RUNC_POSTCOPY = {"cut": MOVED, "agent": MOVED, "ctrl-c": MOVED, "sigkill": Outcome(-9, B, "")}


def container_states(lab, name: str) -> dict[str, str]:
    """runc's word for the container on each host ("" where it knows none)."""
    states = {}
    for h in ("a", "b"):
        res = lab.run(h, ["runc", "state", name], check=False)
        states[h] = json.loads(res.stdout)["status"] if res.returncode == 0 else ""
    return states


def container_runs(lab, name: str) -> str:
    """The host where the container runs, nothing of it left on the other."""
    states = container_states(lab, name)
    running = [h for h, st in states.items() if st == "running"]
    assert len(running) <= 1 and all(st in ("", "running") for st in states.values()), states
    return running[0] if running else ""


@pytest.mark.parametrize("fault", list(RUNC_POSTCOPY))
def test_a_runc_container_s_post_copy_ends_as_a_process_tree_s(lab, fault):
    i = list(RUNC_POSTCOPY).index(fault)
    name, port = f"pc{i}", 7980 + i
    work = lab.start_container_workload("a", mib=MIB, dirty_mibps=DIRTY, port=port, container=name)
    try:
        before = work.query("a")
        with Client(lab, port) as client:
            code, _, failed, lost = _cell(lab, POINTS["post-copy"], fault, 0, port, work, what=(name,))
        assert not client.errors and not client.taken_back(), (client.errors, client.said())
        if lost:
            assert container_states(lab, name) == {"a": "paused", "b": ""}       # stopped, and alone
            res = lab.run("a", ["livemig", "recover", "--target-lost", "--json"], check=False, timeout=120)
            assert res.returncode == 0 and json.loads(res.stdout)["settled"][0]["outcome"] == "rolled back", res.stdout
        runs_on = container_runs(lab, name)
        assert Outcome(code, runs_on, failed, lost) == RUNC_POSTCOPY[fault], client.said()
        assert_counts_on_whole(work, runs_on, before)
        assert_nothing_left(lab)
    finally:
        for h in ("a", "b"):
            lab.run(h, ["runc", "delete", "--force", name], check=False)
            lab.run(h, ["rm", "-rf", work.bundle], check=False)
