"""Link profiles: the lab's veth shaped as the links operators move over (issue 34).

    unshaped   the veth as it is (gigabytes a second: every figure CPU-bound)
    10g        10 Gbit/s, 0.2 ms round trip
    1g         1 Gbit/s, 0.5 ms
    100m       100 Mbit/s, 20 ms

The rate is tc's token bucket (tbf) on each end's eth0, both directions. The round trip is
added by bench/delay.py, ssh's ProxyCommand on both hosts, for every ssh connection between
them: livemig's two, and the seeds' scp and ssh alike (only SSH crosses between the hosts).
Our kernel has no netem, and an asyncio relay's timers are no finer than a millisecond, so a
round trip under 2 ms is not added: the veth's own (about 0.05 ms) stands for it, and each
run records the round trip it measured, with the ssh and TCP rates, in its limits.
"""

from __future__ import annotations

from dataclasses import dataclass

from tests.lab import Lab

from .contenders import SIDE

PROXY = "/opt/livemig/bench/delay.py"     # the checkout, as every lab host sees it
MARK = "# livemig bench: link profile (bench/link.py)\n"
FINEST_DELAY_MS = 2.0


@dataclass(frozen=True)
class Profile:
    name: str
    mbit: float          # 0: no cap
    rtt_ms: float        # added round trip, ms (0: the veth's own)


PROFILES = {p.name: p for p in (Profile("unshaped", 0, 0), Profile("10g", 10_000, 0.2),
                                 Profile("1g", 1000, 0.5), Profile("100m", 100, 20))}


def shape(lab: Lab, profile: Profile, hosts: tuple[str, ...] = ("a", "b")) -> None:
    """Every link between hosts as profile has it (unshape() first: one profile at a time)."""
    unshape(lab, hosts)
    for h in hosts:
        if profile.mbit:
            rate = int(profile.mbit * 1e6 / 8)                 # bytes a second
            burst = max(64 << 10, rate // 250)                 # the kernel's tick at 250 Hz, at least 64 KiB
            lab.run(h, ["tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", f"{profile.mbit:g}mbit",
                        "burst", str(burst), "latency", f"{max(50.0, 2 * profile.rtt_ms):g}ms"])
        if profile.rtt_ms >= FINEST_DELAY_MS:
            others = " ".join(f"{o} {lab.address(o)}" for o in hosts if o != h)
            block = f"{MARK}Host {others}\n  ProxyCommand python3 {PROXY} %h %p {profile.rtt_ms:g}\n\n"
            _write_config(lab, h, block + lab.text(h, ["cat", "/root/.ssh/config"]))


def unshape(lab: Lab, hosts: tuple[str, ...] = ("a", "b")) -> None:
    """The veth as it was, and ssh straight to the other hosts again."""
    for h in hosts:
        lab.run(h, ["tc", "qdisc", "del", "dev", "eth0", "root"], check=False)    # none there: nothing to undo
        config = lab.text(h, ["cat", "/root/.ssh/config"])
        if config.startswith(MARK):
            _write_config(lab, h, config.split("\n\n", 1)[1])


def _write_config(lab: Lab, host: str, text: str) -> None:
    """root's ssh configuration on host, private as ssh wants it."""
    lab.run(host, ["sh", "-c", "umask 077 && cat > /root/.ssh/config"], input=text.encode())


def round_trip_ms(lab: Lab, src: str, dst: str) -> float:
    """What a line and its echo take over ssh from src to dst, the proxy included: the median
    of ten, in one session (its setup not counted)."""
    return float(lab.text(src, ["python3", SIDE, "ssh-rtt", dst]).strip())
