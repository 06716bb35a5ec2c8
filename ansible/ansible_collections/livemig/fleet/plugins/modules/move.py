# Apache-2.0 (see the livemig repository's LICENSE)
"""livemig.fleet.move: live-migrate one workload from the managed host to another host."""

from __future__ import annotations

DOCUMENTATION = r"""
module: move
short_description: Live-migrate a container or process tree from this host to another with livemig
description:
  - Runs C(livemig move --json) on the managed host, which is the source of the move, and returns
    livemig's JSON report.
  - Idempotent. When the workload is not on this host and the target runs it (a container running
    or paused there, under the same name; a process with that PID there, which CRIU restores as it
    was), the task is C(ok), not changed, and livemig is not run.
    A workload neither here nor there is livemig's to refuse (exit code 3, in the report).
  - In check mode it runs C(livemig move --dry-run), the preflight and the plan, touching nothing,
    and reports C(changed) when the workload would move.
  - The managed host needs livemig (C(livemig) on PATH), root, and ssh to the target as livemig
    uses it (a key, the target's host key in known_hosts). See livemig's docs/reference.md.
version_added: "0.1.0"
author: livemig
options:
  workload:
    description:
      - The container's name or ID, or for a process tree (O(runtime=process)) its root's PID.
      - The C(workload) of a C(livemig.fleet.drain) report's moves, as it is.
    type: str
    aliases: [name]
  pid:
    description: The PID of a process tree's root (the same as O(workload) with O(runtime=process)).
    type: int
  runtime:
    description:
      - The workload's runtime, as livemig's reports name it (C(process) for a process tree).
      - Default, a container is looked for under each of podman, runc and crun.
    type: str
    choices: [podman, runc, crun, process]
  target:
    description: The host to move it to, as ssh names it from the managed host ([user@]host, or
      ssh://[user@]host[:port]).
    type: str
    required: true
  mode:
    description: livemig's strategy (default auto, which the report explains).
    type: str
    choices: [auto, precopy, postcopy, hybrid, stopcopy]
  max_downtime:
    description: Seconds; a move whose downtime would be longer is refused before the freeze (exit code 10).
    type: float
  max_bandwidth:
    description: Bytes a second the move sends at most (K, M, G are powers of 1024, e.g. C(50M)).
    type: str
  args:
    description: More flags of C(livemig move), passed as they are (e.g. C(--tcp-established)).
    type: list
    elements: str
    default: []
  livemig:
    description: The livemig command on the managed host.
    type: str
    default: livemig
notes:
  - Check mode runs the preflight on both hosts and measures the link, as C(livemig move --dry-run)
    does. It sends some megabytes of incompressible test data to the target, and nothing else.
"""

EXAMPLES = r"""
- name: Move the container web1 to host-b
  livemig.fleet.move:
    workload: web1
    target: host-b
    max_downtime: 0.5

- name: Move the process tree rooted at PID 4242, stop-and-copy
  livemig.fleet.move:
    pid: 4242
    target: root@host-b
    mode: stopcopy

- name: Bring a drained host's workloads back from where the drain put them
  livemig.fleet.move:
    workload: "{{ item.workload }}"
    runtime: "{{ item.runtime }}"
    target: "{{ inventory_hostname }}"
  delegate_to: "{{ item.target }}"
  loop: "{{ drained.moved }}"
"""

RETURN = r"""
report:
  description:
    - livemig's JSON report, as C(livemig move --json) printed it (its schema is livemig's
      C(schemas/move.json); in check mode the plan, C(schemas/move-dry-run.json)), failures too.
    - Empty when livemig was not run (the workload already runs on the target).
  returned: always
  type: dict
  sample: {"schema": 1, "command": "move", "exit_code": 0, "outcome": "moved", "workload": "web1",
           "runtime": "runc", "target": "host-b", "mode": "precopy", "downtime_seconds": 0.21}
rc:
  description: livemig's exit code (docs/reference.md's table); absent when it was not run.
  returned: when livemig ran
  type: int
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.livemig.fleet.plugins.module_utils.livemig import (
    RUNTIMES,
    livemig_path,
    present_here,
    present_on,
    run_json,
    why_failed,
)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "workload": {"type": "str", "aliases": ["name"]},
            "pid": {"type": "int"},
            "runtime": {"type": "str", "choices": RUNTIMES},
            "target": {"type": "str", "required": True},
            "mode": {"type": "str", "choices": ["auto", "precopy", "postcopy", "hybrid", "stopcopy"]},
            "max_downtime": {"type": "float"},
            "max_bandwidth": {"type": "str"},
            "args": {"type": "list", "elements": "str", "default": []},
            "livemig": {"type": "str", "default": "livemig"},
        },
        required_one_of=[("workload", "pid")],
        mutually_exclusive=[("workload", "pid")],
        supports_check_mode=True,
    )
    p = module.params
    workload, runtime, target = p["workload"], p["runtime"], p["target"]
    if p["pid"] is not None:
        if runtime not in (None, "process"):
            module.fail_json(msg=f"pid names a process tree: runtime {runtime} is a container's")
        workload, runtime = str(p["pid"]), "process"
    if runtime == "process" and not workload.isdigit():
        module.fail_json(msg=f"a process tree is named by its PID, not {workload!r}")
    what = f"PID {workload}" if runtime == "process" else workload

    argv = [livemig_path(module), "move", "--json"]
    argv += ["--pid", workload] if runtime == "process" else [*(["--runtime", runtime] if runtime else []), workload]
    for flag, value in (("--mode", p["mode"]), ("--max-downtime", p["max_downtime"]),
                        ("--max-bandwidth", p["max_bandwidth"])):
        if value is not None:
            argv += [flag, str(value)]
    argv += p["args"]

    # Already moved (a play run again, a bring-back done before): nothing to do. Asked only
    # when the workload is not here, so that a workload here always goes to livemig, whose
    # preflight refuses it where the target has one of that name too.
    if not present_here(module, workload, runtime) and present_on(module, target, workload, runtime):
        module.exit_json(changed=False, report={}, msg=f"{what} already runs on {target}")

    if module.check_mode:
        argv.append("--dry-run")       # the preflight and the plan: nothing dumped, paused or changed
    rc, report, err = run_json(module, [*argv, target])
    if rc != 0:
        module.fail_json(msg=why_failed(report, err, rc), rc=rc, report=report, stderr=err)
    if module.check_mode:
        module.exit_json(changed=True, rc=rc, report=report,
                         msg=f"{what} would move to {target}, mode {report.get('mode')}, downtime about "
                             f"{report.get('expected_downtime_seconds', 0):.3f} s")
    module.exit_json(changed=True, rc=rc, report=report,
                     msg=f"{what} moved to {target}, mode {report.get('mode')}, downtime "
                         f"{report.get('downtime_seconds', 0):.3f} s")


if __name__ == "__main__":
    main()
