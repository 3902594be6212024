"""Per-rank GASLoC checkpoints: each worker's own parameters, inner optimizer and engine state.

Trainer checkpoints hold rank 0's model and optimizer only; a GASLoC worker's
state differs per rank, so each rank also writes ``gasloc/rank<r>.pt`` into the
checkpoint folder (to a temporary name, then renamed: a crash mid-write never
leaves a truncated file under the final name; a failed write, such as a full
disk, leaves no partial file and is an error naming the path). Once every
rank's file is written, rank 0 writes ``gasloc/manifest.json``, which names
every rank's file with its size and SHA-256: a checkpoint without it is
incomplete, one whose files do not match it is damaged, and resuming picks the
newest checkpoint that verifies. Every file carries the run's id and the step,
so a file from another run or another step is an error that names it. What the
files hold is their callers' (``resume.py``); this module writes, checks and
reads them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

logger = logging.getLogger(__name__)

FOLDER = "gasloc"
MANIFEST = "manifest.json"


def rank_state_path(checkpoint_dir: str | os.PathLike, rank: int) -> Path:
    return Path(checkpoint_dir) / FOLDER / f"rank{rank}.pt"


def manifest_path(checkpoint_dir: str | os.PathLike) -> Path:
    return Path(checkpoint_dir) / FOLDER / MANIFEST


def save_rank_state(checkpoint_dir: str | os.PathLike, rank: int,
                    state: dict[str, Any]) -> dict[str, Any]:
    """Write this rank's state (with its ``run_id`` and ``step``) atomically; returns what the
    manifest records of the file: its name, size and SHA-256."""
    path = rank_state_path(checkpoint_dir, rank)
    partial = path.with_suffix(".pt.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, partial)
        os.replace(partial, path)
    except (OSError, RuntimeError) as error:  # torch reports a full disk as a RuntimeError
        partial.unlink(missing_ok=True)
        raise CheckpointError(f"could not write {path}: {str(error).splitlines()[0][:200]} (is "
                              "the disk full?); nothing partial was left, and the previous "
                              "complete checkpoint is kept.") from None
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": file_digest(path)}


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(checkpoint_dir: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Mark the checkpoint complete (rank 0, after every rank wrote its file)."""
    path = manifest_path(checkpoint_dir)
    partial = path.with_suffix(".json.partial")
    try:
        partial.write_text(json.dumps(manifest, indent=1))
        os.replace(partial, path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise CheckpointError(f"could not write {path}: {error} (is the disk full?); the "
                              "checkpoint stays incomplete and is not resumed from.") from None
    return path


def verify(checkpoint_dir: str | os.PathLike, manifest: dict[str, Any]) -> list[str]:
    """What is wrong with the rank files the manifest lists (sizes, checksums): one line each."""
    problems = []
    for rank, entry in sorted(manifest.get("files", {}).items(), key=lambda e: int(e[0])):
        path = Path(checkpoint_dir) / FOLDER / entry["file"]
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != entry["bytes"] or file_digest(path) != entry["sha256"]:
            problems.append(f"{path} is not the file that was saved (its size or SHA-256 "
                            "differs from the manifest's)")
    return problems


def read_manifest(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    path = manifest_path(checkpoint_dir)
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: {checkpoint_dir} was not completely written by a GASLoC run "
            "(a run that stopped while saving, or a checkpoint of a run without GASLoC). Resume "
            "from an earlier checkpoint; run_clm.py picks the newest complete one by itself.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); resume from an earlier "
                              "checkpoint.") from None


def load_rank_state(checkpoint_dir: str | os.PathLike, rank: int,
                  manifest: dict[str, Any]) -> dict[str, Any]:
    """Read ``gasloc/rank<rank>.pt`` and check that it belongs to the manifest's run and step,
    with the size and SHA-256 the manifest lists."""
    path = rank_state_path(checkpoint_dir, rank)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint lacks rank {rank}'s own state. "
                              "Resume from an earlier checkpoint.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same clear error
        raise CheckpointError(f"{path} is truncated or corrupt ({type(error).__name__}: "
                              f"{str(error)[:120]}); resume from an earlier checkpoint.") from None
    if not isinstance(state, dict) or {"run_id", "step", "gasloc"} - set(state):
        raise CheckpointError(f"{path} is not a GASLoC rank state; resume from an earlier "
                              "checkpoint.")
    if state["run_id"] != manifest["run_id"] or state["step"] != manifest["step"]:
        raise CheckpointError(
            f"{path} belongs to another run or step (run {state['run_id']}, step {state['step']}) "
            f"than {manifest_path(checkpoint_dir)} (run {manifest['run_id']}, step "
            f"{manifest['step']}); resume from a checkpoint whose files were saved together.")
    entry = manifest.get("files", {}).get(str(rank))  # last: the errors above say more
    if entry is None:
        raise CheckpointError(f"{manifest_path(checkpoint_dir)} lists no file for rank {rank}: "
                              f"{path} cannot be verified; resume from an earlier checkpoint.")
    if path.stat().st_size != entry["bytes"] or file_digest(path) != entry["sha256"]:
        raise CheckpointError(f"{path} is truncated or corrupt (its size or SHA-256 differs "
                              "from the manifest's); resume from an earlier checkpoint.")
    return state


def complete_checkpoints(output_dir: str | os.PathLike, gasloc: bool = True) -> list[Path]:
    """``checkpoint-<step>`` folders in ``output_dir`` that were completely written, oldest first.

    A complete checkpoint has Trainer's ``trainer_state.json`` and, for a GASLoC
    run, ``gasloc/manifest.json`` (written last). Their files are not read here:
    ``newest_complete_checkpoint`` verifies them.
    """
    found = []
    for folder in Path(output_dir).glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", folder.name)
        if not match or not folder.is_dir():
            continue
        complete = (folder / "trainer_state.json").is_file() and (
            not gasloc or manifest_path(folder).is_file())
        if complete:
            found.append((int(match.group(1)), folder))
        else:
            logger.warning("%s is incomplete (a run stopped while saving it); skipped.", folder)
    return [folder for _, folder in sorted(found)]


def newest_complete_checkpoint(output_dir: str | os.PathLike, gasloc: bool = True) -> Path | None:
    """The newest complete ``checkpoint-<step>`` in ``output_dir`` whose rank files match its
    manifest (``None``: there is none); a newer one that does not verify is skipped with a
    warning naming what is wrong."""
    for folder in reversed(complete_checkpoints(output_dir, gasloc)):
        try:
            problems = verify(folder, read_manifest(folder)) if gasloc else []
        except CheckpointError as error:
            problems = [str(error)]
        if not problems:
            return folder
        logger.warning("%s does not verify (%s); falling back to an older checkpoint.", folder,
                       "; ".join(problems))
    return None
