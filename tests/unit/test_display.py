"""What a move shows while it runs: plain lines off a terminal (logs, failover scripts), a
live display on one, and the ticker that samples bytes and pages. No lab: events in,
text out."""

import asyncio
import io
import re

from rich.console import Console

from livemig import display
from livemig.display import Lines, Live
from livemig.progress import (
    Connecting,
    Copied,
    Fetching,
    Finishing,
    ModeChosen,
    RoundDone,
    Running,
    Sending,
    Stepping,
    Ticker,
)
from livemig.wire import streams

MOVE = [Connecting("b"), ModeChosen("hybrid", "the kernel tracks dirty pages", 512 << 20),
        Copied("bundle", 3 << 20, 1 << 20),
        RoundDone(1, 131072, 300 << 20, 2.0, 150 << 20, None, 1.2, 0.3),
        Sending(400 << 20, 310 << 20, 3.0),
        RoundDone(2, 2560, 6 << 20, 0.05, 120 << 20, 5 << 20, 0.05, 0.3),
        Stepping("final dump", "final dump"), Sending(420 << 20, 320 << 20, 4.0),
        Copied("images", 200 << 10, 40 << 10), Stepping("restore", "restoring on the target"),
        Running([4242], lazy=True), Fetching(100, 400, 0.5), Fetching(400, 400, 1.0)]


def test_lines_off_a_terminal_say_each_step_once_and_bytes_at_most_every_few_seconds():
    out = io.StringIO()
    show = Lines(out, every=3600)
    for e in MOVE:
        show(e)
    text = out.getvalue().splitlines()
    assert text[:3] == ["connecting to b...", "mode hybrid: the kernel tracks dirty pages (512.0 MiB resident)",
                        "bundle sent: 3.0 MiB (1.0 MiB on the wire)"]
    assert text[3].startswith("round 1: 131072 pages, 300.0 MiB sent in 2.00 s at 150.0 MiB/s; downtime now "
                              "would be 1200 ms (budget 300 ms)")
    assert "dirtying 5.0 MiB/s" in text[4] and "round 2" in text[4]
    assert text[5:] == ["final dump...", "dump's image files sent: 200 KiB (40 KiB on the wire)",
                        "restoring on the target...", "running on the target; its remaining pages follow...",
                        # within `every` seconds no byte count, but the end of post-copy always
                        "post-copy: 400 of 400 pages sent (100%)"]


def test_lines_report_bytes_once_every_interval():
    out = io.StringIO()
    show = Lines(out, every=0)
    show(Sending(3 << 20, 1 << 20, 2.0))
    show(Fetching(1, 4, 0.1))
    assert out.getvalue().splitlines() == ["sent 3.0 MiB (1.0 MiB on the wire) in 2 s",
                                           "post-copy: 1 of 4 pages sent (25%)"]


def test_the_live_display_prints_the_steps_above_its_bars():
    out = io.StringIO()
    with Live(Console(file=out, force_terminal=True, width=120)) as show:
        for e in MOVE:
            show(e)
    text = out.getvalue()
    for want in ("mode hybrid", "round 2: 2560 pages", "running on the target", "restoring on the target: done in",
                 "post-copy: the pages the target lacks: done in"):
        assert want in text, want
    # the final dump's bar counted the bytes sent since it began, post-copy's its pages
    assert re.search(r"final dump: done in [0-9.]+ s, 20.0 MiB", text) and "1.6 MiB" in text


def test_the_cli_view_json_none_terminal_live_else_lines():
    assert display.for_cli(json=True) is None
    assert isinstance(display.for_cli(json=False, terminal=False), Lines)
    assert isinstance(display.for_cli(json=False, terminal=True), Live)


async def test_the_ticker_reports_bytes_from_every_stream_then_post_copy_pages():
    seen = []
    ticker = Ticker(seen.append, every=0.01)

    class Sink:
        def write(self, data): pass
        async def drain(self): pass
    async with ticker.running():
        # a writer made under the ticker counts into its tally, as every stream of a move does
        await streams.CompressedWriter(Sink(), streams.Meter(), 1).write(b"x" * 100000, flush=True)
        await asyncio.sleep(0.05)
        ticker.pages = lambda: (3, 10)
        await asyncio.sleep(0.05)
    sending = [e for e in seen if isinstance(e, Sending)]
    assert sending and sending[-1].raw == 100000 and 0 < sending[-1].wire < 100000
    assert [(e.pages, e.total) for e in seen if isinstance(e, Fetching)] == [(3, 10)]   # once: it did not move
    assert streams.tally.get() is None          # and nothing counts once the move is over


def test_a_step_is_preceded_by_the_bytes_sent_until_then():
    seen = []
    ticker = Ticker(seen.append)
    ticker.tally.raw, ticker.tally.wire = 5 << 20, 2 << 20
    ticker.tell(Stepping("restore", "restoring on the target"))
    assert [type(e).__name__ for e in seen] == ["Sending", "Stepping"] and seen[0].raw == 5 << 20


def test_an_interrupt_once_the_copy_ran_is_told_why_the_move_goes_on():
    said = display.line(Finishing("b"))
    assert said is not None and "copy on b ran" in said and "every page" in said and "done" in said
