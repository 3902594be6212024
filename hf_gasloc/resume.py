"""Saving a GASLoC worker into a checkpoint, and resuming it, on the same or another number
of workers.

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
from pathlib import Path
from typing import Any

import torch

from .engine import GASLoC
from .errors import CheckpointError, RunMismatchError
from .identity import check_resumable
from .round.inner import innermost_optimizer
from .round.outer import average_outer_states
from .state.checkpoint import (load_rank_state, manifest_path, read_manifest, save_rank_state,
                               write_manifest)

logger = logging.getLogger(__name__)


def save(checkpoint_dir: str | os.PathLike, engine: GASLoC, model: torch.nn.Module,
         optimizer: torch.optim.Optimizer, step: int) -> Path:
    """Every worker writes its model, inner optimizer and GASLoC state; then, once all files are
    written, worker 0 writes the manifest that names them (collective). A worker that cannot
    write (a full disk) makes every process raise one error naming it; the checkpoint then
    stays incomplete and the previous complete one is what a restart resumes from. The
    processes of a worker of several hold the same state: the first one writes it."""
    groups = engine.groups
    if groups is None:
        return _save_worker(checkpoint_dir, engine, model, optimizer, step)
    failure = None
    if groups.position == 0:
        try:
            _save_worker(checkpoint_dir, engine, model, optimizer, step)
        except CheckpointError as error:
            failure = str(error)
    else:  # as the first process's state_dict does: the worker's processes settle alike
        engine.rounds.scheduler.settle_all()
    failure = groups.first_position(failure)
    if failure:
        raise CheckpointError(failure)
    return manifest_path(checkpoint_dir)


def _save_worker(checkpoint_dir: str | os.PathLike, engine: GASLoC, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, step: int) -> Path:
    try:
        written, failure = save_rank_state(checkpoint_dir, engine.rank, {
            "run_id": engine.run_id, "step": step, "model": model.state_dict(),
            "optimizer": innermost_optimizer(optimizer).state_dict(),
            "gasloc": engine.state_dict()}), None
    except CheckpointError as error:
        written, failure = None, f"rank {engine.rank}: {error}"
    everyone = engine.comm.all_gather_json({"written": written, "failure": failure})
    failures = [found["failure"] for found in everyone if found["failure"]]
    if failures:
        raise CheckpointError(f"{checkpoint_dir} could not be saved completely:\n  "
                              + "\n  ".join(failures))
    failure = None
    if engine.rank == 0:
        identity = {k: v for k, v in engine.identity().items() if k != "rank"}
        try:
            write_manifest(checkpoint_dir, {
                "run_id": engine.run_id, "step": step, "round": engine.round, **identity,
                "files": {str(rank): found["written"] for rank, found in enumerate(everyone)}})
        except CheckpointError as error:
            failure = f"rank 0: {error}"
    failure = engine.comm.all_gather_json(failure)[0]  # every rank stops, or none
    if failure:
        raise CheckpointError(f"{checkpoint_dir} could not be saved completely:\n  {failure}")
    return manifest_path(checkpoint_dir)


def resume(checkpoint_dir: str | os.PathLike, engine: GASLoC, model: torch.nn.Module,
           optimizer: torch.optim.Optimizer, step: int | None = None) -> str:
    """Restore this rank's GASLoC worker from ``checkpoint_dir`` (collective); says how. A
    checkpoint saved without GASLoC (plain DDP or one process) holds no GASLoC state: the
    workers start from its model (which the Trainer loaded) with a fresh outer state."""
    seen = engine.comm.all_gather_json([Path(checkpoint_dir).is_dir(),
                                        (Path(checkpoint_dir) / "gasloc").exists()])
    missing = [rank for rank, (exists, _) in enumerate(seen) if not exists]
    if missing:
        raise CheckpointError(f"{checkpoint_dir} does not exist (on ranks {missing}): check "
                              "the path.")
    plain = [not has_gasloc for _, has_gasloc in seen]
    if any(plain) != all(plain):
        raise CheckpointError(f"{checkpoint_dir}/gasloc exists on some ranks and not on others "
                              f"(ranks without it: {[r for r, p in enumerate(plain) if p]}): "
                              "every rank must see the same checkpoint folder.")
    if all(plain):
        if engine.speaks:
            logger.warning("GASLoC: %s holds no GASLoC state (it was saved without GASLoC): the "
                           "workers start from its model, with a fresh outer state at round 0.",
                           checkpoint_dir)
        return "the model of a checkpoint saved without GASLoC, and a fresh outer state"
    manifest, own, template, problems = None, None, None, []
    try:
        manifest = read_manifest(checkpoint_dir)
        if step is not None and manifest["step"] != step:
            raise CheckpointError(
                f"{checkpoint_dir}/gasloc/manifest.json is of step {manifest['step']} but the "
                f"Trainer resumes at step {step}: the checkpoint's files come from different "
                "saves.")
        check_resumable(manifest, engine.identity(), f"{checkpoint_dir}/gasloc/manifest.json",
                        resized=True)
        if engine.rank < manifest["world_size"]:
            own = load_rank_state(checkpoint_dir, engine.rank, manifest)
        else:  # a new worker: rank 0's file gives the outer optimizer state's layout
            template = load_rank_state(checkpoint_dir, 0, manifest)
    except (CheckpointError, RunMismatchError) as error:
        problems.append(str(error))
    everyone = sorted({p for found in engine.comm.all_gather_json(problems) for p in found})
    if everyone:
        raise CheckpointError(f"cannot resume GASLoC from {checkpoint_dir}:\n  "
                              + "\n  ".join(everyone))
    engine.run_id = manifest["run_id"]
    if manifest["world_size"] == engine.world_size:
        _restore_own(own, engine, model, optimizer, resized=False)
        how = "its own state"
    else:
        how = _resize(engine, model, optimizer, manifest, own, template)
    if engine.changed_at_resume and engine.speaks:
        logger.warning("GASLoC resumes from %s with settings changed since it was saved, and uses "
                       "the new ones: %s.", checkpoint_dir, ", ".join(
                           f"{name} {saved!r} -> {used!r}"
                           for name, (saved, used) in engine.changed_at_resume.items()))
    return how


def _restore_own(own: dict[str, Any], engine: GASLoC, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, resized: bool) -> None:
    engine.load_state_dict(own["gasloc"], resized=resized)
    model.load_state_dict(own["model"])
    innermost_optimizer(optimizer).load_state_dict(own["optimizer"])


@torch.no_grad()
def _resize(engine: GASLoC, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            manifest: dict[str, Any], own: dict[str, Any] | None,
            template: dict[str, Any] | None) -> str:
    if own is not None:
        _restore_own(own, engine, model, optimizer, resized=True)
    else:  # the consensus that Trainer loaded is this worker's parameters and anchor
        engine.load_state_dict(template["gasloc"], resized=True)
        engine.start_as_new_worker()
    average_outer_states([f.outer for f in engine.fragments], engine.comm, own is not None)
    engine.start_round(manifest["round"])
    logger.warning("GASLoC rank %d: resuming %d workers from a checkpoint of %d at round %d.",
                   engine.rank, engine.world_size, manifest["world_size"], engine.round)
    return ("its own state (resized from %d workers)" % manifest["world_size"] if own is not None
            else "the consensus, with the average outer state (a new worker)")
