"""livemig(1) is written from the parser (livemig/manpage.py): docs/livemig.1 is its output."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from livemig import manpage
from livemig.arguments import build_parser
from livemig.errors import ExitCode

SHIPPED = Path(__file__).parents[2] / "docs" / "livemig.1"


def test_the_shipped_page_is_the_one_the_parser_writes():
    # a flag or help text changed: `python -m livemig.manpage > docs/livemig.1`
    assert SHIPPED.read_text() == manpage.page()


def test_every_command_flag_and_exit_code_is_on_it():
    text = manpage.page().replace("\\-", "-")
    parser = build_parser()
    for name, (sub, _) in manpage._commands(parser).items():
        if name == "agent":
            continue
        assert f".SS {name}" in text
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            for flag in action.option_strings:
                assert flag in text, (name, flag)
    for code in ExitCode:
        assert f"\\fB{int(code)}\\fR" in text


def test_it_renders_without_a_warning():
    # groff: .ci/setup installs it (groff-base)
    res = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(SHIPPED)], capture_output=True, text=True,
                         check=False)
    assert res.returncode == 0 and res.stderr == "", res.stderr
