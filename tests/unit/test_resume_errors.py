"""resume.save and resume.resume on every worker at once: a checkpoint path that does not exist,
and a manifest that cannot be written, are one error on every rank."""

import torch

import hf_gasloc.resume as resume_module
from hf_gasloc import GASLoC
from hf_gasloc.errors import CheckpointError
from hf_gasloc.resume import resume, save

from ..fake_fabric import run_workers
from ..workers import TinyNet


def _resume_from(rank, comm, folder):
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = GASLoC(model, inner, comm=comm, topology="1peer", local_steps=2)
    try:
        resume(folder, engine, model, inner)
    except CheckpointError as error:
        return str(error)
    return None


def test_a_checkpoint_folder_that_does_not_exist_is_an_error_not_a_fresh_start(tmp_path):
    for error in run_workers(_resume_from, 2, str(tmp_path / "checkpoint-typo")):
        assert "checkpoint-typo does not exist (on ranks [0, 1])" in error


def _save_to(rank, comm, folder):
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = GASLoC(model, inner, comm=comm, topology="1peer", local_steps=2)
    try:
        save(folder, engine, model, inner, step=2)
    except CheckpointError as error:
        return str(error)
    return None


def test_a_manifest_that_cannot_be_written_stops_every_rank(tmp_path, monkeypatch):
    def full_disk(folder, manifest):
        raise CheckpointError(f"could not write {folder}/gasloc/manifest.json: no space")

    monkeypatch.setattr(resume_module, "write_manifest", full_disk)
    errors = run_workers(_save_to, 2, str(tmp_path / "checkpoint-2"))
    for error in errors:
        assert "could not be saved completely" in error and "rank 0: could not write" in error
    assert not (tmp_path / "checkpoint-2" / "gasloc" / "manifest.json").exists()
