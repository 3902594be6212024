"""How proposals travel: one flat buffer per dtype, point-to-point gossip or one All-Reduce.

Sparse rounds use ``batch_isend_irecv`` on the given process group: measured on
gloo it is the fastest of the options (see ``docs/benchmarks.md``) and it needs
no per-round process groups, whose creation must be collective and whose cost
grows with every pair ever used. The complete graph is one All-Reduce.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .topology import RoundGraph


@dataclass
class ExchangeStats:
    """What one exchange cost and what it saw."""

    bytes_sent: int
    seconds: float
    peer_distance: float | None  # mean_j ||z_i - z_j||^2 / ||z_i||^2 over this round's peers


def communication_device(group: dist.ProcessGroup | None, device: torch.device) -> torch.device:
    """Where a tensor on ``device`` must be staged for this group's backend.

    gloo works on CPU tensors, NCCL on CUDA tensors; a mixed ``cpu:gloo,cuda:nccl``
    group takes either.
    """
    backend = str(dist.get_backend(group)).lower()
    if "nccl" not in backend:
        return torch.device("cpu")
    if device.type == "cuda" or ("gloo" in backend and device.type == "cpu"):
        return device
    return torch.device("cuda", torch.cuda.current_device())


class GossipExchange:
    """Mixes fp32 work buffers in place with the round's peers.

    ``buffers[b]`` is an fp32 flat tensor holding the proposal ``z`` of dtype
    group ``b``; it is sent as ``dtypes[b]`` (the parameters' own dtype) from
    ``device``. Scratch space is allocated once, on first use.
    """

    def __init__(
        self,
        buffers: list[torch.Tensor],
        dtypes: list[torch.dtype],
        group: dist.ProcessGroup | None,
        device: torch.device,
    ):
        self.buffers = buffers
        self.group = group
        self.device = device
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._global_rank = [
            r if group is None else dist.get_global_rank(group, r) for r in range(self.world_size)
        ]
        self._direct = [b.dtype == d and b.device == device for b, d in zip(buffers, dtypes)]
        self._messages = [
            b if direct else torch.empty(b.numel(), dtype=d, device=device)
            for b, d, direct in zip(buffers, dtypes, self._direct)
        ]
        self._received: dict[tuple[int, int], torch.Tensor] = {}
        self._differences: dict[tuple[int, int], torch.Tensor] = {}

    def mix_(self, graph: RoundGraph) -> ExchangeStats:
        """``z_i <- sum_j W[i, j] z_j`` for this rank, in place in ``buffers``."""
        start = self._clock()
        if graph.all_reduce:
            bytes_sent = self._all_reduce_mean_()
            return ExchangeStats(bytes_sent, self._clock() - start, None)
        peers = graph.peers[self.rank]
        if not peers:
            return ExchangeStats(0, 0.0, None)
        messages = self._load_messages()
        ops = []
        for b, message in enumerate(messages):
            for k, peer in enumerate(peers):
                other = self._global_rank[peer]
                ops.append(dist.P2POp(dist.isend, message, other, self.group))
                ops.append(dist.P2POp(dist.irecv, self._receive_buffer(b, k), other, self.group))
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        seconds = self._clock() - start
        distance = self._combine_(list(peers.values()))
        bytes_sent = sum(m.numel() * m.element_size() for m in messages) * len(peers)
        return ExchangeStats(bytes_sent, seconds, distance)

    def ready_(self, table: torch.Tensor, graph: RoundGraph) -> tuple[float, list[torch.Tensor]]:
        """Swap a small tensor with the round's peers before the model exchange.

        Returns the seconds it took (the wait for the peers to be ready) and what
        each peer sent.
        """
        start = self._clock()
        mine = table.to(self.device)
        received = [torch.empty_like(mine) for _ in graph.peers[self.rank]]
        ops = []
        for peer, buffer in zip(graph.peers[self.rank], received):
            other = self._global_rank[peer]
            ops += [dist.P2POp(dist.isend, mine, other, self.group),
                    dist.P2POp(dist.irecv, buffer, other, self.group)]
        for work in dist.batch_isend_irecv(ops) if ops else []:
            work.wait()
        return self._clock() - start, [b.cpu() for b in received]

    def _combine_(self, weights: list[float]) -> float:
        """``z <- z + sum_j w_j (z_j - z)``; returns the mean relative peer distance."""
        distance, norm = 0.0, 0.0
        for b, z in enumerate(self.buffers):
            differences = []
            for k in range(len(weights)):
                received = self._received[(b, k)]
                if received.dtype == z.dtype and received.device == z.device:
                    difference = received
                else:
                    difference = self._differences.get((b, k))
                    if difference is None:
                        difference = self._differences[(b, k)] = torch.empty_like(z)
                    difference.copy_(received)
                difference.sub_(z)
                distance += float(torch.dot(difference, difference))
                differences.append(difference)
            norm += float(torch.dot(z, z))
            for weight, difference in zip(weights, differences):
                z.add_(difference, alpha=weight)
        return distance / len(weights) / max(norm, torch.finfo(torch.float32).tiny)

    def _all_reduce_mean_(self) -> int:
        messages = self._load_messages()
        for message in messages:
            dist.all_reduce(message, group=self.group)
        bytes_sent = 0
        for z, message, direct in zip(self.buffers, messages, self._direct):
            if not direct:
                z.copy_(message)
            z.div_(self.world_size)
            # A ring All-Reduce sends 2 (n - 1) / n of the buffer from every rank.
            size = message.numel() * message.element_size()
            bytes_sent += 2 * (self.world_size - 1) * size // self.world_size
        return bytes_sent

    def _load_messages(self) -> list[torch.Tensor]:
        for z, message, direct in zip(self.buffers, self._messages, self._direct):
            if not direct:
                message.copy_(z)
        return self._messages

    def _receive_buffer(self, b: int, k: int) -> torch.Tensor:
        buffer = self._received.get((b, k))
        if buffer is None:
            buffer = self._received[(b, k)] = torch.empty_like(self._messages[b])
        return buffer

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def all_reduce_mean_(tensors: list[torch.Tensor], group: dist.ProcessGroup | None) -> None:
    """Average fp32 tensors over all ranks of ``group``, in place (CPU tensors on NCCL are staged)."""
    world_size = dist.get_world_size(group)
    for tensor in tensors:
        device = communication_device(group, tensor.device)
        staged = tensor if tensor.device == device else tensor.to(device)
        dist.all_reduce(staged, group=group)
        if staged is not tensor:
            tensor.copy_(staged)
        tensor.div_(world_size)
