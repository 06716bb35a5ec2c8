"""runtimes/podman_networks.py: which networks a podman container is on, and whether its
address and connections can be the same on the target (the lab proves it:
tests/test_podman_network.py)."""

from pathlib import Path

import pytest

from livemig import criu
from livemig.errors import UsageError
from livemig.runtimes import podman
from livemig.runtimes import podman_networks as pn
from livemig.source import local
from livemig.wire import protocol as p

LINK = p.PodmanNetwork("link", "macvlan", ["198.18.0.0/24"], "eth0", address="198.18.0.150")
NAT = p.PodmanNetwork("podman", "bridge", ["10.88.0.0/16"], "podman0", address="10.88.0.5")


def test_the_networks_and_addresses_of_a_container_as_podman_inspect_gives_them():
    found = {"NetworkSettings": {"Networks": {"link": {"IPAddress": "198.18.0.150"}, "b": {}}}}
    assert pn.attached(found) == {"b": "", "link": "198.18.0.150"}
    assert pn.attached({"NetworkSettings": {"Networks": None}}) == {}     # --network host
    assert pn.attached({}) == {}


def test_nothing_is_judged_where_connections_are_not_kept():
    assert pn.judged("c", [NAT], [], keeps_connections=False) == []


def test_a_shared_link_defined_alike_on_both_hosts_keeps_them():
    [(ok, what, hint, _)] = pn.judged("c", [LINK], [LINK], keeps_connections=True)
    assert ok and "198.18.0.150 stays the container's" in what and hint == ""


def test_a_bridge_behind_this_host_s_nat_is_refused_as_this_host_s_own():
    [(ok, what, hint, on_target)] = pn.judged("web", [NAT], [NAT], keeps_connections=True)
    assert not ok and not on_target
    assert "web has 10.88.0.5 on podman network podman (bridge on podman0, 10.88.0.0/16)" in what
    assert "macvlan or ipvlan" in hint


def test_the_target_lacking_the_network_or_defining_it_otherwise_or_lacking_its_parent_is_refused():
    [(ok, what, hint, on_target)] = pn.judged("c", [LINK], [], keeps_connections=True)
    assert not ok and on_target and "the target has no podman network link" in what
    assert hint.endswith("podman network create -d macvlan -o parent=eth0 --subnet 198.18.0.0/24 link")
    other = p.PodmanNetwork("link", "ipvlan", ["198.18.0.0/24"], "eth0")
    [(ok, what, _, _)] = pn.judged("c", [LINK], [other], keeps_connections=True)
    assert not ok and "is ipvlan, 198.18.0.0/24 on the target, macvlan, 198.18.0.0/24 here" in what
    parentless = p.PodmanNetwork("link", "macvlan", ["198.18.0.0/24"], "eth1", interface_here=False)
    [(ok, what, _, _)] = pn.judged("c", [LINK], [parentless], keeps_connections=True)
    assert not ok and "no interface eth1" in what


def test_a_restore_asks_for_the_connections_its_checkpoint_kept_and_keeps_the_name_they_need():
    kept = criu.Options(tcp_established=True)
    # a rollback's, from the checkpoint podman kept: without the flag, CRIU refuses the connections
    assert podman.restore_kept("web", kept) == ["podman", "container", "restore", "--tcp-established", "web"]
    # podman's checkpoint always takes them as they are (it cannot close them): its rollback too
    assert podman.restore_kept("web", criu.NO_OPTIONS) == ["podman", "container", "restore", "--tcp-established", "web"]
    assert "--tcp-established" in podman.checkpoint("web", Path("/w/a.tar"), criu.NO_OPTIONS)
    # the target's, from the archive: under the archive's own name (podman refuses --name beside the flag)
    argv = podman.restore_archive(Path("/w/a.tar"), "web", kept)
    assert "--tcp-established" in argv and "--name" not in argv
    assert podman.restore_archive(Path("/w/a.tar"), "web")[-2:] == ["--name", "web"]


class _Container:
    def __init__(self, runtime: str):
        self.runtime = runtime

    def target_spec(self) -> p.Container:
        return p.Container(self.runtime, "web", "", networks={"link": "198.18.0.150"})


def test_another_name_on_the_target_is_refused_where_podman_would_keep_the_connections_under_its_own():
    assert local.target_spec(_Container("podman"), "web2").id == "web2"
    assert local.target_spec(_Container("podman"), "web", tcp_established=True).id == "web"
    assert local.target_spec(_Container("runc"), "web2", tcp_established=True).id == "web2"
    with pytest.raises(UsageError, match="--name with --tcp-established"):
        local.target_spec(_Container("podman"), "web2", tcp_established=True)
