"""How messages travel on the round's graph: a header and the wire's messages, with deadlines.

Sparse rounds send each live peer a small fp64 header (round, health, lost
peers, adaptive ``H_i`` table) and then the messages of the wire
(``wires.py``), point to point; the complete graph is a health count, then the
wire's All-Reduce or all-gather. Receive buffers are allocated once, on first
use; those of a peer that did not answer are never reused, since its late
message may still land in them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .comm import Arrival, Comm, PendingSwap


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


def size_of(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class GossipExchange:
    """Posts and waits for one round's messages; keeps the receive buffers."""

    def __init__(self, messages: list[torch.Tensor], comm: Comm, device: torch.device):
        self.messages, self.comm, self.device = messages, comm, device
        self._received: dict[int, list[torch.Tensor]] = {}  # peer slot -> header, messages
        self._slots: dict[int, int] = {}  # peer -> its slot this round

    def post(self, peers: list[int], header: torch.Tensor) -> PendingSwap:
        """Start the swap with ``peers``: the header, then the messages, each way."""
        header = header.to(self.device)
        self._slots = {peer: k for k, peer in enumerate(peers)}
        receives = {peer: self._receive_buffers(k, header) for k, peer in enumerate(peers)}
        return self.comm.post_swap({peer: [header, *self.messages] for peer in peers}, receives)

    def wait(self, pending: PendingSwap, header: torch.Tensor) -> PeerMessages:
        arrived, failed = self.comm.wait_swap(pending)
        for peer in failed:  # its late message may still land in these buffers: never reuse them
            del self._received[self._slots[peer]]
        stats = ExchangeStats()
        if arrived:
            ready = max(a.ready for a in arrived.values())
            stats.wait_seconds = ready
            stats.seconds = max(a.done for a in arrived.values()) - ready
        sizes = size_of(header) + sum(size_of(m) for m in self.messages)
        stats.bytes_sent = sizes * len(pending.arrivals)
        headers = {peer: self._received[self._slots[peer]][0].cpu() for peer in arrived}
        return PeerMessages(headers, failed, stats)

    def received(self, peer: int) -> list[torch.Tensor]:
        """The messages ``peer`` sent this round (one per dtype group)."""
        return self._received[self._slots[peer]][1:]

    def post_all(self, healthy: bool, wire) -> tuple[torch.Tensor, Arrival, Arrival]:
        """Complete graph: start counting the healthy workers and the wire's collective."""
        count = torch.tensor([float(healthy)], dtype=torch.float64, device=self.device)
        return count, self.comm.post_all_reduce([count]), wire.post_all()

    def wait_all(self, posted: tuple[torch.Tensor, Arrival, Arrival], wire,
                 round_index: int) -> tuple[float, ExchangeStats]:
        count, counting, collective = posted
        self.comm.wait_collective(counting, f"round {round_index}'s health count")
        ready = time.perf_counter() - counting.started
        self.comm.wait_collective(collective, f"the exchange of round {round_index}")
        done = time.perf_counter() - collective.started
        return float(count), ExchangeStats(wire.all_bytes(), max(0.0, done - ready), ready)

    def _receive_buffers(self, slot: int, header: torch.Tensor) -> list[torch.Tensor]:
        buffers = self._received.get(slot)
        if buffers is None or buffers[0].numel() != header.numel():
            buffers = [torch.empty_like(header)] + [torch.empty_like(m) for m in self.messages]
            self._received[slot] = buffers
        return buffers
