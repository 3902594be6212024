"""Workers of several processes (``worker_size``), on real gloo ranks (2 or 3 workers of 2
processes): DDP inside a worker, GASLoC between workers."""

import time

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer, TrainerCallback

from hf_gasloc import GASLoC, GASLoCCallback
from hf_gasloc.fabric import LostPeers
from hf_gasloc.integrations.ddp import disable_gradient_sync

from .clm import blocks, tiny_llama, training_arguments
from .distributed import run_ranks
from .workers import DILOCO_OUTER, DiLoCoReference, TinyNet, flat, gather

H, ROUNDS, SIZE = 3, 3, 2


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(8, 6, generator=generator), torch.randn(8, 2, generator=generator)


def _loss(model, rank: int, step: int) -> torch.Tensor:
    x, y = _batch(rank, step)
    return torch.nn.functional.mse_loss(model(x), y)


def _replica_of_ddp(model, ranks: list[int], step: int, optimizer) -> None:
    """One step of DDP over ``ranks``, by hand: the mean of their gradients."""
    grads = []
    for rank in ranks:
        model.zero_grad()
        _loss(model, rank, step).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for p, *g in zip(model.parameters(), *grads):
        p.grad = torch.stack(g).mean(0)
    optimizer.step()


def _ddp_inside_complete(rank, world_size):
    model = TinyNet()
    ddp = DistributedDataParallel(model)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = GASLoC(model, inner, topology="complete", local_steps=H, worker_size=SIZE,
                    **DILOCO_OUTER)
    disable_gradient_sync(ddp, engine.groups.inside)
    # The reference: DiLoCo over 2 replicas, each DDP over 2 processes, written by hand.
    replicas = [TinyNet() for _ in range(world_size // SIZE)]
    optimizers = [torch.optim.AdamW(r.parameters(), lr=1e-2) for r in replicas]
    reference = DiLoCoReference.following(flat(model), engine.config)
    worst = 0.0
    for round_index in range(ROUNDS):
        for step in range(round_index * H, (round_index + 1) * H):
            _loss(ddp, rank, step).backward()
            inner.step()
            inner.zero_grad()
            for w, (replica, optimizer) in enumerate(zip(replicas, optimizers)):
                _replica_of_ddp(replica, list(range(w * SIZE, (w + 1) * SIZE)), step, optimizer)
        anchor = reference.step(torch.stack([reference.anchor - flat(r) for r in replicas]).mean(0))
        for replica in replicas:  # a copy each: vector_to_parameters shares the storage
            torch.nn.utils.vector_to_parameters(anchor.clone(), replica.parameters())
        worst = max(worst, float((flat(model) - anchor).abs().max()))
    return dict(worst=worst, params=gather(flat(model)), groups=(
        engine.groups.worker, engine.groups.position, engine.world_size, engine.rank),
        agreed=_agree(rank, engine.groups))


def _agree(rank, groups):
    """Worker 0's first process did not get worker 1's message and lost it; the others did."""
    lost = LostPeers(groups.worker, ["host"] * groups.workers)
    weights = {1 - groups.worker: 0.5}
    if rank == 0:
        weights = {}
        lost.mark(1, "round 4", "a test")
    agreed = groups.agree_on_peers(weights, lost, "round 4")
    return agreed, lost.flags, groups.first_position(f"from rank {rank}")


def test_ddp_inside_two_workers_is_diloco_over_ddp_replicas_and_processes_agree_on_peers():
    results = run_ranks(_ddp_inside_complete, 4)
    assert [r["groups"] for r in results] == [(0, 0, 2, 0), (0, 1, 2, 0), (1, 0, 2, 1),
                                               (1, 1, 2, 1)]
    for r in results:
        assert r["worst"] < 1e-6, f"off DiLoCo over DDP replicas by {r['worst']}"
    params = results[0]["params"]
    assert torch.equal(params[0], params[1]) and torch.equal(params[2], params[3])  # replicas
    agreed = [r["agreed"] for r in results]  # what one process missed, its worker misses
    assert agreed[0][:2] == agreed[1][:2] == ({}, [False, True])
    assert agreed[2][:2] == agreed[3][:2] == ({0: 0.5}, [False, False])
    assert [a[2] for a in agreed] == ["from rank 0", "from rank 0", "from rank 2", "from rank 2"]


def _bad_worker_size(rank, world_size, settings):
    with pytest.raises(ValueError) as error:
        GASLoC(TinyNet(), None, worker_size=SIZE, **settings)
    return str(error.value)


def test_worker_sizes_that_do_not_fit_are_refused_naming_the_setting():
    # The other refusals (auto:H, fewer than 2 workers): tests/unit/test_config.py.
    for message in run_ranks(_bad_worker_size, 3, {}):
        assert "worker_size=2" in message and "3 processes" in message


class MidRound(TrainerCallback):
    """Every process's parameters at step 5, inside a round (H = 3)."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 5:
            self.params = gather(flat(model))


def _trainer(rank, world_size, folder, resume=None):
    train, validation = blocks(train_blocks=128)
    probe = MidRound()
    trainer = Trainer(model=tiny_llama(), args=training_arguments(
        folder, max_steps=12, save_strategy="steps", save_steps=6, save_total_limit=3),
        train_dataset=train, eval_dataset=validation, callbacks=[probe])
    callback = GASLoCCallback(topology="1peer", local_steps=3, worker_size=SIZE).bind(trainer)
    trainer.train(resume_from_checkpoint=resume)
    summary = callback.summary()
    loss = trainer.evaluate()["eval_loss"]
    return dict(params=gather(flat(trainer.model)), summary=summary, loss=loss,
                card=callback._card_section(), mid_round=getattr(probe, "params", None))


def test_the_trainer_runs_two_workers_of_two_processes_and_resumes_bit_exactly(tmp_path):
    straight = run_ranks(_trainer, 4, str(tmp_path / "a"), init=False, timeout=600)
    resumed = run_ranks(_trainer, 4, str(tmp_path / "b"), str(tmp_path / "a" / "checkpoint-6"),
                        init=False, timeout=600)
    for r in straight:
        assert r["summary"]["gasloc_workers"] == 2 and r["summary"]["gasloc_world_size"] == 4
        assert r["summary"]["gasloc/rounds"] == 4
    mid = straight[0]["mid_round"]  # a worker's processes step together (DDP inside it) ...
    assert torch.equal(mid[0], mid[1]) and torch.equal(mid[2], mid[3])
    assert not torch.equal(mid[0], mid[2])  # ... and the workers apart (GASLoC between them)
    final = straight[0]["params"]  # at the end every process holds the consensus
    assert all(torch.equal(final[0], p) for p in final[1:])
    saved = tmp_path / "a" / "checkpoint-6" / "gasloc"
    assert sorted(p.name for p in saved.iterdir()) == ["manifest.json", "rank0.pt", "rank1.pt"]
    workers = [torch.load(saved / f"rank{w}.pt", weights_only=True)["model"] for w in (0, 1)]
    assert any(not torch.equal(workers[0][k], workers[1][k]) for k in workers[0])  # apart
    for before, after in zip(straight, resumed):
        assert torch.equal(before["params"][0], after["params"][0])
        assert torch.equal(before["params"][2], after["params"][2])
    assert "| workers | 2 |" in straight[0]["card"] and "| processes | 4 |" in straight[0]["card"]


def _plugin_loop(rank, world_size):
    from accelerate import Accelerator

    from hf_gasloc import GASLoCPlugin

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == world_size == 4, "accelerate must see every rank"
    model = TinyNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    engine = GASLoCPlugin(topology="1peer", local_steps=H, worker_size=SIZE).attach(
        accelerator, model, optimizer)
    for step in range(H - 1):
        _loss(model, rank, step).backward()
        optimizer.step()
        optimizer.zero_grad()
    mid_round = gather(flat(model))
    _loss(model, rank, H - 1).backward()
    optimizer.step()  # the outer step
    return mid_round, gather(flat(model)), engine.round, engine.world_size


def test_the_plugin_runs_two_workers_of_two_processes():
    for mid_round, after, rounds, workers in run_ranks(_plugin_loop, 4, init=False):
        assert (rounds, workers) == (1, 2)
        assert torch.equal(mid_round[0], mid_round[1]) and torch.equal(mid_round[2], mid_round[3])
        assert not torch.equal(mid_round[0], mid_round[2])
        assert all(torch.allclose(after[0], p, atol=1e-6) for p in after[1:])  # 1peer on 2


def _one_process_late(rank, world_size):
    model = TinyNet()
    ddp = DistributedDataParallel(model)
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = GASLoC(model, inner, topology="ring", local_steps=2, peer_timeout=3,
                    worker_size=SIZE, outer_optimizer="sgd", outer_lr=1.0)
    disable_gradient_sync(ddp, engine.groups.inside)
    step = 0
    while engine.round < 8:
        _loss(ddp, rank, step).backward()
        if rank == 5 and engine.round == 2 and engine.steps_in_round == 1:
            time.sleep(12)  # after the worker's All-Reduce: only this process posts late
        inner.step()
        inner.zero_grad()
        step += 1
    return dict(lost=engine.lost_peers, params=flat(model),
                finite=bool(torch.isfinite(flat(model)).all()))


def test_a_peer_one_process_missed_is_missed_and_lost_by_every_process_of_the_worker():
    """Round 2: worker 2's first process posts in time, its second 12 s late. The first
    processes of workers 0 and 1 receive worker 2's message, the second ones time out on it;
    each worker agrees to leave worker 2 out and lose it, so its processes stay identical."""
    results = run_ranks(_one_process_late, 6, abandon=(4, 5), timeout=300)
    for r in results[:4]:
        assert r["finite"] and r["lost"] == [2]
    assert torch.equal(results[0]["params"], results[1]["params"])
    assert torch.equal(results[2]["params"], results[3]["params"])


def _save_or_resume(rank, world_size, folder, resuming):
    from hf_gasloc.resume import resume, save

    model = TinyNet()
    ddp = DistributedDataParallel(model)
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = GASLoC(model, inner, topology="1peer", local_steps=H, worker_size=SIZE,
                    outer_optimizer="nesterov", outer_lr=0.7, outer_momentum=0.5)
    disable_gradient_sync(ddp, engine.groups.inside)
    if resuming:
        how = resume(folder, engine, model, inner, step=2 * H)
        return dict(how=how, round=engine.round, params=flat(model))
    for step in range(2 * H):
        _loss(ddp, rank, step).backward()
        inner.step()
        inner.zero_grad()
    save(folder, engine, model, inner, step=2 * H)
    return dict(params=flat(model))


def test_a_run_of_three_workers_resumes_on_two_whole_workers(tmp_path):
    saved = run_ranks(_save_or_resume, 6, str(tmp_path), False)
    assert sorted(p.name for p in (tmp_path / "gasloc").iterdir()) == [
        "manifest.json", "rank0.pt", "rank1.pt", "rank2.pt"]
    resumed = run_ranks(_save_or_resume, 4, str(tmp_path), True)
    for rank, r in enumerate(resumed):  # each process takes its worker's own state
        assert r["round"] == 2 and "resized from 3 workers" in r["how"]
        assert torch.equal(r["params"], saved[rank]["params"])


def _delayed(rank, world_size, folder, resume_from):
    from hf_gasloc.resume import resume, save

    model = TinyNet()
    ddp = DistributedDataParallel(model)
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = GASLoC(model, inner, topology="1peer", local_steps=H, worker_size=SIZE,
                    outer_delay=1, outer_optimizer="sgd", outer_lr=1.0)
    disable_gradient_sync(ddp, engine.groups.inside)
    first = 0
    if resume_from:
        resume(folder, engine, model, inner, step=2 * H)
        first = 2 * H
    for step in range(first, 4 * H):
        _loss(ddp, rank, step).backward()
        inner.step()
        inner.zero_grad()
        if step + 1 == 2 * H and not resume_from:  # round 1 is in flight: it lands a step later
            save(folder, engine, model, inner, step=2 * H)
    return flat(model)


def test_a_checkpoint_with_a_round_in_flight_resumes_bit_exactly_on_workers_of_two(tmp_path):
    straight = run_ranks(_delayed, 4, str(tmp_path), False)
    resumed = run_ranks(_delayed, 4, str(tmp_path), True)
    for before, after in zip(straight, resumed):
        assert torch.equal(before, after)
