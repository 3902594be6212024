"""How a round's messages travel, and what they cost: the one place that counts bytes.

Sparse rounds send each live peer the round's header (``header.py``), then the
wire's messages, point to point; the complete graph counts the healthy workers
(a tiny All-Reduce), then sums the wire's messages (native: a ring All-Reduce)
or gathers them (a codec: an all-gather). Receive buffers are allocated once,
on first use; those of a peer that did not answer are never reused, since its
late message may still land in them.

Bytes are what this worker puts on the wire: ``(header + messages) x peers``
on sparse rounds; ``2 (n - 1) / n`` of the messages for a ring All-Reduce and
``n - 1`` payloads for an all-gather on the complete graph.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..fabric import Arrival, Comm, PendingSwap
from .header import Header, layout_of


@dataclass
class ExchangeStats:
    """What one exchange cost."""

    bytes_sent: int = 0
    seconds: float = 0.0  # the transfer, once every peer had reached the exchange
    wait_seconds: float | None = None  # waiting for the peers to reach the exchange


@dataclass
class InTransit:
    """An exchange posted and not yet waited for."""

    swap: PendingSwap | None = None  # sparse: the swap with the round's live peers
    header: torch.Tensor | None = None
    count: torch.Tensor | None = None  # complete: the healthy workers, being summed
    counting: Arrival | None = None
    collective: Arrival | None = None
    gathered: list[list[torch.Tensor]] | None = None  # complete, all-gather: every payload


@dataclass
class Arrived:
    """What an exchange brought: the answering peers' headers, who failed, and the cost."""

    headers: dict[int, Header] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)  # peer -> why it did not answer
    count: float = 0.0  # complete graph: healthy workers
    stats: ExchangeStats = field(default_factory=ExchangeStats)


def size_of(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class GossipExchange:
    """Posts and waits for one wire's messages; keeps the receive buffers. ``channel`` keeps
    the exchanges of different fragments, which may be in flight together, apart."""

    def __init__(self, wire, comm: Comm, device: torch.device, channel: int = 0):
        self.wire, self.comm, self.device, self.channel = wire, comm, device, channel
        self.layout = layout_of(wire.messages, wire.encoding)
        self._received: dict[int, list[torch.Tensor]] = {}  # peer slot -> header, messages
        self._slots: dict[int, int] = {}  # peer -> its slot this round

    # ------------------------------------------------------------ sparse rounds
    def post(self, peers: list[int], round_index: int, healthy: bool, lost: list[bool],
             table: torch.Tensor | None) -> InTransit:
        """Start the swap with ``peers``: the header, then (once it fits) the messages."""
        sent = Header(round_index, healthy, self.layout, lost, table).to_tensor().to(self.device)
        self._slots = {peer: k for k, peer in enumerate(peers)}
        receives = {peer: self._receive_buffers(k, sent) for k, peer in enumerate(peers)}
        swap = self.comm.post_swap({peer: [sent, *self.wire.messages] for peer in peers},
                                   receives, self._refusal, self.channel)
        return InTransit(swap=swap, header=sent)

    def _refusal(self, peer: int, received: torch.Tensor) -> str | None:
        """Why the messages ``peer``'s header announces cannot be received here (``None``:
        they fit). Both ends check the other's header alike, so both skip the messages."""
        received = received.cpu()
        malformed = Header.malformed(received, self.comm.world_size)
        if malformed is not None:
            return f"rank {peer}'s header is malformed ({malformed})"
        layout = Header.from_tensor(received, self.comm.world_size).layout
        if layout != self.layout:
            return (f"rank {peer} announced {layout[0]:.0f} bytes of messages laid out "
                    f"differently from this worker's {self.layout[0]:.0f} (another model, "
                    "payload or fragment split): its messages are not received")
        return None

    def received(self, peer: int) -> list[torch.Tensor]:
        """The messages ``peer`` sent this round (one per dtype group)."""
        return self._received[self._slots[peer]][1:]

    # ------------------------------------------------------------ complete graph
    def post_all(self, healthy: bool) -> InTransit:
        """Start counting the healthy workers, then the wire's collective."""
        count = torch.tensor([float(healthy)], dtype=torch.float64, device=self.device)
        counting = self.comm.post_all_reduce([count])
        messages = self.wire.messages
        if self.wire.collective == "all_reduce":
            return InTransit(count=count, counting=counting,
                             collective=self.comm.post_all_reduce(messages))
        n = self.comm.world_size
        gathered = [[torch.empty_like(m) for _ in range(n)] for m in messages]
        return InTransit(count=count, counting=counting, gathered=gathered,
                         collective=self.comm.post_all_gather(list(zip(gathered, messages))))

    # ------------------------------------------------------------------ waiting
    def wait(self, transit: InTransit, round_index: int) -> Arrived:
        """Wait for the peers (up to ``peer_timeout``, ``fabric/``) and count what was sent."""
        if transit.swap is None:
            return self._wait_all(transit, round_index)
        arrived, failed = self.comm.wait_swap(transit.swap)
        for peer in failed:  # its late message may still land in these buffers: never reuse them
            del self._received[self._slots[peer]]
        stats = ExchangeStats(bytes_sent=(size_of(transit.header) + sum(
            size_of(m) for m in self.wire.messages)) * len(transit.swap.arrivals))
        if arrived:
            ready = max(a.ready for a in arrived.values())
            stats.wait_seconds = ready
            stats.seconds = max(a.done for a in arrived.values()) - ready
        headers = {peer: Header.from_tensor(self._received[self._slots[peer]][0].cpu(),
                                            self.comm.world_size) for peer in arrived}
        return Arrived(headers, failed, stats=stats)

    def _wait_all(self, transit: InTransit, round_index: int) -> Arrived:
        self.comm.wait_collective(transit.counting, f"round {round_index}'s health count")
        ready = time.perf_counter() - transit.counting.started
        self.comm.wait_collective(transit.collective, f"the exchange of round {round_index}")
        done = time.perf_counter() - transit.collective.started
        stats = ExchangeStats(self._collective_bytes(), max(0.0, done - ready), ready)
        return Arrived(count=float(transit.count), stats=stats)

    def _collective_bytes(self) -> int:
        n, sizes = self.comm.world_size, [size_of(m) for m in self.wire.messages]
        if self.wire.collective == "all_reduce":  # a ring All-Reduce: 2 (n - 1) / n of each
            return sum(2 * (n - 1) * size // n for size in sizes)
        return sum((n - 1) * size for size in sizes)  # an all-gather: n - 1 payloads

    def _receive_buffers(self, slot: int, header: torch.Tensor) -> list[torch.Tensor]:
        buffers = self._received.get(slot)
        if buffers is None or buffers[0].numel() != header.numel():
            buffers = [torch.empty_like(header)] + [torch.empty_like(m)
                                                    for m in self.wire.messages]
            self._received[slot] = buffers
        return buffers
