"""What livemig hands on and shows: its programs get a short environment of known names,
not whatever its own caller had (secrets, LD_PRELOAD, PYTHONPATH); the copy's guard, run as
root, imports livemig from where the agent's own came from, never from its directory or
PYTHON* variables (-I); and text from the target reaches the terminal with its control
characters escaped, so that it can neither rewrite the screen nor the terminal's title."""

from __future__ import annotations

import io
import os
import types

from livemig import cli, display, proc
from livemig.errors import LivemigError
from livemig.progress import Stepping
from livemig.target.guard import Guard
from livemig.target.verdicts import Verdicts

HOSTILE = "CRIU says \x1b]0;owned\x07\x1b[2J\x1b[1;1Hall is well\r\x9b31m\u202eevil"


async def test_a_program_gets_the_environment_it_needs_and_no_more(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2")
    monkeypatch.setenv("LD_PRELOAD", "/tmp/evil.so")
    monkeypatch.setenv("LANG", "C.UTF-8")
    env = (await proc.run(["env"])).text.splitlines()
    names = {x.split("=", 1)[0] for x in env}
    assert "AWS_SECRET_ACCESS_KEY" not in names and "LD_PRELOAD" not in names
    assert f"PATH={os.environ['PATH']}" in env and "LANG=C.UTF-8" in env
    # what a caller passes on purpose still gets there
    assert "X=1" in (await proc.run(["env"], env=proc.environ(X="1"))).text.splitlines()


async def test_the_guard_imports_no_livemig_from_its_directory_nor_pythonpath(tmp_path, monkeypatch):
    fake = tmp_path / "fake"
    (fake / "livemig").mkdir(parents=True)
    mark = tmp_path / "hijacked"
    (fake / "livemig" / "__init__.py").write_text(f"open({str(mark)!r}, 'w').close()\n")
    monkeypatch.chdir(fake)         # -m puts the directory it runs in first on sys.path
    monkeypatch.setenv("PYTHONPATH", str(fake))
    monkeypatch.setenv("PYTHONSTARTUP", str(fake / "livemig" / "__init__.py"))
    (tmp_path / "root").mkdir()
    guard = await Guard.start(Verdicts(tmp_path / "root"), "m1")
    process = guard.process
    await guard.release()
    assert not mark.exists()
    assert process is not None and process.returncode == 0     # it ran, as the real livemig's guard


def test_text_from_the_target_is_shown_with_its_control_characters_escaped():
    shown = display.escaped(HOSTILE + "\n\tnext line")
    assert not any(c in shown for c in "\x1b\x07\r\x9b\u202e")
    assert shown.startswith("CRIU says \\x1b]0;owned\\x07") and shown.endswith("\n\tnext line")


def test_an_error_from_the_target_reaches_the_terminal_escaped(capsys):
    def call():
        raise LivemigError(HOSTILE, phase="restore", host="b", detail=HOSTILE)
    args = types.SimpleNamespace(json=False, verbose=True)
    assert cli.reported(args, "move", call, None, "x") != 0
    err = capsys.readouterr().err
    assert "owned" in err and not any(c in err for c in "\x1b\x07\r\x9b\u202e")


def test_a_step_s_line_is_shown_escaped():
    out = io.StringIO()
    display.Lines(out)(Stepping(phase="restore", what=HOSTILE))
    assert "owned" in out.getvalue() and not any(c in out.getvalue() for c in "\x1b\x07\r\x9b\u202e")
