"""The placer's stages (pages/placer.Stage): only the moves its table allows, and what the
agent reads of them (finished, whole) follows."""

from pathlib import Path

import pytest

from livemig.errors import LivemigError
from livemig.pages.placer import Placer, Stage


async def test_the_stages_go_in_order_and_never_back():
    placer = Placer(Path("/nonexistent"), [])
    assert placer.stage is Stage.RESTORING and not placer.finished and not placer.whole
    with pytest.raises(LivemigError):
        placer._advance(Stage.WHOLE)          # never whole before the restore is done
    placer._advance(Stage.REPLAYING)
    assert placer.finished and not placer.whole
    placer._advance(Stage.PLACING)
    placer._advance(Stage.WHOLE)
    assert placer.finished and placer.whole
    for back in Stage:
        with pytest.raises(LivemigError):
            placer._advance(back)


async def test_the_last_early_page_may_make_the_copy_whole():
    placer = Placer(Path("/nonexistent"), [])
    placer._advance(Stage.REPLAYING)
    placer._check_whole()                     # no task lacks a page
    assert placer.whole and placer.all_here.is_set()
