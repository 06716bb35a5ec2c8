"""The one way livemig runs a program on the local host: an argument list, never a shell
string; stdout captured or passed on, stderr always kept for the error the user sees."""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from .errors import CommandFailed

STDERR_KEPT = 64 * 1024


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")


def _tail(stderr: bytes, lines: int = 6) -> str:
    text = stderr.decode(errors="replace").strip()
    return "\n".join(text.splitlines()[-lines:])


def why(stderr: bytes) -> str:
    """The line of a command's stderr that says why it failed: its last "Error:" line (Go
    tools such as podman print warnings around it), else its last line."""
    lines = [x.strip() for x in stderr.decode(errors="replace").splitlines() if x.strip()]
    errors = [x for x in lines if x.lower().startswith(("error:", "error ", "[conmon:e]"))]
    return (errors or lines or ["no error output"])[-1]


def failure(argv: Sequence[str], returncode: int, stderr: bytes, phase: str | None = None) -> CommandFailed:
    tail = _tail(stderr)
    last = why(stderr)
    return CommandFailed(f"{argv[0]} exited {returncode}: {last}", phase=phase, detail=tail)


async def run(argv: Sequence[str], *, input: bytes | None = None, check: bool = True,
              env: Mapping[str, str] | None = None, pass_fds: Sequence[int] = (),
              timeout: float | None = None, phase: str | None = None, leaves_daemon: bool = False,
              started: Callable[[asyncio.subprocess.Process], None] | None = None) -> Result:
    """Run argv to completion. On cancellation or timeout the process is killed, never left behind.

    leaves_daemon: argv starts a daemon that inherits its output (podman's restore leaves
    conmon running); a pipe would stay open as long as the daemon lives, so the output
    goes to unnamed files instead, and the command is done when it exits.
    started: told the process once it runs (for a caller that may have to kill what it
    started, children included)."""
    if leaves_daemon:
        return await _run_leaving_daemon(argv, check=check, env=env, timeout=timeout, phase=phase,
                                         started=started)
    proc = await start(argv, stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
                       stdout=asyncio.subprocess.PIPE, env=env, pass_fds=pass_fds)
    if started:
        started(proc)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate(input)
    except BaseException:
        await kill(proc)
        raise
    return _result(argv, proc.returncode, out, err, check, phase)


async def _run_leaving_daemon(argv, *, check, env, timeout, phase, started) -> Result:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = await start(argv, stdout=out, stderr=err, env=env)
        if started:
            started(proc)
        try:
            async with asyncio.timeout(timeout):
                await proc.wait()
        except BaseException:
            await kill(proc)
            raise
        out.seek(0)
        err.seek(0)
        return _result(argv, proc.returncode, out.read(), err.read()[-STDERR_KEPT:], check, phase)


def _result(argv, returncode: int, out: bytes, err: bytes, check: bool, phase: str | None) -> Result:
    res = Result(tuple(str(a) for a in argv), returncode, out, err)
    if check and res.returncode != 0:
        raise failure(argv, res.returncode, err, phase)
    return res


async def start(argv: Sequence[str], *, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env: Mapping[str, str] | None = None,
                pass_fds: Sequence[int] = (), new_session: bool = False) -> asyncio.subprocess.Process:
    """Start argv with stderr captured (a pipe, or a file of the caller's): the caller owns
    the process and must reap it. new_session: out of our process group, so that what
    kills us does not reach it."""
    argv = [str(a) for a in argv]
    try:
        return await asyncio.create_subprocess_exec(
            *argv, stdin=stdin, stdout=stdout, stderr=stderr,
            env=dict(env) if env is not None else None, pass_fds=tuple(pass_fds), close_fds=True,
            start_new_session=new_session)
    except FileNotFoundError:
        raise CommandFailed(f"{argv[0]}: command not found") from None


async def kill(proc: asyncio.subprocess.Process, sig: int = signal.SIGKILL) -> None:
    """Kill proc if it still runs and reap it; safe to call twice, and from cleanup code."""
    if proc.returncode is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
    try:
        await asyncio.shield(proc.wait())
    except asyncio.CancelledError:
        await proc.wait()
        raise


def environ(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env
