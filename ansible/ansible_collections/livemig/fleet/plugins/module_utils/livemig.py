# Apache-2.0 (see the livemig repository's LICENSE)
"""What the livemig.fleet modules share: running `livemig ... --json` on the managed host (the
source of a move) and reading the one JSON object it prints, and asking a host, this one or
another over ssh, whether it runs a workload.

livemig is run as a command, not imported: on a real host it lives in a venv of its own (pipx),
out of reach of the Python that runs Ansible's modules.
"""

from __future__ import annotations

import json
import shlex
from urllib.parse import urlsplit

RUNTIMES = ["podman", "runc", "crun", "process"]     # as livemig's reports name them
CONTAINER_RUNTIMES = RUNTIMES[:-1]
UP = "running|paused"     # a paused container is still on its host (livemig refuses to move it, and says why)


def livemig_path(module) -> str:
    """The livemig command (the option `livemig`, on PATH unless a path): a missing one fails
    the task in one line, before anything is asked of any host."""
    return module.get_bin_path(module.params["livemig"], required=True)


def run_json(module, argv: list[str]) -> tuple[int, dict, str]:
    """Run livemig with --json: its exit code, the one JSON object it prints on stdout however it
    ends (docs/reference.md, the JSON contract), and its stderr (the one-line error of a failure)."""
    rc, out, err = module.run_command(argv)
    try:
        report = json.loads(out)
    except ValueError:
        report = None
    if not isinstance(report, dict):
        # not livemig's contract: an old livemig without the command, or something that is not livemig
        module.fail_json(msg=f"{shlex.join(argv)} printed no JSON report (exit code {rc}): "
                             f"{(err or out).strip()[-2000:]}", rc=rc, stdout=out, stderr=err, cmd=argv)
    return rc, report, err


def why_failed(report: dict, err: str, rc: int) -> str:
    """The failure in one line: livemig's own error (the report's, else its stderr's last line)."""
    lines = [line for line in err.splitlines() if line.startswith("livemig")]
    return report.get("error") or (lines[-1] if lines else "") or f"livemig exited with code {rc}"


def ssh_argv(target: str) -> list[str]:
    """ssh to a target named as livemig names it: [user@]host (an alias of ~/.ssh/config too),
    or ssh://[user@]host[:port]. BatchMode: a module has no one to answer a prompt; host keys are
    checked as root's ssh configuration says, as livemig's own ssh does."""
    argv = ["ssh", "-o", "BatchMode=yes"]
    if target.startswith("ssh://"):
        url = urlsplit(target)
        if url.port:
            argv += ["-p", str(url.port)]
        target = f"{url.username}@{url.hostname}" if url.username else str(url.hostname)
    return [*argv, "--", target]


def present_script(workload: str, runtime: str | None) -> str:
    """A sh script that exits 0 where the workload is up (a container running or paused, under
    runtime or any of them; a process tree's root, its PID a process's, not a thread's), else 1:
    the same script here and on a target."""
    if runtime == "process":
        pid = int(workload)
        # /proc/TID exists for a thread too (unlisted): only a process has its own PID as Tgid
        return f'[ "$(sed -n "s/^Tgid:[[:space:]]*//p" /proc/{pid}/status 2>/dev/null)" = {pid} ] || exit 1'
    name = shlex.quote(workload)
    checks = []
    for rt in [runtime] if runtime else CONTAINER_RUNTIMES:
        if rt == "podman":
            checks.append(f"podman container inspect --format '{{{{.State.Status}}}}' {name} 2>/dev/null"
                          f" | grep -Eqx '{UP}'")
        else:   # runc and crun print the OCI state, as JSON
            checks.append(f"{rt} state {name} 2>/dev/null | grep -Eq '\"status\": *\"({UP})\"'")
    return " || ".join(checks) + " || exit 1"


def present_here(module, workload: str, runtime: str | None) -> bool:
    rc, _, _ = module.run_command(["sh", "-c", present_script(workload, runtime)])
    return rc == 0


def present_on(module, target: str, workload: str, runtime: str | None) -> bool | None:
    """Whether target runs the workload; None when it could not be asked (ssh's own failure)."""
    rc, _, err = module.run_command([*ssh_argv(target), "sh -c " + shlex.quote(present_script(workload, runtime))])
    if rc == 255:      # ssh's code for a failure of its own: not reached, not let in
        module.warn(f"could not ask {target} whether it runs {workload}: {err.strip()}")
        return None
    return rc == 0
