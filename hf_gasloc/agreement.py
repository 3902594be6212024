"""Check, before any training step, that every rank was launched with the same settings."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def check_ranks_agree(values: dict[str, Any], group: dist.ProcessGroup | None = None) -> None:
    """Gather ``values`` from every rank and raise one error naming each setting that differs."""
    gathered: list[dict[str, Any] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, values, group=group)
    problems = []
    for key in values:
        seen = [rank_values.get(key) for rank_values in gathered]  # type: ignore[union-attr]
        if any(value != seen[0] for value in seen[1:]):
            per_rank = ", ".join(f"rank {rank}: {value!r}" for rank, value in enumerate(seen))
            problems.append(f"  {key} differs ({per_rank})")
    if problems:
        raise ValueError(
            "GASLoC settings differ across ranks; launch every rank with the same flags, "
            "environment and seed:\n" + "\n".join(problems)
        )
