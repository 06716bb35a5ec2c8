"""`python -m livemig` is the `livemig` command: the same output, the same exit codes."""

import subprocess
import sys

from livemig.errors import ExitCode
from livemig.version import __version__
from livemig.wire.protocol import PROTOCOL_OLDEST, PROTOCOL_VERSION


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "livemig", *args], capture_output=True, text=True,
                          timeout=60, check=False)


def test_python_m_livemig_says_its_version_and_its_wire_protocols():
    res = run("--version")
    spoken = (f"wire protocol {PROTOCOL_VERSION}" if PROTOCOL_OLDEST == PROTOCOL_VERSION
              else f"wire protocols {PROTOCOL_OLDEST}-{PROTOCOL_VERSION}")
    assert (res.returncode, res.stdout.strip()) == (0, f"livemig {__version__} ({spoken})")


def test_python_m_livemig_refuses_bad_input_with_the_usage_exit_code():
    res = run("move", "--mode", "sideways", "--pid", "1", "b")
    assert res.returncode == ExitCode.USAGE
    assert "sideways" in res.stderr and "Traceback" not in res.stderr
