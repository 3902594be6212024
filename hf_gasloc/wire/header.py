"""The small message that rides ahead of every gossip message: who sent what, and the news."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Header:
    """A round's header: its index, the sender's health, the layout of the messages that follow
    (their total bytes and a fingerprint of their dtypes, sizes and encoding), the ranks the
    sender knows lost, and its adaptive ``H_i`` table (empty for a fixed ``H``)."""

    round_index: int
    healthy: bool
    layout: tuple[float, float]
    lost: list[bool]
    table: torch.Tensor | None = None

    def to_tensor(self) -> torch.Tensor:
        values = [float(self.round_index), float(self.healthy), *self.layout,
                  *map(float, self.lost)]
        header = torch.tensor(values, dtype=torch.float64)
        return header if self.table is None else torch.cat([header, self.table])

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, world_size: int) -> "Header":
        values = tensor.tolist()
        return cls(int(values[0]), bool(values[1]), (values[2], values[3]),
                   [bool(f) for f in values[4 : 4 + world_size]], tensor[4 + world_size :])

    @staticmethod
    def malformed(tensor: torch.Tensor, world_size: int) -> str | None:
        """Why ``tensor`` is not a header a worker could have sent (``None``: it could be)."""
        values = tensor.tolist()
        flags = [values[1], *values[4 : 4 + world_size]]
        if any(flag not in (0.0, 1.0) for flag in flags):
            return "its header's flags are not 0 or 1"
        if not all(map(math.isfinite, values[:4])) or not (
                values[0] == int(values[0]) >= 0 and values[2] == int(values[2]) >= 0):
            return "its header's round or size is not a whole number"
        return _malformed_table(values[4 + world_size :], world_size)


def _malformed_table(table: list[float], world_size: int) -> str | None:
    """The adaptive ``H_i`` table (``schedule/adaptive.py``): link and step times (NaN: not
    measured yet, else finite and >= 0), then the rounds they were measured in (-1: never)."""
    if not table:
        return None
    if len(table) != 3 * world_size:
        return f"its header's table has {len(table)} values, not {3 * world_size}"
    times, stamps = table[: 2 * world_size], table[2 * world_size :]
    if any(t == t and not (math.isfinite(t) and t >= 0) for t in times):
        return "its header's link or step times are negative or infinite"
    if not all(math.isfinite(s) and s == int(s) and s >= -1 for s in stamps):  # -1: never
        return "its header's table stamps are not whole numbers"
    return None


def layout_of(messages: list[torch.Tensor], encoding: str) -> tuple[float, float]:
    """What a header announces of ``messages``: their total bytes and a 52-bit fingerprint of
    their dtypes, sizes and ``encoding`` (exact in float64)."""
    shapes = repr([(str(m.dtype), m.numel()) for m in messages] + [encoding])
    fingerprint = int(hashlib.sha256(shapes.encode()).hexdigest()[:13], 16)
    return float(sum(m.numel() * m.element_size() for m in messages)), float(fingerprint)
