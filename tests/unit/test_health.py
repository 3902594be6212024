"""Non-finite containment: the policy of ``round/health.py``, stage by stage, on the fake fabric."""

import logging

import pytest
import torch

from hf_gasloc import GASLoC
from hf_gasloc.errors import NonFiniteError
from hf_gasloc.round.health import Health, reset_nonfinite_state
from hf_gasloc.schedule.topology import build_topology

from ..fake_fabric import Fault, run_workers
from ..workers import TinyNet, flat, local_step


def test_health_counts_unhealthy_rounds_in_a_row_and_gives_up():
    health = Health(rank=3, max_bad_rounds=2)
    assert health.proposal_is_healthy(1.0, 0, 5)
    assert not health.proposal_is_healthy(float("nan"), 4, 20)
    assert not health.proposal_is_healthy(float("inf"), 6, 30)  # not in a row: starts again
    assert (health.recoveries, health.in_a_row) == (2, 1)
    with pytest.raises(NonFiniteError, match="rank 3: .* 2 rounds in a row .*round 7"):
        health.proposal_is_healthy(float("nan"), 7, 35)


def test_finite_peers_leave_out_what_is_not_finite_and_say_so(caplog):
    health = Health(rank=0, max_bad_rounds=3)
    with caplog.at_level(logging.WARNING):
        kept = health.finite_peers({2: 1.0, 5: float("nan"), 7: float("inf")}, round_index=9)
    assert kept == [2]
    assert "message of rank 5 in round 9 is not finite" in caplog.text
    assert "message of rank 7 in round 9" in caplog.text


def test_the_inner_optimizer_forgets_only_its_non_finite_state():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    adam = torch.optim.AdamW([a, b])
    (a.sum() + b.sum()).backward()
    adam.step()
    adam.state[b]["exp_avg"][1] = float("nan")
    kept = adam.state[a]["exp_avg"].clone()
    assert reset_nonfinite_state(adam) == 1
    assert torch.equal(adam.state[a]["exp_avg"], kept)
    assert not adam.state[b]["exp_avg"].any() and int(adam.state[b]["step"]) == 0


def _nan_worker(rank, comm, sick, seed):
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = GASLoC(model, inner, comm=comm, topology="2peer", seed=seed, local_steps=2,
                    outer_optimizer="sgd", outer_lr=1.0, max_bad_rounds=2)
    anchor = flat(model)
    local_step(model, inner, rank, 0)
    if rank == sick:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
    live = flat(model)
    local_step(model, inner, rank, 1)  # the round: z = x (outer lr 1)
    return anchor, live, flat(model), engine.health.recoveries


def test_a_nan_worker_takes_its_healthy_peers_average_and_they_leave_it_out():
    """Proposals: rank 1 is not finite. It sends zeros flagged unhealthy; its peers mix only
    their healthy neighbours (rank 1's weight stays with them); rank 1 takes the weighted
    average of its peers' proposals."""
    results = run_workers(_nan_worker, 4, 1, 7)
    graph = build_topology("2peer", 4, seed=7).graph(0)
    after_step = [_one_more_step(r, live) for r, (_, live, _, _) in enumerate(results)]
    for rank, (_, _, new, recoveries) in enumerate(results):
        peers = graph.peers[rank]
        assert torch.isfinite(new).all() and recoveries == (1 if rank == 1 else 0)
        if rank == 1:
            expected = sum(after_step[j] for j in peers) / len(peers)
        else:
            expected = after_step[rank] + sum(w * (after_step[j] - after_step[rank])
                                              for j, w in peers.items() if j != 1)
        assert torch.allclose(new, expected, atol=1e-6), rank


def _one_more_step(rank, live):
    model = TinyNet()
    with torch.no_grad():
        offset = 0
        for p in model.parameters():
            p.copy_(live[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
    if torch.isfinite(live).all():
        local_step(model, torch.optim.SGD(model.parameters(), lr=0.1), rank, 1)
    return flat(model)


def _both_sick(rank, comm):
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    GASLoC(model, inner, comm=comm, topology="1peer", local_steps=1, outer_optimizer="sgd",
           outer_lr=1.0, max_bad_rounds=2)
    anchor = flat(model)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("inf"))
    local_step(model, inner, rank, 0)
    first = flat(model)
    try:
        for step in range(1, 3):
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
            local_step(model, inner, rank, step)
    except NonFiniteError as error:
        return anchor, first, str(error)
    return anchor, first, None


def test_with_no_healthy_peer_a_worker_keeps_its_anchor_and_stops_after_max_bad_rounds():
    for anchor, first, error in run_workers(_both_sick, 2):
        assert torch.equal(first, anchor)  # no progress, but nothing lost
        assert error is not None and "2 rounds in a row" in error


def _corrupted_message(rank, comm):
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = GASLoC(model, inner, comm=comm, topology="1peer",
                    local_steps=1, outer_optimizer="sgd", outer_lr=1.0)
    local_step(model, inner, rank, 0)
    return flat(model), engine.health.recoveries


def test_a_message_that_arrives_non_finite_is_left_out(caplog):
    with caplog.at_level(logging.WARNING):
        (x0, r0), (x1, r1) = run_workers(_corrupted_message, 2, faults=[Fault("nan", sender=1)])
    assert torch.isfinite(x0).all() and torch.isfinite(x1).all() and (r0, r1) == (0, 0)
    assert not torch.equal(x0, x1)  # rank 0 kept its own proposal, rank 1 mixed rank 0's
    assert "rank 0: the message of rank 1 in round 0 is not finite; left out" in caplog.text


def _save_after_nan(rank, comm):
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = GASLoC(model, inner, comm=comm, topology="1peer", local_steps=4)
    anchor = flat(model)
    local_step(model, inner, rank, 0)
    if rank == 0:
        with torch.no_grad():
            next(model.parameters())[0] = float("nan")
    recovered = engine.health.recover_before_save(engine.round, engine.inner_step)
    return recovered, anchor, flat(model)


def test_a_worker_is_rolled_back_before_its_state_is_saved():
    (recovered0, anchor0, live0), (recovered1, anchor1, live1) = run_workers(_save_after_nan, 2)
    assert recovered0 and torch.equal(live0, anchor0)  # back to its anchor
    assert not recovered1 and not torch.equal(live1, anchor1)  # a healthy worker keeps going
