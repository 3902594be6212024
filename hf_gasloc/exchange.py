"""How proposals travel and mix: encode, exchange, decode/combine, on the round's graph.

``GossipExchange`` holds the messages and receive buffers of the fp32 work
buffers (one per dtype group). Each message is sent in the parameters' own
dtype (a bf16 model sends bf16 proposals). Sparse rounds swap messages with the
round's peers point to point; the complete graph is one All-Reduce per message.
Scratch space is allocated once, on first use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .comm import Comm
from .topology import RoundGraph


@dataclass
class ExchangeStats:
    """What one exchange cost and what it saw."""

    bytes_sent: int
    seconds: float
    peer_distance: float | None  # mean_j ||z_i - z_j||^2 / ||z_i||^2 over this round's peers


class GossipExchange:
    """Mixes fp32 work buffers in place with the round's peers: ``z_i <- sum_j W[i, j] z_j``."""

    def __init__(self, buffers: list[torch.Tensor], dtypes: list[torch.dtype], comm: Comm,
                 device: torch.device):
        self.buffers = buffers
        self.comm = comm
        self.device = comm.staging_device(device)
        self._direct = [b.dtype == d and b.device == self.device for b, d in zip(buffers, dtypes)]
        self._messages = [
            b if direct else torch.empty(b.numel(), dtype=d, device=self.device)
            for b, d, direct in zip(buffers, dtypes, self._direct)
        ]
        self._received: dict[tuple[int, int], torch.Tensor] = {}
        self._differences: dict[tuple[int, int], torch.Tensor] = {}

    # ---------------------------------------------------------------- stages
    def encode(self) -> list[torch.Tensor]:
        """The messages: the work buffers in the parameters' dtype, on the staging device."""
        for z, message, direct in zip(self.buffers, self._messages, self._direct):
            if not direct:
                message.copy_(z)
        return self._messages

    def exchange(self, graph: RoundGraph, messages: list[torch.Tensor]) -> ExchangeStats:
        """Send ``messages`` to the round's peers and receive theirs (complete: sum them all)."""
        start = self.comm.clock(self.device)
        if graph.all_reduce:
            self.comm.all_reduce_sum_(messages)
            # A ring All-Reduce sends 2 (n - 1) / n of the buffer from every rank.
            n = self.comm.world_size
            bytes_sent = sum(2 * (n - 1) * _size(m) // n for m in messages)
            return ExchangeStats(bytes_sent, self.comm.clock(self.device) - start, None)
        peers = list(graph.peers[self.comm.rank])
        if not peers:  # this worker sits the round out
            return ExchangeStats(0, 0.0, None)
        self.comm.swap({peer: messages for peer in peers},
                       {peer: [self._receive_buffer(b, k) for b in range(len(messages))]
                        for k, peer in enumerate(peers)})
        bytes_sent = sum(_size(m) for m in messages) * len(peers)
        return ExchangeStats(bytes_sent, self.comm.clock(self.device) - start, None)

    def combine(self, graph: RoundGraph, messages: list[torch.Tensor]) -> float | None:
        """Decode and mix into the work buffers; returns the mean relative peer distance."""
        if graph.all_reduce:
            for z, message, direct in zip(self.buffers, messages, self._direct):
                if not direct:
                    z.copy_(message)
                z.div_(self.comm.world_size)
            return None
        weights = list(graph.peers[self.comm.rank].values())
        if not weights:
            return None
        return self._combine_with_peers(weights)

    def swap_small(self, tensor: torch.Tensor, graph: RoundGraph) -> list[torch.Tensor]:
        """Swap a small tensor with the round's peers; returns what each peer sent."""
        mine = tensor.to(self.device)
        peers = list(graph.peers[self.comm.rank])
        received = [torch.empty_like(mine) for _ in peers]
        self.comm.swap({peer: [mine] for peer in peers},
                       {peer: [buffer] for peer, buffer in zip(peers, received)})
        return [b.cpu() for b in received]

    # --------------------------------------------------------------- helpers
    def _combine_with_peers(self, weights: list[float]) -> float:
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

    def _receive_buffer(self, b: int, k: int) -> torch.Tensor:
        buffer = self._received.get((b, k))
        if buffer is None:
            buffer = self._received[(b, k)] = torch.empty_like(self._messages[b])
        return buffer


def _size(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
