"""Mixing what arrived into this worker's proposal ``z``, in two steps: measure, then mix.

Every wire turns a received message into an fp32 value ``m_j`` (a copy, or a
decoded codec payload) and knows its own ``m_i`` (``z``, or what it sent
``D(q_i)``), a scale ``s`` and a base. A round measures first (each peer's
squared distance, or squared norm), so that the caller can leave out messages
that are not finite (``round/health.py`` decides), then mixes the kept ones:

- ``differences`` / ``mix``:  ``z <- z + s sum_j w_j (m_j - m_i)``;
- ``values`` / ``average``:   ``z <- base + s sum_j w_j m_j / sum_j w_j`` (for a worker whose
  own ``z`` is not finite).

What ``measure`` computed is kept until the mix, in the wire's scratch buffers.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..state.flat import FlatModel

Received = Callable[[int], list[torch.Tensor]]  # peer -> its messages, one per dtype group


class Mixing:
    """The measure-then-mix steps shared by every wire; subclasses say what a message means."""

    flat: FlatModel

    def __init__(self) -> None:
        self._kept: dict[tuple[int, int], torch.Tensor] = {}  # (buffer, peer) -> d_j or m_j

    # ------------------------------------------------------ what subclasses define
    def _value(self, b: int, slot: int, message: torch.Tensor) -> torch.Tensor:
        """``m_j`` of buffer ``b`` in fp32 (in a scratch buffer of ``slot`` if it must be made)."""
        raise NotImplementedError

    def _own(self, b: int) -> torch.Tensor:
        """``m_i``: what this worker's message of buffer ``b`` means."""
        raise NotImplementedError

    def _scale(self) -> float:
        return 1.0

    def _base_into(self, b: int) -> None:
        """``z <- base`` for buffer ``b``."""
        raise NotImplementedError

    # ---------------------------------------------------------------- the steps
    def differences(self, received: Received, peers: list[int]) -> dict[int, float]:
        """Keep ``d_j = m_j - m_i``; return each peer's ``s^2 ||d_j||^2`` (``inf``/``nan``: not
        finite)."""
        distance = dict.fromkeys(peers, 0.0)
        self._kept = {}
        for b in range(len(self.flat.groups)):
            for slot, peer in enumerate(peers):
                d = self._value(b, slot, received(peer)[b]).sub_(self._own(b))
                distance[peer] += float(torch.dot(d, d)) * self._scale() ** 2
                self._kept[(b, peer)] = d
        return distance

    def mix(self, weights: dict[int, float]) -> None:
        """``z <- z + s sum_j w_j d_j`` over the peers in ``weights`` (measured before)."""
        for b, g in enumerate(self.flat.groups):
            for peer, weight in weights.items():
                g.work.add_(self._kept[(b, peer)], alpha=self._scale() * weight)
        self._kept = {}

    def values(self, received: Received, peers: list[int]) -> dict[int, float]:
        """Keep ``m_j``; return each peer's ``||m_j||^2`` (``inf``/``nan``: not finite)."""
        norms = dict.fromkeys(peers, 0.0)
        self._kept = {}
        for slot, peer in enumerate(peers):
            for b in range(len(self.flat.groups)):
                value = self._value(b, slot, received(peer)[b])
                norms[peer] += float(torch.dot(value, value))
                self._kept[(b, peer)] = value
        return norms

    def average(self, weights: dict[int, float]) -> None:
        """``z <- base + s sum_j w_j m_j / sum_j w_j`` over the peers in ``weights``."""
        total = sum(weights.values())
        for b, g in enumerate(self.flat.groups):
            self._base_into(b)
            for peer, weight in weights.items():
                g.work.add_(self._kept[(b, peer)], alpha=self._scale() * weight / total)
        self._kept = {}
