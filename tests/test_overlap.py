"""Overlapped rounds: the delayed outer step, streamed fragments, and what they must not break."""

import math

import torch
from transformers import Trainer

from hf_gasloc import GASLoC, GASLoCCallback
from hf_gasloc.schedule.fragments import split_fragments, start_steps

from .clm import blocks, tiny_llama, training_arguments
from .distributed import run_ranks
from .workers import (DILOCO_OUTER, DiLoCoReference, TinyNet, flat, gather, load_training,
                      local_step, mean, save_training)

H, DELAY = 4, 2


def _delayed_complete_is_delayed_diloco(rank, world_size):
    model = TinyNet()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    after_inner = []
    inner.register_step_post_hook(lambda *_: after_inner.append(flat(model)))  # before GASLoC's
    engine = GASLoC(model, inner, topology="complete", local_steps=H, outer_delay=DELAY,
                    **DILOCO_OUTER)
    reference = DiLoCoReference.following(flat(model), engine.config)
    worst, started = 0.0, {}
    for step in range(1, 5 * H + DELAY + 1):
        local_step(model, inner, rank, step)
        if step % H == 0:
            started[step] = after_inner[-1]  # x_t: the proposal is taken here
        if step > H and (step - DELAY) % H == 0:  # the round of step - DELAY lands now
            x_t = started.pop(step - DELAY)
            new_anchor = reference.step(mean(gather(reference.anchor - x_t)))
            expected = new_anchor + (after_inner[-1] - x_t)
            worst = max(worst, float((flat(model) - expected).abs().max()))
    return worst, engine.round, engine.last_round.blocked_seconds


def test_delayed_outer_step_on_the_complete_graph_is_delayed_diloco():
    for worst, rounds, blocked in run_ranks(_delayed_complete_is_delayed_diloco, 3):
        assert rounds == 5 and worst < 1e-6, worst
        assert blocked > 0


def _fragments_on_the_complete_graph(rank, world_size):
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    after_inner = []
    inner.register_step_post_hook(lambda *_: after_inner.append(
        [p.detach().clone() for p in model.parameters()]))  # runs before GASLoC's hook
    engine = GASLoC(model, inner, topology="complete", local_steps=H, fragments=2,
                    **DILOCO_OUTER)
    parts = [{id(p) for p in part} for part in split_fragments(model, 2)]
    members = [[k for k, p in enumerate(model.parameters()) if id(p) in part] for part in parts]

    def fragment(values, f):
        return torch.cat([values[k].reshape(-1) for k in members[f]])

    params = list(model.parameters())
    references = [DiLoCoReference.following(fragment(params, f).detach(), engine.config)
                  for f in range(2)]
    worst = 0.0
    for step in range(1, 3 * H + 1):
        local_step(model, inner, rank, step)
        for f, start in enumerate(start_steps(H, 2)):
            if step % H == start % H:  # fragment f lands at its own step of the round
                x = fragment(after_inner[-1], f)
                expected = references[f].step(mean(gather(references[f].anchor - x)))
                worst = max(worst, float((fragment(params, f) - expected).abs().max()))
    sizes = [w.messages[0].numel() for w in (f.wire for f in engine.fragments)]
    return worst, sizes, sum(p.numel() for p in params)


def test_each_fragment_is_diloco_at_its_own_step_on_the_complete_graph():
    for worst, sizes, total in run_ranks(_fragments_on_the_complete_graph, 2):
        assert worst < 1e-6, worst
        assert sizes == [35, 12] and sum(sizes) == total  # a message per fragment: its layers


def _in_flight_resume(rank, world_size, folder):
    def run(steps, resume=False):
        model = TinyNet()
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
        engine = GASLoC(model, inner, topology="1peer", local_steps=H, outer_delay=DELAY,
                        fragments=2, seed=5, payload="int8")
        checkpoint = f"{folder}/rank{rank}.pt"
        if resume:
            load_training(model, inner, engine, checkpoint)
        in_flight = None
        while engine.inner_step < steps:
            local_step(model, inner, rank, engine.inner_step)
            if engine.inner_step == 2 * H + 1 and not resume:  # round 1 is in flight
                in_flight = len(engine.rounds.scheduler.in_flight)
                save_training(model, inner, engine, checkpoint)
        return flat(model), in_flight, engine.totals.rounds
    uninterrupted, in_flight, rounds = run(6 * H)
    resumed, _, resumed_rounds = run(6 * H, resume=True)
    return uninterrupted, resumed, in_flight, rounds, resumed_rounds


def test_resume_from_a_checkpoint_taken_while_an_exchange_is_in_flight_is_bit_exact(tmp_path):
    for uninterrupted, resumed, in_flight, rounds, resumed_rounds in run_ranks(
            _in_flight_resume, 2, str(tmp_path)):
        assert in_flight >= 1, "the checkpoint must catch an exchange in flight"
        assert torch.equal(uninterrupted, resumed)
        assert resumed_rounds == rounds


def _trainer_overlapped(rank, world_size, folder):
    train, validation = blocks(train_blocks=256)

    def run(resume=None):
        arguments = training_arguments(folder, max_steps=12, logging_steps=1, eval_strategy="steps",
                                       eval_steps=3, save_strategy="steps", save_steps=5)
        callback = GASLoCCallback(topology="2peer", local_steps=4, outer_delay=2, fragments=2,
                                  seed=2)
        trainer = Trainer(model=tiny_llama(), args=arguments, train_dataset=train,
                          eval_dataset=validation, callbacks=[callback])
        trainer.train(resume_from_checkpoint=resume)
        return flat(trainer.model), trainer.state.log_history, callback.engine
    final, history, engine = run()
    resumed, _, _ = run(f"{folder}/checkpoint-5")  # saved at step 5: round 0 still in flight
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    blocked = [h["gasloc/blocked_seconds"] for h in history if "gasloc/blocked_seconds" in h]
    return final, resumed, evals, blocked, gather(final)


def test_a_trainer_that_logs_evaluates_and_saves_during_overlapped_rounds(tmp_path):
    results = run_ranks(_trainer_overlapped, 3, str(tmp_path), init=False, timeout=400)
    for final, resumed, evals, blocked, finals in results:
        assert len(evals) == 4 and all(math.isfinite(e) for e in evals)  # no deadlock, no NaN
        assert blocked and all(b >= 0 for b in blocked)
        assert torch.equal(final, resumed), "resume with an exchange in flight is not exact"
        assert all(torch.equal(f, finals[0]) for f in finals)  # the consensus at the end


def _adaptive_and_faults(rank, world_size):
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = GASLoC(model, inner, topology="1peer", local_steps="auto:4", outer_delay=1,
                    fragments=2, seed=3)
    step, blown_up = 0, False
    while engine.round < 8:  # each rank's H_i is its own: count rounds, not steps
        step += 1
        local_step(model, inner, rank, step)
        if rank == 1 and engine.round == 1 and not blown_up:  # a blow-up while round 1 travels
            blown_up = True
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))
    engine.outer_step()
    return bool(torch.isfinite(flat(model)).all()), engine.health.recoveries, engine.round


def test_overlapped_rounds_adapt_and_contain_a_nan():
    for rank, (finite, recoveries, rounds) in enumerate(run_ranks(_adaptive_and_faults, 2)):
        assert finite and rounds >= 8
        assert recoveries == (1 if rank == 1 else 0)
