"""The Trainer callback and the Accelerate plugin where no process group is needed."""

import logging

import pytest
from transformers import Trainer

from hf_gasloc import GASLoC, GASLoCCallback, GASLoCPlugin

from ..clm import blocks, tiny_llama, training_arguments
from ..workers import TinyNet


def test_single_process_warns_and_trains_normally(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    train, _ = blocks(train_blocks=8)
    trainer = Trainer(model=tiny_llama(), args=training_arguments(str(tmp_path), max_steps=2),
                      train_dataset=train, callbacks=[GASLoCCallback(topology="1peer")])
    with caplog.at_level(logging.WARNING, logger="hf_gasloc.integrations.trainer"):
        trainer.train()
    assert "single-process run trains normally" in caplog.text
    assert trainer.state.global_step == 2


def test_callback_validates_settings_at_construction():
    with pytest.raises(ValueError, match="local_steps must be >= 1"):
        GASLoCCallback(local_steps=0)
    with pytest.raises(ValueError, match="either a plugin or keyword settings"):
        from hf_gasloc import GASLoCPlugin
        GASLoCCallback(GASLoCPlugin(), topology="1peer")


def test_attach_refuses_a_single_process_and_sharded_models():
    class FakeAccelerator:
        num_processes = 1
        distributed_type = "NO"

        @staticmethod
        def unwrap_model(model):
            return model

    with pytest.raises(ValueError, match="needs at least 2 processes, but accelerate started 1"):
        GASLoCPlugin().attach(FakeAccelerator(), TinyNet(), None)
    FakeAccelerator.distributed_type, FakeAccelerator.num_processes = "FSDP", 4
    with pytest.raises(ValueError, match="shards the model"):
        GASLoCPlugin().attach(FakeAccelerator(), TinyNet(), None)


def test_topology_none_is_refused_by_the_engine():
    with pytest.raises(ValueError, match="topology 'none' is plain DDP"):
        GASLoC(TinyNet(), None, topology="none")


def test_a_checkpoint_rotation_that_could_lose_every_complete_checkpoint_is_refused(tmp_path):
    train, _ = blocks(train_blocks=8)
    trainer = Trainer(model=tiny_llama(), train_dataset=train, args=training_arguments(
        str(tmp_path), save_strategy="steps", save_steps=2, save_total_limit=1))
    with pytest.raises(ValueError, match="save_total_limit=1: Trainer deletes the previous "
                                         "checkpoint .* Use save_total_limit 2 or more"):
        GASLoCCallback(topology="1peer").bind(trainer)


def test_a_model_that_cannot_be_split_as_asked_fails_at_bind(tmp_path):
    train, _ = blocks(train_blocks=8)
    trainer = Trainer(model=tiny_llama(), train_dataset=train,
                      args=training_arguments(str(tmp_path)))
    with pytest.raises(ValueError, match="fragments=40 but the model has"):
        GASLoCCallback(topology="1peer", fragments=40).bind(trainer)
