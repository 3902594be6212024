"""Check, before any training step, that every rank was launched with the same settings."""

from __future__ import annotations

from typing import Any

from .comm import Comm
from .config import GASLoCConfig
from .flat import FlatModel
from .graphs import Topology


def settings_to_agree_on(config: GASLoCConfig, topology: Topology, flat: FlatModel) -> dict[str, Any]:
    """Every setting, plus what follows from them: world size, first graphs, parameter shapes."""
    settings = config.to_dict()
    # H_i may differ per rank on purpose, but the list (or rule) must be the same.
    settings["local_steps (all ranks)"] = settings.pop("local_steps")
    settings["world_size"] = topology.world_size
    settings["graphs of the first rounds"] = topology.fingerprint()
    settings["parameters (dtype, numel)"] = flat.shapes()
    return settings


def check_ranks_agree(values: dict[str, Any], comm: Comm) -> None:
    """Gather ``values`` from every rank and raise one error naming each setting that differs."""
    gathered = comm.all_gather_object(values)
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
