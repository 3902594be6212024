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
from .fabric import Comm, WorkerGroups
from .schedule.graphs import Topology
from .state.flat import FlatModel

RESUME_KEYS = ("topology", "seed", "payload", "payload_form", "fragments", "parameters")
# Settings whose saved state another value cannot use; every other setting may change at a
# resume and the new value is used (and logged): the outer lr and momentum, local_steps, ...
KEPT_AT_RESUME = ("outer_optimizer",)


def agreement(config: GASLoCConfig, topology: Topology, flat: FlatModel) -> dict[str, Any]:
    """Every setting, plus what follows from them: world size, first graphs, parameter shapes."""
    settings = config.to_dict()
    # H_i may differ per rank on purpose, but the list (or rule) must be the same.
    settings["local_steps (all ranks)"] = settings.pop("local_steps")
    settings["world_size"] = topology.world_size
    settings["graphs of the first rounds"] = topology.fingerprint()
    settings["parameters (dtype, numel)"] = flat.shapes()
    return settings


def check_ranks_agree(values: dict[str, Any], comm: Comm | WorkerGroups,
                      what: str = "GASLoC settings") -> None:
    """Gather ``values`` from every rank (of the worker's process group, or with worker groups,
    of the whole run) and raise one error naming each one that differs."""
    gathered = comm.all_gather_json(values)
    problems = []
    for key in values:
        seen = [rank_values.get(key) for rank_values in gathered]  # type: ignore[union-attr]
        if any(value != seen[0] for value in seen[1:]):
            per_rank = ", ".join(f"rank {rank}: {value!r}" for rank, value in enumerate(seen))
            problems.append(f"  {key} differs ({per_rank})")
    if problems:
        raise RunMismatchError(
            f"{what} differ across ranks; launch every rank with the same flags, environment "
            "and seed:\n" + "\n".join(problems)
        )


def checkpoint_identity(config: GASLoCConfig, flat: FlatModel, rank: int,
                        world_size: int) -> dict[str, Any]:
    """What a checkpoint records of its run, to be compared at resume."""
    return {"topology": config.topology, "seed": config.seed, "payload": config.payload,
            "payload_form": config.payload_form, "fragments": config.fragments,
            "parameters": [list(p) for p in flat.shapes()], "rank": rank,
            "world_size": world_size}


def changed_at_resume(saved: dict[str, Any], ours: dict[str, Any], where: str,
                      in_flight: bool) -> dict[str, tuple[Any, Any]]:
    """The settings (``config.to_dict()``) that differ from the checkpoint's: ``{name: (saved,
    ours)}``, to be used and said; refused when the saved state cannot serve the new value (the
    outer optimizer's kind, ``outer_delay`` with a round in flight)."""
    changed = {name: (saved.get(name), value) for name, value in ours.items()
               if name in saved and _plain(saved[name]) != _plain(value)}
    refused = [name for name in changed
               if name in KEPT_AT_RESUME or (name == "outer_delay" and in_flight)]
    if refused:
        name = refused[0]
        raise RunMismatchError(
            f"{where} was saved with {name}={changed[name][0]!r} and this run has {name}="
            f"{changed[name][1]!r}: the saved state cannot serve the new value. Resume with "
            f"{name}={changed[name][0]!r}, or start afresh from the checkpoint's model "
            "(--model_name_or_path CHECKPOINT).")
    return changed


def _plain(value: Any) -> Any:
    """Settings compared as JSON would see them (tuples are lists)."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


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
