"""A `livemig move` held at one of its test points (LIVEMIG_TEST_STOP_AT, the source's
testpoints.py): it stops itself there, for a test to act at that exact instant, whatever
the machine's speed, and then let it go on or kill it."""

from __future__ import annotations

import json
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


# One question over a held connection, asked when told (a line on stdin), its wait printed.
_ONE_QUESTION = """
import json, socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
r = s.makefile("rb")
s.sendall(b"hold\\n"); json.loads(r.readline())
print("connected", flush=True)
sys.stdin.readline()
asked = time.monotonic()
s.sendall(b"next\\n")
answer = json.loads(r.readline())
print(json.dumps({"waited": time.monotonic() - asked, "answer": answer}), flush=True)
"""


def asked_while_held(lab, argv: list[str], address: str, port: int, hold: float, interrupted: bool = False,
                     point: str = "restored") -> tuple[dict, float]:
    """A client on c, connected to address:port, asks once while `livemig move` (argv, run on
    a with --json) is held at point (by default after its restore: the source's copy frozen
    and quiet, the target's restored and stopped). The move goes on hold s later
    (interrupted: with a Ctrl-C, which rolls it back). Its report, and how long the question
    waited for its answer."""
    client = lab.popen("c", ["python3", "-c", _ONE_QUESTION, address, str(port)], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE)
    mover = None
    try:
        assert client.stdout.readline() == b"connected\n"
        mover = lab.popen("a", ["env", f"LIVEMIG_TEST_STOP_AT={point}", *argv], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stopped = wait_stopped(lab, mover, point, within=300)
        client.stdin.write(b"ask\n")
        client.stdin.flush()
        time.sleep(hold)
        if interrupted:
            lab.run("a", ["kill", "-INT", *stopped])
        go_on(lab, mover, stopped)
        out, err = mover.communicate(timeout=300)
        assert mover.returncode == (130 if interrupted else 0), err.decode()
        heard = json.loads(client.stdout.readline())
    finally:
        end_if_held(lab, mover)
        client.kill()
    return json.loads(out), heard["waited"]
