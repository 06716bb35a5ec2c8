"""A moved process tree's TCP connections, in the namespaced lab.

Without --tcp-established nothing moves a connection (issue 30 will): a client connected
as the workload froze must not fail the move. The copy's end of its connection is closed
(CRIU's --tcp-close, on the dump and its restore), the source's ends as the source's copy
does; the client sees it end unanswered, and asks again, of the copy on the target. A
move says so in its preflight, before anything is touched, and --dry-run says it too.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.held import end_if_held, go_on, wait_stopped
from tests.test_move import assert_moved_intact
from tests.waiting import eventually

pytestmark = pytest.mark.lab

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


# A service that holds every connection it takes until its client ends it (a database's
# clients do), started on the PID asked for (free on every lab host), detached.
HOLDING_SERVER = """
import os, select, socket, sys
port, pid = int(sys.argv[1]), int(sys.argv[2])
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("0.0.0.0", port))
listener.listen()
with open("/proc/sys/kernel/ns_last_pid", "w") as f:
    f.write(str(pid - 1))
child = os.fork()
if child:
    print(child)
    sys.exit(0)
os.setsid()
null = os.open("/dev/null", os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
held = []
while True:
    readable, _, _ = select.select([listener, *held], [], [])
    for s in readable:
        if s is listener:
            held.append(listener.accept()[0])
        elif not s.recv(64):
            held.remove(s)
            s.close()
"""


def taken(lab, work) -> bool:
    """Whether the workload accepted a connection to its port (one in its listener's queue
    has no process)."""
    return _taken(lab, work.pid, work.port)


def _taken(lab, pid: int, port: int) -> bool:
    out = lab.text("a", ["ss", "-tnpH", "state", "established", "sport", "=", f":{port}"])
    return f"pid={pid}," in out


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


def test_a_move_says_in_its_preflight_that_the_connections_it_holds_will_be_closed(lab):
    pid, port = 4811, 7871
    assert lab.text("a", ["python3", "-c", HOLDING_SERVER, str(port), str(pid)]).strip() == str(pid)
    client = lab.popen("a", ["python3", "-c", HOLDING_CLIENT, str(port)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        eventually(lambda: _taken(lab, pid, port), bool, within=30)
        # --dry-run says it, and changes nothing
        plan = json.loads(lab.text("a", ["livemig", "move", "--dry-run", "--json", "--pid", str(pid), "b"]))
        [said] = [w for w in plan["warnings"] if "established TCP" in w]
        assert said.startswith(f"the workload holds 1 established TCP connection (127.0.0.1:{port} with 127.0.0.1:"), said
        assert client.poll() is None and _taken(lab, pid, port)
        # the move says it before it freezes anything, and goes through
        res = lab.run("a", ["livemig", "move", "--mode", "stopcopy", "--pid", str(pid), "b"], check=False)
        err = res.stderr.decode()
        assert res.returncode == 0, err
        assert f"warning: {said}" in err and err.index("warning: the workload holds") < err.index("final dump"), err
        out, why = client.communicate(timeout=60)
        assert (client.returncode, out) == (0, b""), why.decode()     # its connection ended, unanswered
        # the service runs on b, and takes connections there
        assert lab.run("b", ["python3", "-c", f"import socket; socket.create_connection(('127.0.0.1', {port}), 5)"],
                       check=False).returncode == 0
        assert lab.run("a", ["kill", "-0", str(pid)], check=False).returncode != 0
    finally:
        if client.poll() is None:
            client.kill()
        for host in ("a", "b"):
            lab.run(host, ["kill", str(pid)], check=False)
