"""Every kind of kernel object and process state that plain CRIU carries from host to host,
livemig carries too, in every mode of the namespaced lab; and each kind plain CRIU cannot
carry fails the move with CRIU's own reason, the tree left running on the source as it was.

The workload (tests/workloads/kinds.py) is one tree holding all the kinds at once: pipes,
FIFOs, unix and TCP and UDP sockets (a loopback connection with unread bytes among them),
timers, signals, eventfd, signalfd, epoll, inotify, a pty pair, threads, process groups and
sessions, shared and private mappings, memfd, deleted files, file locks, limits, cwd and
umask. It says what each holds, looked at from inside, on whichever host it runs; the
kinds are the survey's of issue 32 (what plain CRIU carried there, with --tcp-established
and --file-locks where they are asked for).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import pytest

from tests.test_faithful import MODES, lab_tree, move, seen

pytestmark = pytest.mark.lab

KINDS = "/opt/livemig/tests/workloads/kinds.py"

# What each kind holds, as the tree sees it, before a move and after it
CARRIED = {
    "cwd": {"cwd": "/opt/livemig/tests/workloads"},
    "umask": {"umask": "0o27"},
    "rlimits": {"nofile_soft": 321, "core": [4096, 8192]},
    "process_groups": {"root_leads": True, "own_group": True, "own_session": True, "in_its_session": True},
    "shared_anon": {"child_writes_seen": True, "pattern": True},
    "signals": {"handled": True, "ignored": True, "blocked": True, "pending": True},
    "pipe": {"unread": "PIPEDATA"},
    "fifo": {"unread": "FIFODATA", "named": True},
    "unix_stream": {"unread": ["QUEUED1QUEUED2"], "back": "BACK"},
    "unix_dgram": {"unread": ["QUEUED1", "QUEUED2"], "back": "BACK"},
    "unix_seqpacket": {"unread": ["QUEUED1", "QUEUED2"], "back": "BACK"},
    "unix_listen": {"accepts": "hi"},
    "tcp_established": {"unread": "TCPQUEUED", "back": "pong"},
    "udp": {"echo": "live"},
    "timerfd": {"interval": 0.25, "ticks": True},
    "eventfd": {"counter": 8},
    "signalfd": {"pending_read": True},
    "epoll": {"level_ready": True, "edge_quiet": True, "edge_fires": True},
    "inotify": {"event": True},
    "pty": {"unread": "PTYQUEUED\n", "reads": "ping\n", "echo": False},
    "memfd": {"by_fd": "MEMFDDATA", "by_map": "MAPPEDXYZ", "shared": True},
    "private_file_map": {"written": "COW!", "rest_as_file": True},
    "deleted_file": {"content": True, "deleted": True},
    "shm_unlinked": {"by_map": "POSIXSHMDT", "by_fd": "POSIXSHMDT", "deleted": True},
    "flock": {"held": True},
    "fcntl_lock": {"held": True},
    "posix_timer": {"interval": 0.25, "listed": True, "fires": True},
    "itimer": {"interval": 0.25, "fires": True},
    "threads": {"tasks": 4, "all_count": True},
    "tcp_listen": {"address": "0.0.0.0"},
}

# What plain CRIU cannot carry from host to host (the survey's), with what the tree holds,
# the exit code of the step that fails (3: the preflight, which knows it before the freeze;
# 5: the dump, 6: the restore) and the reason said (CRIU's, from the dump)
NOT_CARRIED = {
    "inotify_overlay": ({"event": True}, 5, "Can't dump that handle"),
    "sysv_shm": ({"data": "SYSVSHMDATA"}, 3, "System V shared memory segment of this host's IPC namespace"),
    "uts_ipc_ns": ({"hostname": "kinds-child", "own_uts": True, "own_ipc": True}, 5, "Can't dump nested"),
    # (the preflight's: CRIU would fail on them after the freeze, source/preflight.py UNDUMPABLE)
    "userfaultfd": ({"held": "anon_inode:[userfaultfd]"}, 3, "holds a userfaultfd (fd "),
    "io_uring": ({"held": "anon_inode:[io_uring]"}, 3, "holds an io_uring instance (fd "),
    # (CRIU's restore maps it before it seals it, and fails: "Cannot apply seals on memfd")
    "memfd_sealed": ({"by_map": "SEALEDDATA", "seals": 14}, 3, "maps a memfd sealed against writes"),
}


@contextlib.contextmanager
def kinds_tree(lab, pid: int, port: int, *also: str) -> Iterator[None]:
    """kinds.py's tree on a as PID pid, holding also's kinds too; the paths it needs made on
    b (a's, it makes itself). Once the test is done with it, gone from both hosts, with the
    paths it made there."""
    try:
        lab.run("b", ["python3", KINDS, "prepare", "--port", str(port)])
        with lab_tree(lab, KINDS, pid, port, *(a for kind in also for a in ("--also", kind))):
            yield
    finally:
        for h in ("a", "b"):
            lab.run(h, ["rm", "-rf", f"/tmp/kinds-{port}", f"/root/kinds-{port}", f"/dev/shm/kinds-only-here-{port}"],
                    check=False)


def assert_holds(view: dict, expected: dict) -> None:
    """Every kind holds what it must, as the tree sees it: the ones that do not, named."""
    wrong = {kind: {"holds": view["kinds"].get(kind), "must": must} for kind, must in expected.items()
             if view["kinds"].get(kind) != must}
    assert wrong == {}
    assert sorted(view["kinds"]) == sorted(expected)      # and no kind it holds goes unchecked


@pytest.mark.parametrize("i, flags", list(enumerate(MODES.values())), ids=list(MODES))
def test_every_kind_plain_criu_carries_comes_out_of_every_mode_as_it_went_in(lab, i, flags):
    pid, port = 6000 + 100 * i, 7600 + 10 * i
    # and a file in a's /dev/shm, mapped shared, which b lacks: carried, as it was at the freeze
    carried = {**CARRIED, "posix_shm": {"by_map": "POSIXSHMDT"}}
    with kinds_tree(lab, pid, port, "posix_shm"):
        assert lab.run("b", ["test", "-e", f"/dev/shm/kinds-only-here-{port}"], check=False).returncode == 1
        before = seen(lab, "a", port, KINDS)
        assert_holds(before, carried)
        res = move(lab, "a", pid, "b", *flags, "--tcp-established", "--file-locks")
        assert res.returncode == 0, res.stderr.decode()
        report = json.loads(res.stdout)
        assert report["outcome"] == "moved" and report["carried_files"] == [f"/dev/shm/kinds-only-here-{port}"]
        now = seen(lab, "b", port, KINDS)
        assert_holds(now, carried)
        assert now["tasks"] == before["tasks"]                 # every process and thread, as it was
        assert lab.run("a", ["kill", "-0", str(pid)], check=False).returncode != 0      # one copy only
        assert lab.leftovers() == {"a": ([], []), "b": ([], [])}


@pytest.mark.parametrize("j, kind", list(enumerate(NOT_CARRIED)), ids=list(NOT_CARRIED))
def test_a_kind_plain_criu_cannot_carry_fails_the_move_with_criu_s_reason_and_the_tree_runs_on(lab, j, kind):
    # In the default mode, as a user moves. The dump's failures come after the freeze: the
    # rollback must give the tree back as it was
    holds, code, reason = NOT_CARRIED[kind]
    pid, port = 6400 + 100 * j, 7650 + 10 * j
    with kinds_tree(lab, pid, port, kind):
        before = seen(lab, "a", port, KINDS)
        assert_holds(before, {**CARRIED, kind: holds})
        res = move(lab, "a", pid, "b", "--tcp-established", "--file-locks")
        assert res.returncode == code, res.stderr.decode()
        assert reason in res.stderr.decode()
        now = seen(lab, "a", port, KINDS)
        assert_holds(now, {**CARRIED, kind: holds})
        assert now["tasks"] == before["tasks"]
        assert lab.run("b", ["kill", "-0", str(pid)], check=False).returncode != 0
        assert lab.leftovers() == {"a": ([], []), "b": ([], [])}
