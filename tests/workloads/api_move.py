"""A failover script's move through the Python API (livemig.migrate), as a program that
leaves SIGTERM to its default would run it: prints one JSON line, how it ended.

    python3 api_move.py PID HOST [MODE]
"""

from __future__ import annotations

import asyncio
import json
import sys

import livemig


async def main() -> dict:
    pid, host = int(sys.argv[1]), sys.argv[2]
    mode = livemig.Mode(sys.argv[3]) if len(sys.argv) > 3 else livemig.Mode.AUTO
    try:
        report = await livemig.migrate(pid, host, livemig.Options(mode=mode))
        return {"outcome": report.outcome, "exit_code": 0}
    except livemig.LivemigError as e:
        return {"error": type(e).__name__, "exit_code": int(e.exit_code),
                "outcome": e.report.outcome if e.report is not None else None, "phase": e.phase}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())))
