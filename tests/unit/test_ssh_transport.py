"""What ~/.ssh/config may not change in livemig's SSH connections: host keys are verified
(UserKnownHostsFile none is refused, not obeyed), and root's agent is never forwarded to a
target (ForwardAgent yes is ignored). asyncssh's own option handling is what is checked:
connect() is replaced by one that builds the options as asyncssh does, and stops there."""

from __future__ import annotations

import asyncssh
import pytest

from livemig.errors import ConnectionFailed
from livemig.wire.transports import ssh


class _Stop(Exception):
    pass


@pytest.fixture
def connecting(tmp_path, monkeypatch):
    """(write ~/.ssh/config, the options the connection would have had)"""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SSH_AUTH_SOCK", str(tmp_path / "agent.sock"))     # root's agent, as a forward would find it
    (tmp_path / ".ssh").mkdir()
    seen: list[asyncssh.SSHClientConnectionOptions] = []

    async def connect(host, port=(), *, config=(), options=None, **kw):
        seen.append(await asyncssh.SSHClientConnectionOptions.construct(options, config=config, host=host,
                                                                        port=port, **kw))
        raise _Stop
    monkeypatch.setattr(asyncssh, "connect", connect)

    def config(text: str) -> None:
        (tmp_path / ".ssh" / "config").write_text(text)
    return config, seen


async def test_a_config_that_turns_host_key_checks_off_is_refused(connecting):
    config, seen = connecting
    config("Host *\n  UserKnownHostsFile none\n")
    with pytest.raises(ConnectionFailed, match="UserKnownHostsFile"):
        await ssh.SshTransport.connect("host-b")
    assert all(o.known_hosts is not None for o in seen)     # never a connection that trusts any key


async def test_host_keys_are_checked_against_the_files_the_config_names(connecting, tmp_path):
    config, seen = connecting
    config(f"Host host-b\n  UserKnownHostsFile {tmp_path}/hosts\n")
    with pytest.raises(_Stop):
        await ssh.SshTransport.connect("host-b")
    assert seen[0].known_hosts == [f"{tmp_path}/hosts"]


async def test_root_s_agent_is_never_forwarded(connecting):
    config, seen = connecting
    config("Host *\n  ForwardAgent yes\n")
    with pytest.raises(_Stop):
        await ssh.SshTransport.connect("host-b")
    assert seen[0].agent_forward_path is None and seen[0].known_hosts is not None
