"""How proposals travel and mix: encode, exchange, decode/combine, on the round's graph.

``GossipExchange`` holds the messages and receive buffers of the fp32 work
buffers (one per dtype group). Each message is sent in the parameters' own
dtype (a bf16 model sends bf16 proposals). Sparse rounds send each peer a small
fp64 header (round, health, lost peers, adaptive ``H_i`` table) and then the
messages, point to point; the complete graph is a health count and one
All-Reduce per message. Scratch space is allocated once, on first use; the
buffers of a peer that did not answer are never reused, since its late
message may still land in them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from .comm import Comm, PendingSwap

logger = logging.getLogger(__name__)


@dataclass
class ExchangeStats:
    """What one exchange cost."""

    bytes_sent: int = 0
    seconds: float = 0.0  # the transfer, once every peer had reached the exchange
    wait_seconds: float | None = None  # waiting for the peers to reach the exchange


@dataclass
class PeerMessages:
    """What arrived from the peers of a sparse round."""

    headers: dict[int, torch.Tensor]  # peer -> its header
    failed: dict[int, str]  # peer -> why it did not answer
    stats: ExchangeStats


class GossipExchange:
    """Encodes, exchanges and mixes the work buffers with the round's peers."""

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
        self._received: dict[int, list[torch.Tensor]] = {}  # peer slot -> header, messages
        self._scratch: dict[tuple[int, int], torch.Tensor] = {}
        self._slots: dict[int, int] = {}  # peer -> its slot this round

    # ---------------------------------------------------------------- encode
    def encode(self, healthy: bool) -> list[torch.Tensor]:
        """The messages: the work buffers in the wire dtype; zeros when the proposal is not finite."""
        for z, message, direct in zip(self.buffers, self._messages, self._direct):
            if not healthy:
                message.zero_()  # a non-finite proposal never leaves this worker
            elif not direct:
                message.copy_(z)
        return self._messages

    # -------------------------------------------------------------- exchange
    def post(self, peers: list[int], header: torch.Tensor,
             messages: list[torch.Tensor]) -> PendingSwap:
        """Start the swap with ``peers``: the header, then the messages, each way."""
        header = header.to(self.device)
        self._slots = {peer: k for k, peer in enumerate(peers)}
        receives = {peer: self._receive_buffers(k, header, messages) for k, peer in enumerate(peers)}
        return self.comm.post_swap({peer: [header, *messages] for peer in peers}, receives)

    def wait(self, pending: PendingSwap, header: torch.Tensor,
             messages: list[torch.Tensor]) -> PeerMessages:
        arrived, failed = self.comm.wait_swap(pending)
        for peer in failed:  # its late message may still land in these buffers: never reuse them
            del self._received[self._slots[peer]]
        stats = ExchangeStats()
        if arrived:
            ready = max(a.ready for a in arrived.values())
            stats.wait_seconds = ready
            stats.seconds = max(a.done for a in arrived.values()) - ready
        sizes = header.numel() * header.element_size() + sum(_size(m) for m in messages)
        stats.bytes_sent = sizes * len(pending.arrivals)
        headers = {peer: self._received[self._slots[peer]][0].cpu() for peer in arrived}
        return PeerMessages(headers, failed, stats)

    def all_reduce(self, healthy: bool, messages: list[torch.Tensor],
                   round_index: int) -> tuple[float, ExchangeStats]:
        """Complete graph: count the healthy workers, then sum every message over all ranks."""
        start = self.comm.clock(self.device)
        count = torch.tensor([float(healthy)], dtype=torch.float64, device=self.device)
        self.comm.gossip_all_reduce_sum_([count], f"round {round_index}'s health count")
        ready = self.comm.clock(self.device)
        self.comm.gossip_all_reduce_sum_(messages, f"round {round_index}")
        # A ring All-Reduce sends 2 (n - 1) / n of the buffer from every rank.
        n = self.comm.world_size
        stats = ExchangeStats(sum(2 * (n - 1) * _size(m) // n for m in messages),
                              self.comm.clock(self.device) - ready, ready - start)
        return float(count), stats

    # ------------------------------------------------------- decode/combine
    def combine(self, weights: dict[int, float], norm: float, round_index: int
                ) -> tuple[float | None, list[int]]:
        """``z <- z + sum_j w_j (z_j - z)`` over the peers whose messages are finite.

        Returns the mean relative peer distance and the peers that were mixed.
        A non-finite message is left out (its weight stays with this worker).
        """
        differences: dict[tuple[int, int], torch.Tensor] = {}
        distance = dict.fromkeys(weights, 0.0)
        for b, z in enumerate(self.buffers):
            for peer in weights:
                difference = self._as_fp32(b, peer)
                difference.sub_(z)
                distance[peer] += float(torch.dot(difference, difference))
                differences[(b, peer)] = difference
        mixed = [peer for peer in weights if math.isfinite(distance[peer])]
        for peer in weights:
            if peer not in mixed:
                logger.warning("GASLoC rank %d: the message of rank %d in round %d is not finite; "
                               "left out.", self.comm.rank, peer, round_index)
        for b, z in enumerate(self.buffers):
            for peer in mixed:
                z.add_(differences[(b, peer)], alpha=weights[peer])
        if not mixed:
            return None, mixed
        total = sum(distance[peer] for peer in mixed)
        return total / len(mixed) / max(norm, torch.finfo(torch.float32).tiny), mixed

    def take_average(self, weights: dict[int, float]) -> list[int]:
        """``z <- sum_j w_j z_j / sum_j w_j`` over the peers with finite messages (own ``z`` dropped).

        For a worker whose own proposal is not finite; returns the peers used.
        """
        mixed = [peer for peer in weights
                 if all(math.isfinite(float(torch.dot(m, m)))
                        for m in (self._as_fp32(b, peer) for b in range(len(self.buffers))))]
        total = sum(weights[peer] for peer in mixed)
        for b, z in enumerate(self.buffers):
            z.zero_()
            for peer in mixed:
                z.add_(self._as_fp32(b, peer), alpha=weights[peer] / total)
        return mixed

    def average_of_all_(self, messages: list[torch.Tensor], count: float) -> None:
        """Complete graph: ``z <- sum / count`` (the healthy workers' mean)."""
        for z, message, direct in zip(self.buffers, messages, self._direct):
            if not direct:
                z.copy_(message)
            z.div_(count)

    # --------------------------------------------------------------- buffers
    def _receive_buffers(self, slot: int, header: torch.Tensor,
                         messages: list[torch.Tensor]) -> list[torch.Tensor]:
        buffers = self._received.get(slot)
        if buffers is None or buffers[0].numel() != header.numel():
            buffers = [torch.empty_like(header)] + [torch.empty_like(m) for m in messages]
            self._received[slot] = buffers
        return buffers

    def _as_fp32(self, b: int, peer: int) -> torch.Tensor:
        """Peer ``peer``'s message ``b`` as an fp32 tensor beside the work buffer."""
        received = self._received[self._slots[peer]][1 + b]
        z = self.buffers[b]
        if received.dtype == z.dtype and received.device == z.device:
            return received
        key = (b, self._slots[peer])
        scratch = self._scratch.get(key)
        if scratch is None:
            scratch = self._scratch[key] = torch.empty_like(z)
        return scratch.copy_(received)


def _size(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
