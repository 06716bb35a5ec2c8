"""runtimes/oci_networks.py and quiet.py: whether a runc or crun container's own network can be
made again on the target, and the CRIU configuration that makes it (the lab proves it:
tests/test_oci_network.py, tests/test_database.py)."""

import asyncio
import os
import shutil
import subprocess

import pytest

from livemig.errors import LivemigError
from livemig.runtimes import oci_networks as on
from livemig.runtimes import quiet
from livemig.wire import protocol as p

LINK = p.NetLink("eth0", "macvlan", "eth0", "bridge", "02:42:c6:12:00:96", 1500, ["198.18.0.150/24", "2001:db8::5/64"])
VETH = p.NetLink("eth1", "veth", "", "", "02:42:c6:12:00:97", 1500, ["10.0.0.2/24"])
ROUTE = ["default", "via", "198.18.0.254", "dev", "eth0"]


@pytest.fixture(autouse=True)
def tools_anywhere(monkeypatch):
    """nft and the rest where this machine lacks them: the scripts are read, not run, but one."""
    which = shutil.which
    monkeypatch.setattr(quiet.shutil, "which", lambda name: which(name) or f"/usr/sbin/{name}")


def container(runtime: str, *links: p.NetLink, routes=(), hooks: bool = False) -> p.Container:
    return p.Container(runtime, "web", "/b", own_network=p.OwnNetwork(list(links), list(routes), hooks))


def test_a_container_on_the_host_s_network_is_not_judged():
    assert on.judged(p.Container("runc", "web", "/b"), []) == []


def test_a_macvlan_link_is_made_again_on_the_target_s_interface_of_its_parent_s_name():
    for runtime in ("runc", "crun"):
        [(ok, what, hint, on_target)] = on.judged(container(runtime, LINK), [])
        assert ok and on_target and hint == ""
        assert "eth0 (macvlan on eth0, 198.18.0.150/24, 2001:db8::5/64) made again on the target's eth0" in what


def test_a_link_whose_parent_the_target_lacks_is_refused_there():
    [(ok, what, hint, on_target)] = on.judged(container("runc", LINK), ["eth0"])
    assert not ok and on_target and "the target has no interface eth0" in what and "that name" in hint


def test_a_link_livemig_cannot_make_again_is_refused_here():
    [(ok, what, hint, on_target)] = on.judged(container("runc", VETH), [])
    assert not ok and not on_target
    assert "web's eth1 is a veth link" in what and "livemig makes macvlan and ipvlan links" in what
    assert "hook" in hint
    ipvlan = p.NetLink("eth0", "ipvlan", "eth0", "l2", "", 1500, ["198.18.0.150/24"])
    [(ok, what, _, _)] = on.judged(container("crun", ipvlan), [])
    assert not ok and "(livemig makes macvlan links)" in what     # CRIU dumps no ipvlan


def test_a_runc_bundle_with_hooks_makes_its_network_itself():
    [(ok, what, _, _)] = on.judged(container("runc", VETH, hooks=True), [])
    assert ok and "made by its bundle's hooks" in what


def test_runc_s_copy_is_quiet_before_its_link_is_on_the_link_and_gets_its_mac_addresses_and_routes(tmp_path):
    line = on.at_restore(tmp_path, container("runc", LINK, routes=[ROUTE]))
    assert line == f"action-script {tmp_path / 'network-at-restore'}\n"
    script = (tmp_path / "network-at-restore").read_text()
    assert '[ "$CRTOOLS_SCRIPT_ACTION" = setup-namespaces ] || exit 0' in script
    steps = script.splitlines()
    quiet_at = next(i for i, s in enumerate(steps) if "nft -f" in s)
    made_at = next(i for i, s in enumerate(steps) if "link add link eth0" in s)
    assert quiet_at < made_at
    assert "address 02:42:c6:12:00:96 mtu 1500 type macvlan mode bridge" in steps[made_at]
    assert any(s.endswith("address add 2001:db8::5/64 dev eth0 nodad") for s in steps)
    assert any(s.endswith("route add default via 198.18.0.254 dev eth0") for s in steps)
    assert any(s.endswith("link set lo up") for s in steps)
    assert (tmp_path / "network-at-restore").stat().st_mode & 0o777 == 0o700
    assert "table arp livemig-quiet" in (tmp_path / "quiet.nft").read_text()


def test_runc_s_script_runs_under_sh_and_fails_with_what_the_failing_step_said(tmp_path):
    on.at_restore(tmp_path, container("runc", LINK))
    script = tmp_path / "network-at-restore"
    # not its action: nothing done
    ran = subprocess.run(["sh", script], check=False, env={"CRTOOLS_SCRIPT_ACTION": "post-restore", "PATH": "/usr/bin:/bin"})
    assert ran.returncode == 0 and quiet.failed(tmp_path) == ""
    # its action, in a namespace that is not there: fails, and says why
    ran = subprocess.run(["sh", script], check=False, env={"CRTOOLS_SCRIPT_ACTION": "setup-namespaces", "CRTOOLS_INIT_PID": "0",
                                              "PATH": "/usr/bin:/bin"})
    assert ran.returncode != 0 and "/proc/0/ns/net" in quiet.failed(tmp_path)


def test_a_runc_container_with_loopback_alone_gets_it_up_and_needs_no_nft(tmp_path):
    on.at_restore(tmp_path, container("runc"))
    script = (tmp_path / "network-at-restore").read_text()
    assert "nft" not in script and script.rstrip().endswith("link set lo up")


def test_crun_s_criu_is_told_each_macvlan_link_s_parent_and_the_copy_kept_quiet(tmp_path):
    config = on.at_restore(tmp_path, container("crun", LINK))
    assert config.startswith("external macvlan[eth0]:eth0\naction-script ")
    assert "post-restore" in (tmp_path / "quiet-at-restore").read_text()
    assert on.at_restore(tmp_path, container("crun")) == ""     # (its CRIU makes loopback again)


@pytest.mark.parametrize("bad", [
    p.NetLink("eth0;reboot", "macvlan", "eth0", "bridge", "02:42:c6:12:00:96", 1500, []),
    p.NetLink("eth0", "macvlan", "$(reboot)", "bridge", "02:42:c6:12:00:96", 1500, []),
    p.NetLink("eth0", "macvlan", "eth0", "bridge", "02:42 reboot", 1500, []),
    p.NetLink("eth0", "macvlan", "eth0", "bridge", "02:42:c6:12:00:96", 1500, ["198.18.0.150/24; reboot"]),
])
def test_what_a_peer_sends_goes_into_no_script_unchecked(tmp_path, bad):
    with pytest.raises(LivemigError):
        on.at_restore(tmp_path, container("runc", bad))


def test_a_route_word_that_is_no_word_is_refused(tmp_path):
    with pytest.raises(LivemigError):
        on.at_restore(tmp_path, container("runc", LINK, routes=[["default", "via", "1.2.3.4;reboot"]]))


def test_the_target_says_which_parents_it_lacks():
    absent = p.NetLink("eth0", "macvlan", "nosuchif0", "bridge", "", 0, [])
    assert on.parents_missing(container("runc", absent, absent)) == ["nosuchif0"]
    assert on.parents_missing(p.Container("runc", "web", "/b")) == []


def test_this_host_s_own_network_is_never_unlinked_nor_opened(monkeypatch):
    """A container that shares the host's network namespace: its copy's end deletes no link of
    the host's, and its resume touches no table there."""
    async def no_command(*args, **kw):
        raise AssertionError(f"ran {args}")
    monkeypatch.setattr(quiet.proc, "run", no_command)
    asyncio.run(quiet.unlink(os.getpid()))
    assert asyncio.run(quiet.speak(os.getpid())) == ""


@pytest.mark.parametrize("destroys, listed, deleted", [
    (True, None, []),                                           # one nft call, whatever was there
    (False, "table inet livemig-quiet\n", ["inet"]),            # an nft without destroy: those there, one by one
    (False, "table ip filter\n", []),                           # none of ours there: nothing deleted
])
def test_a_copy_s_quiet_tables_go_in_one_nft_call_where_nft_can_destroy(monkeypatch, destroys, listed, deleted):
    ran = []

    async def run(argv, check=True, input=None, **kw):
        ran.append((argv[2:], input))
        out = (listed or "").encode() if argv[2:4] == ["nft", "list"] else b""
        return quiet.proc.Result(tuple(argv), 0 if destroys or argv[3] != "-f" else 1, out, b"")
    monkeypatch.setattr(quiet.proc, "run", run)
    assert asyncio.run(quiet._open(4242)) == []
    assert ran[0] == (["nft", "-f", "-"], b"destroy table inet livemig-quiet\ndestroy table arp livemig-quiet\n")
    if destroys:
        assert len(ran) == 1
    else:
        assert ran[1][0] == ["nft", "list", "tables"]
        assert [argv[:3] + [argv[4]] for argv, _ in ran[2:]] == [["nft", "delete", "table", quiet.TABLE]] * len(deleted)
        assert [argv[3] for argv, _ in ran[2:]] == deleted


def test_a_copy_whose_link_comes_up_before_its_restore_closes_it_is_hushed_at_each_address_on_its_parent(
        monkeypatch):
    """quiet.hush: crun's own links and podman's networks (on the target's interface of the network
    of that name), each address apart, the same tc preference on every host; not runc's, whose
    namespace is closed before its links are made; and each hush taken off by its name."""
    assert quiet.hushes_of(container("crun", LINK, VETH), {}) == [("eth0", "198.18.0.150/24"),
                                                                  ("eth0", "2001:db8::5/64")]
    assert quiet.hushes_of(container("runc", LINK), {}) == []
    podman = p.Container("podman", "web", "", networks={"link": "198.18.0.150", "gone": "198.18.1.2"})
    assert quiet.hushes_of(podman, {"link": "eth1"}) == [("eth1", "198.18.0.150")]
    ran: list[tuple[list[str], bytes]] = []

    async def run(argv, input=b"", **kw):
        ran.append((argv, input))
        return subprocess.CompletedProcess(argv, 0, b"", b"")
    monkeypatch.setattr(quiet.proc, "run", run)
    for address, family in (("198.18.0.150", "ip"), ("2001:db8::5/64", "ip6")):
        ran.clear()
        hushed = asyncio.run(quiet.hush("eth1", address))
        assert hushed == f"livemig-hush-{address.split('/')[0].replace('.', '-').replace(':', '-')}"
        assert ran == [(["nft", "-f", "-"], (
            f"add table netdev {hushed}\ndelete table netdev {hushed}\ntable netdev {hushed} {{\n  chain out {{ type filter hook egress device "
            f"\"eth1\" priority -300 ; policy accept ; {family} saddr {address.split('/')[0]} drop ; }}\n}}\n"
        ).encode())]
        assert quiet.unhush_argv(hushed) == ["nft", "delete", "table", "netdev", hushed]
