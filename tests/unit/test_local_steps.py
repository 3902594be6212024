"""H_i policies by hand: the adaptive rule, the auto setting."""

import pytest

from hf_gasloc import GASLoCConfig
from hf_gasloc.schedule.adaptive import AdaptiveLocalSteps, Auto


def test_rule_by_hand():
    rule = AdaptiveLocalSteps(target=30, rank=0, world_size=4)
    assert rule.steps_for(peers=[1]) == 30  # nothing measured yet
    rule.observe_step(0.1)
    rule.observe_step(0.2)  # moving average: 0.7 * 0.1 + 0.3 * 0.2
    assert rule.step_seconds == pytest.approx(0.13)
    rule.observe_transfer(0, 2.0)
    rule.observe_transfer(1, 1.5)  # my link: my fastest recent transfer
    assert rule.links[0] == 1.5 and rule.steps_for(peers=[1]) == 30  # I am the only one known
    peer = AdaptiveLocalSteps(target=30, rank=1, world_size=4)
    peer.observe_transfer(1, 0.2)
    far = AdaptiveLocalSteps(target=30, rank=3, world_size=4)
    far.observe_transfer(0, 5.0)
    peer.merge(far.table())  # tables spread by gossip: 3's entry reaches 0 through 1
    rule.merge(peer.table())
    assert rule.links[:2] == [1.5, 0.2] and rule.links[3] == 5.0
    # Round with peer 1: slowest link 1.5, fastest 0.2, 1.3 s spare = 10 steps fewer.
    assert rule.steps_for(peers=[1]) == 20
    # Round with peer 3 (5.0 s): its slowness costs me too, or the delay spreads.
    assert rule.steps_for(peers=[3]) == 1
    stale = AdaptiveLocalSteps(target=30, rank=3, world_size=4)
    stale.observe_transfer(-5, 9.0)  # older than what rule knows of rank 3
    rule.merge(stale.table())
    assert rule.links[3] == 5.0


def test_auto_settings():
    assert GASLoCConfig(local_steps="auto").local_steps == Auto(30)
    assert GASLoCConfig(local_steps="auto:12").local_steps_for(3, 4) == 12
    with pytest.raises(ValueError, match="'auto' or 'auto:H'"):
        GASLoCConfig(local_steps="auto:x")


def test_a_worker_whose_steps_are_slower_takes_proportionally_fewer():
    slow = AdaptiveLocalSteps(target=30, rank=0, world_size=2)
    fast = AdaptiveLocalSteps(target=30, rank=1, world_size=2)
    for rule, step in ((slow, 0.2), (fast, 0.1)):
        rule.observe_step(step)
        rule.observe_transfer(0, 0.5)  # the same link
    slow.merge(fast.table())
    fast.merge(slow.table())
    assert slow.step_times == [0.2, 0.1] == fast.step_times
    assert slow.steps_for(peers=[1]) == 15  # half the steps of the fastest: its round's time
    assert fast.steps_for(peers=[0]) == 30
    slow.links[1] = 0.1  # and a link 0.4 s slower than the fastest costs 2 more of its steps
    assert slow.steps_for(peers=[1]) == 13
