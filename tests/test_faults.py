"""Faults injected into real processes: a NaN worker, a frozen worker, a killed worker, bad files."""

import json
import logging
import math
import os
import re
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback

from hf_gasloc import GASLoC, GASLoCCallback
from hf_gasloc.errors import CheckpointError, NonFiniteError, PeerLostError

from .clm import blocks, tiny_llama, training_arguments
from .distributed import run_ranks
from .workers import TinyNet, flat, gather, local_step

from benchmarks.launchers import TINY, Launched, is_gone, is_stopped, torchrun

ROOT = Path(__file__).resolve().parents[1]


class TurnNaN(TrainerCallback):
    """Sets one rank's parameters to NaN after the given steps (a numerical blow-up)."""

    def __init__(self, rank: int, steps: set[int]):
        self.rank, self.steps = rank, steps

    @torch.no_grad()
    def on_step_end(self, args, state, control, model=None, **kwargs):
        if dist.get_rank() == self.rank and state.global_step in self.steps:
            for p in model.parameters():
                p.fill_(float("nan"))


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _train(output_dir, faults, steps=24, **settings):
    train, validation = blocks(train_blocks=256)
    arguments = training_arguments(output_dir, max_steps=steps, eval_strategy="steps",
                                   eval_steps=4, save_strategy="steps", save_steps=6,
                                   logging_steps=4)
    callback = GASLoCCallback(topology="1peer", local_steps=3, **settings)
    trainer = Trainer(model=tiny_llama(), args=arguments, train_dataset=train,
                      eval_dataset=validation, callbacks=[callback, *faults])
    trainer.train()
    return trainer, callback.engine


def _nan_on_one_worker(rank, world_size, folder):
    collected = Collect()
    logging.getLogger("hf_gasloc").addHandler(collected)
    clean_trainer, clean = _train(f"{folder}/clean", [])
    clean_final = clean_trainer.evaluate()["eval_loss"]  # every rank holds the consensus
    trainer, engine = _train(f"{folder}/fault", [TurnNaN(2, {7})])
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    return dict(own_finite=bool(torch.isfinite(flat(trainer.model)).all()), evals=evals,
                final=trainer.evaluate()["eval_loss"], clean_final=clean_final,
                recoveries=engine.health.recoveries, clean_recoveries=clean.health.recoveries,
                warnings=collected.messages)


def test_a_nan_worker_recovers_from_its_peer_and_never_reaches_a_checkpoint(tmp_path):
    results = run_ranks(_nan_on_one_worker, 4, str(tmp_path), init=False, timeout=600)
    for rank, r in enumerate(results):
        assert r["own_finite"], f"rank {rank} ends non-finite"
        assert all(math.isfinite(loss) for loss in r["evals"]), r["evals"]  # step 8: NaN left out
        assert r["recoveries"] == (1 if rank == 2 else 0) and r["clean_recoveries"] == 0
        assert abs(r["final"] - r["clean_final"]) <= 0.05 * r["clean_final"], r
    warning = " ".join(results[2]["warnings"])
    assert "rank 2: non-finite parameters at round 2, inner step 9" in warning, warning
    for path in (tmp_path / "fault").glob("checkpoint-*/**/*"):
        if path.suffix == ".safetensors":
            tensors = load_file(path).values()
        elif path.suffix == ".pt":  # optimizer.pt, scheduler.pt, gasloc/rank<r>.pt
            tensors = _tensors(torch.load(path, map_location="cpu", weights_only=True))
        else:
            continue
        assert all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point()), path


def _tensors(value):
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _nan_every_step(rank, world_size, folder):
    try:
        _train(folder, [TurnNaN(1, set(range(1, 100)))], peer_timeout=10)
    except (NonFiniteError, PeerLostError) as error:
        return type(error).__name__, str(error)
    return None


def test_a_worker_that_keeps_turning_nan_stops_the_run_with_a_clear_error(tmp_path):
    (kind0, message0), (kind1, message1) = run_ranks(_nan_every_step, 2, str(tmp_path),
                                                     init=False)
    assert kind1 == "NonFiniteError" and "non-finite in 3 rounds in a row" in message1
    assert "max_bad_rounds" in message1
    assert kind0 == "PeerLostError" and "rank 1" in message0 and " is lost" in message0


def _frozen_peer_in_a_raw_loop(rank, world_size):
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = GASLoC(model, inner, topology="1peer", local_steps=2, peer_timeout=3, seed=1)
    started, step = time.monotonic(), 0
    while engine.round < 12:
        if rank == 3 and engine.round == 2:
            os.kill(os.getpid(), signal.SIGSTOP)  # a hung machine: frozen for good
        local_step(model, inner, rank, step)
        step += 1
    try:
        with engine.consensus_model():
            refused = None
    except PeerLostError as error:
        refused = str(error)
    return dict(lost=engine.lost_peers, seconds=time.monotonic() - started,
                finite=bool(torch.isfinite(flat(model)).all()), refused=refused,
                rounds_met=[list(engine.topology.graph(t).peers[rank]) for t in range(2, 12)])


def test_survivors_of_a_frozen_peer_go_on_without_it_in_a_raw_loop():
    results = run_ranks(_frozen_peer_in_a_raw_loop, 4, abandon=(3,), timeout=200)
    for rank, r in enumerate(results[:3]):
        met = sum(3 in peers for peers in r["rounds_met"])
        assert met >= 1, "the seed must pair some survivor with the frozen rank"
        assert r["finite"] and r["lost"] == [3], (rank, r["lost"])  # the news spread by gossip
        # Each survivor waited for the frozen rank at most once (then knew): 12 short rounds.
        assert r["seconds"] < 2 * 3 + 30, (rank, r["seconds"])
        assert "rank 3" in r["refused"] and "consensus needs every worker" in r["refused"]


def test_a_frozen_worker_ends_a_trainer_run_within_peer_timeout(tmp_path):
    flags = ["--gasloc_topology", "1peer", "--gasloc_local_steps", "3", "--gasloc_peer_timeout",
             "5", "--max_steps", "100000", "--logging_steps", "100000", *TINY]
    with Launched() as run:
        agent = run.start(torchrun("--nproc_per_node", "4", str(ROOT / "examples/run_clm.py"),
                                   "--output_dir", str(tmp_path), *flags), tmp_path / "log")
        run.wait_for(lambda: re.search(r"\b[4-9]/100000", run.text()), 300, "training")
        victim = run.workers(agent)[3]
        os.kill(victim, signal.SIGSTOP)
        run.wait_for(lambda: is_stopped(victim), 5, "the stop")
        detected = run.wait_for(lambda: "stopped answering" in run.text(), 60, "detection")
        others = [pid for rank, pid in run.workers(agent).items() if rank != 3]
        run.wait_for(lambda: all(is_gone(pid) for pid in others), 30, "the others' exit")
    text = run.text()
    assert detected < 5 + 15, f"detected after {detected:.1f} s"
    assert "rank 3 (" in text and "peer_timeout=5 s" in text and "(in " in text
    assert is_gone(victim), "the frozen worker must not outlive the test"


class StopInsideLogging(TrainerCallback):
    """Stops one rank inside Trainer's logging step, between its collectives."""

    def on_log(self, args, state, control, **kwargs):
        if dist.get_rank() == 2 and state.global_step == 4:
            os.kill(os.getpid(), signal.SIGSTOP)


def _frozen_inside_trainer_collectives(rank, world_size, folder):
    train, _ = blocks(train_blocks=256)
    arguments = training_arguments(folder, max_steps=100, logging_steps=2)
    trainer = Trainer(model=tiny_llama(), args=arguments, train_dataset=train,
                      callbacks=[GASLoCCallback(topology="1peer", local_steps=3, peer_timeout=5),
                                 StopInsideLogging()])
    started = time.monotonic()
    try:
        trainer.train()
    except RuntimeError as error:
        return time.monotonic() - started, str(error)
    return None


def test_a_worker_frozen_inside_trainers_own_collectives_ends_the_run_within_peer_timeout(
        tmp_path):
    results = run_ranks(_frozen_inside_trainer_collectives, 3, str(tmp_path), init=False,
                        abandon=(2,), timeout=120)
    for seconds, error in results[:2]:
        assert "timeout" in error.lower() or "stopped answering" in error, error
        assert seconds < 5 + 20, seconds  # steps before the freeze, then at most peer_timeout


def test_a_killed_worker_is_replaced_by_an_elastic_restart_on_fewer_workers(tmp_path):
    flags = ["--gasloc_topology", "1peer", "--gasloc_local_steps", "4", "--gasloc_peer_timeout",
             "10", "--max_steps", "48", "--save_strategy", "steps", "--save_steps", "8",
             "--logging_steps", "4", *TINY]
    with Launched() as run:
        agents = run.start_elastic_nodes([str(ROOT / "examples/run_clm.py"), "--output_dir",
                                          str(tmp_path), *flags], tmp_path, "kill")
        run.wait_for(lambda: (tmp_path / "checkpoint-16/gasloc/manifest.json").exists(), 400,
                     "checkpoint-16")
        run.kill_node(agents[3])
        codes = run.wait(400)
    assert codes[:3] == [0, 0, 0], run.text()[-3000:]
    results = json.loads((tmp_path / "all_results.json").read_text())
    assert results["world_size"] == 3 and math.isfinite(results["eval_loss"])
    assert json.loads((tmp_path / "trainer_state.json").read_text())["global_step"] == 48
    text = run.text()
    assert "resuming from" in text and "checkpoint-" in text
    assert "resuming 3 workers from a checkpoint of 4" in text


def _bad_checkpoints(rank, world_size, folder):
    def train(output_dir, resume=None, seed=0):
        train_blocks, validation = blocks()
        arguments = training_arguments(output_dir, max_steps=4, save_strategy="steps",
                                       save_steps=2, seed=seed)
        trainer = Trainer(model=tiny_llama(), args=arguments, train_dataset=train_blocks,
                          eval_dataset=validation,
                          callbacks=[GASLoCCallback(topology="1peer", local_steps=2)])
        try:
            trainer.train(resume_from_checkpoint=resume)
        except CheckpointError as error:
            return str(error)
        return None

    train(f"{folder}/a")
    train(f"{folder}/b", seed=1)
    dist.barrier()
    a, b = Path(folder) / "a", Path(folder) / "b"
    if rank == 0:
        truncated = a / "checkpoint-4/gasloc/rank1.pt"
        truncated.write_bytes(truncated.read_bytes()[:1000])
        shutil.copytree(a / "checkpoint-2", a / "checkpoint-6")
        shutil.copytree(a / "checkpoint-2", a / "checkpoint-8")
        (a / "checkpoint-2/gasloc/rank1.pt").unlink()
        shutil.copy(b / "checkpoint-2/gasloc/rank1.pt", a / "checkpoint-6/gasloc/rank1.pt")
        (a / "checkpoint-8/gasloc/manifest.json").unlink()
    dist.barrier()
    return {name: train(f"{folder}/resumed-{name}", str(a / name))
            for name in ("checkpoint-4", "checkpoint-2", "checkpoint-6", "checkpoint-8")}


def test_truncated_missing_and_foreign_rank_files_are_clear_errors_on_every_rank(tmp_path):
    for errors in run_ranks(_bad_checkpoints, 2, str(tmp_path), init=False):
        assert "checkpoint-4/gasloc/rank1.pt is truncated or corrupt" in errors["checkpoint-4"]
        assert "checkpoint-2/gasloc/rank1.pt is missing" in errors["checkpoint-2"]
        assert ("checkpoint-6/gasloc/rank1.pt belongs to another run"
                in errors["checkpoint-6"])
        assert "checkpoint-8/gasloc/manifest.json is missing" in errors["checkpoint-8"]


class FirstStep(TrainerCallback):
    """Each rank's own parameters and outer momentum when the first resumed step begins."""

    def __init__(self, callback):
        self.callback, self.seen = callback, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.seen is None:
            momentum = self.callback.engine.fragments[0].outer.optimizer.state
            self.seen = (flat(model), [s["momentum_buffer"].clone() for s in momentum.values()])


MOMENTUM = dict(outer_optimizer="nesterov", outer_momentum=0.5)  # a state to keep or average


def _grow(rank, world_size, folder):
    train_blocks, validation = blocks()
    callback = GASLoCCallback(topology="1peer", local_steps=2, seed=3, **MOMENTUM)
    probe = FirstStep(callback)
    arguments = training_arguments(folder, max_steps=8, save_strategy="no")
    trainer = Trainer(model=tiny_llama(), args=arguments, train_dataset=train_blocks,
                      eval_dataset=validation, callbacks=[callback, probe])
    trainer.train(resume_from_checkpoint=f"{folder}/checkpoint-4")
    own, momentum = probe.seen
    return own, momentum, gather(flat(trainer.model)), callback.engine.round


def _saved(rank, world_size, folder):
    train_blocks, _ = blocks()
    arguments = training_arguments(folder, max_steps=4, save_strategy="steps", save_steps=4)
    trainer = Trainer(model=tiny_llama(), args=arguments, train_dataset=train_blocks,
                      callbacks=[GASLoCCallback(topology="1peer", local_steps=2, seed=3, **MOMENTUM)])
    trainer.train()


def test_resuming_on_more_workers_keeps_old_states_and_starts_new_ones_from_the_consensus(
        tmp_path):
    run_ranks(_saved, 2, str(tmp_path), init=False)
    saved = [torch.load(tmp_path / f"checkpoint-4/gasloc/rank{r}.pt", weights_only=True)
             for r in range(2)]
    consensus = load_file(tmp_path / "checkpoint-4/model.safetensors")
    results = run_ranks(_grow, 3, str(tmp_path), init=False)
    for rank in range(2):  # old workers: their own parameters and momentum, bit for bit
        own, momentum, _, _ = results[rank]
        model = tiny_llama()
        model.load_state_dict(saved[rank]["model"])
        assert torch.equal(own, flat(model))
        buffer = saved[rank]["gasloc"]["fragments"][0]["outer"]["state"][0]["momentum_buffer"]
        assert torch.equal(momentum[0], buffer)
    own, momentum, finals, rounds = results[2]  # the new worker
    model = tiny_llama()
    model.load_state_dict(consensus, strict=False)
    assert torch.equal(own, flat(model))
    average = sum(s["gasloc"]["fragments"][0]["outer"]["state"][0]["momentum_buffer"] for s in saved) / 2
    assert torch.allclose(momentum[0], average, atol=1e-7)
    assert rounds == 4 and all(torch.equal(f, finals[0]) for f in finals)


def _resized_messages(rank, world_size, extra):
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = GASLoC(model, inner, topology="1peer", local_steps=1, peer_timeout=30)
    if rank == 1:  # a worker whose messages are longer (extra > 0) or shorter than announced
        from hf_gasloc.wire.header import layout_of
        wire = engine.fragments[0].wire
        wire.messages[0] = torch.zeros(wire.messages[0].numel() + extra)
        engine.fragments[0].exchange.layout = layout_of(wire.messages, "native")
    started = time.monotonic()
    try:
        local_step(model, inner, rank, 0)
    except PeerLostError as error:
        return str(error), time.monotonic() - started, bool(torch.isfinite(flat(model)).all())
    return None


def test_a_message_longer_or_shorter_than_expected_is_refused_by_both_ends():
    """On gloo a longer message aborts the receiving process, a shorter one leaves garbage in
    the buffer's tail; the header announces the layout, and both ends skip what does not fit."""
    for extra in (1000, -10):
        for rank, (error, seconds, finite) in enumerate(run_ranks(_resized_messages, 2, extra)):
            peer = 1 - rank
            assert f"rank {peer} (" in error and "every other worker is lost" in error, error
            assert seconds < 10 and finite  # at once, not after peer_timeout
