"""The commit point's server (hook.py), spoken to as CRIU's action script does."""

from __future__ import annotations

import asyncio

from livemig.runtimes.hook import HookServer


async def _post_dump(server: HookServer) -> bytes:
    reader, writer = await asyncio.open_unix_connection(str(server.socket))
    writer.write(b"post-dump\n")
    await writer.drain()
    verdict = await reader.read(1)
    writer.close()
    return verdict


async def test_a_rollback_before_the_dump_is_done_answers_its_post_dump_step_at_once(tmp_path):
    # a lazy dump writes no page before its post-dump step: only this stops it
    server = await HookServer.start(tmp_path)
    try:
        server.rollback()
        async with asyncio.timeout(5):
            assert await _post_dump(server) == b"1"
        assert server.journal.read_text() == "rolled back\n" and not server.post_dump.done()
    finally:
        await server.close()


async def test_post_dump_waits_for_the_verdict(tmp_path):
    server = await HookServer.start(tmp_path)
    try:
        asking = asyncio.create_task(_post_dump(server))
        await server.post_dump
        assert server.waiting and not asking.done()
        server.commit()
        assert await asking == b"0" and server.journal.read_text() == "committed\n"
    finally:
        await server.close()


async def _run_script(server: HookServer, action: str) -> asyncio.subprocess.Process:
    # as CRIU runs it: the script itself (its #! line, -IS), the action in the environment
    return await asyncio.create_subprocess_exec(
        str(server.script), env={"CRTOOLS_SCRIPT_ACTION": action, **server.environment()})


async def test_the_script_itself_waits_at_post_dump_and_exits_with_the_verdict(tmp_path):
    server = await HookServer.start(tmp_path)
    try:
        pre = await _run_script(server, "pre-dump")
        assert await pre.wait() == 0
        # the script only says it and goes on (CRIU must not wait on us to freeze): the server
        # reads its line in its own time, which a busy machine can put after the script's exit
        async with asyncio.timeout(10):
            while not server.frozen_at:
                await asyncio.sleep(0.01)
        assert await (await _run_script(server, "network-lock")).wait() == 0   # not ours: passes
        post = await _run_script(server, "post-dump")
        await server.post_dump
        server.commit()
        assert await post.wait() == 0          # CRIU kills the source
    finally:
        await server.close()


async def test_the_script_asks_the_journal_once_the_coordinator_is_gone(tmp_path):
    server = await HookServer.start(tmp_path)
    await server.close()                   # the coordinator died: nobody on the socket
    assert await (await _run_script(server, "post-dump")).wait() == 1     # "dumping": resume it
    server.journal.write_text("committed\n")
    assert await (await _run_script(server, "post-dump")).wait() == 0     # moved: the source goes
