"""What a drain finds to move, and its record of what moved (source/drain.py): the logic
alone, the runtimes' lists made up here (the lab's test_drain.py drains real ones)."""

from __future__ import annotations

import asyncio
import os
import stat

import pytest

from livemig import runtimes
from livemig.drainreport import DrainReport
from livemig.errors import UsageError
from livemig.options import Options
from livemig.source import drain


def report() -> DrainReport:
    return DrainReport("a", ["b"], False)


@pytest.fixture
def here(monkeypatch):
    hosted = [runtimes.Hosted("podman", "web1"), runtimes.Hosted("runc", "db1"), runtimes.Hosted("crun", "cache")]

    async def listed():
        return hosted
    monkeypatch.setattr(runtimes, "hosted", listed)
    return hosted


def found(options, r, **asked) -> list[tuple[str, str]]:
    got = asyncio.run(drain.find(r, options, asked.get("only", ()), asked.get("exclude", ()), asked.get("pids", ())))
    return [(c.runtime, c.workload) for c in got]


def test_every_container_here_but_those_excepted_and_the_trees_named(tmp_path, here):
    options = Options(image_root=str(tmp_path))
    assert found(options, report()) == [("podman", "web1"), ("runc", "db1"), ("crun", "cache")]
    assert found(options, report(), exclude=["db1"], pids=[os.getpid()]) == [
        ("podman", "web1"), ("crun", "cache"), ("process", str(os.getpid()))]
    assert found(options, report(), only=["cache"]) == [("crun", "cache")]


def test_a_name_not_here_is_refused_unless_an_earlier_drain_moved_it(tmp_path, here):
    options = Options(image_root=str(tmp_path))
    with pytest.raises(UsageError, match="no container 'gone' here"):
        found(options, report(), only=["gone"])
    with pytest.raises(UsageError, match="no process 999999999 here"):
        found(options, report(), pids=[999999999])
    drain.remember(str(tmp_path), "runc:gone", "b")
    drain.remember(str(tmp_path), "process:999999999", "c")
    r = report()
    assert found(options, r, only=["gone", "web1"], pids=[999999999]) == [("podman", "web1")]
    assert [(e.workload, e.runtime, e.target) for e in r.earlier] == [("gone", "runc", "b"), ("999999999", "process", "c")]


def test_the_record_keeps_every_move_and_is_private(tmp_path):
    drain.remember(str(tmp_path), "runc:db1", "b")
    drain.remember(str(tmp_path), "process:42", "c")
    drain.remember(str(tmp_path), "runc:db1", "c")         # moved again since: the last word
    done = drain._done(str(tmp_path))
    assert {k: v["target"] for k, v in done.items()} == {"runc:db1": "c", "process:42": "c"}
    assert stat.S_IMODE((tmp_path / drain.DONE).stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [drain.DONE, f"{drain.DONE}.lock"]


def test_a_workload_back_here_leaves_the_record_and_a_plain_drain_says_what_is_still_away(tmp_path, here):
    options = Options(image_root=str(tmp_path))
    drain.remember(str(tmp_path), "runc:db1", "b")        # moved away, and since back here
    drain.remember(str(tmp_path), "podman:away", "c")     # moved away, still there
    r = report()
    assert ("runc", "db1") in found(options, r)
    assert [(e.workload, e.target) for e in r.earlier] == [("away", "c")]
    assert set(drain._done(str(tmp_path))) == {"podman:away"}
