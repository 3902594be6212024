"""Bad inputs and hostile faults, injected into real processes: Trainer arguments that differ
between ranks, a full disk while saving, a checkpoint saved without GASLoC, damaged checkpoints
found by the automatic resume."""

import json
import resource
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback

from hf_gasloc import GASLoCCallback
from hf_gasloc.errors import CheckpointError, RunMismatchError
from hf_gasloc.state.checkpoint import newest_complete_checkpoint

from .clm import blocks, tiny_llama, training_arguments
from .distributed import run_ranks
from .workers import flat, gather


def _differing_max_steps(rank, world_size, folder):
    train, _ = blocks()
    trainer = Trainer(model=tiny_llama(), train_dataset=train,
                      args=training_arguments(folder, max_steps=4 + 2 * rank))
    GASLoCCallback(topology="1peer", local_steps=2).bind(trainer)
    try:
        trainer.train()
    except RunMismatchError as error:
        return str(error), trainer.state.global_step
    return None


def test_trainer_arguments_that_differ_between_ranks_stop_every_rank_before_any_step(tmp_path):
    for error, steps in run_ranks(_differing_max_steps, 2, str(tmp_path), init=False):
        assert "Trainer arguments differ across ranks" in error
        assert "max_steps differs (rank 0: 4, rank 1: 6)" in error and steps == 0


class FillTheDisk(TrainerCallback):
    """From step 3 on, rank 1 may write no file larger than 64 kB: its disk is full."""

    def on_step_end(self, args, state, control, **kwargs):
        if dist.get_rank() == 1 and state.global_step == 3:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.RLIM_INFINITY))


def _full_disk(rank, world_size, folder):
    train, _ = blocks()
    trainer = Trainer(model=tiny_llama(), train_dataset=train, callbacks=[FillTheDisk()],
                      args=training_arguments(folder, max_steps=4, save_strategy="steps",
                                              save_steps=2))
    GASLoCCallback(topology="1peer", local_steps=2).bind(trainer)
    try:
        trainer.train()
    except CheckpointError as error:
        return str(error)
    return None


def test_a_full_disk_on_one_rank_is_one_clear_error_and_loses_no_checkpoint(tmp_path):
    for error in run_ranks(_full_disk, 2, str(tmp_path), init=False):
        assert "checkpoint-4 could not be saved completely" in error
        assert "rank 1: could not write" in error and "checkpoint-4/gasloc/rank1.pt" in error
        assert "(is the disk full?)" in error
    assert not list(tmp_path.rglob("*.partial"))
    assert not (tmp_path / "checkpoint-4/gasloc/manifest.json").exists()
    assert newest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-2"


def _plain_then_gasloc(rank, world_size, folder):
    train, _ = blocks()
    plain = Trainer(model=tiny_llama(), train_dataset=train,
                    args=training_arguments(folder, max_steps=2, save_strategy="steps",
                                            save_steps=2))
    plain.train()  # DDP: a checkpoint without GASLoC state
    dist.barrier()
    trainer = Trainer(model=tiny_llama(), train_dataset=train,
                      args=training_arguments(folder, max_steps=6))
    callback = GASLoCCallback(topology="1peer", local_steps=2).bind(trainer)
    starts = []

    class Start(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if not starts:
                starts.append(flat(model))

    trainer.add_callback(Start())
    trainer.train(resume_from_checkpoint=f"{folder}/checkpoint-2")
    return gather(starts[0]), callback.engine.round, trainer.state.global_step


def test_a_gasloc_run_starts_from_a_checkpoint_saved_without_gasloc(tmp_path, caplog):
    saved = None
    for starts, rounds, steps in run_ranks(_plain_then_gasloc, 2, str(tmp_path), init=False):
        assert torch.equal(starts[0], starts[1])  # every worker starts from the same model
        assert (rounds, steps) == (2, 6)  # a fresh outer state: rounds from 0, steps go on
        saved = saved or json.loads((tmp_path / "checkpoint-2/trainer_state.json").read_text())
    assert saved["global_step"] == 2 and not (tmp_path / "checkpoint-2/gasloc").exists()
    assert Path(tmp_path / "checkpoint-2/model.safetensors").exists()
