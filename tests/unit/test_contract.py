"""--json's contract (livemig/contract.py): one JSON object on stdout, valid against the
command's shipped schema, failures included; the shipped schemas are what the code writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from livemig import contract
from livemig.drainreport import (
    DrainEarlier,
    DrainLeft,
    DrainMove,
    DrainPlacement,
    DrainReport,
)
from livemig.errors import ExitCode
from livemig.recoverreport import Settled
from livemig.report import CloneReport, Plan, Replica, Report, RoundReport
from tests.contract import command_of, held


@pytest.mark.parametrize("command", list(contract.BODIES))
def test_the_shipped_schema_is_the_one_the_code_writes(command):
    # a change to a report's fields changes its schema: `python -m livemig.contract --write`
    assert contract.file_of(command).read_text() == contract.written(command)


def _livemig(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "livemig", *argv], capture_output=True, timeout=60, check=False,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("argv, env, code, phase", [
    # reaching for the target would fail otherwise: each fails before that
    (["move", "--json", "--dry-run", "--pid", "999999", "--image-root", "ROOT", "nowhere.invalid"], {},
     ExitCode.PREFLIGHT, "preflight"),
    (["move", "--json", "--pid", "999999", "--image-root", "ROOT", "nowhere.invalid"], {}, ExitCode.PREFLIGHT,
     "preflight"),
    (["move", "--json", "web1"], {}, ExitCode.USAGE, ""),
    (["move", "--json", "--no-such-flag", "web1", "b"], {}, ExitCode.USAGE, "usage"),
    (["check", "--json", "nowhere.invalid"], {"LIVEMIG_MODE": "sideways"}, ExitCode.USAGE, "preflight"),
    (["clone", "--json", "web1"], {}, ExitCode.USAGE, "usage"),
    (["config", "--json"], {"LIVEMIG_MAX_ROUNDS": "many"}, ExitCode.USAGE, ""),
    (["drain", "--json", "--only", "web1"], {}, ExitCode.USAGE, "usage"),
    (["drain", "--json", "--to", "nowhere.invalid", "--parallel", "0"], {}, ExitCode.USAGE, ""),
    # (a root short enough for the moves' sockets: the drain checks it for them)
    (["drain", "--json", "--dry-run", "--to", "nowhere.invalid", "--pid", "999999", "--image-root", "SHORT"], {},
     ExitCode.USAGE, ""),
], ids=["dry run", "move", "move without a host", "an unknown flag", "check", "clone without a host", "config",
        "drain without a target", "drain none at once", "drain a PID not here"])
def test_a_command_that_fails_before_its_report_prints_one_object_saying_why(tmp_path, argv, env, code, phase):
    short = Path(tempfile.mkdtemp(prefix="lm-"))
    argv = [str(tmp_path) if a == "ROOT" else str(short) if a == "SHORT" else a for a in argv]
    try:
        res = _livemig(*argv, env=env)
    finally:
        shutil.rmtree(short)
    assert res.returncode == code, res.stderr
    command = command_of(["livemig", *argv])
    assert command is not None
    doc = held(command, res.stdout, res.returncode)
    assert doc["outcome"] == "failed" and doc["error"] and doc["failed_phase"] == phase, doc
    assert res.stderr.strip() and b"Traceback" not in res.stderr


def test_recover_and_config_print_their_own_objects(tmp_path):
    res = _livemig("recover", "--json", "--image-root", str(tmp_path))
    assert held("recover", res.stdout, res.returncode)["settled"] == [] and res.returncode == 0
    res = _livemig("config", "--json", env={"LIVEMIG_MAX_ROUNDS": "3"})
    doc = held("config", res.stdout, res.returncode)
    assert doc["settings"]["max_rounds"] == {"value": 3, "from": "LIVEMIG_MAX_ROUNDS"}


def test_reports_in_full_hold_to_their_schemas():
    report = Report(4242, "a", "b", migration_id="20261205-120000-0a1b2c3d", started_at="2026-12-05T12:00:00.000+00:00",
                    outcome="moved", rounds=[RoundReport("hashes", 10, 40960, 4096)], expected_downtime_seconds=0.2,
                    max_bandwidth_bytes_per_s=1 << 20, warnings=["w"])
    clone = CloneReport("a", "web1", replicas=[Replica("b", "web1-clone", 7)])
    plan = Plan("4242", "process", "a", "b", "precopy", "why", 1, 1 << 20, 1e8, 0.1, 0.3, "1 to 8", "note",
                expected_downtime_by_mode={"stopcopy": 0.5})
    drained = DrainReport("a", ["b", "c"], False, placements=[DrainPlacement("4242", "process", "b", 1 << 20, 0.1,
                                                                             "precopy", 0.3, plan)],
                          moves=[DrainMove("4242", "process", "b", "moved", 0, report=report.to_dict())],
                          unplaced=[DrainLeft("web1", "runc", "b: no runc there")],
                          earlier=[DrainEarlier("web2", "podman", "c", "2026-12-05T12:00:00.000+00:00")], empty=False)
    for command, body in (("move", report.to_dict()), ("clone", clone.to_dict()), ("move --dry-run", plan.to_dict()),
                          ("recover", {"settled": [vars(Settled("m", "b", "PID 1", "moved", "d"))]}),
                          ("drain", drained.to_dict())):
        doc = held(command, contract.document(command, body, 0).encode(), 0)
        assert doc["schema"] == contract.SCHEMA and doc["command"] == command


def test_a_report_missing_a_field_or_with_one_of_the_wrong_type_is_refused():
    body = Report(1, "a", "b").to_dict()
    del body["migration_id"]
    with pytest.raises(AssertionError, match="migration_id"):
        held("move", contract.document("move", body, 0).encode(), 0)
    body = {**Report(1, "a", "b").to_dict(), "downtime_seconds": "fast"}
    with pytest.raises(AssertionError, match="fast"):
        held("move", contract.document("move", body, 0).encode(), 0)


def test_the_schemas_ship_with_the_package():
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    assert '"schemas/*.json"' in pyproject
    assert {p.stem for p in contract.SCHEMAS.glob("*.json")} == {contract.file_of(c).stem for c in contract.BODIES}
    assert json.loads(contract.file_of("move").read_text())["allOf"][0]["properties"]["schema"]["const"] == 1
