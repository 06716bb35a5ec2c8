"""livemig move CTR for podman in the namespaced lab: the seeds' counter web server (each
request answers the next integer) moves, image and all, and answers the next number there."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.lab

TOOL = "/opt/livemig/tests/workloads/container.py"
ENV = ["env", "PODMAN_IGNORE_CGROUPSV1_WARNING=1"]


def ask(lab, host: str, name: str) -> int:
    return int(lab.text(host, ["python3", TOOL, "ask", "--name", name]))


def running(lab, host: str, name: str) -> bool | None:
    res = lab.run(host, [*ENV, "podman", "container", "inspect", name], check=False)
    return json.loads(res.stdout)[0]["State"]["Running"] if res.returncode == 0 else None


def leftovers(lab) -> dict:
    return {h: (lab.text(h, ["ls", "-A", "/var/lib/livemig"], check=False).split(),
                lab.text(h, ["pgrep", "-x", "criu"], check=False).split()) for h in ("a", "b")}


def test_podman_counter_server_moves_with_its_image_and_answers_the_next_number(lab):
    first = int(lab.text("a", ["python3", TOOL, "serve", "--name", "web1"]))
    assert ask(lab, "a", "web1") == first + 1
    assert lab.run("b", [*ENV, "podman", "image", "exists", "localhost/livemig-busybox:1"],
                   check=False).returncode != 0          # b lacks the image: livemig sends it
    res = lab.run("a", [*ENV, "livemig", "move", "--json", "web1", "b"], check=False, timeout=600)
    assert res.returncode == 0, res.stderr.decode()
    report = json.loads(res.stdout)
    assert (report["runtime"], report["mode"], report["outcome"]) == ("podman", "stopcopy", "moved")
    assert report["image_bytes_wire"] > 0
    assert ask(lab, "b", "web1") == first + 2             # the next number, from the target
    assert running(lab, "b", "web1") and running(lab, "a", "web1") is None
    assert leftovers(lab) == {"a": ([], []), "b": ([], [])}
    # refused before anything stops: postcopy is not podman's, and the name is taken on a now
    lab.run("a", ["python3", TOOL, "serve", "--name", "web1"])
    res = lab.run("b", [*ENV, "livemig", "move", "web1", "a"], check=False, timeout=600)
    assert res.returncode == 3 and "web1" in res.stderr.decode()
    res = lab.run("b", [*ENV, "livemig", "move", "--mode", "postcopy", "web1", "a"], check=False, timeout=600)
    assert res.returncode == 3 and "podman" in res.stderr.decode()
    assert ask(lab, "b", "web1") == first + 3 and running(lab, "b", "web1")
    for h in ("a", "b"):
        lab.run(h, [*ENV, "podman", "rm", "--force", "web1"])
