"""Checkpoint files: a manifest that names every rank file, verification, the fallback to the
newest checkpoint that verifies, and a write that fails cleanly."""

import json
import logging

import pytest
import torch

from hf_gasloc.errors import CheckpointError
from hf_gasloc.state.checkpoint import (newest_complete_checkpoint, rank_state_path,
                                        save_rank_state, verify, write_manifest)


def _checkpoint(output_dir, step, ranks=2):
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text("{}")
    files = {str(rank): save_rank_state(folder, rank, {"run_id": "r", "step": step,
                                                       "gasloc": {}, "x": torch.ones(100)})
             for rank in range(ranks)}
    write_manifest(folder, {"run_id": "r", "step": step, "files": files})
    return folder


def test_the_newest_checkpoint_that_verifies_is_chosen_and_the_others_are_named(tmp_path,
                                                                                caplog):
    _checkpoint(tmp_path, 4)
    truncated = _checkpoint(tmp_path, 8)
    missing = _checkpoint(tmp_path, 12)
    path = rank_state_path(truncated, 1)
    path.write_bytes(path.read_bytes()[:500])
    rank_state_path(missing, 0).unlink()
    (tmp_path / "checkpoint-16").mkdir()  # a save that stopped before its manifest
    (tmp_path / "checkpoint-16" / "trainer_state.json").write_text("{}")
    with caplog.at_level(logging.WARNING):
        assert newest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert "checkpoint-16 is incomplete" in caplog.text
    assert "checkpoint-12/gasloc/rank0.pt is missing" in caplog.text
    assert ("checkpoint-8/gasloc/rank1.pt is not the file that was saved (its size or SHA-256 "
            "differs") in caplog.text
    manifest = json.loads((tmp_path / "checkpoint-4/gasloc/manifest.json").read_text())
    assert verify(tmp_path / "checkpoint-4", manifest) == []
    assert set(manifest["files"]["1"]) == {"file", "bytes", "sha256"}


def test_a_write_that_fails_leaves_no_partial_file_and_names_the_path(tmp_path, monkeypatch):
    def full_disk(obj, path):
        with open(path, "wb") as f:
            f.write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"could not write .*rank2.pt: .*unexpected pos "
                                              r"64 \(is the disk full\?\); nothing partial"):
        save_rank_state(tmp_path, 2, {})
    assert list((tmp_path / "gasloc").iterdir()) == []


def test_a_manifest_without_a_ranks_entry_is_refused(tmp_path):
    from hf_gasloc.state.checkpoint import load_rank_state, read_manifest

    folder = _checkpoint(tmp_path, 4)
    manifest = read_manifest(folder)
    assert load_rank_state(folder, 1, manifest)["step"] == 4
    del manifest["files"]["1"]
    with pytest.raises(CheckpointError, match="lists no file for rank 1"):
        load_rank_state(folder, 1, manifest)
