"""Unequal H_i under the Trainer, on real gloo ranks: every rank takes the same Trainer steps,
a round lasts the largest H_i of them, and a worker with a smaller H_i idles for the rest of
the round; logging every step, evaluation, a mid-run checkpoint, a bit-exact resume, auto:H."""

import time
import warnings

import torch
import torch.distributed as dist
from transformers import Trainer

from hf_gasloc import GASLoCCallback

from .clm import blocks, tiny_llama, training_arguments
from .distributed import run_ranks
from .workers import flat, gather


def _train(rank, world_size, folder, local_steps, resume=None, slow_rank=None, overrides=None):
    train, validation = blocks(train_blocks=128)
    model = tiny_llama()
    if rank == slow_rank:  # a slower GPU: every real step's forward takes 0.2 s longer
        model.register_forward_pre_hook(lambda *_: time.sleep(0.2))
    settings = dict(max_steps=12, logging_steps=1, eval_strategy="steps", eval_steps=6,
                    save_strategy="steps", save_steps=8)
    settings.update(overrides or {})
    trainer = Trainer(model=model, args=training_arguments(folder, **settings),
                      train_dataset=train, eval_dataset=validation)
    callback = GASLoCCallback(topology="1peer", local_steps=local_steps).bind(trainer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=resume)
    final = trainer.evaluate()["eval_loss"]  # every rank holds the consensus
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return dict(final=final, params=gather(flat(trainer.model)), summary=callback.summary(),
                steps=trainer.state.global_step, rounds=callback.engine.round, losses=losses,
                warnings=[str(w.message) for w in caught])


def test_per_rank_h_under_the_trainer_logs_every_step_evaluates_saves_and_ends_together(
        tmp_path):
    results = run_ranks(_train, 2, str(tmp_path), "4,2", init=False, timeout=600)
    for r in results:
        assert r["steps"] == 12 and r["rounds"] == 3  # the same rounds on every rank
        assert len(r["losses"]) == 12  # logging_steps 1: no deadlock, a loss every step
        summary = r["summary"]
        assert summary["gasloc_local_steps_per_worker"] == [4, 2]
        assert summary["gasloc_inner_steps_per_worker"] == [12, 6]  # the slow rank: fewer
        # Idle steps wrap optimizer.step; the LR scheduler must still see its own wrapper.
        assert not [w for w in r["warnings"] if "optimizer.step()" in w], r["warnings"]
    assert torch.equal(results[0]["params"][0], results[0]["params"][1])
    assert (tmp_path / "checkpoint-8/gasloc/manifest.json").exists()


def test_a_resume_with_unequal_h_is_bit_exact(tmp_path):
    uninterrupted = run_ranks(_train, 2, str(tmp_path / "a"), "4,2", init=False, timeout=600)
    run_ranks(_train, 2, str(tmp_path / "b"), "4,2", init=False, timeout=600)
    resumed = run_ranks(_train, 2, str(tmp_path / "b"), "4,2",
                        str(tmp_path / "b" / "checkpoint-8"), init=False, timeout=600)
    for before, after in zip(uninterrupted, resumed):
        assert torch.equal(before["params"][0], after["params"][0])
        assert after["summary"]["gasloc_inner_steps_per_worker"] == [12, 6]


def test_auto_h_gives_a_slower_worker_fewer_steps_under_the_trainer(tmp_path):
    results = run_ranks(_train, 2, str(tmp_path), "auto:4", None, 1,
                        dict(max_steps=32, eval_steps=16, save_steps=16), init=False, timeout=900)
    for r in results:
        assert r["steps"] == 32 and r["rounds"] == 8
        fast, slow = r["summary"]["gasloc_inner_steps_per_worker"]
        assert fast == 32 and slow < 28, (fast, slow)  # round 0 is full; then it adapts
        assert r["summary"]["gasloc_local_steps_per_worker"][1] < 4  # its H_i at the end


def test_evaluation_and_a_checkpoint_inside_a_round_change_nothing(tmp_path):
    # Step 6 is inside the round of steps 5-8: rank 1 (H_i = 2) has posted its exchange.
    inside = dict(eval_steps=6, save_steps=6)
    probed = run_ranks(_train, 2, str(tmp_path / "a"), "4,2", None, None, inside, init=False,
                       timeout=600)
    plain = run_ranks(_train, 2, str(tmp_path / "b"), "4,2", None, None,
                      dict(eval_strategy="no", save_strategy="no"), init=False, timeout=600)
    assert torch.equal(probed[0]["params"][0], plain[0]["params"][0])
    assert torch.equal(probed[0]["params"][1], plain[0]["params"][1])
    # The checkpoint asked for at step 6 is taken at the round's end, step 8.
    assert not (tmp_path / "a" / "checkpoint-6").exists()
    assert (tmp_path / "a" / "checkpoint-8/gasloc/manifest.json").exists()
    assert (tmp_path / "a" / "checkpoint-12/gasloc/manifest.json").exists()


def test_a_run_that_ends_inside_a_round_lands_that_round_short_on_every_rank(tmp_path):
    # 10 steps of rounds of 4: the last round ends at step 10, after rank 1 (H_i = 2) posted.
    results = run_ranks(_train, 2, str(tmp_path), "4,2", None, None,
                        dict(max_steps=10, eval_strategy="no", save_strategy="no"), init=False,
                        timeout=600)
    for r in results:
        assert r["steps"] == 10 and r["rounds"] == 3
        assert r["summary"]["gasloc_inner_steps_per_worker"] == [10, 6]
    assert torch.equal(results[0]["params"][0], results[0]["params"][1])
