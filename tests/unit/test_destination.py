"""Targets as ssh names them (livemig/wire/transports/destination.py), and bad ones refused
with one line and the usage's exit code before anything is reached."""

from __future__ import annotations

import subprocess
import sys

import pytest

from livemig.errors import ExitCode, UsageError
from livemig.wire.transports.destination import Destination


@pytest.mark.parametrize("text, host, user, port", [
    ("b", "b", None, None),
    ("root@b", "b", "root", None),
    ("ops@host-b.example", "host-b.example", "ops", None),
    ("ssh://b", "b", None, None),
    ("ssh://root@b:2222", "b", "root", 2222),
    ("ssh://root@b:2222/", "b", "root", 2222),
    ("ssh://198.18.0.2:22", "198.18.0.2", None, 22),
    ("ssh://[2001:db8::2]:2222", "2001:db8::2", None, 2222),
    ("ssh://[2001:db8::2]", "2001:db8::2", None, None),
    ("2001:db8::2", "2001:db8::2", None, None),
    ("root@2001:db8::2", "2001:db8::2", "root", None),
])
def test_a_destination_is_read_as_ssh_reads_it(text, host, user, port):
    assert Destination.parse(text) == Destination(host, user, port)


@pytest.mark.parametrize("text", ["", "@b", "root@", "root@b:22", "b:2222", "ssh://", "ssh://b:0", "ssh://b:65536",
                                  "ssh://b:http", "ssh://[::1]x", "-oProxyCommand=touch /tmp/x", "ssh://-p22@b",
                                  "b c", "root@-b", "b/c"])
def test_a_bad_destination_is_refused(text):
    with pytest.raises(UsageError):
        Destination.parse(text)


def test_a_port_given_twice_must_agree_and_is_kept_in_the_text_a_record_keeps():
    assert Destination.parse("root@b").with_port(2222).text == "ssh://root@b:2222"
    assert Destination.parse("ssh://b:2222").with_port(2222).text == "ssh://b:2222"
    assert Destination.parse("2001:db8::2").with_port(22).text == "ssh://[2001:db8::2]:22"
    assert Destination.parse("root@b").text == "root@b"
    with pytest.raises(UsageError, match="two ports"):
        Destination.parse("ssh://b:22").with_port(2222)
    for text in ("ssh://root@b:2222", "root@b", "ssh://[2001:db8::2]:22"):
        assert Destination.parse(Destination.parse(text).text) == Destination.parse(text)


@pytest.mark.parametrize("argv", [["move", "--pid", "1", "root@b:22"], ["move", "--pid", "1", "-p", "0", "b"],
                                  ["check", "ssh://b:x"], ["clone", "web1", "b", "-p", "70000"]])
def test_the_cli_refuses_one_in_one_line_and_reaches_nothing(argv):
    res = subprocess.run([sys.executable, "-m", "livemig", *argv], capture_output=True, text=True, timeout=60,
                         check=False)
    assert res.returncode == ExitCode.USAGE, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr, res.stderr
