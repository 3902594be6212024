"""What makes workers one run, checked in one place: across ranks at start, against a checkpoint
at resume.

- **At start** every rank must hold the same settings, world size, first
  graphs and parameter shapes (``agreement``), or training stops before any
  step with one error naming every value that differs, per rank.
- **At resume** a checkpoint must come from a run with the same ``RESUME_KEYS``
  (``checkpoint_identity``): a different graph family, seed, payload, fragment
  split or model cannot continue it. The rank and world size must match too,
  unless the run resumes on another number of workers (``resume.py``).
"""

from __future__ import annotations

from typing import Any

from .config import GASLoCConfig
from .errors import RunMismatchError
from .fabric import Comm
from .schedule.graphs import Topology
from .state.flat import FlatModel

RESUME_KEYS = ("topology", "seed", "payload", "fragments", "parameters")


def agreement(config: GASLoCConfig, topology: Topology, flat: FlatModel) -> dict[str, Any]:
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
    gathered = comm.all_gather_json(values)
    problems = []
    for key in values:
        seen = [rank_values.get(key) for rank_values in gathered]  # type: ignore[union-attr]
        if any(value != seen[0] for value in seen[1:]):
            per_rank = ", ".join(f"rank {rank}: {value!r}" for rank, value in enumerate(seen))
            problems.append(f"  {key} differs ({per_rank})")
    if problems:
        raise RunMismatchError(
            "GASLoC settings differ across ranks; launch every rank with the same flags, "
            "environment and seed:\n" + "\n".join(problems)
        )


def checkpoint_identity(config: GASLoCConfig, flat: FlatModel, rank: int,
                        world_size: int) -> dict[str, Any]:
    """What a checkpoint records of its run, to be compared at resume."""
    return {"topology": config.topology, "seed": config.seed, "payload": config.payload,
            "fragments": config.fragments, "parameters": [list(p) for p in flat.shapes()],
            "rank": rank, "world_size": world_size}


def check_resumable(saved: dict[str, Any], ours: dict[str, Any], where: str,
                    resized: bool) -> None:
    """Refuse a checkpoint (``where``) of another run; ``resized``: rank and size may differ."""
    keys = RESUME_KEYS if resized else (*RESUME_KEYS, "rank", "world_size")
    for key in keys:
        if key in saved and saved[key] != ours[key]:
            raise RunMismatchError(
                f"{where} was saved with {key}={saved[key]!r} but this run has {key}="
                f"{ours[key]!r}: it is a checkpoint of another run. Resume with that run's "
                "settings, or start afresh.")
