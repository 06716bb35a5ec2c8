#!/usr/bin/env python3
"""Run on a lab host by bench/wpcost.py: what being watched costs a process that writes.

    python3 wpwatch.py MIB SECONDS RATE   (RATE: pages a second the writer aims at; 0: as fast as it can)

For each way of watching (none; pre-copy by write-protection; pre-copy by page hashes), a fresh
writer child holds MIB MiB of private memory, every page written once, and then writes one byte
into random pages for SECONDS seconds, counting its writes; meanwhile this process watches it
as pre-copy's rounds do (livemig's pagehash.Tracker: a round every ROUND seconds, the pages
changed since the last read and hashed). The first round (everything) is taken before the
writer starts counting, as pre-copy's first round is long over when the rounds that repeat
begin. Prints one JSON object: per way, the writes a second, rounds and pages sent.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import sys
import time

sys.path.insert(0, "/opt/livemig")
# (from the checkout the lab hosts mount, hence the import after the path)
from livemig.pages import pagehash

ROUND = 0.5
WAYS = ("none", "write-protect", "page hashes")


def writer(mib: int, seconds: float, rate: int, ready: int, go: int) -> None:
    pages = mib * 256
    m = mmap.mmap(-1, pages * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_NOHUGEPAGE)
    for p in range(pages):
        m[p * 4096] = 1
    os.write(ready, b"r")
    os.read(go, 1)
    rng, writes = random.Random(1), 0
    end = time.monotonic() + seconds
    tick = time.monotonic()
    while (now := time.monotonic()) < end:
        batch = 1000 if not rate else max(1, int(rate * 0.01))
        value = writes // batch % 250 + 2      # a new value each batch: a rewrite changes the page's content
        for _ in range(batch):
            m[rng.randrange(pages) * 4096] = value
        writes += batch
        if rate:
            tick += batch / rate
            time.sleep(max(0.0, tick - now))
    os.write(ready, json.dumps({"writes_per_s": writes / seconds}).encode())


def one(way: str, mib: int, seconds: float, rate: int) -> dict:
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            writer(mib, seconds, rate, ready_w, go_r)
        finally:
            os._exit(0)
    os.read(ready_r, 1)
    tracker = None if way == "none" else pagehash.Tracker(watching=way == "write-protect")
    rounds = pages = 0
    try:
        if tracker is not None:
            for _ in tracker.scan(pid, pid):        # the first round: all of it
                pass
        os.write(go_w, b"g")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.monotonic()
            if tracker is not None:
                pages += sum(r.pages for r in tracker.scan(pid, pid))
                rounds += 1
            time.sleep(max(0.0, ROUND - (time.monotonic() - t0)))
        got = json.loads(os.read(ready_r, 4096))
    finally:
        if tracker is not None:
            tracker.close()
        os.waitpid(pid, 0)
    return {"way": way, **got, "rounds": rounds, "pages_sent": pages}


def main(argv: list[str]) -> int:
    mib, seconds, rate = int(argv[0]), float(argv[1]), int(argv[2])
    print(json.dumps([one(way, mib, seconds, rate) for way in WAYS]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
