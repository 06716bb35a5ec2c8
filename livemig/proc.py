"""The one way livemig runs a program on the local host: an argument list, never a shell
string; stdout captured or passed on, stderr always kept for the error the user sees."""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass
from typing import Mapping, Sequence

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


def failure(argv: Sequence[str], returncode: int, stderr: bytes, phase: str | None = None) -> CommandFailed:
    tail = _tail(stderr)
    last = tail.splitlines()[-1] if tail else "no error output"
    return CommandFailed(f"{argv[0]} exited {returncode}: {last}", phase=phase, detail=tail)


async def run(argv: Sequence[str], *, input: bytes | None = None, check: bool = True,
              env: Mapping[str, str] | None = None, pass_fds: Sequence[int] = (),
              timeout: float | None = None, phase: str | None = None) -> Result:
    """Run argv to completion. On cancellation or timeout the process is killed, never left behind."""
    proc = await start(argv, stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
                       stdout=asyncio.subprocess.PIPE, env=env, pass_fds=pass_fds)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate(input)
    except BaseException:
        await kill(proc)
        raise
    res = Result(tuple(argv), proc.returncode, out, err)
    if check and res.returncode != 0:
        raise failure(argv, res.returncode, err, phase)
    return res


async def start(argv: Sequence[str], *, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                env: Mapping[str, str] | None = None, pass_fds: Sequence[int] = ()) -> asyncio.subprocess.Process:
    """Start argv with stderr captured: the caller owns the process and must reap it."""
    argv = [str(a) for a in argv]
    try:
        return await asyncio.create_subprocess_exec(
            *argv, stdin=stdin, stdout=stdout, stderr=asyncio.subprocess.PIPE,
            env=dict(env) if env is not None else None, pass_fds=tuple(pass_fds), close_fds=True)
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
