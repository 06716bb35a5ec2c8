"""A workload systemd runs moves as the unit it is (issue 35), in a lab whose hosts' init is
systemd (python -m tests.lab up --init systemd).

A service's main process moved a -> b: on b the same unit (its definition carried, b had
none) runs the copy as its main process, so `systemctl` there says it is active and a
`systemctl stop` stops it; on a the unit ended without a restart, inactive (not failed),
and disabled as it was enabled; the service's lines go on in b's journal, for its unit. A
rollback leaves a's unit active with its workload, never restarted; b keeps nothing of it.
What cannot be handed over is refused before anything is touched: a part of a unit's tree,
a unit already active on the target.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from tests.held import end_if_held, wait_stopped
from tests.lab import CONTAINER_TOOL, WORKLOAD
from tests.test_trial import trial_leftovers
from tests.waiting import eventually

pytestmark = pytest.mark.lab

UNIT = "memc.service"
PORT = 7777
FIRST_PID = 20000     # the unit's main process starts as this PID: free on b, where it is restored
MEMCOUNTER = f"""[Unit]
Description=memcounter, moved by livemig's tests
[Service]
ExecStart=/usr/bin/python3 {WORKLOAD} run --mib 64 --dirty-mibps 2 --port {PORT} --children {{children}}
Restart=always
[Install]
WantedBy=multi-user.target
"""
TICKER = """[Unit]
Description=a service that logs a numbered line every 50 ms
[Service]
ExecStart=/usr/bin/python3 -u -c "import itertools, time; [(print('tick', i), time.sleep(0.05)) for i in itertools.count()]"
SyslogIdentifier=ticker
Restart=always
"""


def show(lab, host: str, *props: str) -> dict[str, str]:
    text = lab.text(host, ["systemctl", "show", UNIT, *(f"--property={p}" for p in props)])
    return dict(line.split("=", 1) for line in text.splitlines())


def start_unit(lab, text: str, *, enable: bool = True) -> int:
    """UNIT on a from text, started (enabled too) as FIRST_PID: its main PID."""
    lab.run("a", ["sh", "-c", f"cat > /etc/systemd/system/{UNIT} && systemctl daemon-reload"], input=text.encode())
    lab.run("a", ["sh", "-c", (f"echo {FIRST_PID - 1} > /proc/sys/kernel/ns_last_pid && "
                              f"systemctl {'enable --now' if enable else 'start'} --quiet {UNIT}")])
    pid = int(show(lab, "a", "MainPID")["MainPID"])
    assert pid >= FIRST_PID
    return pid


@pytest.fixture
def unit(sd_lab):
    """UNIT is nowhere once the test is done, on either host."""
    yield
    for h in "ab":
        sd_lab.run(h, ["sh", "-c", (f"systemctl disable --now --quiet {UNIT}; rm -rf /etc/systemd/system/{UNIT} "
                                   f"/run/systemd/system/{UNIT}.d; systemctl daemon-reload; "
                                   f"systemctl reset-failed {UNIT}")], check=False)


def held_at_restore(lab, *what: str) -> tuple[subprocess.Popen, list[str]]:
    """livemig move WHAT b on a, in stop-and-copy, stopped at its test point "restore" (the
    workload frozen, its unit held): the mover, and its PIDs on a."""
    mover = lab.popen("a", ["env", "LIVEMIG_TEST_STOP_AT=restore", "livemig", "move", "--mode", "stopcopy",
                            *what, "b"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        return mover, wait_stopped(lab, mover, "restore")
    except BaseException:
        end_if_held(lab, mover)
        raise


def interrupted(lab, mover: subprocess.Popen, stopped: list[str]) -> None:
    """Ctrl-C to a move held_at_restore: it rolls back (exit code 130)."""
    try:
        lab.run("a", ["kill", "-INT", *stopped])
        lab.run("a", ["kill", "-CONT", *stopped])
        mover.send_signal(signal.SIGCONT)
        assert mover.wait(timeout=300) == 130, mover.stderr.read().decode()
    finally:
        end_if_held(lab, mover)


def query(lab, host: str, what: str = "get", wait: float = 10) -> dict:
    return json.loads(lab.text(host, ["python3", WORKLOAD, "query", what, "--port", str(PORT), "--wait", str(wait)]))


@pytest.mark.parametrize("mode", ["auto", "postcopy", "stopcopy"])
def test_a_service_moves_and_the_same_unit_runs_it_on_the_target(sd_lab, unit, mode):
    lab = sd_lab
    pid = start_unit(lab, MEMCOUNTER.format(children=1))
    before = query(lab, "a")
    res = lab.run("a", ["livemig", "move", "--json", "--mode", mode, "--pid", str(pid), "b"],
                  check=False, timeout=600)
    report = json.loads(res.stdout)
    assert res.returncode == 0, res.stderr.decode()
    assert report["outcome"] == "moved" and report["unit"] == UNIT
    assert not [w for w in report["warnings"] if "did not take it" in w or "main process is" in w], report["warnings"]

    # b: the same unit, its definition carried, runs the copy as its main process, enabled
    there = show(lab, "b", "ActiveState", "SubState", "MainPID", "UnitFileState", "FragmentPath", "DropInPaths")
    assert (there["ActiveState"], there["SubState"], int(there["MainPID"])) == ("active", "running", pid)
    assert there["UnitFileState"] == "enabled" and there["FragmentPath"] == f"/etc/systemd/system/{UNIT}"
    assert there["DropInPaths"] == ""       # nothing of livemig's left in its definition
    after = query(lab, "b")
    assert after["host"] == "b" and after["pid"] == pid and after["counter"] >= before["counter"]
    assert query(lab, "b", "verify")["bad_pages"] == 0
    cgroup = lab.text("b", ["cat", f"/proc/{pid}/cgroup"]).splitlines()[-1]
    assert cgroup == f"0::/system.slice/{UNIT}"
    # its child too is the unit's
    procs = lab.text("b", ["cat", f"/sys/fs/cgroup/system.slice/{UNIT}/cgroup.procs"]).split()
    assert len(procs) == 2 and str(pid) in procs

    # a: ended, not failed, never restarted, disabled; nothing of it runs
    here = show(lab, "a", "ActiveState", "Result", "NRestarts", "UnitFileState", "DropInPaths")
    assert (here["ActiveState"], here["Result"], here["NRestarts"]) == ("inactive", "success", "0")
    assert here["UnitFileState"] == "disabled" and here["DropInPaths"] == ""
    assert lab.text("a", ["pgrep", "-f", "memcounter.py run"], check=False).strip() == ""

    # the unit is b's now: Restart= restarts it there, and stop stops it
    lab.run("b", ["kill", "-KILL", str(pid)])
    eventually(lambda: show(lab, "b", "NRestarts", "ActiveState"),
               lambda s: s == {"NRestarts": "1", "ActiveState": "active"})
    lab.run("b", ["systemctl", "stop", UNIT])
    assert lab.text("b", ["pgrep", "-f", "memcounter.py run"], check=False).strip() == ""


@pytest.mark.parametrize("trial", [False, True], ids=["moved", "tried first"])
def test_a_service_s_lines_go_on_in_the_target_s_journal_for_its_unit(sd_lab, unit, trial):
    """Its stdout was a stream to a's journald, which CRIU cannot dump: b's restore gives it
    one of b's, opened as systemd opens a service's; no line is lost or written twice. Tried
    first (--trial), its trial restore on b is given streams of its own (never b's journal),
    and leaves no cgroup there."""
    lab = sd_lab

    def ticks(host: str) -> list[int]:
        out = lab.text(host, ["journalctl", "--no-pager", "-o", "cat", "-u", UNIT, "SYSLOG_IDENTIFIER=ticker"])
        return [int(line.split()[1]) for line in out.splitlines() if line.startswith("tick ")]
    earlier = {h: len(ticks(h)) for h in "ab"}      # an earlier test's lines, in the same unit's name
    pid = start_unit(lab, TICKER, enable=False)
    res = lab.run("a", ["livemig", "move", "--json", *(["--trial"] if trial else []), "--pid", str(pid), "b"],
                  check=False, timeout=600)
    assert res.returncode == 0, res.stderr.decode()
    assert json.loads(res.stdout)["trial"] == ("passed" if trial else "")
    assert trial_leftovers(lab) == ([], [])
    time.sleep(1)
    lab.run("b", ["systemctl", "stop", UNIT])
    on_a, on_b = ticks("a")[earlier["a"]:], ticks("b")[earlier["b"]:]
    assert on_a and on_b, (on_a, on_b)
    assert on_a + on_b == list(range(on_b[-1] + 1))     # one line each, in order, from 0: a's then b's


def test_a_service_rolled_back_runs_on_in_its_unit_never_restarted(sd_lab, unit):
    """Interrupted once its workload froze (Ctrl-C as the restore begins): a's unit runs the
    same process on, its drop-in gone; b keeps neither a copy nor the definition it got."""
    lab = sd_lab
    pid = start_unit(lab, MEMCOUNTER.format(children=0))
    mover, stopped = held_at_restore(lab, "--pid", str(pid))
    try:
        assert show(lab, "a", "DropInPaths")["DropInPaths"].endswith("50-livemig-moving.conf")
    except BaseException:
        end_if_held(lab, mover)
        raise
    interrupted(lab, mover, stopped)
    here = show(lab, "a", "ActiveState", "MainPID", "NRestarts", "DropInPaths", "UnitFileState")
    assert here == {"ActiveState": "active", "MainPID": str(pid), "NRestarts": "0", "DropInPaths": "",
                    "UnitFileState": "enabled"}
    assert query(lab, "a")["pid"] == pid
    assert show(lab, "b", "LoadState")["LoadState"] == "not-found"
    assert lab.text("b", ["ls", "/etc/systemd/system"]).split().count(UNIT) == 0


def test_what_cannot_be_handed_over_is_refused_before_anything_is_touched(sd_lab, unit):
    lab = sd_lab
    pid = start_unit(lab, MEMCOUNTER.format(children=1))
    query(lab, "a")     # (it forks its child before it answers)
    child = int(lab.text("a", ["pgrep", "-P", str(pid), "-f", "memcounter.py run"]).split()[0])

    # a part of the unit's tree: the rest would stay, or be killed with it
    res = lab.run("a", ["livemig", "move", "--pid", str(child), "b"], check=False)
    assert res.returncode == 3
    assert f"PID {child} is one of {UNIT}'s processes, not its main one (PID {pid})" in res.stderr.decode()

    # the same unit active on the target: it would run twice there
    lab.run("b", ["sh", "-c", (f"cat > /etc/systemd/system/{UNIT} && systemctl daemon-reload && "
                              f"systemctl start {UNIT}")], input=MEMCOUNTER.format(children=0).encode())
    res = lab.run("a", ["livemig", "move", "--force", "--pid", str(pid), "b"], check=False)
    assert res.returncode == 3
    assert f"{UNIT} is active on b: the workload would run twice there" in res.stderr.decode()

    here = show(lab, "a", "ActiveState", "MainPID", "NRestarts", "DropInPaths")
    assert here == {"ActiveState": "active", "MainPID": str(pid), "NRestarts": "0", "DropInPaths": ""}


def test_a_move_killed_with_its_unit_held_is_settled_by_recover_with_the_unit_as_it_was(sd_lab, unit):
    """The coordinator killed outright once the workload froze: `livemig recover` resumes it
    here and gives the unit back its Restart= (the drop-in goes), saying so."""
    lab = sd_lab
    pid = start_unit(lab, MEMCOUNTER.format(children=0))
    mover, stopped = held_at_restore(lab, "--pid", str(pid))
    try:
        lab.run("a", ["kill", "-KILL", *stopped])
        mover.send_signal(signal.SIGCONT)
        mover.wait(timeout=60)
    finally:
        end_if_held(lab, mover)
    res = lab.run("a", ["livemig", "recover", "--json"], check=False, timeout=120)
    assert res.returncode == 0, res.stderr.decode()
    [settled] = json.loads(res.stdout)["settled"]
    assert settled["outcome"] == "rolled back" and f"{UNIT} here runs it as before" in settled["detail"]
    here = show(lab, "a", "ActiveState", "MainPID", "NRestarts", "DropInPaths")
    assert here == {"ActiveState": "active", "MainPID": str(pid), "NRestarts": "0", "DropInPaths": ""}
    assert query(lab, "a")["pid"] == pid
    # and its Restart= is its own again
    lab.run("a", ["kill", "-KILL", str(pid)])
    eventually(lambda: show(lab, "a", "NRestarts", "ActiveState"),
               lambda s: s == {"NRestarts": "1", "ActiveState": "active"})


QUADLET = "web1"
# The seeds' counter server (tests/workloads/container.py's SERVER), as a Quadlet runs it: each
# connection to 8080 answers the next integer ($$: systemd's $). Its sh ignores SIGTERM: a stop
# kills it, which is its success.
COUNTER_QUADLET = """[Unit]
Description=the seeds' counter server, a Quadlet moved by livemig's tests
[Container]
Image=localhost/livemig-busybox:1
ContainerName=web1
Exec=sh -c "i=0; while true; do i=$$((i+1)); echo $$i | nc -l -p 8080 >/dev/null; done"
StopSignal=SIGKILL
[Service]
Restart=always
SuccessExitStatus=137
[Install]
WantedBy=multi-user.target
"""


def quadlet_show(lab, host: str, *props: str) -> dict[str, str]:
    text = lab.text(host, ["systemctl", "show", f"{QUADLET}.service", *(f"--property={p}" for p in props)])
    return dict(line.split("=", 1) for line in text.splitlines())


def ask(lab, host: str) -> int:
    return int(lab.text(host, ["python3", CONTAINER_TOOL, "ask", "--name", QUADLET]))


def conmon_of(lab, host: str) -> int:
    return int(lab.text(host, ["podman", "inspect", QUADLET, "--format", "{{.State.ConmonPid}}"]))


@pytest.fixture
def quadlet(sd_lab):
    """web1.container on a, started; nowhere once the test is done."""
    lab = sd_lab
    lab.run("a", ["python3", CONTAINER_TOOL, "image"])
    lab.run("a", ["sh", "-c", (f"mkdir -p /etc/containers/systemd && cat > /etc/containers/systemd/{QUADLET}.container"
                              " && systemctl daemon-reload")], input=COUNTER_QUADLET.encode())
    lab.run("a", ["systemctl", "start", f"{QUADLET}.service"])
    eventually(lambda: lab.run("a", ["python3", CONTAINER_TOOL, "ask", "--name", QUADLET], check=False).returncode,
               lambda rc: rc == 0)
    yield
    for h in "ab":
        lab.run(h, ["sh", "-c", (f"systemctl unmask --quiet {QUADLET}.service; systemctl stop {QUADLET}.service; "
                                f"rm -f /etc/containers/systemd/{QUADLET}.container; rm -rf /run/systemd/system/"
                                f"{QUADLET}.service.d; systemctl daemon-reload; systemctl reset-failed; "
                                f"podman rm -f {QUADLET}")], check=False)


def test_a_quadlet_s_container_moves_there_and_back_and_its_unit_runs_it_on_each(sd_lab, quadlet):
    """The seeds' counter server under a Quadlet: a -> b, where the Quadlet file is carried and
    its unit runs the restored container (conmon its main process) and counts on; a's unit ends
    without a restart and is masked (a generated unit cannot be disabled); then back b -> a,
    where the unit is unmasked and runs it again."""
    lab = sd_lab
    first = ask(lab, "a")
    for here, there, n in (("a", "b", 1), ("b", "a", 2)):
        res = lab.run(here, ["livemig", "move", "--json", QUADLET, there], check=False, timeout=600)
        assert res.returncode == 0, res.stderr.decode()
        report = json.loads(res.stdout)
        assert report["outcome"] == "moved" and report["unit"] == f"{QUADLET}.service", report
        assert not [w for w in report["warnings"] if "did not take it" in w or "main process is" in w], report
        now = quadlet_show(lab, there, "ActiveState", "SubState", "MainPID", "NRestarts", "DropInPaths")
        assert (now["ActiveState"], now["SubState"], now["DropInPaths"]) == ("active", "running", "")
        assert int(now["MainPID"]) == conmon_of(lab, there)
        assert ask(lab, there) == first + n       # the next number: its state came along
        gone = quadlet_show(lab, here, "ActiveState", "Result", "NRestarts", "LoadState")
        assert gone == {"ActiveState": "inactive", "Result": "success", "NRestarts": "0", "LoadState": "masked"}
        assert lab.run(here, ["podman", "container", "exists", QUADLET], check=False).returncode == 1
    # its own unit's stop stops it, through the container's ID file it was given
    lab.run("a", ["systemctl", "stop", f"{QUADLET}.service"])
    assert lab.run("a", ["podman", "container", "exists", QUADLET], check=False).returncode == 1


def test_a_quadlet_s_container_rolled_back_runs_on_in_its_unit_with_its_state(sd_lab, quadlet):
    """Interrupted as the restore begins, the container its checkpoint ended (a Quadlet's is
    --rm: podman removed it) comes back from the exported archive into its unit's cgroup, and
    a's unit runs it again, never having restarted it; b keeps nothing."""
    lab = sd_lab
    first = ask(lab, "a")
    interrupted(lab, *held_at_restore(lab, QUADLET))
    here = quadlet_show(lab, "a", "ActiveState", "MainPID", "NRestarts", "DropInPaths", "LoadState")
    assert (here["ActiveState"], here["NRestarts"], here["DropInPaths"], here["LoadState"]) == \
        ("active", "0", "", "loaded")
    assert int(here["MainPID"]) == conmon_of(lab, "a")
    assert ask(lab, "a") == first + 1
    assert lab.run("b", ["podman", "container", "exists", QUADLET], check=False).returncode == 1
    assert quadlet_show(lab, "b", "LoadState")["LoadState"] == "not-found"


def test_a_container_labelled_as_a_unit_s_that_does_not_run_it_is_refused_untouched(sd_lab):
    """podman's label PODMAN_SYSTEMD_UNIT names a unit whose main process is not the
    container's conmon: which unit would start it again cannot be told. Refused before
    anything is touched, whatever the flags."""
    lab = sd_lab
    first = int(lab.text("a", ["python3", CONTAINER_TOOL, "serve", "--name", "web8", "--label",
                               "PODMAN_SYSTEMD_UNIT=web8.service"]))
    try:
        res = lab.run("a", ["livemig", "move", "--force", "web8", "b"], check=False, timeout=300)
        assert res.returncode == 3
        assert "container web8 is labelled as web8.service's (PODMAN_SYSTEMD_UNIT)" in res.stderr.decode()
        assert int(lab.text("a", ["python3", CONTAINER_TOOL, "ask", "--name", "web8"])) == first + 1
        assert lab.run("b", ["podman", "container", "exists", "web8"], check=False).returncode == 1
    finally:
        lab.run("a", ["podman", "rm", "--force", "web8"], check=False)
