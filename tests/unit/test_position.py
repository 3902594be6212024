"""The position in the run (rounds, step counters, lockstep) and the timing of inner steps."""

import torch

from hf_gasloc.round.inner import InnerStepHook
from hf_gasloc.round.position import RoundPosition


def test_a_free_round_ends_after_h_inner_steps_and_lands_by_inner_steps():
    position = RoundPosition()
    for _ in range(2):
        position.count(real=True)
    assert not position.round_is_over(3) and not position.is_idle(3)
    position.count(real=True)
    assert position.round_is_over(3)
    assert position.clock == position.inner_step == 3
    assert position.lands_at(outer_delay=2) == 5


def test_a_lockstep_round_counts_idle_steps_and_lands_at_its_last_step():
    position = RoundPosition(round_steps=4)
    position.count(real=True)
    position.count(real=True)
    assert position.is_idle(2) and not position.round_is_over(2)
    assert position.lands_at(outer_delay=0) == 4  # not before every peer has posted
    position.count(real=False)
    assert (position.steps_in_round, position.inner_step, position.ticks) == (2, 2, 3)
    position.count(real=False)
    assert position.round_is_over(2) and position.clock == 4
    position.start_round(position.round + 1)
    assert (position.round, position.steps_in_round, position.ticks_in_round) == (1, 0, 0)
    assert position.lands_at(outer_delay=6) == 10


def test_a_resized_resume_keeps_the_run_counters_and_starts_the_round_afresh():
    saved = RoundPosition(round_steps=4, round=7, steps_in_round=2, inner_step=30, ticks=30,
                          ticks_in_round=2).state_dict()
    same, resized = RoundPosition(round_steps=4), RoundPosition(round_steps=4)
    same.load_state_dict(saved)
    resized.load_state_dict(saved, resized=True)
    assert same.state_dict() == saved
    assert resized.state_dict() == dict(saved, round=0, steps_in_round=0, ticks_in_round=0)


def test_the_hook_times_steps_without_the_outer_step_and_not_across_a_pause():
    times = []
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    hook = InnerStepHook(times.append)
    hook.attach(optimizer)
    for _ in range(3):
        optimizer.step()
    hook.pause()
    optimizer.step()
    hook.timed_by_caller = True
    optimizer.step()
    assert times[0] is None and times[3] is None and times[4] is None
    assert all(isinstance(t, float) and t >= 0 for t in times[1:3])
