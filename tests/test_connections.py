"""A moved process tree's TCP connections, in the namespaced lab.

Without --tcp-established nothing moves a connection (issue 30 will): a client connected
as the workload froze must not fail the move. The copy's end of its connection is closed
(CRIU's --tcp-close, on the dump and its restore), the source's ends as the source's copy
does; the client sees it end unanswered, and asks again, of the copy on the target.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.held import end_if_held, go_on, wait_stopped
from tests.test_move import assert_moved_intact
from tests.waiting import eventually

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("no_workload_left")]

PORT = 7870

# A client that connects, asks nothing (memcounter waits 5 s for its command), and prints
# whatever comes back before the connection ends.
HOLDING_CLIENT = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
got = b""
try:
    while chunk := s.recv(65536):
        got += chunk
except OSError:
    pass
sys.stdout.write(got.decode())
"""


def taken(lab, work) -> bool:
    """Whether the workload accepted a connection to its port (one in its listener's queue
    has no process)."""
    out = lab.text("a", ["ss", "-tnpH", "state", "established", "sport", "=", f":{work.port}"])
    return f"pid={work.pid}," in out


@pytest.mark.parametrize("mode, pid", [("stopcopy", 4801), ("precopy", 4802), ("postcopy", 4803)],
                         ids=["stop-and-copy", "pre-copy by hashes", "post-copy"])
def test_a_connection_open_as_the_workload_froze_ends_unanswered_and_the_move_goes_through(lab, mode, pid):
    work = lab.start_workload("a", mib=64, dirty_mibps=5, pid=pid, port=PORT)
    before = work.query("a")
    mover = lab.popen("a", ["env", "LIVEMIG_TEST_STOP_AT=final-dump", "livemig", "move", "--json",
                            "--mode", mode, "--pid", str(pid), "b"],
                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    client = None
    try:
        stopped = wait_stopped(lab, mover, "final-dump")
        # the connection is the workload's (accepted, its command awaited) when it freezes
        client = lab.popen("a", ["python3", "-c", HOLDING_CLIENT, str(PORT)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        eventually(lambda: taken(lab, work), bool, within=30)
        go_on(lab, mover, stopped)
        out, err = mover.communicate(timeout=300)
    finally:
        end_if_held(lab, mover)
    assert mover.returncode == 0, err.decode()
    assert_moved_intact(lab, work, before, json.loads(out))
    said, why = client.communicate(timeout=60)
    assert client.returncode == 0, why.decode()
    assert said == b"", said        # never answered: its connection ended with the source's copy
    lab.run("b", ["kill", str(work.pid)])
