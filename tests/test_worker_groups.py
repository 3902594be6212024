"""Workers of several processes (``worker_size``), on 4 real gloo ranks = 2 workers x 2: DDP
inside a worker, GASLoC between workers."""

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer, TrainerCallback

from hf_gasloc import GASLoC, GASLoCCallback
from hf_gasloc.fabric import LostPeers, WorkerGroups
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
        bytes=engine.totals.bytes_sent)


def test_ddp_inside_two_workers_on_the_complete_graph_is_diloco_over_two_ddp_replicas():
    results = run_ranks(_ddp_inside_complete, 4)
    assert [r["groups"] for r in results] == [(0, 0, 2, 0), (0, 1, 2, 0), (1, 0, 2, 1),
                                               (1, 1, 2, 1)]
    for r in results:
        assert r["worst"] < 1e-6, f"off DiLoCo over DDP replicas by {r['worst']}"
    params = results[0]["params"]
    assert torch.equal(params[0], params[1]) and torch.equal(params[2], params[3])  # replicas


def _agree(rank, world_size):
    groups = WorkerGroups.build(SIZE)
    lost = LostPeers(groups.worker, ["host"] * groups.workers)
    weights = {1 - groups.worker: 0.5}
    if rank == 0:  # worker 0's first process did not get worker 1's message and lost it
        weights = {}
        lost.mark(1, "round 4", "a test")
    agreed = groups.agree_on_peers(weights, lost, "round 4")
    return agreed, lost.flags, groups.first_position(f"from rank {rank}")


def test_what_one_process_of_a_worker_missed_every_process_of_it_misses():
    results = run_ranks(_agree, 4)
    assert results[0][:2] == ({}, [False, True])
    assert results[1][:2] == ({}, [False, True])  # its partner had the message, drops it too
    assert results[2][:2] == ({0: 0.5}, [False, False])  # the other worker agreed on nothing new
    assert results[3][:2] == ({0: 0.5}, [False, False])
    assert [r[2] for r in results] == ["from rank 0", "from rank 0", "from rank 2", "from rank 2"]


def _bad_worker_size(rank, world_size, settings):
    with pytest.raises(ValueError) as error:
        GASLoC(TinyNet(), None, worker_size=SIZE, **settings)
    return str(error.value)


def test_worker_sizes_that_do_not_fit_are_refused_naming_the_setting():
    for message in run_ranks(_bad_worker_size, 3, {}):
        assert "worker_size=2" in message and "3 processes" in message
    for message in run_ranks(_bad_worker_size, 4, {"local_steps": "auto:4"}):
        assert "worker_size=2" in message and "fixed local_steps" in message


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
    run_ranks(_trainer, 4, str(tmp_path / "b"), init=False, timeout=600)
    resumed = run_ranks(_trainer, 4, str(tmp_path / "b"), str(tmp_path / "b" / "checkpoint-6"),
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
