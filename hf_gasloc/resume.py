"""Resuming GASLoC workers from a checkpoint, on the same or on another number of workers.

Collective: every rank checks its part (the manifest, its own file), the ranks
share what they found, and either all resume or all raise one error naming
every bad file. On the same number of workers each rank takes back its own
state, bit for bit. On another number (an elastic restart after a lost worker,
or more workers joining), the ranks that have a saved state keep it, the new
ones start from the consensus (the checkpoint's model, which Trainer loads on
every rank) with the average of the saved outer optimizer states; every rank
starts a fresh round at the saved round number, and the graphs follow the new
world size. Work since the checkpoint is lost either way.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from .checkpoint import check_manifest, load_own_file, read_manifest, restore_own_state
from .engine import GASLoC
from .errors import CheckpointError
from .inner import innermost_optimizer
from .state import restore_engine_state

logger = logging.getLogger(__name__)


def resume(checkpoint_dir: str | os.PathLike, engine: GASLoC, model: torch.nn.Module,
           optimizer: torch.optim.Optimizer, step: int | None = None) -> str:
    """Restore this rank's GASLoC worker from ``checkpoint_dir`` (collective); says how."""
    manifest, own, template, problems = None, None, None, []
    try:
        manifest = read_manifest(checkpoint_dir)
        check_manifest(manifest, checkpoint_dir, engine, step)
        if engine.rank < manifest["world_size"]:
            own = load_own_file(checkpoint_dir, engine.rank, manifest)
        else:  # a new worker: rank 0's file gives the outer optimizer state's layout
            template = load_own_file(checkpoint_dir, 0, manifest)
    except CheckpointError as error:
        problems.append(str(error))
    everyone = sorted({p for found in engine.comm.all_gather_object(problems) for p in found})
    if everyone:
        raise CheckpointError(f"cannot resume GASLoC from {checkpoint_dir}:\n  "
                              + "\n  ".join(everyone))
    engine.run_id = manifest["run_id"]
    if manifest["world_size"] == engine.world_size:
        restore_own_state(own, engine, model, optimizer)
        return "its own state"
    return _resize(engine, model, optimizer, manifest, own, template)


@torch.no_grad()
def _resize(engine: GASLoC, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            manifest: dict[str, Any], own: dict[str, Any] | None,
            template: dict[str, Any] | None) -> str:
    saved = own if own is not None else template
    restore_engine_state(engine, saved["gasloc"], resized=True)
    if own is not None:
        model.load_state_dict(own["model"])
        innermost_optimizer(optimizer).load_state_dict(own["optimizer"])
    else:  # the consensus that Trainer loaded is this worker's parameters and anchor
        engine.flat.load_live()
        engine.flat.set_anchor_from_work()
        engine.health.load_state_dict({"in_a_row": 0, "recoveries": 0, "last_bad": -2})
        engine.wire.reset()
    _average_outer_state(engine, own is not None)
    engine.round, engine.steps_in_round = manifest["round"], 0
    engine.local_steps_policy.plan(
        list(engine.topology.graph(engine.round).peers[engine.rank]))
    logger.warning("GASLoC rank %d: resuming %d workers from a checkpoint of %d at round %d.",
                   engine.rank, engine.world_size, manifest["world_size"], engine.round)
    return ("its own state (resized from %d workers)" % manifest["world_size"] if own is not None
            else "the consensus, with the average outer state (a new worker)")


def _average_outer_state(engine: GASLoC, has_own: bool) -> None:
    """New workers take the mean of the saved workers' outer optimizer state tensors."""
    tensors = [value for optimizer in engine.outer_optimizers for state in optimizer.state.values()
               for value in state.values() if torch.is_tensor(value) and value.is_floating_point()]
    sums = [value.clone() if has_own else torch.zeros_like(value) for value in tensors]
    count = torch.tensor([float(has_own)], dtype=torch.float64)
    engine.comm.all_reduce_sum_(sums + [count])
    if not has_own:
        for value, total in zip(tensors, sums):
            value.copy_(total / count.item())
