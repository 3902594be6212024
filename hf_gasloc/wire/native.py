"""What goes on the wire and how received messages are mixed: native dtype or a codec.

``NativeWire`` sends each flat buffer in the parameters' own dtype and mixes
``z <- z + sum_j w_j (z_j - z)``, bit for bit as before payload codecs existed.
``CodecWire`` encodes with a codec (``codec.py``) and error feedback; see its
docstring and ``docs/algorithm.md`` for what it encodes and why.

Both decode and check received messages in the same pass that mixes them: a
message that is not finite is left out (its weight stays with this worker).
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Protocol

import torch

from .comm import Arrival, Comm
from .exchange import size_of
from .flat import FlatModel

logger = logging.getLogger(__name__)

Received = Callable[[int], list[torch.Tensor]]  # peer -> its messages, one per dtype group
TINY = torch.finfo(torch.float32).tiny


class Wire(Protocol):
    """The stages of a round that depend on what travels."""

    messages: list[torch.Tensor]
    encode_seconds: float

    def encode(self, healthy: bool, eta: float) -> None: ...
    def combine(self, received: Received, weights: dict[int, float], norm: float,
                round_index: int) -> tuple[float | None, list[int]]: ...
    def take_average(self, received: Received, weights: dict[int, float]) -> list[int]: ...
    def post_all(self) -> Arrival: ...
    def all_bytes(self) -> int: ...
    def average_all(self, count: float, eta: float) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def reset(self) -> None: ...


def _left_out(rank: int, peers: list[int], mixed: list[int], round_index: int) -> None:
    for peer in peers:
        if peer not in mixed:
            logger.warning("GASLoC rank %d: the message of rank %d in round %d is not finite; "
                           "left out.", rank, peer, round_index)


Values = Callable[[int, int, int], torch.Tensor]  # (buffer, slot, peer) -> fp32 tensor


def mix_differences(flat: FlatModel, rank: int, weights: dict[int, float], difference: Values,
                    scale: float, norm: float, round_index: int) -> tuple[float | None, list[int]]:
    """``z <- z + scale sum_j w_j d_j`` over the peers whose differences ``d_j`` are finite;
    returns the peer distance (``scale^2 ||d_j||^2`` relative to ``norm``) and the peers mixed."""
    differences, distance = {}, dict.fromkeys(weights, 0.0)
    for b in range(len(flat.groups)):
        for slot, peer in enumerate(weights):
            d = difference(b, slot, peer)
            distance[peer] += float(torch.dot(d, d)) * scale ** 2
            differences[(b, peer)] = d
    mixed = [peer for peer in weights if math.isfinite(distance[peer])]
    _left_out(rank, list(weights), mixed, round_index)
    for b, g in enumerate(flat.groups):
        for peer in mixed:
            g.work.add_(differences[(b, peer)], alpha=scale * weights[peer])
    if not mixed:
        return None, mixed
    return sum(distance[p] for p in mixed) / len(mixed) / max(norm, TINY), mixed


def average_values(flat: FlatModel, weights: dict[int, float], value: Values, scale: float,
                   base_into: Callable[[int], None]) -> list[int]:
    """``z <- base + scale sum_j w_j v_j / sum_j w_j`` over the peers whose values are finite."""
    values = {peer: [value(b, slot, peer) for b in range(len(flat.groups))]
              for slot, peer in enumerate(weights)}
    mixed = [p for p in weights if all(math.isfinite(float(torch.dot(v, v))) for v in values[p])]
    total = sum(weights[p] for p in mixed)
    for b, g in enumerate(flat.groups):
        base_into(b)
        for peer in mixed:
            g.work.add_(values[peer][b], alpha=scale * weights[peer] / total)
    return mixed


class NativeWire:
    """The parameters' dtype on the wire (a bf16 model sends bf16 proposals)."""

    def __init__(self, flat: FlatModel, comm: Comm):
        self.flat, self.comm = flat, comm
        self.device = comm.staging_device(flat.device)
        self._direct = [g.work.dtype == g.dtype and g.work.device == self.device
                        for g in flat.groups]
        self.messages = [g.work if direct else torch.empty(g.work.numel(), dtype=g.dtype,
                                                           device=self.device)
                         for g, direct in zip(flat.groups, self._direct)]
        self._scratch: dict[tuple[int, int], torch.Tensor] = {}
        self.encode_seconds = 0.0

    def encode(self, healthy: bool, eta: float) -> None:
        for g, message, direct in zip(self.flat.groups, self.messages, self._direct):
            if not healthy:
                message.zero_()  # a non-finite proposal never leaves this worker
            elif not direct:
                message.copy_(g.work)

    def _as_fp32(self, b: int, slot: int, received: torch.Tensor) -> torch.Tensor:
        z = self.flat.groups[b].work
        if received.dtype == z.dtype and received.device == z.device:
            return received
        scratch = self._scratch.get((b, slot))
        if scratch is None:
            scratch = self._scratch[(b, slot)] = torch.empty_like(z)
        return scratch.copy_(received)

    def combine(self, received: Received, weights: dict[int, float], norm: float,
                round_index: int) -> tuple[float | None, list[int]]:
        """``z <- z + sum_j w_j (z_j - z)`` over finite messages; peer distance and peers mixed."""
        def difference(b: int, slot: int, peer: int) -> torch.Tensor:
            return self._as_fp32(b, slot, received(peer)[b]).sub_(self.flat.groups[b].work)
        return mix_differences(self.flat, self.comm.rank, weights, difference, 1.0, norm,
                               round_index)

    def take_average(self, received: Received, weights: dict[int, float]) -> list[int]:
        """``z <- sum_j w_j z_j / sum_j w_j`` over finite messages (for a non-finite own ``z``)."""
        return average_values(self.flat, weights,
                              lambda b, slot, peer: self._as_fp32(b, slot, received(peer)[b]),
                              1.0, lambda b: self.flat.groups[b].work.zero_())

    def post_all(self) -> Arrival:
        """Complete graph: start summing every message over all ranks (a ring All-Reduce)."""
        return self.comm.post_all_reduce(self.messages)

    def all_bytes(self) -> int:
        """A ring All-Reduce sends 2 (n - 1) / n of the buffer from every rank."""
        n = self.comm.world_size
        return sum(2 * (n - 1) * size_of(m) // n for m in self.messages)

    def average_all(self, count: float, eta: float) -> None:
        """Complete graph: ``z <- sum / count`` (the healthy workers' mean)."""
        for g, message, direct in zip(self.flat.groups, self.messages, self._direct):
            if not direct:
                g.work.copy_(message)
            g.work.div_(count)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def reset(self) -> None:
        pass
