"""Streamed rounds: the parameters split into ``fragments`` of whole layers, in order.

A *layer* is every parameter whose name shares the prefix up to its first
numeric part (``model.layers.3.*``); parameters without one (embeddings, final
norm, head) group by the module that owns them. Layers are cut into ``F`` contiguous
fragments of about equal size, each synchronised at its own offset within the
round (``start_steps``), so the largest message is about ``1/F`` of the model
and the transfers spread over the round, as in Streaming DiLoCo.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from ..state.flat import trainable_parameters


def _layers(model: torch.nn.Module | Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
    if not isinstance(model, torch.nn.Module):
        return [[p] for p in trainable_parameters(model)]
    keep = {id(p) for p in trainable_parameters(model)}
    layers: dict[str, list[torch.Tensor]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) not in keep or id(p) in seen:
            continue
        seen.add(id(p))
        parts = name.split(".")
        cut = next((k + 1 for k, part in enumerate(parts) if part.isdigit()),
                   max(1, len(parts) - 1))  # else the module that owns it
        layers.setdefault(".".join(parts[:cut]), []).append(p)
    return list(layers.values())


def split_fragments(model: torch.nn.Module | Iterable[torch.Tensor],
                    count: int) -> list[list[torch.Tensor]]:
    """``count`` contiguous groups of whole layers, of about equal numbers of parameters."""
    layers = _layers(model)
    if count > len(layers):
        raise ValueError(f"fragments={count} but the model has {len(layers)} layers to split "
                         f"(--gasloc_fragments): use at most {len(layers)}.")
    sizes = [sum(p.numel() for p in layer) for layer in layers]
    total, fragments, current, done = sum(sizes), [], [], 0
    for k, (layer, size) in enumerate(zip(layers, sizes)):
        current += layer
        done += size
        left_layers, left_fragments = len(layers) - k - 1, count - len(fragments) - 1
        if left_fragments and (done >= total * (len(fragments) + 1) / count
                               or left_layers == left_fragments):
            fragments.append(current)
            current = []
    fragments.append(current)
    return fragments


def start_steps(round_length: int, count: int) -> list[int]:
    """The inner step of the round (1-based) at which each fragment's exchange starts;
    the last one ends the round."""
    return [max(1, math.ceil(round_length * (f + 1) / count)) for f in range(count)]
