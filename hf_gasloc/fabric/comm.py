"""One worker's door to ``torch.distributed``: rank, world size, staging, and every transfer.

Everything the engine sends goes through a ``Comm``: the start-up agreement and
broadcast and the consensus All-Reduces (on the caller's process group), and
the gossip itself (on a process group of its own, so that it never queues
behind, or blocks, the collectives that Trainer and accelerate run):
point-to-point messages (``batch_isend_irecv``: measured on gloo it is the
fastest option, ``docs/results/engine_costs.md``, and it needs no per-round process
groups, whose creation is collective) or the complete graph's All-Reduce.
Tensors are staged on the device the backend needs: gloo works on CPU tensors,
NCCL on CUDA tensors.

Every wait on a peer has a deadline, ``peer_timeout`` (``waiting.py``).
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import PeerLostError
from .liveness import Liveness
from .point_to_point import PointToPoint
from .waiting import Arrival

OUT_OF_REACH = timedelta(days=30)  # gloo's own timeout: our deadlines come first
MAX_JSON_BYTES = 1 << 20  # start-up exchanges (settings, hosts, checkpoint problems)


class Comm(PointToPoint):
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
        everyone = self.all_gather_json((socket.gethostname(), uuid.uuid4().hex[:12]))
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
    def all_gather_json(self, value: Any) -> list[Any]:
        """Every rank's ``value``, as JSON (``gather_json``)."""
        return gather_json(value, self.group, self.staging_device(torch.device("cpu")))

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
                "worker: restart the job with the workers that are alive (docs/guide/reliability.md)."
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


def bound_group_timeout(group: dist.ProcessGroup | None, seconds: float) -> timedelta | None:
    """Lower ``group``'s timeout (``None``: the default group, the one Trainer and accelerate
    use) to ``seconds`` if it is longer: a rank that stalls inside someone else's collective
    then ends the run within that bound. Returns the timeout it replaced (for
    ``set_group_timeout``), or ``None``."""
    group = group or dist.distributed_c10d._get_default_group()
    backend = group._get_backend(device_for(group))
    previous = getattr(getattr(backend, "options", None), "_timeout", None)
    bound = timedelta(seconds=seconds)
    if previous is None or previous <= bound:
        return None
    set_group_timeout(group, bound)
    return previous


def set_group_timeout(group: dist.ProcessGroup | None, timeout: timedelta) -> None:
    dist.distributed_c10d._set_pg_timeout(timeout, group)


def device_for(group: dist.ProcessGroup | None) -> torch.device:
    """Where ``group``'s backend takes tensors: the GPU for NCCL alone, else the CPU."""
    if str(dist.get_backend(group)).lower() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_json(value: Any, group: dist.ProcessGroup | None = None,
                device: torch.device = torch.device("cpu")) -> list[Any]:
    """Every rank's ``value``, sent as JSON: data, never code (nothing another rank sends is
    unpickled), at most ``MAX_JSON_BYTES`` each, the sizes checked before the bytes are read;
    tuples arrive as lists. Collective over ``group``; ``device``: where the backend wants
    tensors (CPU for gloo, the GPU for NCCL)."""
    data = json.dumps(value, sort_keys=True, default=repr).encode()
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)  # every rank learns every size before any bytes
    lengths = [int(n) for n in sizes]
    too_long = [rank for rank, n in enumerate(lengths) if not 0 <= n <= MAX_JSON_BYTES]
    if too_long:
        raise ValueError(f"GASLoC rank {dist.get_rank(group)}: ranks {too_long} announced more "
                         f"than {MAX_JSON_BYTES} bytes to gather ({max(lengths)}); nothing was "
                         "read.")
    mine = torch.zeros(max(lengths), dtype=torch.uint8)
    mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    mine = mine.to(device)
    everyone = [torch.empty_like(mine) for _ in sizes]
    dist.all_gather(everyone, mine, group=group)
    return [json.loads(bytes(t[:n].cpu().tolist())) for t, n in zip(everyone, lengths)]
