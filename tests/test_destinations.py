"""Targets named as ssh names them (issue 28): a user, a port, in ssh's two forms and with
--port, each taking a real move in the lab. Each host's sshd listens on 22 and on
hosts.SSH_PORT_TOO; a port where nothing listens is refused, so the port named is the one used."""

from __future__ import annotations

import json

import pytest

from tests.lab.hosts import SSH_PORT_NO_STREAMS, SSH_PORT_TOO

pytestmark = pytest.mark.lab


def test_a_target_named_with_a_user_and_a_port_takes_the_move(lab):
    work = lab.start_workload("a", mib=64, dirty_mibps=4, pid=4801, port=7881)
    before = work.query("a")
    try:
        for src, dst, named, recorded in (
                ("a", "b", ["root@b"], "root@b"),
                ("b", "a", [f"ssh://root@a:{SSH_PORT_TOO}"], f"ssh://root@a:{SSH_PORT_TOO}"),
                ("a", "b", ["-p", str(SSH_PORT_TOO), "b"], f"ssh://b:{SSH_PORT_TOO}")):
            res = lab.run(src, ["livemig", "move", "--pid", str(work.pid), "--json", *named], check=False, timeout=600)
            assert res.returncode == 0, res.stderr.decode()
            report = json.loads(res.stdout)
            assert (report["outcome"], report["target"]) == ("moved", recorded), report
            after = work.query(dst, wait=10)
            assert after["host"] == dst and after["counter"] > before["counter"]
            assert work.query(dst, "verify")["bad_pages"] == 0
            assert lab.run(src, ["kill", "-0", str(work.pid)], check=False).returncode != 0    # one copy only
            before = after
        assert lab.leftovers() == {"a": ([], []), "b": ([], [])}
    finally:
        for h in ("a", "b"):
            lab.run(h, ["kill", str(work.pid)], check=False)


def test_check_reaches_the_port_it_is_given_and_no_other(lab):
    res = lab.run("a", ["livemig", "check", "--json", f"ssh://root@b:{SSH_PORT_TOO}"], check=False)
    assert res.returncode == 0 and json.loads(res.stdout)["ok"], res.stdout.decode()
    res = lab.run("a", ["livemig", "check", "--json", "-p", str(SSH_PORT_TOO + 1), "root@b"], check=False)
    failed = json.loads(res.stdout)
    assert res.returncode == 4 and "refused" in failed["error"].lower(), failed
    assert failed["host"] == f"ssh://root@b:{SSH_PORT_TOO + 1}", failed


def test_an_sshd_that_refuses_the_agent_s_streams_is_named_in_check_with_the_setting_to_change(lab, work_on_a):
    lab.run("b", ["/usr/sbin/sshd", "-p", str(SSH_PORT_NO_STREAMS), "-o", "AllowStreamLocalForwarding=no",
                  "-o", f"PidFile=/run/sshd-{SSH_PORT_NO_STREAMS}.pid"])
    try:
        res = lab.run("a", ["livemig", "check", "--json", "-p", str(SSH_PORT_NO_STREAMS), "root@b"], check=False)
        found = json.loads(res.stdout)
        [streams] = [c for c in found["checks"] if c["name"] == "data streams"]
        assert res.returncode == 3 and not found["ok"] and not streams["ok"], found
        assert "AllowStreamLocalForwarding yes" in streams["hint"], streams
        # a move there stops in its preflight, saying the same; the workload runs on, untouched
        work, before = work_on_a
        res = lab.run("a", ["livemig", "move", "--pid", str(work.pid), "-p", str(SSH_PORT_NO_STREAMS), "root@b"],
                      check=False)
        assert res.returncode == 4 and b"AllowStreamLocalForwarding yes" in res.stderr, res.stderr
        assert work.query("a")["counter"] > before["counter"]
        assert lab.leftovers() == {"a": ([], []), "b": ([], [])}
    finally:
        lab.run("b", ["sh", "-c", f"kill $(cat /run/sshd-{SSH_PORT_NO_STREAMS}.pid)"], check=False)


@pytest.fixture
def work_on_a(lab):
    work = lab.start_workload("a", mib=16, pid=4803, port=7883)
    yield work, work.query("a")
    lab.run("a", ["kill", str(work.pid)], check=False)


def test_a_root_key_restricted_to_what_livemig_needs_takes_a_move(lab, work_on_a):
    # authorized_keys' `restrict` takes away every forwarding, the pty, agent and X11 forwarding and
    # ~/.ssh/rc; `port-forwarding` gives back the one livemig uses (its data streams are forwarded
    # UNIX sockets): docs/reference.md shows the line
    keys = "/root/.ssh/authorized_keys"
    lab.run("b", ["cp", "-p", keys, f"{keys}.lab"])
    lab.run("b", ["sed", "-i", "s/^/restrict,port-forwarding /", keys])
    try:
        work, before = work_on_a
        res = lab.run("a", ["livemig", "move", "--json", "--pid", str(work.pid), "root@b"], check=False, timeout=600)
        assert res.returncode == 0, res.stderr.decode()
        after = work.query("b", wait=10)
        assert after["host"] == "b" and after["counter"] > before["counter"]
        assert work.query("b", "verify")["bad_pages"] == 0
        lab.run("b", ["kill", str(work.pid)])
        # and without port-forwarding, check says which setting stops it
        lab.run("b", ["sed", "-i", "s/^restrict,port-forwarding /restrict /", keys])
        res = lab.run("a", ["livemig", "check", "--json", "root@b"], check=False)
        [streams] = [c for c in json.loads(res.stdout)["checks"] if c["name"] == "data streams"]
        assert res.returncode == 3 and not streams["ok"], streams
    finally:
        lab.run("b", ["mv", f"{keys}.lab", keys])


def test_a_target_reached_through_a_jump_host_named_in_ssh_config_takes_the_move(lab):
    # Each alias is 127.0.0.1 seen from b: reached directly it would be a itself, whose host key
    # is not b's (HostKeyAlias b), so a move that lands on b went through b. ProxyJump in root's
    # ~/.ssh/config, ProxyCommand in the system's /etc/ssh/ssh_config: livemig reads both.
    jump = "Host b-by-jump\n  HostName 127.0.0.1\n  HostKeyAlias b\n  ProxyJump root@b\n"
    command = "Host b-by-command\n  HostName 127.0.0.1\n  HostKeyAlias b\n  ProxyCommand ssh -W %h:%p root@b\n"
    kept = {f: lab.run("a", ["cat", f]).stdout for f in ("/root/.ssh/config", "/etc/ssh/ssh_config")}
    lab.run("a", ["tee", "/root/.ssh/config"], input=jump.encode() + kept["/root/.ssh/config"])
    lab.run("a", ["tee", "/etc/ssh/ssh_config"], input=command.encode() + kept["/etc/ssh/ssh_config"])
    works = [lab.start_workload("a", mib=16, pid=pid, port=port) for pid, port in ((4811, 7891), (4815, 7895))]
    try:
        for work, alias in zip(works, ("b-by-jump", "b-by-command"), strict=True):
            before = work.query("a")
            res = lab.run("a", ["livemig", "move", "--json", "--pid", str(work.pid), alias], check=False, timeout=600)
            assert res.returncode == 0, res.stderr.decode()
            assert (json.loads(res.stdout)["outcome"], json.loads(res.stdout)["target"]) == ("moved", alias)
            after = work.query("b", wait=10)
            assert after["host"] == "b" and after["counter"] > before["counter"]
            assert work.query("b", "verify")["bad_pages"] == 0
        # and without the jump, the same name is a, whose key is not b's: refused, nothing touched
        lab.run("a", ["tee", "/root/.ssh/config"], input=jump.replace("  ProxyJump root@b\n", "").encode()
                + kept["/root/.ssh/config"])
        res = lab.run("a", ["livemig", "check", "--json", "b-by-jump"], check=False)
        assert res.returncode == 4 and "host key" in json.loads(res.stdout)["error"], res.stdout.decode()
        assert lab.leftovers() == {"a": ([], []), "b": ([], [])}
    finally:
        for f, text in kept.items():
            lab.run("a", ["tee", f], input=text)
        for work in works:
            for h in ("a", "b"):
                lab.run(h, ["kill", str(work.pid)], check=False)
