# Apache-2.0 (see the livemig repository's LICENSE)
"""livemig.fleet.drain: empty the managed host of its workloads onto other hosts."""

from __future__ import annotations

DOCUMENTATION = r"""
module: drain
short_description: Empty this host of its workloads onto other hosts with livemig
description:
  - Runs C(livemig drain --json) on the managed host, which live-migrates the containers it runs
    (and the process trees named by O(pids)) onto the hosts of O(to), placed by their room, and
    returns livemig's JSON report.
  - Idempotent. A host with nothing left to move is C(ok), not changed; a drain that moved
    workloads is C(changed); one that could not empty the host fails, with the report (what moved
    is in RV(moved) then too, running on its target).
  - In check mode it runs C(livemig drain --dry-run), the plan (which workload would go where),
    touching nothing, and reports C(changed) when anything would move.
  - The managed host needs livemig (C(livemig) on PATH), root, and ssh to each target as livemig
    uses it. See livemig's docs/reference.md.
version_added: "0.1.0"
author: livemig
options:
  to:
    description: The hosts to drain onto, as ssh names them from the managed host.
    type: list
    elements: str
    required: true
    aliases: [targets]
  only:
    description: Move only these containers (names or IDs).
    type: list
    elements: str
    default: []
  exclude:
    description: Leave these containers here (livemig's C(--except)).
    type: list
    elements: str
    default: []
    aliases: [except]
  pids:
    description: Process trees to move too, by their root's PID (a drain moves containers, and
      process trees only when named).
    type: list
    elements: int
    default: []
  parallel:
    description: How many moves run at once.
    type: int
  max_bandwidth:
    description: Bytes a second the drain sends at most, all its moves together (K, M, G are powers
      of 1024, e.g. C(50M)).
    type: str
  mode:
    description: The strategy of every move (default auto, which each move's report explains).
    type: str
    choices: [auto, precopy, postcopy, hybrid, stopcopy]
  max_downtime:
    description: Seconds; a workload whose downtime would be longer on every target is left here,
      unplaced, and the drain fails.
    type: float
  args:
    description: More flags of C(livemig drain), passed as they are.
    type: list
    elements: str
    default: []
  livemig:
    description: The livemig command on the managed host.
    type: str
    default: livemig
"""

EXAMPLES = r"""
- name: Empty host-a onto host-b and host-c
  livemig.fleet.drain:
    to: [host-b, host-c]
    pids: [4242]
  register: drained

- name: Bring them back afterwards
  livemig.fleet.move:
    workload: "{{ item.workload }}"
    runtime: "{{ item.runtime }}"
    target: "{{ inventory_hostname }}"
  delegate_to: "{{ item.target }}"
  loop: "{{ drained.moved }}"
"""

RETURN = r"""
report:
  description: livemig's JSON report, as C(livemig drain --json) printed it (its placements, the
    moves and how each ended, what could not be placed), failures too.
  returned: always
  type: dict
moved:
  description: The workloads this drain moved, each with its C(workload) (a container's name, a
    process tree's PID), C(runtime) and C(target), the host it runs on now; a failed drain's too.
    Empty in check mode.
  returned: always
  type: list
  elements: dict
  sample: [{"workload": "web1", "runtime": "podman", "target": "host-b"},
           {"workload": "4242", "runtime": "process", "target": "host-c"}]
rc:
  description: livemig's exit code (0 only when the host is empty of what it was asked to move).
  returned: always
  type: int
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.livemig.fleet.plugins.module_utils.livemig import (
    livemig_path,
    run_json,
    why_failed,
)


def failure(report: dict, err: str, rc: int) -> str:
    """Why the host is not empty, in one line: each workload left, and why."""
    left = [f"{u['workload']} ({u['runtime']}) not placed: {u['reason']}" for u in report.get("unplaced", [])]
    for m in report.get("moves", []):
        if m.get("outcome") != "moved":
            why = m.get("error") or f"exit code {m.get('exit_code')}"
            left.append(f"{m['workload']} ({m['runtime']}) to {m['target']}: {m['outcome']}: {why}")
    return "; ".join(left) or why_failed(report, err, rc)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "to": {"type": "list", "elements": "str", "required": True, "aliases": ["targets"]},
            "only": {"type": "list", "elements": "str", "default": []},
            "exclude": {"type": "list", "elements": "str", "default": [], "aliases": ["except"]},
            "pids": {"type": "list", "elements": "int", "default": []},
            "parallel": {"type": "int"},
            "max_bandwidth": {"type": "str"},
            "mode": {"type": "str", "choices": ["auto", "precopy", "postcopy", "hybrid", "stopcopy"]},
            "max_downtime": {"type": "float"},
            "args": {"type": "list", "elements": "str", "default": []},
            "livemig": {"type": "str", "default": "livemig"},
        },
        supports_check_mode=True,
    )
    p = module.params
    if not p["to"]:
        module.fail_json(msg="to: no host to drain onto")
    argv = [livemig_path(module), "drain", "--json", "--to", ",".join(p["to"])]
    for name in p["only"]:
        argv += ["--only", name]
    for name in p["exclude"]:
        argv += ["--except", name]
    for pid in p["pids"]:
        argv += ["--pid", str(pid)]
    for flag, value in (("--parallel", p["parallel"]), ("--max-bandwidth", p["max_bandwidth"]),
                        ("--mode", p["mode"]), ("--max-downtime", p["max_downtime"])):
        if value is not None:
            argv += [flag, str(value)]
    argv += p["args"]
    if module.check_mode:
        argv.append("--dry-run")       # the plan: nothing dumped, paused or changed

    rc, report, err = run_json(module, argv)
    # what moved runs on its target now, whatever became of the rest: a play brings it back from there
    moved = [{"workload": m["workload"], "runtime": m["runtime"], "target": m["target"]}
             for m in report.get("moves", []) if m.get("outcome") == "moved"]
    if rc != 0:
        module.fail_json(msg=failure(report, err, rc), rc=rc, report=report, moved=moved, changed=bool(moved),
                         stderr=err)
    if module.check_mode:
        plan = report.get("placements", [])
        module.exit_json(changed=bool(plan), rc=rc, report=report, moved=[],
                         msg="; ".join(f"{x['workload']} would go to {x['target']}" for x in plan) or "nothing to move")
    module.exit_json(changed=bool(moved), rc=rc, report=report, moved=moved,
                     msg="; ".join(f"{x['workload']} moved to {x['target']}" for x in moved) or "nothing to move")


if __name__ == "__main__":
    main()
