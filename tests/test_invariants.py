"""ALGORITHM.md's invariants, on real gloo process groups."""

import torch
from torch.nn.parallel import DistributedDataParallel

from hf_gasloc import GASLoC
from hf_gasloc.fabric import gather_json
from hf_gasloc.integrations.ddp import disable_gradient_sync

from .distributed import count_collectives, run_ranks
from .workers import (DiLoCoReference, TinyNet, flat, gather, load_training, local_step, mean,
                      mean_anchor_against_diloco, train_rounds)

H = 3


def _complete_is_diloco(rank, world_size):
    errors = {}
    for name, momentum in (("sgd", 0.0), ("sgdm", 0.9), ("nesterov", 0.9)):
        model = TinyNet()
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
        engine = GASLoC(model, None, topology="complete", outer_optimizer=name, outer_lr=0.7,
                        outer_momentum=momentum, local_steps=H)
        reference = DiLoCoReference(flat(model), name, 0.7, momentum)
        worst = 0.0
        for round_index in range(4):
            for step in range(H):
                local_step(model, inner, rank, round_index * H + step)
            pseudo_gradient = mean([reference.anchor - x for x in gather(flat(model))])
            expected = reference.step(pseudo_gradient)
            engine.outer_step()
            worst = max(worst, float((flat(model) - expected).abs().max()))
        errors[name] = worst
    return errors


def test_invariant_1_complete_equals_diloco_parameter_for_parameter():
    for errors in run_ranks(_complete_is_diloco, 3):
        assert errors.keys() == {"sgd", "sgdm", "nesterov"}
        for name, error in errors.items():
            assert error < 1e-6, f"{name}: complete differs from DiLoCo by {error}"


def _mean_anchor_follows_diloco(rank, world_size, topologies):
    report = {}
    for topology in topologies:
        model = TinyNet()
        inner = torch.optim.SGD(model.parameters(), lr=0.05)
        engine = GASLoC(model, None, topology=topology, outer_optimizer="nesterov",
                        outer_lr=0.7, outer_momentum=0.9, seed=11, local_steps=H)
        worst, spread = mean_anchor_against_diloco(model, inner, engine, rank, 6, H)
        report[topology] = (worst, spread)
    return report


def test_invariant_2_mean_anchor_is_diloco_on_the_mean_pseudo_gradient():
    for world_size, topologies in ((4, ["1peer", "2peer", "ring"]), (3, ["1peer", "exponential"])):
        for report in run_ranks(_mean_anchor_follows_diloco, world_size, topologies):
            for topology, (error, spread) in report.items():
                assert error < 1e-6, f"{topology} on {world_size}: mean anchor off by {error}"
                # Sparse gossip leaves a consensus error: workers really differ.
                assert spread > 1e-4, f"{topology}: anchors identical, gossip not sparse?"


def _no_gradient_all_reduce(rank, world_size):
    model = DistributedDataParallel(TinyNet())
    plain = DistributedDataParallel(TinyNet())
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    plain_inner = torch.optim.SGD(plain.parameters(), lr=0.1)
    with count_collectives() as plain_counts:
        local_step(plain, plain_inner, rank, 0)
    disable_gradient_sync(model)
    GASLoC(model.module, inner, topology="1peer", local_steps=100)
    with count_collectives() as counts:
        local_step(model, inner, rank, 0)
        with model.no_sync():
            local_step(model, inner, rank, 1)
        local_step(model, inner, rank, 2)
    lives = gather(flat(model))
    return dict(counts), dict(plain_counts), model.require_backward_grad_sync, lives


def test_invariant_3_no_gradient_all_reduce_during_local_steps():
    for counts, plain_counts, sync_flag, lives in run_ranks(_no_gradient_all_reduce, 2):
        assert plain_counts.get("gloo:all_reduce", 0) >= 1, "the counter must see plain DDP"
        assert counts == {}, f"collectives during local steps: {counts}"
        assert sync_flag is False, "no_sync() must not turn gradient sync back on"
        assert not torch.equal(lives[0], lives[1]), "ranks trained on different data"


def _graphs_and_resume(rank, world_size, folder):
    def run(rounds, resume=False):
        model = TinyNet()
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
        engine = GASLoC(model, inner, topology="1peer", seed=21, local_steps=2)
        checkpoint = f"{folder}/rank{rank}.pt"
        if resume:
            load_training(model, inner, engine, checkpoint)
        train_rounds(model, inner, engine, rank, rounds, save_to=None if resume else checkpoint)
        return flat(model), engine
    uninterrupted, engine = run(6)
    graphs = [engine.topology.graph(t).matrix() for t in range(20)]
    every_rank = gather_json(graphs)
    resumed, _ = run(6, resume=True)
    return every_rank, uninterrupted, resumed


def test_invariant_4_same_seed_same_graphs_on_every_rank_and_after_resume(tmp_path):
    for every_rank, uninterrupted, resumed in run_ranks(_graphs_and_resume, 4, str(tmp_path)):
        assert all(graphs == every_rank[0] for graphs in every_rank)
        assert torch.equal(uninterrupted, resumed), "resume mid-round is not bit-exact"
