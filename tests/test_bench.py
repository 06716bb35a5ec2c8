"""The benchmark keeps working: `python -m bench --quick` moves a real workload with every
contender in the lab and writes its JSON, table and plots. It asserts what was measured,
never how fast: speed is the benchmark's business, not a test's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.contenders import CONTENDERS, FOR_CONTAINERS

pytestmark = pytest.mark.lab
REPO = Path(__file__).resolve().parents[1]


def test_quick_benchmark_moves_the_workload_with_every_contender_and_writes_its_results(tmp_path):
    res = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)], cwd=REPO,
                         capture_output=True, timeout=1800, check=False)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    [path] = tmp_path.glob("*.json")
    result = json.loads(path.read_text())
    assert {s["contender"] for s in result["samples"]} == set(CONTENDERS)
    # and the runc container, with every contender that moves one
    assert {s["contender"] for s in result["samples"] if s["workload"] == "runc"} == set(FOR_CONTAINERS)
    for s in result["samples"]:
        assert s["ok"] and s["downtime_app"] > 0 and s["total"] >= s["downtime_tool"] > 0, s
        assert s["bytes_wire"] > 0
    livemig = [s for s in result["samples"] if s["contender"].startswith("livemig")]
    assert all(s["rounds"] and s["peak_rss_bytes"] > 0 and s["cpu_seconds"] > 0 for s in livemig)
    # pre-copy, both ways the lab's kernel allows: by write-protection, and by page hashes on request
    tracking = {s["contender"]: s["tracking"] for s in livemig if s["workload"] == "process"}
    assert tracking["livemig precopy"] == "write-protect"
    assert tracking["livemig precopy --no-write-protect"] == "page hashes"
    lim = result["limits"]
    assert lim["ssh_mibps"] > 0 and lim["tcp_mibps"] > 0 and lim["criu_floor"] > 0
    ratios = {r["contender"]: r["less_downtime_than_seeds"] for r in result["summary"]}
    assert ratios["seeds"] == 1.0 and all(v > 0 for v in ratios.values())
    table = path.with_suffix(".md").read_text()
    assert all(f"| {name} |" in table for name in CONTENDERS)
    for plot in ("downtime", "rounds"):
        assert (tmp_path / f"{path.stem}-{plot}.png").read_bytes()[:4] == b"\x89PNG"


def test_a_link_profile_holds_every_ssh_connection_to_its_rate_and_round_trip_and_goes_away(lab):
    # The 100 Mbit/s, 20 ms profile: what the bench's far-link rows rest on. Both bounds hold by
    # construction (a token bucket never lets more through, a relay never answers sooner).
    from bench import link
    before = lab.text("a", ["cat", "/root/.ssh/config"])
    link.shape(lab, link.PROFILES["100m"])
    try:
        assert link.round_trip_ms(lab, "a", "b") >= 20.0
        took = float(lab.text("a", ["python3", "-c", (
            "import subprocess,time\n"
            "subprocess.run(['head','-c','8388608','/dev/urandom'],stdout=open('/dev/shm/probe','wb'),check=True)\n"
            "t=time.monotonic();subprocess.run(['scp','-q','/dev/shm/probe','b:/dev/null'],check=True)\n"
            "print(time.monotonic()-t)")]))
        assert 8 * 2**20 / took <= 100e6 / 8 * 1.1       # the cap, and a margin for the bucket's first burst
        assert lab.run("a", ["livemig", "check", "--json", "b"], check=False).returncode == 0   # livemig too
    finally:
        link.unshape(lab)
        lab.run("a", ["rm", "-f", "/dev/shm/probe"], check=False)
    assert lab.text("a", ["cat", "/root/.ssh/config"]) == before
    assert "tbf" not in lab.text("a", ["tc", "qdisc", "show", "dev", "eth0"])
