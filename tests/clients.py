"""The moved service as its clients live it: a client that asks, over and over, on every
host the service may answer on, for the next integer (memcounter's `next`), and keeps
every answer it got, in the order it got them. The promise in its words: no answer it got
is ever given again (a copy running on from an older state would), and afterwards exactly
one copy answers."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Self

from tests.lab import WORKLOAD
from tests.lab.proc import LabError

ANSWER_WITHIN = 2.0     # seconds a client waits for one answer before it asks again


@dataclass(frozen=True)
class Answer:
    at: float       # time.monotonic() when it came
    host: str
    n: int


class Client(threading.Thread):
    def __init__(self, lab, port: int, hosts: tuple[str, ...] = ("a", "b"), every: float = 0.05,
                 wait: float = 0.0):
        super().__init__(daemon=True)
        # wait: each ask retries, in its one process, this long while nothing answers (query
        # --wait): a host the service is not on costs one process per wait, not one per ask
        self.lab, self.port, self.hosts, self.every, self.wait = lab, port, hosts, every, wait
        self.answers: list[Answer] = []
        self.errors: list[str] = []       # asks the lab itself failed to run (none may be)
        self._stop_asking = threading.Event()

    def ask(self, host: str) -> Answer | None:
        # A stopped copy's port still takes the connection (the kernel's backlog) and never
        # answers: a client gives up on it after a moment, as a real one would, and asks again.
        try:
            res = self.lab.run(host, ["python3", WORKLOAD, "query", "next", "--port", str(self.port),
                                      "--timeout", str(ANSWER_WITHIN), "--wait", str(self.wait)],
                               check=False, timeout=60)
        except LabError as e:      # the host itself did not run the query: said after, as a failure
            self.errors.append(f"{host}: {e}")
            return None
        if res.returncode != 0:
            return None      # nothing answers there (now)
        try:
            got = Answer(time.monotonic(), host, json.loads(res.stdout)["next"])
        except (ValueError, KeyError):     # cut off as it answered (a workload exiting by itself): none
            return None
        self.answers.append(got)
        return got

    def run(self) -> None:
        while not self._stop_asking.is_set():
            for host in self.hosts:
                self.ask(host)
            self._stop_asking.wait(self.every)

    def __enter__(self) -> Self:
        self.ask(self.hosts[0])     # one answer before anything happens to it
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop_asking.set()
        self.join(timeout=180)

    def until_answered_by(self, host: str, within: float = 60) -> None:
        """Back once host has answered since this call (the service runs there); an
        AssertionError if it has not within that many seconds."""
        since, deadline = len(self.answers), time.monotonic() + within
        while not any(a.host == host for a in self.answers[since:]):
            assert time.monotonic() < deadline, f"{host} never answered: {self.said()}"
            time.sleep(0.05)

    def taken_back(self) -> list[tuple[Answer, Answer]]:
        """Each answer that was not above every one before it, with the one it repeats or undercuts."""
        back, best = [], None
        for a in self.answers:
            if best is not None and a.n <= best.n:
                back.append((a, best))
            if best is None or a.n > best.n:
                best = a
        return back

    def said(self) -> str:
        return " ".join(f"{a.host}:{a.n}" for a in self.answers)
