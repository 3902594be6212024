"""The outer defaults: the values chosen per band of H and rounds, user values winning, the why
that logs and all_results.json show, and the warning for settings known to overshoot."""

import logging

import pytest
import torch

from hf_gasloc import GASLoCConfig
from hf_gasloc.round.outer_defaults import choose_outer, warn_if_known_to_hurt


@pytest.mark.parametrize("h,rounds,expected", [
    (1, None, ("sgd", 1.0, 0.0)),  # gossip AdamW
    (10, None, ("sgd", 1.0, 0.0)),  # accelerate's LocalSGD on the complete graph
    (16, 1000, ("sgd", 1.0, 0.0)),
    (17, None, ("nesterov", 0.7, 0.5)),
    (30, 60, ("nesterov", 0.7, 0.5)),
    (100, None, ("nesterov", 0.7, 0.5)),
    (30, 12, ("sgd", 1.0, 0.0)),  # too few rounds for momentum to build up
    (500, 29, ("sgd", 1.0, 0.0)),
])
def test_the_defaults_per_band(h, rounds, expected):
    chosen = choose_outer(None, None, None, h, rounds)
    assert (chosen.optimizer, chosen.lr, chosen.momentum) == expected
    assert chosen.why.endswith(f"default for H = {h}" + (f", {rounds} rounds" if rounds else ""))


def test_values_the_user_sets_win_and_the_rest_is_filled_around_them():
    lr_only = choose_outer(None, 0.5, None, 30)
    assert (lr_only.optimizer, lr_only.lr, lr_only.momentum) == ("nesterov", 0.5, 0.5)
    assert lr_only.why == "outer_optimizer nesterov, outer_momentum 0.5: default for H = 30"
    momentum_only = choose_outer(None, None, 0.3, 10)
    assert (momentum_only.optimizer, momentum_only.lr) == ("nesterov", 0.7)
    assert choose_outer(None, None, 0.0, 100).optimizer == "sgd"
    nesterov_at_small_h = choose_outer("nesterov", None, None, 10)
    assert (nesterov_at_small_h.lr, nesterov_at_small_h.momentum) == (0.7, 0.5)
    paper = choose_outer("iterate_momentum", None, None, 1)
    assert (paper.lr, paper.momentum) == (1.0, 0.3)
    every = choose_outer("sgdm", 0.2, 0.1, 30)
    assert (every.optimizer, every.lr, every.momentum) == ("sgdm", 0.2, 0.1)
    assert every.why == "every outer setting given by the user"
    factory = torch.optim.SGD
    assert choose_outer(factory, None, None, 30).optimizer is factory


def test_the_config_fills_from_h_and_the_number_of_rounds():
    config, chosen = GASLoCConfig(local_steps="40,40,20").with_outer_defaults(total_steps=4000)
    assert (config.outer_optimizer, config.outer_lr, config.outer_momentum) == (
        "nesterov", 0.7, 0.5)  # H = 40 (the largest), 100 rounds
    assert chosen.why.endswith("default for H = 40, 100 rounds")
    short, _ = GASLoCConfig(local_steps="auto:40").with_outer_defaults(total_steps=400)
    assert short.outer_optimizer == "sgd"  # 10 rounds
    assert GASLoCConfig(outer_lr=0.3).with_outer_defaults()[0].outer_lr == 0.3


def test_settings_known_to_overshoot_at_small_h_are_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="hf_gasloc.round.outer_defaults"):
        warn_if_known_to_hurt(choose_outer("nesterov", 0.7, 0.9, 30), 30)
    assert "outer lr 0.7 with momentum 0.9 moves 7.0 times the mean pseudo-gradient" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_gasloc.round.outer_defaults"):
        warn_if_known_to_hurt(choose_outer(None, None, None, 30), 30)  # the defaults never warn
        warn_if_known_to_hurt(choose_outer("nesterov", 0.7, 0.9, 500), 500)  # DiLoCo's own H
    assert caplog.text == ""
