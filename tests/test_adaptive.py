"""Adaptive H_i: the rule by hand, and a worker on a slow link taking fewer steps."""

import time

import pytest
import torch

from hf_gasloc import GASLoC, GASLoCConfig
from hf_gasloc.adaptive import AdaptiveLocalSteps, Auto

from .distributed import run_ranks
from .workers import TinyNet, local_step


def test_rule_by_hand():
    rule = AdaptiveLocalSteps(target=30)
    assert rule.next_local_steps() == 30  # nothing measured yet
    rule.observe_step(0.1)
    rule.observe_step(0.2)  # moving average: 0.7 * 0.1 + 0.3 * 0.2
    assert rule.step_seconds == pytest.approx(0.13)
    rule.observe_round(2.0, peers_fastest=[float("inf")])
    assert rule.fastest_link == 2.0 and rule.next_local_steps() == 30  # I am the fastest I know
    rule.observe_round(1.5, peers_fastest=[0.2, 5.0])
    # link = fastest of my transfers = 1.5; fastest anywhere = 0.2: 1.3 s spare = 10 steps.
    assert rule.link_seconds == 1.5 and rule.fastest_link == 0.2
    assert rule.next_local_steps() == 30 - 10
    rule.observe_round(0.1, peers_fastest=[0.2])
    assert rule.next_local_steps() == 30 and rule.advertised_fastest() == 0.1
    slow = AdaptiveLocalSteps(target=5)
    slow.observe_step(0.01)
    slow.observe_round(9.0, peers_fastest=[0.0])
    assert slow.next_local_steps() == 1  # never below 1


def test_auto_settings():
    assert GASLoCConfig(local_steps="auto").local_steps == Auto(30)
    assert GASLoCConfig(local_steps="auto:12").local_steps_for(3, 4) == 12
    with pytest.raises(ValueError, match="'auto' or 'auto:H'"):
        GASLoCConfig(local_steps="auto:x")


def _slow_worker(rank, world_size, topology, slow_rank, delay):
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.01)
    engine = GASLoC(model, inner, topology=topology, local_steps="auto:10", seed=2)
    if rank == slow_rank:  # a slow link: every transfer of this worker takes `delay` longer
        load = engine._exchange._load_messages
        engine._exchange._load_messages = lambda buffers: (time.sleep(delay), load(buffers))[1]
    history = []
    step = 0
    while engine.round < 14:
        time.sleep(0.02)  # a 20 ms inner step
        local_step(model, inner, rank, step)
        step += 1
        if engine.steps_in_round == 0:
            history.append(engine.last_round.local_steps)
    state = engine.state_dict()
    restored = GASLoC(TinyNet(), None, topology=topology, local_steps="auto:10", seed=2)
    restored.load_state_dict(state)
    same = (restored.local_steps == engine.local_steps
            and restored.adaptive.state_dict() == engine.adaptive.state_dict())
    return history, engine.local_steps, same


def test_a_worker_on_a_slow_link_takes_fewer_steps():
    results = run_ranks(_slow_worker, 4, "1peer", 1, 0.1)
    for rank, (history, final, restored) in enumerate(results):
        assert history[0] == 10 and restored
        if rank == 1:  # 0.1 s slower per transfer, 20 ms steps: about 5 steps fewer
            assert 2 <= final <= 7, history
        else:
            assert final >= 9, (rank, history)


def test_on_a_complete_graph_nobody_can_adapt():
    for history, final, _ in run_ranks(_slow_worker, 2, "complete", 1, 0.1):
        assert final == 10 and set(history) == {10}
