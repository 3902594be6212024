"""Encoded messages with error feedback, mixed so that the workers' mean stays exact.

What is encoded, ``v``, is the proposal itself (``form="proposal"``) or the
pseudo-gradient ``(a - z) / eta = a - x`` (``form="pseudo_gradient"``); either
way ``z = base + s v`` with ``(base, s) = (0, 1)`` or ``(a, -eta)``. Each worker
sends ``q = Q(v + r)`` and keeps the error ``r <- v + r - D(q)`` for the next
round (error feedback, saved with its state), so what encoding loses is sent
later instead of being a bias.

- Sparse rounds mix what both ends encoded: ``z <- z + s sum_j w_j (D(q_j) - D(q_i))``.
  With symmetric weights the terms cancel in the sum over workers, so the
  *mean* proposal is kept exactly, whatever the codec loses: invariant 2 holds.
- The complete graph replaces ``z`` by ``base + s mean_j D(q_j)`` (an all-gather;
  every worker decodes and sums the same payloads in rank order): with the
  pseudo-gradient form, that is DiLoCo with the codec applied to the
  pseudo-gradient, and the anchors stay identical.

Why ``auto`` picks the pseudo-gradient on the complete graph and the proposal
on sparse graphs: ``docs/algorithm.md`` (measured).
"""

from __future__ import annotations

import time

import torch

from .comm import Arrival, Comm
from .exchange import size_of
from .flat import FlatModel, views_of
from .codec import make_codec
from .wires import NativeWire, Received, average_values, mix_differences


class CodecWire:
    """A codec on the wire, with error feedback (one residual per dtype group)."""

    def __init__(self, flat: FlatModel, comm: Comm, codec, form: str):
        self.flat, self.comm, self.codec, self.form = flat, comm, codec, form
        self.device = comm.staging_device(flat.device)
        works = flat.works
        self.messages = [torch.zeros(codec.wire_bytes(w.numel()), dtype=torch.uint8,
                                     device=self.device) for w in works]
        self.residuals = [torch.zeros_like(w) for w in works]
        self._own = [torch.empty_like(w) for w in works]  # v, then D(q_i)
        self._own_views = [views_of(own, g.params) for own, g in zip(self._own, flat.groups)]
        self._decoded: dict[tuple[int, int], torch.Tensor] = {}
        self._gathered: list[list[torch.Tensor]] = []
        self._scale = 1.0
        self.encode_seconds = 0.0

    # ---------------------------------------------------------------- encode
    def encode(self, healthy: bool, eta: float) -> None:
        """``q = Q(v + r)``, ``r <- v + r - D(q)``; zeros when the proposal is not finite."""
        start = time.perf_counter()
        self._scale = 1.0 if self.form == "proposal" else -eta
        for g, wire, own, views, residual in zip(self.flat.groups, self.messages, self._own,
                                                 self._own_views, self.residuals):
            if not healthy:  # a non-finite proposal never leaves this worker; r is kept
                wire.zero_()
                own.zero_()
                continue
            if self.form == "proposal":
                own.copy_(g.work)
            else:  # a - x from the live parameters: exactly DiLoCo's pseudo-gradient
                for view, anchor, param in zip(views, g.anchor_views, g.params):
                    torch.sub(anchor, param, out=view)
            own.add_(residual)  # u = v + r
            self.codec.encode_(own, wire)
            residual.copy_(own)
            self.codec.decode_(wire, own)
            residual.sub_(own)  # r = u - D(q)
        self.encode_seconds = time.perf_counter() - start

    def _base_into(self, b: int) -> None:
        """``z <- base``: the anchor (pseudo-gradient form) or zero (proposal form)."""
        g = self.flat.groups[b]
        g.work.copy_(g.anchor) if self.form == "pseudo_gradient" else g.work.zero_()

    def _decode(self, b: int, slot: int, wire: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self._decoded.get((b, slot))
        if out is None:
            out = self._decoded[(b, slot)] = torch.empty_like(self.flat.groups[b].work)
        self.codec.decode_(wire, out)
        self.encode_seconds += time.perf_counter() - start
        return out

    # ------------------------------------------------------- decode/combine
    def combine(self, received: Received, weights: dict[int, float], norm: float,
                round_index: int) -> tuple[float | None, list[int]]:
        """``z <- z + s sum_j w_j (D(q_j) - D(q_i))`` over finite messages."""
        def difference(b: int, slot: int, peer: int) -> torch.Tensor:
            return self._decode(b, slot, received(peer)[b]).sub_(self._own[b])
        return mix_differences(self.flat, self.comm.rank, weights, difference, self._scale, norm,
                               round_index)

    def take_average(self, received: Received, weights: dict[int, float]) -> list[int]:
        """``z <- base + s sum_j w_j D(q_j) / sum_j w_j`` (for a non-finite own ``z``)."""
        return average_values(self.flat, weights,
                              lambda b, slot, peer: self._decode(b, slot, received(peer)[b]),
                              self._scale, self._base_into)

    # --------------------------------------------------------- complete graph
    def post_all(self) -> Arrival:
        """Start all-gathering every worker's payload."""
        n = self.comm.world_size
        self._gathered = [[torch.empty_like(wire) for _ in range(n)] for wire in self.messages]
        return self.comm.post_all_gather(list(zip(self._gathered, self.messages)))

    def all_bytes(self) -> int:
        """An all-gather sends this rank's payload to each of the ``n - 1`` others."""
        return sum((self.comm.world_size - 1) * size_of(wire) for wire in self.messages)

    def average_all(self, count: float, eta: float) -> None:
        """``z <- base + s sum_j D(q_j) / count``, summed in rank order on every worker."""
        for b, g in enumerate(self.flat.groups):
            total = torch.zeros_like(g.work)
            for wire in self._gathered[b]:
                total.add_(self._decode(b, 0, wire))
            self._base_into(b)
            g.work.add_(total, alpha=self._scale / count)
        self._gathered = []

    def state_dict(self) -> dict:
        return {"residuals": [r.clone() for r in self.residuals]}

    def load_state_dict(self, state: dict) -> None:
        for residual, saved in zip(self.residuals, state["residuals"], strict=True):
            residual.copy_(saved)

    def reset(self) -> None:
        """A new worker has lost nothing to encoding yet."""
        for residual in self.residuals:
            residual.zero_()


def make_wire(flat: FlatModel, comm: Comm, payload: str, form: str, synchronous: bool):
    """``NativeWire`` for ``payload="native"``; else a ``CodecWire`` (``auto`` form resolved)."""
    codec = make_codec(payload)
    if codec is None:
        return NativeWire(flat, comm)
    if form == "auto":
        form = "pseudo_gradient" if synchronous else "proposal"
    return CodecWire(flat, comm, codec, form)
