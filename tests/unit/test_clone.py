"""How replicas are named, and what a clone's report says."""

import json

import pytest

from livemig.errors import UsageError
from livemig.options import Options
from livemig.report import CloneReport, Replica
from livemig.source.clone import Clone, replica_names


def test_replicas_are_named_after_the_original_unless_told():
    assert replica_names("web1", None, 1, False) == ["web1-clone"]
    assert replica_names("web1", None, 3, False) == ["web1-clone-1", "web1-clone-2", "web1-clone-3"]
    assert replica_names("web1", "cache", 1, False) == ["cache"]
    assert replica_names("web1", "cache", 2, False) == ["cache-1", "cache-2"]
    assert replica_names("web1", None, 1, True) == ["web1"]


@pytest.mark.parametrize("name,count,keep", [(None, 0, False), (None, 2, True), ("x", 1, True)])
def test_impossible_names_are_usage_errors(name, count, keep):
    with pytest.raises(UsageError):
        replica_names("web1", name, count, keep)


def test_the_report_names_every_replica_and_the_originals_pause():
    r = CloneReport(source="a", workload="web1", outcome="cloned", frozen_seconds=0.073, pages_written=36,
                    checkpoint_bytes=3 << 20, replicas=[Replica("b", "web1-clone-1", 101, 0.18),
                                                        Replica("b", "web1-clone-2", 102, 0.2)])
    text = r.summary()
    assert "2 replica(s) on b" in text and "stood still 73 ms" in text
    assert "web1-clone-2 on b: PID 102" in text
    assert json.loads(r.to_json())["replicas"][0] == {"host": "b", "name": "web1-clone-1", "pid": 101,
                                                      "restore_seconds": 0.18, "bytes_wire": 0}


async def test_a_clone_that_made_no_work_directory_removes_none(tmp_path):
    # the clone's ID already names a directory there (not the clone's: it made none)
    c = Clone("web1", ["b"], ["web1-clone"], Options(image_root=str(tmp_path)), lambda target: None)
    c.work.mkdir()
    (c.work / "theirs").write_text("keep")
    await c.close()
    assert (c.work / "theirs").read_text() == "keep"
