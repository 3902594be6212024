"""Per-rank GASLoC checkpoints: each worker's own parameters, inner optimizer and engine state.

Trainer checkpoints hold rank 0's model and optimizer only; a GASLoC worker's
state differs per rank, so each rank also writes ``gasloc/rank<r>.pt`` into the
checkpoint folder. The file is written to a temporary name and renamed, so a
crash mid-write never leaves a truncated file under the final name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .engine import GASLoC
from .inner import innermost_optimizer

FOLDER = "gasloc"


def rank_state_path(checkpoint_dir: str | os.PathLike, rank: int) -> Path:
    return Path(checkpoint_dir) / FOLDER / f"rank{rank}.pt"


def save_rank_state(
    checkpoint_dir: str | os.PathLike,
    engine: GASLoC,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
) -> Path:
    """Write this rank's model, inner optimizer and GASLoC state; return the file."""
    path = rank_state_path(checkpoint_dir, engine.rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": innermost_optimizer(optimizer).state_dict(),
        "gasloc": engine.state_dict(),
    }
    partial = path.with_suffix(".pt.partial")
    torch.save(state, partial)
    os.replace(partial, path)
    return path


def load_rank_state(
    checkpoint_dir: str | os.PathLike,
    engine: GASLoC,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
) -> None:
    """Restore what ``save_rank_state`` wrote for this rank."""
    path = rank_state_path(checkpoint_dir, engine.rank)
    if not path.exists():
        raise FileNotFoundError(
            f"no GASLoC state for rank {engine.rank} in {checkpoint_dir} (expected {path}). "
            "Resume from a checkpoint written by a GASLoC run with the same number of workers."
        )
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    engine.load_state_dict(state["gasloc"])
    model.load_state_dict(state["model"])
    innermost_optimizer(optimizer).load_state_dict(state["optimizer"])
