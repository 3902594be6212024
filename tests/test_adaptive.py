"""Adaptive H_i: the rule by hand, and a worker on a slow link taking fewer steps."""

import time

import torch

from hf_gasloc import GASLoC
from hf_gasloc.schedule.local_steps import FixedLocalSteps

from .distributed import run_ranks
from .workers import TinyNet, local_step


def _slow_worker(rank, world_size, topology, slow_rank, delay):
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.01)
    engine = GASLoC(model, inner, topology=topology, local_steps="auto:10", seed=2)
    if rank == slow_rank:  # a slow link: every transfer of this worker takes `delay` longer
        post = torch.distributed.batch_isend_irecv

        def slow_link(ops):  # the header (fp64) goes at once, the model's message late
            if any(op.tensor.dtype != torch.float64 for op in ops):
                time.sleep(delay)
            return post(ops)

        torch.distributed.batch_isend_irecv = slow_link
    history, step = [], 0
    while engine.round < 16:
        time.sleep(0.02)  # a 20 ms inner step
        local_step(model, inner, rank, step)
        step += 1
        if engine.steps_in_round == 0:
            history.append(engine.last_round.inner_steps)
    met_slow = [slow_rank == rank or slow_rank in engine.topology.graph(r).peers[rank]
                for r in range(16)]
    state = engine.state_dict()
    restored = GASLoC(TinyNet(), None, topology=topology, local_steps="auto:10", seed=2)
    restored.load_state_dict(state)
    same = (restored.round_length == engine.round_length
            and restored.local_steps.state_dict() == engine.local_steps.state_dict())
    return history, met_slow, same


def test_workers_meeting_a_slow_link_take_fewer_steps():
    for rank, (history, met_slow, restored) in enumerate(run_ranks(_slow_worker, 4, "1peer", 1, 0.1)):
        assert history[0] == 10 and restored
        # After a few rounds every table knows rank 1's link (0.1 s slower, 20 ms steps):
        # whoever exchanges with it takes about 5 steps fewer, everyone else keeps H = 10.
        for round_index in range(6, 16):
            steps = history[round_index]
            if met_slow[round_index]:
                assert 2 <= steps <= 7, (rank, round_index, history)
            else:
                assert steps >= 9, (rank, round_index, history)


def _complete(rank, world_size):
    engine = GASLoC(TinyNet(), None, topology="complete", local_steps="auto:10")
    return isinstance(engine.local_steps, FixedLocalSteps), engine.round_length


def test_on_a_complete_graph_nobody_adapts():
    for fixed, local_steps in run_ranks(_complete, 2):
        assert fixed and local_steps == 10
