"""GASLoCCallback inside a real Trainer on 2 gloo ranks."""

import os

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback

from hf_gasloc import GASLoCCallback

from .clm import blocks, tiny_llama, training_arguments
from .distributed import run_ranks
from .workers import flat, gather


class StepProbe(TrainerCallback):
    """Counts collectives between consecutive on_step_end events and checks what eval sees.

    Interval k runs from the end of step k-1 (its logging, evaluation and saving
    included) to the end of step k (batch fetch, forward, backward, optimizer
    step, outer step).
    """

    def __init__(self):
        self.intervals, self.eval_spread, self.after_eval_spread = [], [], []
        self._profiler = None
        self._pending: dict[str, int] = {}
        self._evaluated = False

    def _stop(self):
        if self._profiler is not None:
            self._profiler.stop()
            for event in self._profiler.events():
                if event.name.startswith("gloo:"):
                    self._pending[event.name] = self._pending.get(event.name, 0) + 1
            self._profiler = None

    def _start(self):
        self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self._profiler.start()

    def _restart(self, record: bool):
        self._stop()
        if record:
            self.intervals.append(self._pending)
        self._pending = {}
        self._start()

    def on_train_begin(self, args, state, control, **kwargs):
        self._restart(record=False)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self._evaluated:
            self._evaluated = False
            self._pause(lambda: self.after_eval_spread.append(_spread(model)))

    def on_step_end(self, args, state, control, **kwargs):
        self._restart(record=True)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self._evaluated = True
        self._pause(lambda: self.eval_spread.append(_spread(model)))

    def _pause(self, probe):
        """Run a probe of our own (it gathers) outside the counted intervals."""
        self._stop()
        probe()
        self._start()

    def on_train_end(self, args, state, control, **kwargs):
        self._stop()


def _spread(model) -> float:
    parameters = gather(flat(model))
    return float((parameters[0] - parameters[1]).abs().max())


def _train_and_probe(rank, world_size, output_dir):
    train, validation = blocks(train_blocks=128)  # one epoch: no epoch boundary in 6 steps
    probe = StepProbe()
    arguments = training_arguments(output_dir, max_steps=6, logging_steps=3,
                                   gradient_accumulation_steps=2, eval_strategy="steps",
                                   eval_steps=4, report_to=["tensorboard"], bf16=True)
    trainer = Trainer(model=tiny_llama(), args=arguments, train_dataset=train,
                      eval_dataset=validation)
    callback = GASLoCCallback(topology="1peer", local_steps=2)
    trainer.add_callback(callback)
    trainer.add_callback(probe)
    trainer.train()
    final_spread = _spread(trainer.model)
    return dict(intervals=probe.intervals, eval_spread=probe.eval_spread,
                after_eval_spread=probe.after_eval_spread, final_spread=final_spread,
                log_history=trainer.state.log_history, rounds=callback.engine.round,
                average_tokens=trainer.args.average_tokens_across_devices)


def test_callback_trains_without_step_collectives_and_evaluates_the_consensus(tmp_path):
    results = run_ranks(_train_and_probe, 2, str(tmp_path), init=False)
    for r in results:
        assert r["rounds"] == 3  # 6 optimizer steps (2 micro-batches each), H = 2
        assert r["average_tokens"] is False
        assert len(r["intervals"]) == 6
        for step, counts in enumerate(r["intervals"], start=1):
            # A round's exchange: the header swap from the training thread (the message
            # follows from the thread that checks the header: the profiler does not see it).
            expected = {"gloo:send": 1, "gloo:recv": 1} if step % 2 == 0 else {}
            if step in (4, 6):  # eval steps: GASLoC swaps in the consensus (a count of the
                expected["gloo:all_reduce"] = 2  # finite workers, then one All-Reduce)
            if step in (3, 4, 6):  # before Trainer's logging/eval collectives: a roll call
                for name in ("gloo:send", "gloo:recv"):
                    expected[name] = expected.get(name, 0) + 1
            if step - 1 in (3, 4):  # after the logging step 3 and the eval step 4
                for name, count in expected.items():
                    assert counts.get(name) == count, f"step {step}: {counts}"
            else:
                assert counts == expected, f"step {step}: {counts}"
        assert r["eval_spread"] == [0.0, 0.0], "every rank must evaluate the same consensus model"
        assert r["after_eval_spread"][0] > 0, "own parameters must come back after evaluation"
        assert r["final_spread"] == 0.0, "after training every rank holds the consensus"
        train_logs = [h for h in r["log_history"] if "loss" in h]
        assert train_logs and all("gasloc/rounds" in h for h in train_logs)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for root, _, files in os.walk(tmp_path):
        for name in files:
            if name.startswith("events"):
                tags |= set(EventAccumulator(os.path.join(root, name)).Reload().Tags()["scalars"])
    assert {"train/gasloc/rounds", "train/gasloc/peer_distance", "train/loss"} <= tags


class OwnParameters(TrainerCallback):
    """Each rank's own parameters right after every optimizer step."""

    def __init__(self):
        self.after_step = {}

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.after_step[state.global_step + 1] = flat(model)


def _resume(rank, world_size, output_dir):
    train, validation = blocks()

    def run(resume_from=None):
        own = OwnParameters()
        arguments = training_arguments(output_dir, max_steps=8, save_strategy="steps",
                                       save_steps=2, save_total_limit=3, max_grad_norm=0.5,
                                       lr_scheduler_type="cosine", warmup_steps=2)
        trainer = Trainer(model=tiny_llama(), args=arguments, train_dataset=train,
                          eval_dataset=validation,
                          callbacks=[GASLoCCallback(topology="1peer", local_steps=3, seed=5), own])
        trainer.train(resume_from_checkpoint=resume_from)
        return own.after_step[8], flat(trainer.model)

    uninterrupted_own, uninterrupted_final = run()
    dist.barrier()
    folders = sorted(os.listdir(output_dir))
    if rank == 0:  # keep checkpoint-4 only, as if the run had died after step 5
        import shutil
        for late in ("checkpoint-6", "checkpoint-8"):
            shutil.rmtree(os.path.join(output_dir, late))
    dist.barrier()
    resumed_own, resumed_final = run(os.path.join(output_dir, "checkpoint-4"))
    return uninterrupted_own, resumed_own, uninterrupted_final, resumed_final, folders


def test_resume_mid_round_is_bit_exact(tmp_path):
    results = run_ranks(_resume, 2, str(tmp_path), init=False)
    for uninterrupted_own, resumed_own, uninterrupted_final, resumed_final, folders in results:
        assert [f for f in folders if f.startswith("checkpoint")] == [
            "checkpoint-4", "checkpoint-6", "checkpoint-8"], "save_total_limit=3 keeps the last 3"
        assert torch.equal(uninterrupted_own, resumed_own), "rank's own parameters differ"
        assert torch.equal(uninterrupted_final, resumed_final), "consensus differs"
    assert not torch.equal(results[0][0], results[1][0]), "ranks should differ before averaging"
    assert (tmp_path / "checkpoint-4" / "gasloc" / "rank1.pt").exists()


def _undistributed_trainer(rank, world_size, output_dir):
    train, _ = blocks()
    arguments = training_arguments(output_dir, use_cpu=False, max_steps=1)
    trainer = Trainer(model=tiny_llama(), args=arguments, train_dataset=train,
                      callbacks=[GASLoCCallback(topology="1peer")])
    try:
        trainer.train()
    except RuntimeError as error:
        return str(error)
    return None


def test_launched_ranks_that_do_not_join_a_group_are_a_clear_error(tmp_path):
    for error in run_ranks(_undistributed_trainer, 2, str(tmp_path), init=False):
        assert error is not None and "pass use_cpu=True" in error


