"""Waiting for something to happen, rather than sleeping and hoping it did: a test's
premise that holds however slow or busy the machine is."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(read: Callable[[], T], holds: Callable[[T], bool], within: float = 60.0, every: float = 0.05) -> T:
    """read() again and again until holds(it), within seconds; the value that held. A
    premise that never comes fails the test with the last value read."""
    deadline = time.monotonic() + within
    while True:
        value = read()
        if holds(value):
            return value
        assert time.monotonic() < deadline, f"not within {within} s: {value!r}"
        time.sleep(every)
