"""The seeds' procedure, as an operator types it: what livemig replaces and is measured against.

criu dump to a directory, pack it into a zstd archive, scp it across, unpack,
criu restore. Every step waits for the one before, with the workload frozen from
the dump's start until the restore, and nothing of it needs livemig.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from . import Lab
from .proc import LabError


@dataclass
class ByHand:
    steps: dict[str, float]   # step name -> seconds, in the order they ran
    image_bytes: int
    archive_bytes: int

    @property
    def total(self) -> float:
        return sum(self.steps.values())


def migrate(lab: Lab, pid: int, src: str, dst: str, name: str = "by-hand", wrap=None,
            timeout: float = 600, container: tuple[str, str] | None = None,
            max_bandwidth: int | None = None) -> ByHand:
    """wrap(label, host, argv), if given, returns the argv to run for each step instead (the
    benchmark measures the steps' CPU time through it). container (name, bundle): a runc
    container instead of PID, checkpointed and restored through runc as in the seeds' runc
    procedure, its bundle already on dst (the seeds share it over NFS). max_bandwidth: bytes
    a second the copy may use (scp -l, as an operator sharing a link would)."""
    img, archive = f"/img/{name}", f"/img/{name}.tar.zst"
    steps: dict[str, float] = {}

    def step(label: str, host: str, argv: list[str]) -> None:
        t = time.monotonic()
        lab.run(host, wrap(label, host, argv) if wrap else argv, timeout=timeout)
        steps[label] = time.monotonic() - t

    for host in (src, dst):
        # a run killed before its tidying below (a bench stopped with SIGTERM) left its own
        lab.run(host, ["rm", "-rf", img, archive])
        lab.run(host, ["mkdir", "-m", "700", img])
    try:
        if container:
            step("dump", src, ["runc", "checkpoint", "--image-path", img, "--work-path", img, container[0]])
        else:
            try:
                step("dump", src, ["criu", "dump", "-t", str(pid), "-D", img, "-o", "dump.log"])
            except LabError as e:       # CRIU said why in its log alone
                said = lab.text(src, ["grep", "Error", f"{img}/dump.log"], check=False).strip()
                raise LabError(f"{e} {said}") from None
        image_bytes = int(lab.text(src, ["du", "-sb", img]).split()[0])
        step("pack", src, ["tar", "--zstd", "-cf", archive, "-C", img, "."])
        archive_bytes = int(lab.text(src, ["stat", "-c", "%s", archive]).strip())
        limit = ["-l", str(max_bandwidth * 8 // 1000)] if max_bandwidth else []    # scp counts Kbit/s
        step("copy", src, ["scp", "-q", *limit, archive, f"{dst}:{archive}"])
        step("unpack", dst, ["tar", "--zstd", "-xf", archive, "-C", img])
        if container:
            step("restore", dst, ["runc", "restore", "--detach", "--image-path", img, "--work-path", img,
                                  "--bundle", container[1], container[0]])
        else:
            step("restore", dst, ["criu", "restore", "-D", img, "-d", "-o", "restore.log"])
    finally:
        for host in (src, dst):
            lab.run(host, ["rm", "-rf", img, archive], check=False)
    return ByHand(steps, image_bytes, archive_bytes)
