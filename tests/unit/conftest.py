"""Fixtures the unit tests share."""

import shutil
import tempfile
from pathlib import Path

import pytest


@pytest.fixture
def short_root():
    """A directory for an image root that livemig accepts (workdirs.check_root): root's, 0700,
    and short enough for the sockets bound under it (tmp_path's names are too long for them)."""
    d = Path(tempfile.mkdtemp(prefix="lm-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)    # a test's leftovers: nothing else depends on them
