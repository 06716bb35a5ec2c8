"""The Ansible collection livemig.fleet (ansible/ansible_collections/livemig/fleet, issue 29) in the
three-host lab: its example playbook drains each host in turn (serial: 1) for maintenance and
brings the workloads back, in check mode first (the plans, nothing touched), then for real; its
move module, run again, is ok and unchanged; a host that cannot be emptied is given back what left
it, and is not maintained.

The controller is ansible-core from PyPI in this machine's venv (.ci/setup installs it), run in
host c's network and reaching every host over its sshd, as an operator's machine would: with
this machine's OpenSSH, the lab's root key, and the hosts' keys checked against the lab's
known_hosts. The modules run on the hosts with their own Python (trixie's 3.13) and their livemig.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from livemig.source.drain import DONE
from tests import contract
from tests.lab.hosts import LAB_DIR, REPO, SSH_PORT_TOO

pytestmark = pytest.mark.lab

ANSIBLE_PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")
PLAYBOOK = "livemig.fleet.maintenance"        # the collection's playbook, by its name
CONTAINER, PROCESS = "fleet1", 5301           # a's workloads: a runc container, a process tree
PORT = 7841                                   # the container's memcounter; the tree's on the next two
POD = "fleet2"                                # a podman container, for the move module's idempotency alone
HOSTS = ("a", "b", "c")
TOOL = "/opt/livemig/tests/workloads/container.py"
DRAIN_TASK = "Move every workload off the host, onto the others"
MAINTENANCE_TASK = "Maintenance (a placeholder for the real work, e.g. a kernel update and a reboot)"
BACK_TASK = "Bring the workloads back"
# The maintenance, as the test gives it: it writes down what the host runs while it is maintained.
MAINTENANCE = "sh -c 'runc list -q > /root/maintained; pgrep -f \"memcounter[.]py run\" >> /root/maintained; true'"

# Each task's result on each host, one JSON line each, into the file $LIVEMIG_ANSIBLE_RECORD: what
# the modules returned, read by the test (ansible-core has no JSON output of its own to parse).
RECORDER = '''
import json, os
from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "notification"
    CALLBACK_NAME = "record"
    CALLBACK_NEEDS_ENABLED = True

    def _record(self, result, status):
        with open(os.environ["LIVEMIG_ANSIBLE_RECORD"], "a") as f:
            f.write(json.dumps({"task": result.task.get_name(), "host": result.host.get_name(), "status": status,
                                "result": result.result}, default=str) + "\\n")

    def v2_runner_on_ok(self, result):
        self._record(result, "ok")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._record(result, "ignored" if ignore_errors else "failed")

    def v2_runner_on_skipped(self, result):
        self._record(result, "skipped")
'''


@dataclass
class Played:
    rc: int
    output: str                  # what ansible-playbook printed (its default callback), for a failure's message
    records: list[dict]

    def task(self, name: str) -> dict[str, dict]:
        """The task's record on each host it ran on ({host: record})."""
        return {r["host"]: r for r in self.records if r["task"] == name}


class Controller:
    """ansible-playbook with its own configuration, inventory and ssh files (none of this
    machine's), in host c's network."""

    def __init__(self, lab, home: Path):
        if not ANSIBLE_PLAYBOOK.is_file():
            pytest.fail(f"no {ANSIBLE_PLAYBOOK}: run .ci/setup (it installs ansible-core into the venv)")
        self.lab, self.home = lab, home
        ssh = home / ".ssh"
        ssh.mkdir(mode=0o700, parents=True)
        key = ssh / "id_ed25519"
        key.write_bytes((LAB_DIR / "keys/id_ed25519").read_bytes())
        key.chmod(0o600)
        known = ssh / "known_hosts"       # the lab's, which names each host by its name and address
        known.write_text(lab.text("a", ["cat", "/root/.ssh/known_hosts"]))
        (home / "callback_plugins").mkdir()
        (home / "callback_plugins/record.py").write_text(RECORDER)
        # the hosts by the names they know each other by, reached at their addresses from here
        inventory = {"livemig": {"hosts": {h: {"ansible_host": lab.address(h)} for h in HOSTS}},
                     "all": {"vars": {"ansible_user": "root"}}}
        inventory["livemig"]["hosts"]["a"]["livemig_pids"] = [PROCESS]
        (home / "inventory.yml").write_text(json.dumps(inventory))     # (JSON is YAML)
        # -F /dev/null: not this machine's ssh configuration (ssh reads root's own ~/.ssh, whatever
        # HOME says); host keys checked; no master connection left behind after a run
        ssh_args = (f"-F /dev/null -i {key} -o IdentitiesOnly=yes -o UserKnownHostsFile={known} "
                    "-o StrictHostKeyChecking=yes -o BatchMode=yes -o ConnectTimeout=10 -o ControlMaster=no")
        (home / "ansible.cfg").write_text(
            "[defaults]\n"
            f"inventory = {home / 'inventory.yml'}\n"
            f"collections_path = {REPO / 'ansible'}\n"
            f"callback_plugins = {home / 'callback_plugins'}\n"
            "callbacks_enabled = record\n"
            "interpreter_python = /usr/bin/python3\n"
            f"local_tmp = {home / 'tmp'}\n"
            "host_key_checking = True\n"
            "retry_files_enabled = False\n"
            "nocolor = True\n"
            "[ssh_connection]\n"
            f"ssh_args = {ssh_args}\n"
            "pipelining = True\n")

    def play(self, playbook: str | Path, *args: str) -> Played:
        record = self.home / "record.jsonl"
        record.unlink(missing_ok=True)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(self.home), "LANG": "C.UTF-8",
               "ANSIBLE_CONFIG": str(self.home / "ansible.cfg"), "LIVEMIG_ANSIBLE_RECORD": str(record),
               "PYTHONWARNINGS": "ignore"}     # (cryptography's deprecations, said at every start)
        c = self.lab.state.host("c")
        t0 = time.monotonic()
        res = subprocess.run(["nsenter", "--target", str(c.pid), "--net", "--", str(ANSIBLE_PLAYBOOK), str(playbook),
                              *args], env=env, cwd=self.home, capture_output=True, text=True, timeout=1200,
                             check=False)
        output = f"{res.stdout}\n{res.stderr}\n(ansible-playbook: {time.monotonic() - t0:.1f} s)"
        print(output)        # shown by pytest with a failure
        records = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
        return Played(res.returncode, output, records)


@pytest.fixture(scope="module")
def ansible(lab3, tmp_path_factory) -> Controller:
    return Controller(lab3, tmp_path_factory.mktemp("ansible"))


def started(lab, host: str, pid: int) -> str:
    """When the process started (its stat's starttime): a process restored by CRIU is a new one."""
    return lab.text(host, ["cat", f"/proc/{pid}/stat"]).rsplit(")", 1)[1].split()[19]


def runc_pid(lab, host: str, name: str) -> int | None:
    res = lab.run(host, ["runc", "state", name], check=False)
    return json.loads(res.stdout)["pid"] if res.returncode == 0 else None


def runs_here(lab, host: str) -> list[str]:
    """What host runs of the test's: containers runc knows, memcounter processes."""
    return [*lab.text(host, ["runc", "list", "-q"]).split(),
            *lab.text(host, ["pgrep", "-f", "memcounter[.]py run"], check=False).split()]


def nothing_left(lab) -> bool:
    """No host holds anything of a move (lab.leftovers) but the drain's record of what it moved
    and its lock, which it keeps on purpose (DONE: a drain run again says what an earlier one moved)."""
    def kept(name: str) -> bool:
        return name == DONE or name.startswith(f"{DONE}.")
    return {h: ([x for x in images if not kept(x)], criu) for h, (images, criu) in lab.leftovers(HOSTS).items()} == \
        {h: ([], []) for h in HOSTS}


def reports_hold(records: list[dict]) -> None:
    """Every report a module returned is livemig's --json object as it printed it: valid
    against its command's schema (a move's, a drain's, their dry runs')."""
    for r in records:
        for one in [r["result"], *r["result"].get("results", [])]:
            report = one.get("report")
            if report:
                contract.held(report["command"], json.dumps(report).encode(), report["exit_code"])


def start(lab):
    ctr = lab.start_container_workload("a", mib=32, dirty_mibps=1, port=PORT, container=CONTAINER)
    tree = lab.start_workload("a", mib=32, dirty_mibps=1, pid=PROCESS, port=PORT + 1, children=1)
    return ctr, tree


def remove(lab, ctr) -> None:
    for h in HOSTS:
        lab.run(h, ["env", "PODMAN_IGNORE_CGROUPSV1_WARNING=1", "podman", "rm", "--force", "--time", "0", POD], check=False)
        lab.run(h, ["runc", "delete", "--force", ctr.container], check=False)
        lab.run(h, ["rm", "-rf", ctr.bundle, "/root/maintained"])


def test_rolling_maintenance_drains_each_host_in_turn_and_brings_its_workloads_back(lab3, ansible):
    lab = lab3
    ctr, tree = start(lab)
    try:
        before = {"ctr": ctr.query("a"), "tree": tree.query("a"), "child": tree.query("a", port=PORT + 2)}
        pids = {"ctr": runc_pid(lab, "a", CONTAINER), "tree": PROCESS}
        born = {k: started(lab, "a", pid) for k, pid in pids.items()}

        # check mode: each drain's plan, nothing touched
        played = ansible.play(PLAYBOOK, "--check")
        assert played.rc == 0, played.output
        reports_hold(played.records)
        drains = played.task(DRAIN_TASK)
        assert list(drains) == list(HOSTS), drains
        plan = drains["a"]["result"]
        assert plan["changed"] and plan["report"]["dry_run"] and plan["report"]["command"] == "drain --dry-run"
        assert sorted((p["workload"], p["runtime"]) for p in plan["report"]["placements"]) == [
            (str(PROCESS), "process"), (CONTAINER, "runc")], plan
        assert {p["target"] for p in plan["report"]["placements"]} <= {"b", "c"} and plan["moved"] == []
        assert [drains[h]["result"]["changed"] for h in ("b", "c")] == [False, False]    # nothing there
        assert all(r["status"] == "skipped" for r in played.task(MAINTENANCE_TASK).values())
        assert {h: runs_here(lab, h) for h in ("b", "c")} == {"b": [], "c": []}
        assert runc_pid(lab, "a", CONTAINER) == pids["ctr"]
        assert {k: started(lab, "a", pid) for k, pid in pids.items()} == born    # the same processes
        assert nothing_left(lab), lab.leftovers(HOSTS)

        # for real: the maintenance says what each host ran meanwhile
        played = ansible.play(PLAYBOOK, "-e", json.dumps({"livemig_maintenance_command": MAINTENANCE}))
        assert played.rc == 0, played.output
        reports_hold(played.records)
        # one host at a time: each drained, maintained and given its workloads back before the next
        assert [(r["task"], r["host"]) for r in played.records] == [
            (task, h) for h in HOSTS for task in (DRAIN_TASK, MAINTENANCE_TASK, BACK_TASK)], played.records
        drains = played.task(DRAIN_TASK)
        drained = drains["a"]["result"]
        assert drained["changed"] and drained["report"]["empty"], drained
        assert sorted((m["workload"], m["outcome"]) for m in drained["report"]["moves"]) == [
            (str(PROCESS), "moved"), (CONTAINER, "moved")], drained
        assert sorted(m["workload"] for m in drained["moved"]) == [str(PROCESS), CONTAINER]
        assert [drains[h]["result"]["changed"] for h in ("b", "c")] == [False, False]    # a's came back before
        back = played.task(BACK_TASK)
        assert [back[h]["status"] for h in HOSTS] == ["ok", "skipped", "skipped"], back    # (nothing left b or c)
        assert all(r["changed"] and r["report"]["outcome"] == "moved" and r["report"]["target"] == "a"
                   for r in back["a"]["result"]["results"]), back
        for h in HOSTS:       # each host was maintained empty
            assert lab.text(h, ["cat", "/root/maintained"]) == "", h

        # every workload back on a, on from where it was, its memory whole; nothing left elsewhere
        after = {"ctr": ctr.query("a", wait=10), "tree": tree.query("a", wait=10),
                 "child": tree.query("a", wait=10, port=PORT + 2)}
        for k, was in before.items():
            assert after[k]["counter"] > was["counter"], (k, was, after[k])
        for what, port in ((ctr, 0), (tree, 0), (tree, PORT + 2)):
            assert what.query("a", "verify", port=port)["bad_pages"] == 0
        assert runc_pid(lab, "a", CONTAINER) and started(lab, "a", PROCESS) != born["tree"]    # restored here
        assert {h: runs_here(lab, h) for h in ("b", "c")} == {"b": [], "c": []}
        assert nothing_left(lab), lab.leftovers(HOSTS)

        # the move module, again: ok, unchanged where the workload runs on its target already (a
        # podman container too, started on a for this, and a target named with its port); a
        # workload nowhere is livemig's refusal; check mode is the plan
        lab.run("a", ["python3", TOOL, "serve", "--name", POD])
        again = ansible.home / "again.yml"
        again.write_text(json.dumps([
            {"hosts": "b", "gather_facts": False, "tasks": [
                {"name": "again", "livemig.fleet.move": {"workload": "{{ item.workload }}", "runtime": "{{ item.runtime }}",
                                                         "target": "{{ item.target }}"},
                 "loop": [{"workload": CONTAINER, "runtime": "runc", "target": "a"},
                          {"workload": str(PROCESS), "runtime": "process", "target": "a"},
                          {"workload": POD, "runtime": "podman", "target": f"ssh://root@a:{SSH_PORT_TOO}"}]},
                {"name": "by name alone", "livemig.fleet.move": {"name": "{{ item }}", "target": "a"},
                 "loop": [CONTAINER, POD]},
                {"name": "nowhere", "livemig.fleet.move": {"workload": "nosuch", "target": "a"}, "ignore_errors": True}]},
            {"hosts": "a", "gather_facts": False, "tasks": [
                {"name": "plan", "livemig.fleet.move": {"pid": PROCESS, "target": "c"}, "check_mode": True}]}]))
        played = ansible.play(again)
        assert played.rc == 0, played.output
        reports_hold(played.records)
        for task in ("again", "by name alone"):
            for r in played.task(task)["b"]["result"]["results"]:
                assert not r["changed"] and r["report"] == {} and " already runs on " in r["msg"], r
        nowhere = played.task("nowhere")["b"]
        assert nowhere["status"] == "ignored" and nowhere["result"]["rc"] == 3, nowhere
        assert "nosuch" in nowhere["result"]["msg"] and nowhere["result"]["report"]["outcome"] == "failed"
        planned = played.task("plan")["a"]["result"]
        assert planned["changed"] and planned["report"]["command"] == "move --dry-run", planned
        assert planned["report"]["target"] == "c"
        assert {h: runs_here(lab, h) for h in ("b", "c")} == {"b": [], "c": []}
        assert tree.query("a")["counter"] > after["tree"]["counter"]
        assert nothing_left(lab), lab.leftovers(HOSTS)
    finally:
        remove(lab, ctr)


def test_a_host_that_cannot_be_emptied_gets_back_what_left_it_and_is_not_maintained(lab3, ansible):
    """a's container is paused (livemig refuses to move a paused container): the drain moves the
    process tree and fails; the play brings the tree back, stops, and no host is maintained."""
    lab = lab3
    ctr, tree = start(lab)
    try:
        lab.run("a", ["runc", "pause", CONTAINER])
        before = tree.query("a")
        played = ansible.play(PLAYBOOK, "-e", json.dumps({"livemig_maintenance_command": MAINTENANCE}))
        assert played.rc != 0, played.output
        reports_hold(played.records)
        drains = played.task(DRAIN_TASK)
        assert list(drains) == ["a"], drains       # the play stopped there: b and c were never drained
        failed = drains["a"]["result"]
        assert drains["a"]["status"] == "failed" and failed["rc"] == 11 and not failed["report"]["empty"], failed
        assert [u["workload"] for u in failed["report"]["unplaced"]] == [CONTAINER]
        assert CONTAINER in failed["msg"] and "paused" in failed["msg"], failed["msg"]
        assert [m["workload"] for m in failed["moved"]] == [str(PROCESS)]
        back = played.task("Bring back what the failed drain moved")["a"]["result"]["results"]
        assert [(r["item"]["workload"], r["changed"]) for r in back] == [(str(PROCESS), True)], back
        assert played.task("Stop the rolling maintenance")["a"]["status"] == "failed"
        assert all(lab.run(h, ["test", "-e", "/root/maintained"], check=False).returncode != 0 for h in HOSTS)

        after = tree.query("a", wait=10)
        assert after["counter"] > before["counter"] and tree.query("a", "verify")["bad_pages"] == 0
        assert json.loads(lab.text("a", ["runc", "state", CONTAINER]))["status"] == "paused"
        assert {h: runs_here(lab, h) for h in ("b", "c")} == {"b": [], "c": []}
        assert nothing_left(lab), lab.leftovers(HOSTS)
    finally:
        lab.run("a", ["runc", "resume", CONTAINER], check=False)
        remove(lab, ctr)
