"""The engine's one door to ``torch.distributed``: rank, world size, staging, and every transfer.

Everything the engine sends goes through a ``Comm``: the start-up agreement and
broadcast and the consensus All-Reduces (on the caller's process group), and
the gossip itself (on a process group of its own, so that it never queues
behind, or blocks, the collectives that Trainer and accelerate run):
point-to-point messages (``batch_isend_irecv``: measured on gloo it is the
fastest option, ``docs/benchmarks.md``, and it needs no per-round process
groups, whose creation is collective) or the complete graph's All-Reduce.
Tensors are staged on the device the backend needs: gloo works on CPU tensors,
NCCL on CUDA tensors.

Every wait on a peer has a deadline, ``peer_timeout`` (``waiting.py``).
"""

from __future__ import annotations

import socket
import time
import uuid
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import PeerLostError
from .liveness import Liveness
from .waiting import Arrival, PendingSwap, reason

__all__ = ["Arrival", "Comm", "PendingSwap"]

OUT_OF_REACH = timedelta(days=30)  # gloo's own timeout: our deadlines come first
ROLL_CALL = 7  # the roll call's tag, apart from the gossip's (tag 0)
PATIENCE = 4  # a late peer that answers pings is waited for up to 4 x peer_timeout


class Comm:
    """One process group, seen from one rank."""

    def __init__(self, group: dist.ProcessGroup | None = None, peer_timeout: float = 600.0):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "GASLoC needs torch.distributed initialised with at least 2 ranks; launch with "
                "`torchrun --nproc_per_node N` or `accelerate launch` (num_processes >= 2)."
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group)).lower()
        self._global_ranks = [
            r if group is None else dist.get_global_rank(group, r) for r in range(self.world_size)
        ]
        self.peer_timeout = peer_timeout
        everyone = self.all_gather_object((socket.gethostname(), uuid.uuid4().hex[:12]))
        self.hosts = [host for host, _ in everyone]
        self.run_id = everyone[0][1]  # rank 0's: the same on every rank
        self.gossip_group = dist.new_group(
            None if group is None else self._global_ranks,
            timeout=timedelta(seconds=peer_timeout) if self.blocking_waits else OUT_OF_REACH,
            backend=dist.get_backend(group),
            use_local_synchronization=group is not None,
        )
        # NCCL: the first operation on a group must involve all its ranks.
        dist.barrier(group=self.gossip_group)
        self.liveness = None if self.blocking_waits else Liveness(
            dist.new_group(None if group is None else self._global_ranks, timeout=OUT_OF_REACH,
                           backend="gloo", use_local_synchronization=group is not None),
            self._global_ranks, min(peer_timeout / 2, 30.0), peer_timeout)

    @property
    def blocking_waits(self) -> bool:
        """NCCL: a wait cannot be abandoned; the group's timeout (NCCL's watchdog) applies."""
        return "nccl" in self.backend

    def staging_device(self, device: torch.device) -> torch.device:
        """Where a tensor on ``device`` must be staged for this group's backend.

        A mixed ``cpu:gloo,cuda:nccl`` group takes either.
        """
        if "nccl" not in self.backend:
            return torch.device("cpu")
        if device.type == "cuda" or ("gloo" in self.backend and device.type == "cpu"):
            return device
        return torch.device("cuda", torch.cuda.current_device())

    # ------------------------------------------------------------ collectives
    def all_gather_object(self, value: Any) -> list[Any]:
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value, group=self.group)
        return gathered

    @torch.no_grad()
    def broadcast_from_first_(self, tensors: list[torch.Tensor]) -> None:
        """Every rank takes the first rank's ``tensors``, in place."""
        for tensor in tensors:
            staged = tensor.to(self.staging_device(tensor.device))
            dist.broadcast(staged, src=self._global_ranks[0], group=self.group)
            tensor.copy_(staged)

    def post_all_reduce(self, tensors: list[torch.Tensor]) -> Arrival:
        """Start summing ``tensors`` over every rank of the gossip group (staged already)."""
        return self._post_collective([dist.all_reduce(t, group=self.gossip_group, async_op=True)
                                      for t in tensors])

    def post_all_gather(self, pairs: list[tuple[list[torch.Tensor], torch.Tensor]]) -> Arrival:
        """Start gathering every rank's ``tensor`` into ``outputs`` (rank order), per pair."""
        return self._post_collective(
            [dist.all_gather(outputs, tensor, group=self.gossip_group, async_op=True)
             for outputs, tensor in pairs])

    def _post_collective(self, works: list) -> Arrival:
        arrival = Arrival(header_works=works)
        arrival.posted.set()
        arrival.wait_in_background(time.perf_counter(), self.blocking_waits)
        arrival.started = time.perf_counter()
        return arrival

    def wait_collective(self, arrival: Arrival, what: str) -> None:
        """Wait for a collective of every rank, up to ``peer_timeout`` from its start; a
        collective cannot go on without a rank, so a timeout is ``PeerLostError``."""
        if not self._join(arrival, arrival.started + self.peer_timeout):
            raise PeerLostError(
                f"GASLoC rank {self.rank} ({self.hosts[self.rank]}): {what} "
                + (f"failed: {arrival.error}" if arrival.error else
                   f"did not complete within peer_timeout={self.peer_timeout:g} s")
                + ". A worker is stalled or lost, and the complete graph (DiLoCo) needs every "
                "worker: restart the job with the workers that are alive (docs/reliability.md)."
            )

    @torch.no_grad()
    def all_reduce_sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum tensors over all ranks, in place (staged when the backend needs it)."""
        for tensor in tensors:
            device = self.staging_device(tensor.device)
            staged = tensor if tensor.device == device else tensor.to(device)
            dist.all_reduce(staged, group=self.group)
            if staged is not tensor:
                tensor.copy_(staged)

    def all_reduce_mean_(self, tensors: list[torch.Tensor]) -> None:
        """Average tensors over all ranks, in place."""
        self.all_reduce_sum_(tensors)
        for tensor in tensors:
            tensor.div_(self.world_size)

    def bound_group_timeout(self) -> timedelta | None:
        """Lower the caller's group timeout to ``peer_timeout`` (if it is longer): a rank that
        stalls inside someone else's collective then ends the run within that bound.

        Returns the timeout it replaced (for ``set_group_timeout``), or ``None``.
        """
        group = self.group or dist.distributed_c10d._get_default_group()
        backend = group._get_backend(self.staging_device(torch.device("cpu")))
        previous = getattr(getattr(backend, "options", None), "_timeout", None)
        bound = timedelta(seconds=self.peer_timeout)
        if previous is None or previous <= bound:
            return None
        self.set_group_timeout(bound)
        return previous

    def set_group_timeout(self, timeout: timedelta) -> None:
        dist.distributed_c10d._set_pg_timeout(timeout, self.group)

    # ---------------------------------------------------------- point to point
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

    def clock(self, device: torch.device) -> float:
        """Wall time, after the device's queued work is done."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()
