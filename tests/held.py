"""A `livemig move` held at one of its test points (LIVEMIG_TEST_STOP_AT, the source's
testpoints.py): it stops itself there, for a test to act at that exact instant, whatever
the machine's speed, and then let it go on or kill it."""

from __future__ import annotations

import os
import signal
import subprocess
import time


def wait_stopped(lab, mover: subprocess.Popen, point: str, within: float = 120, named: str = "livemig move"
                 ) -> list[str]:
    """The PIDs on a of `livemig move` (mover, started with LIVEMIG_TEST_STOP_AT=point)
    once it stopped itself there (named: what its command line holds)."""
    deadline = time.monotonic() + within
    while True:
        stopped = [line.split()[0] for line in lab.text("a", ["ps", "-eo", "pid=,stat=,args="]).splitlines()
                   if named in line and line.split()[1].startswith("T")]
        if stopped:
            return stopped
        assert mover.poll() is None, f"livemig ended before {point}: {mover.stderr.read().decode()}"
        assert time.monotonic() < deadline, f"livemig never reached {point}"
        time.sleep(0.05)


def go_on(lab, mover: subprocess.Popen, stopped: list[str]) -> None:
    """Let a `livemig move` stopped at its point (wait_stopped's PIDs) go on."""
    lab.run("a", ["kill", "-CONT", *stopped], check=False)
    os.kill(mover.pid, signal.SIGCONT)     # nsenter stopped itself with its child (job control)


def end_if_held(lab, mover: subprocess.Popen | None) -> None:
    """A test that failed while its move was held: the move is killed, and let go to die."""
    if mover is not None and mover.poll() is None:
        lab.run("a", ["pkill", "-KILL", "-f", "livemig move"], check=False)
        os.kill(mover.pid, signal.SIGCONT)
        mover.wait(timeout=60)
