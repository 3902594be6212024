"""Is a silent peer alive? A ping answered by a daemon thread in every worker.

A worker that waits for its peer cannot tell a dead peer from a late one: the
peer may itself be waiting, up to ``peer_timeout``, for a peer of its own that
died, and that lateness travels through the graph round after round. So when
the deadline passes, the waiting worker pings the silent peer on a small gloo
group of its own; a daemon thread in every worker answers pings. A peer that
answers is alive and is waited for again; one that does not (stopped, hung
machine, cut link) or whose connection broke is lost. The answer carries how
long ago the worker's main thread last showed life (an inner step, or a slice
of a wait): a process whose main thread is stuck (a deadlock, or an exit that
hangs) answers pings but is lost all the same once that age passes
``peer_timeout``.
"""

from __future__ import annotations

import threading
import time

import torch
import torch.distributed as dist

from .waiting import Arrival

PING, PONG = 11, 12  # tags


class Liveness:
    """Pings peers and answers their pings, on its own process group."""

    def __init__(self, group: dist.ProcessGroup, global_ranks: list[int], seconds: float,
                 peer_timeout: float):
        self.group, self.global_ranks = group, global_ranks
        self.seconds, self.peer_timeout = seconds, peer_timeout
        self.last_beat = time.monotonic()
        self._lock = threading.Lock()  # one ping at a time from this worker
        threading.Thread(target=self._answer, name="gasloc-liveness", daemon=True).start()

    def beat(self) -> None:
        """The main thread shows life (called at every inner step and while waiting)."""
        self.last_beat = time.monotonic()

    def _answer(self) -> None:
        """Answer every ping with the age of the last beat, for as long as the process lives."""
        while True:
            knock = torch.empty(1, dtype=torch.float64)
            try:
                source = dist.recv(knock, group=self.group, tag=PING)
                age = torch.tensor([time.monotonic() - self.last_beat], dtype=torch.float64)
                dist.send(age, source, group=self.group, tag=PONG)
            except Exception:  # noqa: BLE001 - the pinger went away; keep answering others
                time.sleep(0.05)

    def is_alive(self, peer: int) -> bool:
        """Does ``peer`` (a rank of the group) answer a ping, with a main thread that lives?"""
        with self._lock:
            started = time.perf_counter()
            age = torch.full((1,), float("inf"), dtype=torch.float64)
            try:
                arrival = Arrival(header_works=[
                    dist.isend(torch.zeros(1, dtype=torch.float64), self.global_ranks[peer],
                               self.group, tag=PING),
                    dist.irecv(age, self.global_ranks[peer], self.group, tag=PONG)])
            except RuntimeError:  # its connection is gone
                return False
            arrival.wait_in_background(started, blocking=False)
            return arrival.join(started + self.seconds) and float(age) < self.peer_timeout
