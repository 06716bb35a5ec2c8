"""Fault injection for the lab's tests: where a move may stop itself for a test to act."""

from __future__ import annotations

import os
import signal

STOP_FOR_TESTS = "LIVEMIG_TEST_STOP_AT"
# A drain's moves (each in a process of its own) stop at this one's point: LIVEMIG_TEST_STOP_AT
# is the drain's own ("drain-moved": once a move of it ended).
MOVES_STOP_FOR_TESTS = "LIVEMIG_TEST_MOVES_STOP_AT"


def stop_for_tests(point: str) -> None:
    """With LIVEMIG_TEST_STOP_AT=point the coordinator stops itself there (SIGSTOP), for a
    test to act at that exact instant (then SIGKILL or SIGCONT it). The points, in a move's
    order: "connected" (preflight: the target's agent answers, nothing probed yet), "round"
    (the first pre-copy round about to begin), "throttled" (auto-converge's first step
    taken), "final-dump" (about to freeze the workload), "transfer" (frozen and dumped, no
    image sent), "restore" (the images on the target, not restored), "restored" (the
    target's copy restored, the source's not given up), "marked" (the commit mark on disk,
    CRIU's journal not yet written: the source's copy not given up), "released" (the source's copy given
    up, the target's not yet resumed), "running" (the target's copy resumed: post-copy's
    or a fill's with pages still to come, stop-and-copy's with a container's source copy not yet
    removed) and "whole" (the running copy has every page, the
    source's copy waits, stopped). A drain (drain.py) has two of its own: "drain-planned" (every
    workload placed, none moved) and "drain-moved" (a move of it just ended, the next not begun)."""
    if os.environ.get(STOP_FOR_TESTS) == point:
        os.kill(os.getpid(), signal.SIGSTOP)


def moves_stop_for_tests() -> dict[str, str]:
    """The environment a drain's move gets for the lab's tests: its own stop, if one was asked."""
    point = os.environ.get(MOVES_STOP_FOR_TESTS)
    return {STOP_FOR_TESTS: point} if point else {}
