"""A client of the moved service as one that keeps its connection lives it: one TCP
connection to the service (memcounter's "hold", or Redis's INCR), over which it asks for the next integer
every --every seconds and waits for each answer, until the file --until exists. It prints,
as one JSON object, every answer (when, which host, which integer) and how long it waited
for each, the longest of those, and how the connection ended, if it did: a reset, a timeout
or a close is a connection lost."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--every", type=float, default=0.02)
    ap.add_argument("--until", required=True, help="stop once this file exists")
    ap.add_argument("--answer-within", type=float, default=30.0, help="a longer wait is a connection lost")
    ap.add_argument("--redis", action="store_true",
                    help="the service is Redis: each question an INCR of one key, the answer its new value")
    a = ap.parse_args()
    answers, waits, error, longest = [], [], "", 0.0
    s = socket.create_connection((a.address, a.port), timeout=5)
    s.settimeout(a.answer_within)
    reader = s.makefile("rb")
    if not a.redis:
        s.sendall(b"hold\n")
        json.loads(reader.readline())
    question = b"*2\r\n$4\r\nINCR\r\n$7\r\ncounter\r\n" if a.redis else b"next\n"
    print("connected", flush=True)
    try:
        while not os.path.exists(a.until):
            asked = time.monotonic()
            s.sendall(question)
            line = reader.readline()
            if not line:
                error = "the service closed the connection"
                break
            if a.redis and not line.startswith(b":"):
                error = f"Redis answered {line.decode(errors='replace').strip()}"
                break
            if a.redis:
                host, n = "", int(line[1:])
            else:
                got = json.loads(line)
                host, n = got["host"], got["next"]
            now = time.monotonic()
            longest = max(longest, now - asked)
            answers.append([round(time.time(), 4), host, n])
            waits.append(round(now - asked, 4))
            time.sleep(max(0.0, a.every - (time.monotonic() - now)))
    except OSError as e:
        error = f"{type(e).__name__}: {e}"
    print(json.dumps({"answers": answers, "waits": waits, "longest_wait": round(longest, 4), "error": error}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
