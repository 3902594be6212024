"""The engine's one door to ``torch.distributed``: rank, world size, staging, and every transfer.

Everything the engine sends goes through a ``Comm``: the start-up agreement and
broadcast, the point-to-point gossip (``batch_isend_irecv``: measured on gloo it
is the fastest option, ``docs/benchmarks.md``, and it needs no per-round process
groups, whose creation is collective), and the All-Reduces of the complete graph
and of the consensus. Tensors are staged on the device the backend needs: gloo
works on CPU tensors, NCCL on CUDA tensors.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist


class Comm:
    """One process group, seen from one rank."""

    def __init__(self, group: dist.ProcessGroup | None = None):
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

    def all_reduce_sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum over ranks in place; the tensors must already sit on the staging device."""
        for tensor in tensors:
            dist.all_reduce(tensor, group=self.group)

    @torch.no_grad()
    def all_reduce_mean_(self, tensors: list[torch.Tensor]) -> None:
        """Average fp32 tensors over all ranks, in place (staged when the backend needs it)."""
        for tensor in tensors:
            device = self.staging_device(tensor.device)
            staged = tensor if tensor.device == device else tensor.to(device)
            dist.all_reduce(staged, group=self.group)
            if staged is not tensor:
                tensor.copy_(staged)
            tensor.div_(self.world_size)

    # ---------------------------------------------------------- point to point
    def swap(self, sends: dict[int, list[torch.Tensor]],
             receives: dict[int, list[torch.Tensor]]) -> None:
        """Send ``sends[peer]`` to each peer and fill ``receives[peer]`` from it; wait for all."""
        ops = []
        for peer, tensors in sends.items():
            other = self._global_ranks[peer]
            for sent, received in zip(tensors, receives[peer], strict=True):
                ops.append(dist.P2POp(dist.isend, sent, other, self.group))
                ops.append(dist.P2POp(dist.irecv, received, other, self.group))
        for work in dist.batch_isend_irecv(ops) if ops else []:
            work.wait()

    def clock(self, device: torch.device) -> float:
        """Wall time, after the device's queued work is done."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()
