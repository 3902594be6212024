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
on sparse graphs: ``docs/guide/settings.md`` (measured).
"""

from __future__ import annotations

import time

import torch

from ..state.flat import FlatModel, views_of
from .codec import make_codec
from .mixing import Mixing
from .native import NativeWire


class CodecWire(Mixing):
    """A codec on the wire, with error feedback (one residual per dtype group)."""

    collective = "all_gather"  # encoded payloads cannot be summed in transit

    def __init__(self, flat: FlatModel, device: torch.device, codec, form: str):
        super().__init__()
        self.flat, self.codec, self.form = flat, codec, form
        self.encoding = f"{codec.name}/{form}"
        works = flat.works
        self.messages = [torch.zeros(codec.wire_bytes(w.numel()), dtype=torch.uint8,
                                     device=device) for w in works]
        self.residuals = [torch.zeros_like(w) for w in works]
        self._sent = [torch.empty_like(w) for w in works]  # v, then D(q_i)
        self._sent_views = [views_of(sent, g.params) for sent, g in zip(self._sent, flat.groups)]
        self._decoded: dict[tuple[int, int], torch.Tensor] = {}
        self._eta = 1.0
        self.encode_seconds = 0.0

    # ---------------------------------------------------------------- encode
    def encode(self, healthy: bool, eta: float) -> None:
        """``q = Q(v + r)``, ``r <- v + r - D(q)``; zeros when the proposal is not finite."""
        start = time.perf_counter()
        self._eta = eta
        for g, wire, sent, views, residual in zip(self.flat.groups, self.messages, self._sent,
                                                  self._sent_views, self.residuals):
            if not healthy:  # a non-finite proposal never leaves this worker; r is kept
                wire.zero_()
                sent.zero_()
                continue
            if self.form == "proposal":
                sent.copy_(g.work)
            else:  # a - x from the live parameters: exactly DiLoCo's pseudo-gradient
                for view, anchor, param in zip(views, g.anchor_views, g.params):
                    torch.sub(anchor, param, out=view)
            sent.add_(residual)  # u = v + r
            self.codec.encode_(sent, wire)
            residual.copy_(sent)
            self.codec.decode_(wire, sent)
            residual.sub_(sent)  # r = u - D(q)
        self.encode_seconds = time.perf_counter() - start

    # ------------------------------------------------------- decode and mix
    def _scale(self) -> float:
        return 1.0 if self.form == "proposal" else -self._eta

    def _base_into(self, b: int) -> None:
        """``z <- base``: the anchor (pseudo-gradient form) or zero (proposal form)."""
        g = self.flat.groups[b]
        g.work.copy_(g.anchor) if self.form == "pseudo_gradient" else g.work.zero_()

    def _own(self, b: int) -> torch.Tensor:
        return self._sent[b]

    def _value(self, b: int, slot: int, message: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self._decoded.get((b, slot))
        if out is None:
            out = self._decoded[(b, slot)] = torch.empty_like(self.flat.groups[b].work)
        self.codec.decode_(message, out)
        self.encode_seconds += time.perf_counter() - start
        return out

    def average_all(self, count: float, gathered: list[list[torch.Tensor]] | None) -> None:
        """``z <- base + s sum_j D(q_j) / count``, summed in rank order on every worker."""
        for b, g in enumerate(self.flat.groups):
            total = torch.zeros_like(g.work)
            for wire in gathered[b]:
                total.add_(self._value(b, 0, wire))
            self._base_into(b)
            g.work.add_(total, alpha=self._scale() / count)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"residuals": [r.clone() for r in self.residuals]}

    def load_state_dict(self, state: dict) -> None:
        for residual, saved in zip(self.residuals, state["residuals"], strict=True):
            residual.copy_(saved)

    def reset(self) -> None:
        """A new worker has lost nothing to encoding yet."""
        for residual in self.residuals:
            residual.zero_()


def make_wire(flat: FlatModel, device: torch.device, payload: str, form: str,
              synchronous: bool) -> NativeWire | CodecWire:
    """``NativeWire`` for ``payload="native"``; else a ``CodecWire`` (``auto`` form resolved)."""
    codec = make_codec(payload)
    if codec is None:
        return NativeWire(flat, device)
    if form == "auto":
        form = "pseudo_gradient" if synchronous else "proposal"
    return CodecWire(flat, device, codec, form)
