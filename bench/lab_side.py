#!/usr/bin/env python3
"""What the benchmark runs on a lab host (stdlib only: any python3 the host has).

    lab_side.py usage OUT ARGV...        run ARGV; its CPU seconds and peak RSS as JSON into OUT
    lab_side.py spawn LOG ARGV...        start ARGV in its own session, detached; print its PID
    lab_side.py wait-listen PORT [S [PID]]  until something listens on TCP PORT here (and PID lives)
    lab_side.py wait-free PORT [S]       until nothing listens on TCP PORT here
    lab_side.py wait-file PATH [S]       until PATH exists
    lab_side.py wait-exit PID [S]        until process PID is gone
    lab_side.py wait-children PID N [S]  until process PID has N children
    lab_side.py tcp-sink ADDR PORT       accept one connection, read it to the end, answer its size
    lab_side.py tcp-send ADDR PORT FILE  send FILE to a tcp-sink; print seconds until it answered
    lab_side.py netdev                   bytes sent + received on this host's non-loopback links
    lab_side.py ssh-rtt HOST             ms a line takes to come back from `ssh HOST cat` (median of 10)
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import time


def _until(check, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.005)


def _listening(port: int) -> bool:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def _children(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return len(f.read().split())
    except OSError:
        return 0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def main(argv: list[str]) -> int:
    cmd, args = argv[0], argv[1:]
    if cmd == "usage":
        rc = subprocess.run(args[1:], check=False).returncode
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        with open(args[0], "w") as out:
            json.dump({"cpu_seconds": ru.ru_utime + ru.ru_stime, "peak_rss_bytes": ru.ru_maxrss * 1024}, out)
        return rc
    if cmd == "spawn":
        with open(args[0], "ab") as log, open(os.devnull, "rb") as null:
            p = subprocess.Popen(args[1:], stdin=null, stdout=log, stderr=log, start_new_session=True)
        print(p.pid)
        return 0
    if cmd == "wait-listen":    # PORT [SECONDS [PID]]: PID, if given, must still be alive then
        _until(lambda: _listening(int(args[0])), float(args[1]) if len(args) > 1 else 120, f"port {args[0]}")
        if len(args) > 2 and not _alive(int(args[2])):
            raise SystemExit(f"PID {args[2]} is gone: something else listens on port {args[0]}")
        return 0
    if cmd == "wait-free":
        _until(lambda: not _listening(int(args[0])), float(args[1]) if len(args) > 1 else 30,
               f"port {args[0]} to be free")
        return 0
    if cmd == "wait-file":
        _until(lambda: os.path.exists(args[0]), float(args[1]) if len(args) > 1 else 120, args[0])
        return 0
    if cmd == "ssh-rtt":
        echo = subprocess.Popen(["ssh", "-T", args[0], "cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        times = []
        for _ in range(11):         # the first waits for the session: not counted
            t = time.monotonic()
            echo.stdin.write(b"x\n")
            echo.stdin.flush()
            echo.stdout.readline()
            times.append(time.monotonic() - t)
        echo.stdin.close()
        echo.wait()
        print(f"{sorted(times[1:])[5] * 1000:.2f}")
        return 0
    if cmd == "wait-children":
        _until(lambda: _children(int(args[0])) >= int(args[1]), float(args[2]) if len(args) > 2 else 60,
               f"{args[1]} children of PID {args[0]}")
        return 0
    if cmd == "wait-exit":
        _until(lambda: not _alive(int(args[0])), float(args[1]) if len(args) > 1 else 1800, f"PID {args[0]}")
        return 0
    if cmd == "tcp-sink":
        with socket.create_server((args[0], int(args[1]))) as srv:
            print("listening", flush=True)
            conn, _ = srv.accept()
            with conn:
                total = 0
                while chunk := conn.recv(1 << 20):
                    total += len(chunk)
                conn.sendall(str(total).encode())
        return 0
    if cmd == "tcp-send":
        with open(args[2], "rb") as f, socket.create_connection((args[0], int(args[1]))) as conn:
            t = time.monotonic()
            conn.sendfile(f)
            conn.shutdown(socket.SHUT_WR)
            conn.recv(64)
            print(time.monotonic() - t)
        return 0
    if cmd == "netdev":
        total = 0
        with open("/proc/net/dev") as f:
            for row in f.read().splitlines()[2:]:
                name, data = row.split(":", 1)
                if name.strip() != "lo":
                    cols = data.split()
                    total += int(cols[0]) + int(cols[8])
        print(total)
        return 0
    raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
