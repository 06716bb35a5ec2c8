"""Auto-converge, as a move uses it: found at the preflight, stepped between pre-copy
rounds, lifted at the switchover (Move.lift_throttle). The cgroup's side is throttle.py;
when to step, policy.py."""

from __future__ import annotations

from ..progress import Throttled
from . import throttle
from .move import Move
from .testpoints import stop_for_tests


def find(m: Move, pids: list[int]) -> str:
    """Auto-converge's state before pre-copy, as the report says it."""
    if not m.options.throttle:
        return "off"
    w = m.w
    try:
        what = f"PID {pids[0]}" if w.kind == "process" else f"{w.kind} container {w.name}"
        m.throttle = throttle.Throttle(throttle.find(pids), pids, m.work, what)
    except throttle.Unavailable as e:
        return f"unavailable: {e.message}"
    except (OSError, ValueError) as e:
        return f"unavailable: cannot read its cgroup ({e})"
    return "ready"


def step(m: Move, percent: int, after_round: int) -> bool:
    """One auto-converge step; False (and the throttle lifted) if the cgroup refused it."""
    if m.throttle is None:
        return False
    try:
        s = m.throttle.set(percent, after_round)
    except OSError as e:
        m.lift_throttle()
        m.report.throttle = f"unavailable: its cgroup refused a CPU quota ({e})"
        return False
    m.report.throttle_steps.append(s)
    m.progress(Throttled(s.after_round, s.percent, s.baseline_cpus, s.quota_cpus))
    if len(m.report.throttle_steps) == 1:
        stop_for_tests("throttled")
    return True
