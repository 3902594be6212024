"""Waiting for posted operations with a deadline that the caller, not the backend, enforces.

On gloo, a wait that times out inside gloo closes every connection of its
process group, so gloo's own timeout is set out of reach and each wait runs in
a daemon thread that the caller simply stops waiting for at the deadline: the
connections to the other peers keep working. On NCCL a stalled operation cannot
be abandoned (the GPU stream waits for it): there the waits block, and NCCL's
watchdog (the group's timeout) ends the process.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable


class Refused(Exception):
    """The first part of an exchange arrived, and what it announced does not fit: the rest is
    neither sent nor received."""


@dataclass
class Arrival:
    """One peer's part of an exchange: the works of its first part (a header, or a collective),
    what to post once they complete (``then``: the messages, after checking the header), and
    when each part completed (seconds since the exchange was posted)."""

    header_works: list = field(default_factory=list)
    then: Callable[[], list] | None = None
    ready: float = 0.0  # its header arrived: the peer reached the exchange
    done: float = 0.0  # every message, both ways
    error: str | None = None
    thread: threading.Thread | None = None
    started: float = 0.0  # when it was posted (collectives)
    deferred: Callable[[], None] | None = None  # NCCL: the wait, run when the caller joins

    def wait_in_background(self, started: float, blocking: bool) -> None:
        """Wait for the first part's works, post and wait for the rest; record when."""

        def wait() -> None:
            try:
                for work in self.header_works:
                    work.wait()
                self.ready = time.perf_counter() - started
                for work in self.then() if self.then is not None else []:
                    work.wait()
                self.done = time.perf_counter() - started
            except Refused as refused:
                self.error = str(refused)
            except Exception as error:  # noqa: BLE001 - reported to the caller
                self.error = reason(error)

        if blocking:  # on the caller's thread, when it waits: posting never blocks
            self.deferred = wait
            return
        self.thread = threading.Thread(target=wait, name="gasloc-wait", daemon=True)
        self.thread.start()

    def join(self, deadline: float) -> bool:
        """Wait until ``deadline`` (a ``perf_counter`` time); True when everything completed."""
        if self.deferred is not None:
            wait, self.deferred = self.deferred, None
            wait()
        if self.thread is not None:
            self.thread.join(max(0.0, deadline - time.perf_counter()))
            if self.thread.is_alive():
                return False
        return self.error is None


@dataclass
class PendingSwap:
    """Messages posted to and from each peer, being waited for in the background."""

    started: float
    arrivals: dict[int, Arrival] = field(default_factory=dict)


def reason(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
