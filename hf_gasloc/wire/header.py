"""The small message that rides ahead of every gossip message: who sent what, and the news."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Header:
    """A round's header: its index, the sender's health, the ranks it knows lost, and its
    adaptive ``H_i`` table (empty for a fixed ``H``)."""

    round_index: int
    healthy: bool
    lost: list[bool]
    table: torch.Tensor | None = None

    def to_tensor(self) -> torch.Tensor:
        values = [float(self.round_index), float(self.healthy), *map(float, self.lost)]
        header = torch.tensor(values, dtype=torch.float64)
        return header if self.table is None else torch.cat([header, self.table])

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, world_size: int) -> "Header":
        lost = [bool(f) for f in tensor[2 : 2 + world_size].tolist()]
        return cls(int(tensor[0]), bool(tensor[1]), lost, tensor[2 + world_size :])
