"""--max-bandwidth in the namespaced lab: a capped move keeps to its cap on the wire, as the
source host's own interface counts it (TCP, IP and ssh framing included), and its downtime
figures still hold. The cap is far below what the lab's link and CPUs move (hundreds of
MiB/s), so the move is held by the cap, not by the machine."""

from __future__ import annotations

import statistics
import threading
import time

import pytest

from tests.test_move import assert_moved_intact, move

pytestmark = pytest.mark.lab

CAP = 4 << 20            # "4M"
WINDOW = 1.0             # seconds: the rate on the wire is measured over this long


class WireWatch:
    """host's bytes sent on its link, sampled every 0.1 s in a thread while the block runs."""

    def __init__(self, lab, host: str):
        self.lab, self.host, self.samples = lab, host, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.lab.tx_bytes(self.host)))
            self._stop.wait(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.samples.append((time.monotonic(), self.lab.tx_bytes(self.host)))

    def rates(self) -> list[float]:
        """The rate on the wire over every WINDOW-long stretch between samples."""
        out, j = [], 0
        for i, (t, b) in enumerate(self.samples):
            while j < len(self.samples) and self.samples[j][0] - t < WINDOW:
                j += 1
            if j == len(self.samples):
                break
            t2, b2 = self.samples[j]
            out.append((b2 - b) / (t2 - t))
        return out

    @property
    def sent(self) -> int:
        return self.samples[-1][1] - self.samples[0][1]


@pytest.mark.parametrize("i, mode", list(enumerate(["precopy", "postcopy"])))
def test_a_capped_move_keeps_to_its_cap_on_the_wire_and_its_downtime_figures_hold(lab, i, mode):
    pid, port = 4990 + 10 * i, 7880 + i
    work = lab.start_workload("a", mib=64, dirty_mibps=1, pid=pid, port=port)
    before = work.query("a")
    t0 = time.time()
    with WireWatch(lab, "a") as wire:
        # level 1 pinned, as below: the premise counts the pages at half their size on the wire, and
        # capped, a move chooses a level that sends far less of memcounter's (wire/compression.py)
        report = move(lab, pid, "--mode", mode, "--max-bandwidth", "4M", "--compression-level", "1")
    assert report["max_bandwidth_bytes_per_s"] == CAP
    # 64 MiB of pages, half text: about 33 MiB on the wire, about 8 s at the cap
    assert report["wire_bytes"] > 24 << 20
    # everything the move sent crossed the link, with TCP, IP and ssh's framing on top
    assert report["wire_bytes"] <= wire.sent <= 1.1 * report["wire_bytes"] + (1 << 20)
    # while it sent, its rate stayed within 10 % of the cap: the busy stretches' median
    # rate is the cap's, and no stretch went over it by more than 10 %
    rates = wire.rates()
    busy = [r for r in rates if r > CAP / 4]
    assert len(busy) >= 10, rates
    assert 0.9 * CAP <= statistics.median(busy) <= 1.1 * CAP, rates
    assert max(rates) <= 1.1 * CAP, rates
    assert report["peak_wire_bytes_per_s"] <= 1.1 * CAP
    # the downtime: its parts add up to it; the pages that crossed while it was frozen took at
    # least their share of the cap; and the workload stood still no longer than it says
    parts = report["downtime_parts"]
    assert sum(d["seconds"] for d in parts) == pytest.approx(report["downtime_seconds"], abs=1e-6)
    final = report["rounds"][-1]
    if mode == "precopy":
        # a fill: the changed pages are on the target's host before the copy runs
        assert report["downtime_seconds"] >= (final["bytes_wire"] - 64 * 1024) / CAP
        assert report["downtime_seconds"] >= work.stall_between("b", t0) - 0.02
        assert len([r for r in report["rounds"] if r["kind"] == "hashes"]) >= 2
    else:
        # post-copy: the pages went after the resume, at the cap, while the copy ran
        assert report["postcopy_seconds"] >= (final["bytes_wire"] - 64 * 1024) / CAP
        assert report["downtime_seconds"] < report["postcopy_seconds"]
    assert_moved_intact(lab, work, before, report)
    lab.run("b", ["kill", str(pid)])
