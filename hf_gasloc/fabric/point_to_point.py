"""Point-to-point traffic on the gossip group: a round's swap with its peers, the roll call,
and waiting with a deadline that tolerates late-but-alive peers (``liveness.py``)."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from .waiting import Arrival, PendingSwap, reason

ROLL_CALL = 7  # the roll call's tag, apart from the gossip's (tag 0)
PATIENCE = 4  # a late peer that answers pings is waited for up to 4 x peer_timeout


class PointToPoint:
    """The point-to-point half of ``Comm`` (which provides the group, ranks and liveness)."""

    def post_swap(self, sends: dict[int, list[torch.Tensor]],
                  receives: dict[int, list[torch.Tensor]]) -> PendingSwap:
        """Start sending ``sends[peer]`` to each peer and receiving ``receives[peer]`` from it.

        The first tensor of each list is the header: it is posted first, and its
        arrival tells that the peer reached the exchange. Returns at once;
        ``wait_swap`` waits.
        """
        pending = PendingSwap(time.perf_counter())
        ops = {peer: [[self._op(dist.irecv, receives[peer][k], peer),
                       self._op(dist.isend, sent, peer)] for k, sent in enumerate(tensors)]
               for peer, tensors in sends.items()}
        if self.blocking_waits:  # NCCL: one coalesced batch (one work), waited for here
            everything = [op for pairs in ops.values() for pair in pairs for op in pair]
            arrival = Arrival(header_works=dist.batch_isend_irecv(everything) if ops else [])
            arrival.posted.set()
            arrival.wait_in_background(pending.started, blocking=True)
            pending.arrivals = dict.fromkeys(ops, arrival)
            return pending
        for phase in ("header", "messages"):  # gloo: one work per operation, in order
            for peer, pairs in ops.items():
                arrival = pending.arrivals.setdefault(peer, Arrival())
                if arrival.error:
                    continue
                chosen = pairs[:1] if phase == "header" else pairs[1:]
                try:
                    works = dist.batch_isend_irecv([op for pair in chosen for op in pair])
                except RuntimeError as error:  # its connection is already gone
                    arrival.error, works = reason(error), []
                if phase == "header":
                    arrival.header_works = works
                    arrival.wait_in_background(pending.started, blocking=False)
                else:
                    arrival.message_works = works
                    arrival.posted.set()
        return pending

    def wait_swap(self, pending: PendingSwap) -> tuple[dict[int, Arrival], dict[int, str]]:
        """Wait, up to ``peer_timeout`` in all, for each peer; returns who answered and who not."""
        arrived, failed = {}, {}
        for peer, arrival in pending.arrivals.items():
            if self._wait_for(arrival, peer, pending.started):
                arrived[peer] = arrival
            else:
                failed[peer] = arrival.error or self.silence
        return arrived, failed

    @property
    def silence(self) -> str:
        return f"no answer within peer_timeout={self.peer_timeout:g} s, nor to a ping"

    def _wait_for(self, arrival: Arrival, peer: int, started: float) -> bool:
        """Wait ``peer_timeout``; past it, go on waiting while the peer answers pings (it is
        late, not lost: it may be waiting for a lost peer of its own), up to ``PATIENCE``
        times ``peer_timeout`` in all."""
        deadline, limit = started + self.peer_timeout, started + PATIENCE * self.peer_timeout
        while not self._join(arrival, deadline):
            if arrival.error or deadline >= limit or not self.liveness.is_alive(peer):
                return False
            deadline = min(limit, time.perf_counter() + self.peer_timeout)
        return True

    def _join(self, arrival: Arrival, deadline: float) -> bool:
        """``arrival.join(deadline)`` in one-second slices, showing life between them."""
        while True:
            if arrival.join(min(deadline, time.perf_counter() + 1.0)):
                return True
            if arrival.error or time.perf_counter() >= deadline:
                return False
            self.beat()

    def beat(self) -> None:
        """This worker's main thread is alive (``liveness.py``)."""
        if self.liveness is not None:
            self.liveness.beat()

    def roll_call(self) -> list[int]:
        """The ranks that do not answer within ``peer_timeout`` (collective, point to point).

        Every rank reports to rank 0, which answers each with the list of the
        missing; a rank that hears nothing from rank 0 reports rank 0 missing.
        Gloo only: on NCCL a stalled rank ends the process through the watchdog.
        """
        if self.blocking_waits:
            return []
        started = time.perf_counter()
        missing = torch.zeros(self.world_size, dtype=torch.float64)
        if self.rank != 0:
            arrival = Arrival(header_works=[
                dist.isend(torch.ones(1, dtype=torch.float64), self._global_ranks[0],
                           self.gossip_group, tag=ROLL_CALL),
                dist.irecv(missing, self._global_ranks[0], self.gossip_group, tag=ROLL_CALL)])
            arrival.posted.set()
            arrival.wait_in_background(started, blocking=False)
            if not self._wait_for(arrival, 0, started):
                return [0]
            return [r for r, m in enumerate(missing.tolist()) if m]
        calls = {}
        for rank in range(1, self.world_size):
            calls[rank] = Arrival(header_works=[dist.irecv(
                torch.empty(1, dtype=torch.float64), self._global_ranks[rank], self.gossip_group,
                tag=ROLL_CALL)])
            calls[rank].posted.set()
            calls[rank].wait_in_background(started, blocking=False)
        answered = [rank for rank, call in calls.items() if self._wait_for(call, rank, started)]
        for rank in set(calls) - set(answered):
            missing[rank] = 1.0
        replies = Arrival(header_works=[
            dist.isend(missing, self._global_ranks[rank], self.gossip_group, tag=ROLL_CALL)
            for rank in answered])
        replies.posted.set()
        replies.wait_in_background(started, blocking=False)
        self._join(replies, time.perf_counter() + self.peer_timeout)
        return [r for r, m in enumerate(missing.tolist()) if m]

    def _op(self, operation, tensor: torch.Tensor, peer: int) -> dist.P2POp:
        return dist.P2POp(operation, tensor, self._global_ranks[peer], self.gossip_group)
