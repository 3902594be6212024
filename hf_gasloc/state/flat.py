"""The trainable parameters as flat fp32 buffers: one anchor and one work buffer per dtype group.

All outer math is fp32 on flat buffers, one per (dtype, device) group of
parameters, so that each stage is a handful of large vectorised ops. Only two
fp32 model copies are kept: the anchor ``a`` and a work buffer that holds ``x``,
then the proposal ``z``, then the mixed ``z_hat``, then the outer gradient ``G``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch


def views_of(flat: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    views, offset = [], 0
    for p in params:
        views.append(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return views


@dataclass
class FlatGroup:
    """Parameters of one dtype and device, with their fp32 anchor and work buffer."""

    params: list[torch.Tensor]
    anchor: torch.Tensor
    work: torch.Tensor

    def __post_init__(self) -> None:
        self.anchor_views = views_of(self.anchor, self.params)
        self.work_views = views_of(self.work, self.params)

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype


class FlatModel:
    """The model's trainable parameters, grouped by (dtype, device), as flat fp32 buffers."""

    def __init__(self, model: torch.nn.Module | Iterable[torch.Tensor], anchor_on_cpu: bool):
        by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for p in trainable_parameters(model):
            by_kind.setdefault((p.dtype, p.device), []).append(p)
        self.groups = []
        for (_, device), members in by_kind.items():
            numel = sum(p.numel() for p in members)
            where = torch.device("cpu") if anchor_on_cpu else device
            anchor = torch.empty(numel, dtype=torch.float32, device=where)
            self.groups.append(FlatGroup(members, anchor, torch.empty_like(anchor)))

    @classmethod
    def of_groups(cls, groups: list[FlatGroup]) -> "FlatModel":
        """The union of several fragments' groups, as one model."""
        flat = cls.__new__(cls)
        flat.groups = groups
        return flat

    @property
    def anchors(self) -> list[torch.Tensor]:
        return [g.anchor for g in self.groups]

    @property
    def works(self) -> list[torch.Tensor]:
        return [g.work for g in self.groups]

    @property
    def device(self) -> torch.device:
        """Where the parameters live (of the first group)."""
        return self.groups[0].params[0].device

    def shapes(self) -> list[tuple[str, int]]:
        """(dtype, numel) of every group: what all ranks must agree on."""
        return [(str(g.dtype), g.anchor.numel()) for g in self.groups]

    def _views(self, buffers: list[torch.Tensor] | None) -> list[list[torch.Tensor]]:
        """Per group, the parameter-shaped views of ``buffers`` (the work buffers if None)."""
        if buffers is None:
            return [g.work_views for g in self.groups]
        return [views_of(b, g.params) for g, b in zip(self.groups, buffers, strict=True)]

    @torch.no_grad()
    def load_live(self, buffers: list[torch.Tensor] | None = None) -> None:
        """``work <- x`` (the live parameters, in fp32), or into ``buffers`` (one per group)."""
        for g, views in zip(self.groups, self._views(buffers)):
            torch._foreach_copy_(views, g.params)

    @torch.no_grad()
    def store_work(self, buffers: list[torch.Tensor] | None = None) -> None:
        """``x <- work`` (rounded to the parameters' dtype), or from ``buffers``."""
        for g, views in zip(self.groups, self._views(buffers)):
            torch._foreach_copy_(g.params, views)

    @torch.no_grad()
    def store_anchor(self) -> None:
        """``x <- a`` (rounded to the parameters' dtype)."""
        for g in self.groups:
            torch._foreach_copy_(g.params, g.anchor_views)

    @torch.no_grad()
    def set_anchor_from_work(self) -> None:
        for g in self.groups:
            g.anchor.copy_(g.work)

    def backup_live(self) -> list[list[torch.Tensor]]:
        """A copy of the live parameters, for ``restore_live``."""
        return [[p.detach().clone() for p in g.params] for g in self.groups]

    @torch.no_grad()
    def restore_live(self, backup: list[list[torch.Tensor]]) -> None:
        for g, own in zip(self.groups, backup, strict=True):
            torch._foreach_copy_(g.params, own)


def trainable_parameters(model: torch.nn.Module | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    params = model.parameters() if isinstance(model, torch.nn.Module) else model
    unique: dict[int, torch.Tensor] = {}
    for p in params:
        if p.requires_grad:
            unique.setdefault(id(p), p)
    if not unique:
        raise ValueError("GASLoC found no trainable parameters (requires_grad=True) to average.")
    return list(unique.values())
