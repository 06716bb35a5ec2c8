"""livemig move CTR for podman in the namespaced lab: the seeds' counter web server (each
request answers the next integer) moves, image and all, and answers the next number there."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.held import end_if_held, go_on, wait_stopped
from tests.test_stopcopy_faults import (
    killed_at,
    recover,
)
from tests.waiting import eventually

pytestmark = pytest.mark.lab

TOOL = "/opt/livemig/tests/workloads/container.py"
ENV = ["env", "PODMAN_IGNORE_CGROUPSV1_WARNING=1"]


def ask(lab, host: str, name: str) -> int:
    return int(lab.text(host, ["python3", TOOL, "ask", "--name", name]))


def running(lab, host: str, name: str) -> bool | None:
    res = lab.run(host, [*ENV, "podman", "container", "inspect", name], check=False)
    return json.loads(res.stdout)[0]["State"]["Running"] if res.returncode == 0 else None


def leftovers(lab) -> dict:
    return lab.leftovers()


def test_podman_counter_server_moves_with_its_image_and_answers_the_next_number(lab):
    first = int(lab.text("a", ["python3", TOOL, "serve", "--name", "web1"]))
    assert ask(lab, "a", "web1") == first + 1
    assert lab.run("b", [*ENV, "podman", "image", "exists", "localhost/livemig-busybox:1"],
                   check=False).returncode != 0          # b lacks the image: livemig sends it
    res = lab.run("a", [*ENV, "livemig", "move", "--json", "web1", "b"], check=False, timeout=600)
    assert res.returncode == 0, res.stderr.decode()
    report = json.loads(res.stdout)
    assert (report["runtime"], report["mode"], report["outcome"]) == ("podman", "stopcopy", "moved")
    assert report["image_bytes_wire"] > 0
    assert ask(lab, "b", "web1") == first + 2             # the next number, from the target
    assert running(lab, "b", "web1") and running(lab, "a", "web1") is None
    assert leftovers(lab) == {"a": ([], []), "b": ([], [])}
    # refused before anything stops: postcopy is not podman's, and the name is taken on a now
    lab.run("a", ["python3", TOOL, "serve", "--name", "web1"])
    res = lab.run("b", [*ENV, "livemig", "move", "web1", "a"], check=False, timeout=600)
    assert res.returncode == 3 and "web1" in res.stderr.decode()
    res = lab.run("b", [*ENV, "livemig", "move", "--mode", "postcopy", "web1", "a"], check=False, timeout=600)
    assert res.returncode == 3 and "podman" in res.stderr.decode()
    assert ask(lab, "b", "web1") == first + 3 and running(lab, "b", "web1")
    for h in ("a", "b"):
        lab.run(h, [*ENV, "podman", "rm", "--force", "web1"])


def replicas(lab, host: str) -> list[str]:
    return sorted(n for n in lab.text(host, [*ENV, "podman", "ps", "--all", "--format", "{{.Names}}"]).split()
                  if "-clone" in n)


def test_clones_answer_the_same_next_number_on_every_host_while_the_original_runs_on(lab):
    first = int(lab.text("a", ["python3", TOOL, "serve", "--name", "web3"]))
    res = lab.run("a", [*ENV, "livemig", "clone", "--json", "web3", "a", "b", "--count", "2"],
                  check=False, timeout=600)
    assert res.returncode == 0, res.stderr.decode()
    report = json.loads(res.stdout)
    assert report["outcome"] == "cloned" and report["frozen_seconds"] > 0 and report["pages_written"] > 0
    assert sorted((r["host"], r["name"]) for r in report["replicas"]) == [
        ("a", "web3-clone-1"), ("a", "web3-clone-2"), ("b", "web3-clone-1"), ("b", "web3-clone-2")]
    # the seeds' replicas: each restored from the same checkpoint answers the same next number
    for host in ("a", "b"):
        assert replicas(lab, host) == ["web3-clone-1", "web3-clone-2"]
        for name in replicas(lab, host):
            assert running(lab, host, name) and ask(lab, host, name) == first + 1
    assert ask(lab, "a", "web3") == first + 1 and running(lab, "a", "web3")
    assert leftovers(lab) == {"a": ([], []), "b": ([], [])}
    # a replica under the original's own name cannot go where the original is; nothing changes
    res = lab.run("a", [*ENV, "livemig", "clone", "--keep-name", "web3", "b", "a"], check=False, timeout=600)
    assert res.returncode == 3 and "web3" in res.stderr.decode() and "on a" in res.stderr.decode()
    assert lab.run("b", [*ENV, "podman", "container", "exists", "web3"], check=False).returncode != 0
    for host in ("a", "b"):
        lab.run(host, [*ENV, "podman", "rm", "--force", *replicas(lab, host)])
    lab.run("a", [*ENV, "podman", "rm", "--force", "web3"])


def test_a_podman_restore_that_fails_leaves_no_replica_and_moves_nothing(lab):
    """b's podman cannot start a task (pids.max 0 for its containers): the restore fails for real."""
    first = int(lab.text("a", ["python3", TOOL, "serve", "--name", "web4"]))
    limit = "/sys/fs/cgroup/pids/libpod_parent"
    lab.run("b", ["sh", "-c", f"mkdir -p {limit} && echo 0 > {limit}/pids.max"])
    try:
        res = lab.run("a", [*ENV, "livemig", "clone", "web4", "a", "b", "--count", "2"], check=False, timeout=600)
        err = res.stderr.decode()
        assert res.returncode == 6 and "restore on b" in err and "conmon" in err, err
        assert replicas(lab, "a") == [] and replicas(lab, "b") == []     # a's were restored, and deleted
        res = lab.run("a", [*ENV, "livemig", "move", "--json", "web4", "b"], check=False, timeout=600)
        assert res.returncode == 6, res.stderr.decode()
        assert json.loads(res.stdout)["outcome"] == "rolled back"
    finally:
        lab.run("b", ["sh", "-c", f"echo max > {limit}/pids.max"])
    assert running(lab, "a", "web4") and running(lab, "b", "web4") is None
    assert ask(lab, "a", "web4") == first + 1        # the source's own state, restored where it was
    assert leftovers(lab) == {"a": ([], []), "b": ([], [])}
    lab.run("a", [*ENV, "podman", "rm", "--force", "web4"])


def test_force_goes_past_a_must_match_mismatch_and_says_so(lab):
    # b's podman runs containers with runc, a's with crun: podman's guide wants the same OCI runtime
    conf = "/etc/containers/containers.conf"
    lab.run("b", ["sh", "-c", f"mkdir -p /etc/containers && printf '[engine]\\nruntime = \"runc\"\\n' > {conf}"])
    try:
        first = int(lab.text("a", ["python3", TOOL, "serve", "--name", "web9"]))
        res = lab.run("a", [*ENV, "livemig", "move", "web9", "b"], check=False, timeout=600)
        err = res.stderr.decode()
        assert res.returncode == 3 and "same OCI runtime" in err and "--force" in err, err
        assert ask(lab, "a", "web9") == first + 1 and running(lab, "b", "web9") is None   # nothing touched
        res = lab.run("a", [*ENV, "livemig", "move", "--force", "--json", "web9", "b"], check=False, timeout=600)
        assert res.returncode == 0, res.stderr.decode()
        report = json.loads(res.stdout)
        assert any(w.startswith("forced past a failed check: same OCI runtime") for w in report["warnings"]), report
        assert ask(lab, "b", "web9") == first + 2 and running(lab, "a", "web9") is None
        assert leftovers(lab) == {"a": ([], []), "b": ([], [])}
    finally:
        lab.run("b", ["rm", "-f", conf])
        for h in ("a", "b"):
            lab.run(h, [*ENV, "podman", "rm", "--force", "web9"], check=False)


def test_a_host_named_twice_is_refused_and_nothing_of_either_agent_is_removed_by_the_other(lab):
    # one clone ID, two agents on b: the second finds the first's work directory, and says so
    lab.text("a", ["python3", TOOL, "serve", "--name", "web5"])
    try:
        res = lab.run("a", [*ENV, "livemig", "clone", "web5", "b", lab.address("b")], check=False, timeout=600)
        err = res.stderr.decode()
        said = [line for line in err.splitlines() if line.startswith("livemig")]     # not its progress
        assert res.returncode == 3 and len(said) == 1 and "named twice" in said[0], err
        assert replicas(lab, "b") == [] and running(lab, "a", "web5")
        assert leftovers(lab) == {"a": ([], []), "b": ([], [])}
    finally:
        lab.run("a", [*ENV, "podman", "rm", "--force", "web5"])


def test_a_podman_move_killed_before_its_commit_is_recovered_by_a_restore_here(lab):
    """podman's final checkpoint stopped the source's container (podman cannot checkpoint a
    paused one): `livemig recover` brings it back with a restore from that checkpoint, not
    an unpause, and ends the target's paused copy."""
    first = int(lab.text("a", ["python3", TOOL, "serve", "--name", "web6"]))
    try:
        killed_at(lab, "restored", "web6")
        assert running(lab, "a", "web6") is False          # checkpointed: stopped, not paused
        settled = recover(lab)
        assert settled["outcome"] == "rolled back", settled
        assert running(lab, "a", "web6") and running(lab, "b", "web6") is None
        assert ask(lab, "a", "web6") == first + 1           # its own state, as of the checkpoint
        assert leftovers(lab) == {"a": ([], []), "b": ([], [])}
    finally:
        for h in ("a", "b"):
            lab.run(h, [*ENV, "podman", "rm", "--force", "web6"], check=False)


def test_a_podman_rm_container_rolled_back_comes_back_from_its_checkpoint(lab):
    """A --rm container (as a Quadlet's is) is removed by podman as its checkpoint stops it,
    the checkpoint podman kept with it: interrupted once it froze, the move puts it back from
    the archive it exported, with its state, never leaving it gone."""
    first = int(lab.text("a", ["python3", TOOL, "serve", "--rm", "--name", "web7"]))
    mover = None
    try:
        mover = lab.popen("a", [*ENV, "LIVEMIG_TEST_STOP_AT=restore", "livemig", "move", "web7", "b"],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        stopped = wait_stopped(lab, mover, "restore")
        assert running(lab, "a", "web7") is None        # removed with its checkpoint, by podman
        lab.run("a", ["kill", "-INT", *stopped])
        go_on(lab, mover, stopped)
        assert mover.wait(timeout=300) == 130, mover.stderr.read().decode()
        assert running(lab, "a", "web7") and running(lab, "b", "web7") is None
        assert ask(lab, "a", "web7") == first + 1           # its own state, as of the checkpoint
        assert leftovers(lab) == {"a": ([], []), "b": ([], [])}
    finally:
        end_if_held(lab, mover)
        for h in ("a", "b"):
            lab.run(h, [*ENV, "podman", "rm", "--force", "web7"], check=False)


def test_a_podman_rm_container_whose_move_was_killed_comes_back_from_its_checkpoint_by_recover(lab):
    """Killed outright (SIGKILL) once the target restored it, the move leaves a --rm container
    gone here (podman removed it at its checkpoint): `livemig recover` restores it from the
    archive that checkpoint exported, with its state, and ends the target's stopped copy. It
    was settled as lost, its archive deleted with the move's directory."""
    first = int(lab.text("a", ["python3", TOOL, "serve", "--rm", "--name", "web8"]))
    try:
        killed_at(lab, "restored", "web8")
        assert running(lab, "a", "web8") is None        # removed with its checkpoint, by podman
        settled = recover(lab)
        assert settled["outcome"] == "rolled back", settled
        assert running(lab, "a", "web8") and running(lab, "b", "web8") is None
        assert ask(lab, "a", "web8") == first + 1           # its own state, as of the checkpoint
        assert leftovers(lab) == {"a": ([], []), "b": ([], [])}
    finally:
        for h in ("a", "b"):
            lab.run(h, [*ENV, "podman", "rm", "--force", "web8"], check=False)


def test_a_podman_container_never_runs_on_the_target_before_its_resume(lab):
    """Restored on b, the container stays stopped until the Resume (podman's runtime gets the
    CRIU configuration that leaves it so through conmon): held just after the restore, b's
    copy has not counted once past the source's checkpoint, counting thousands a second."""
    lab.run("a", ["python3", TOOL, "busy", "--name", "still1"])
    mover = None
    try:
        mover = lab.popen("a", [*ENV, "LIVEMIG_TEST_STOP_AT=restored", "livemig", "move", "--json", "still1", "b"],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stopped = wait_stopped(lab, mover, "restored")
        checkpointed = lab.text("a", ["python3", TOOL, "written", "--name", "still1"])
        time.sleep(0.5)
        assert lab.text("b", ["python3", TOOL, "written", "--name", "still1"]) == checkpointed
        assert json.loads(lab.text("b", [*ENV, "podman", "container", "inspect", "still1"]))[0]["State"]["Paused"]
        go_on(lab, mover, stopped)
        out, err = mover.communicate(timeout=300)
        assert mover.returncode == 0 and json.loads(out)["outcome"] == "moved", err.decode()
        eventually(lambda: lab.text("b", ["python3", TOOL, "written", "--name", "still1"]),
                   lambda now: now.strip() != "" and int(now) > int(checkpointed or 0), within=10)
        assert running(lab, "b", "still1")
        assert running(lab, "a", "still1") is None
        assert leftovers(lab) == {"a": ([], []), "b": ([], [])}
    finally:
        end_if_held(lab, mover)     # failed while held: nothing of it may stay
        for h in ("a", "b"):
            lab.run(h, [*ENV, "podman", "rm", "--force", "--time", "0", "still1"], check=False)
            lab.run(h, ["find", "/var/lib/livemig", "-mindepth", "1", "-maxdepth", "1", "!", "-name", "logs",
                        "-exec", "rm", "-rf", "{}", "+"], check=False)
