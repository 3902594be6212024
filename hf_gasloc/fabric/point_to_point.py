"""Point-to-point traffic on the gossip group: a round's swap with its peers, the roll call,
and waiting with a deadline that tolerates late-but-alive peers (``liveness.py``)."""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist

from .waiting import Arrival, PendingSwap, Refused, reason

ROLL_CALL = 7  # the roll call's tag, apart from the gossip's
FIRST_TAG = 100  # gossip: fragment f swaps its header on tag 100 + 2f, its messages on 101 + 2f
Check = Callable[[int, torch.Tensor], "str | None"]  # (peer, its header) -> why it does not fit
PATIENCE = 4  # a late peer that answers pings is waited for up to 4 x peer_timeout


class PointToPoint:
    """The point-to-point half of ``Comm`` (which provides the group, ranks and liveness)."""

    def post_swap(self, sends: dict[int, list[torch.Tensor]],
                  receives: dict[int, list[torch.Tensor]], check: Check,
                  channel: int = 0) -> PendingSwap:
        """Start swapping ``sends[peer]`` for ``receives[peer]`` with each peer.

        The first tensor of each list is the header. On gloo it is swapped first;
        when the peer's header arrives, ``check(peer, header)`` says whether the
        messages it announces fit (``None``) or why not, and only then are the
        messages posted, with exactly the sizes both ends expect: a message never
        lands in a buffer of another size. ``channel`` (a fragment) keeps the
        swaps that may be in flight together apart. Returns at once; ``wait_swap``
        waits.
        """
        pending = PendingSwap(time.perf_counter())
        tags = (FIRST_TAG + 2 * channel, FIRST_TAG + 2 * channel + 1)
        if self.blocking_waits:  # NCCL: one coalesced batch (one work), checked once arrived
            ops = [op for peer, tensors in sends.items()
                   for k, sent in enumerate(tensors)
                   for op in (self._op(dist.irecv, receives[peer][k], peer, tags[k > 0]),
                              self._op(dist.isend, sent, peer, tags[k > 0]))]
            batch = dist.batch_isend_irecv(ops) if ops else []
            for peer in sends:
                arrival = Arrival(header_works=batch, then=_checked(check, peer, receives[peer][0]))
                arrival.wait_in_background(pending.started, blocking=True)
                pending.arrivals[peer] = arrival
            return pending
        for peer, tensors in sends.items():
            arrival = pending.arrivals.setdefault(peer, Arrival())
            try:
                arrival.header_works = dist.batch_isend_irecv([
                    self._op(dist.irecv, receives[peer][0], peer, tags[0]),
                    self._op(dist.isend, tensors[0], peer, tags[0])])
            except RuntimeError as error:  # its connection is already gone
                arrival.error = reason(error)
                continue
            arrival.then = self._then_messages(peer, tensors[1:], receives[peer], check, tags[1])
            arrival.wait_in_background(pending.started, blocking=False)
        return pending

    def _then_messages(self, peer: int, sends: list[torch.Tensor],
                       receives: list[torch.Tensor], check: Check, tag: int):
        """Once the peer's header is in ``receives[0]``: check it, then post the messages."""
        def post() -> list:
            refusal = check(peer, receives[0])
            if refusal is not None:
                raise Refused(refusal)
            return dist.batch_isend_irecv([op for received, sent in zip(receives[1:], sends)
                                           for op in (self._op(dist.irecv, received, peer, tag),
                                                      self._op(dist.isend, sent, peer, tag))])
        return post

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
            arrival.wait_in_background(started, blocking=False)
            if not self._wait_for(arrival, 0, started):
                return [0]
            return [r for r, m in enumerate(missing.tolist()) if m]
        calls = {}
        for rank in range(1, self.world_size):
            calls[rank] = Arrival(header_works=[dist.irecv(
                torch.empty(1, dtype=torch.float64), self._global_ranks[rank], self.gossip_group,
                tag=ROLL_CALL)])
            calls[rank].wait_in_background(started, blocking=False)
        answered = [rank for rank, call in calls.items() if self._wait_for(call, rank, started)]
        for rank in set(calls) - set(answered):
            missing[rank] = 1.0
        replies = Arrival(header_works=[
            dist.isend(missing, self._global_ranks[rank], self.gossip_group, tag=ROLL_CALL)
            for rank in answered])
        replies.wait_in_background(started, blocking=False)
        self._join(replies, time.perf_counter() + self.peer_timeout)
        return [r for r, m in enumerate(missing.tolist()) if m]

    def _op(self, operation, tensor: torch.Tensor, peer: int, tag: int) -> dist.P2POp:
        return dist.P2POp(operation, tensor, self._global_ranks[peer], self.gossip_group, tag=tag)


def _checked(check: Check, peer: int, header: torch.Tensor):
    """NCCL: everything arrived in one batch; a header that does not fit discards the rest."""
    def after() -> list:
        refusal = check(peer, header)
        if refusal is not None:
            raise Refused(refusal)
        return []
    return after
