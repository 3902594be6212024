"""The paper's accelerated form (``iterate_momentum``): its exact reductions to our rules."""

import torch

from hf_gasloc import GASLoC

from .distributed import run_ranks
from .workers import TinyNet, flat, gather, local_step, mean


def _reductions(rank, world_size):
    finals = {}
    for name, rule, momentum in (("sgd", "sgd", 0.0), ("paper0", "iterate_momentum", 0.0)):
        model = TinyNet()
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
        engine = GASLoC(model, inner, topology="2peer", outer_optimizer=rule, outer_lr=0.8,
                        outer_momentum=momentum, local_steps=2, seed=3)
        for step in range(8):
            local_step(model, inner, rank, step)
        finals[name] = flat(model)
    drifts = {}
    for name, rule in (("sgdm", "sgdm"), ("paper", "iterate_momentum")):
        model = TinyNet()
        engine = GASLoC(model, None, topology="2peer", outer_optimizer=rule, outer_lr=0.8,
                        outer_momentum=0.6, seed=3)
        with torch.no_grad():  # workers that disagree, and no local progress: x = a each round
            torch.manual_seed(rank)
            for anchor in engine.flat.anchors:
                anchor.add_(torch.randn_like(anchor))
            engine.flat.store_anchor()
        for _ in range(6):
            engine.outer_step()
        drifts[name] = flat(model)
    return finals, drifts


def test_iterate_momentum_reduces_to_outer_sgd_and_to_heavy_ball_without_local_progress():
    for finals, drifts in run_ranks(_reductions, 4):
        assert torch.equal(finals["paper0"], finals["sgd"]), "gamma = 0 is outer SGD at lr eta"
        assert torch.allclose(drifts["paper"], drifts["sgdm"], atol=1e-6, rtol=0), \
            "without local progress it is heavy-ball momentum gamma on the anchor"


def _complete(rank, world_size):
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    GASLoC(model, inner, topology="complete", outer_optimizer="iterate_momentum",
           outer_momentum=0.6, local_steps=2)
    for step in range(6):
        local_step(model, inner, rank, step)
    return gather(flat(model))


def test_iterate_momentum_on_the_complete_graph_does_not_keep_workers_identical():
    anchors = run_ranks(_complete, 2)[0]
    assert not torch.equal(anchors[0], anchors[1]), "documented: it is not DiLoCo there"


def _complete_mean(rank, world_size, eta, gamma):
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = GASLoC(model, None, topology="complete", outer_optimizer="iterate_momentum",
                    outer_lr=eta, outer_momentum=gamma)
    means, drifts = [], []  # theta_bar_t and the mean pseudo-gradient Delta_bar_t
    for round_index in range(6):
        starts = gather(flat(model))  # x_i == theta_i at the start of a round
        for step in range(2):
            local_step(model, inner, rank, 2 * round_index + step)
        lives = gather(flat(model))
        means.append(mean(starts))
        drifts.append(mean([s - x for s, x in zip(starts, lives)]))
        engine.outer_step()
    means.append(mean(gather(flat(model))))
    return means, drifts


def test_iterate_momentum_on_the_complete_graph_moves_the_mean_by_diloco_nesterov():
    """docs/guide/algorithm.md: the mean obeys torch's Nesterov recursion on the mean pseudo-gradient,
    theta_{t+1} = theta_t - eta D_t + gamma (theta_t - theta_{t-1}) - gamma eta (D_t - D_{t-1}),
    from the second round on; the first round is outer SGD."""
    eta, gamma = 0.8, 0.6
    means, drifts = run_ranks(_complete_mean, 3, eta, gamma)[0]
    assert torch.allclose(means[1], means[0] - eta * drifts[0], atol=1e-6, rtol=0)
    for t in range(1, len(drifts)):
        expected = (means[t] - eta * drifts[t] + gamma * (means[t] - means[t - 1])
                    - gamma * eta * (drifts[t] - drifts[t - 1]))
        assert torch.allclose(means[t + 1], expected, atol=1e-6, rtol=0), t
