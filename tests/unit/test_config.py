"""Settings: defaults, validation before any work, environment variables, CLI flags."""

import functools

import pytest
import torch
from transformers import HfArgumentParser

from hf_gasloc import GASLoCArguments, GASLoCConfig, GASLoCPlugin


def test_defaults():
    config = GASLoCConfig()
    assert (config.topology, config.local_steps, config.seed) == ("2peer", 30, 0)
    # The outer settings stay unset until the engine fills them from H (test_outer_defaults.py).
    assert (config.outer_optimizer, config.outer_lr, config.outer_momentum) == (None, None, None)


@pytest.mark.parametrize("settings,message", [
    ({"topology": "star"}, "unknown topology 'star' .*--gasloc_topology"),
    ({"topology": "static"}, "unknown topology 'static'"),
    ({"local_steps": 0}, "local_steps must be >= 1"),
    ({"local_steps": "30,0"}, "local_steps must be >= 1"),
    ({"local_steps": "thirty"}, "cannot read local_steps='thirty'"),
    ({"outer_optimizer": "adam"}, "unknown outer_optimizer 'adam'"),
    ({"outer_optimizer": "sgd", "outer_momentum": 0.9}, "'sgd' has no momentum"),
    ({"outer_optimizer": "nesterov", "outer_momentum": 0}, "needs outer_momentum > 0"),
    ({"outer_momentum": 1.5}, r"outer_momentum must be in \[0, 1\)"),
    ({"outer_lr": 0}, "outer_lr must be > 0"),
    ({"outer_lr": "fast"}, "outer_lr must be a number"),
    ({"outer_lr": "inf"}, r"outer_lr must be a finite number, got 'inf' \(--gasloc_outer_lr"),
    ({"peer_timeout": "inf"}, "peer_timeout must be a finite number"),
    ({"peer_timeout": 0.01}, r"peer_timeout must be at least 1, got 0.01 \(--gasloc_peer_timeout"),
    ({"gossip_weight": 1.5}, "gossip_weight must be at most 1"),
    ({"seed": -1}, "seed must be an integer >= 0"),
    ({"outer_delay": float("inf")}, "outer_delay must be an integer"),
    ({"seed": "abc"}, "seed must be an integer"),
    ({"anchor_on_cpu": "maybe"}, "anchor_on_cpu must be true or false"),
    ({"outer_optimizer": functools.partial(torch.optim.SGD, lr=1), "outer_momentum": 0.5},
     "put them in that optimizer"),
])
def test_bad_settings_are_clear_errors(settings, message):
    with pytest.raises(ValueError, match=message):
        GASLoCConfig(**settings)


def test_local_steps_per_rank():
    config = GASLoCConfig(local_steps="30, 30,15")
    assert config.local_steps == [30, 30, 15]
    assert config.local_steps_for(2, 3) == 15
    with pytest.raises(ValueError, match="one value for every rank"):
        config.local_steps_for(0, 4)


def test_environment_variables_fill_unset_settings(monkeypatch):
    monkeypatch.setenv("ACCELERATE_GASLOC_TOPOLOGY", "1peer")
    monkeypatch.setenv("ACCELERATE_GASLOC_LOCAL_STEPS", "5")
    monkeypatch.setenv("ACCELERATE_GASLOC_OUTER_LR", "0.5")
    monkeypatch.setenv("ACCELERATE_GASLOC_ANCHOR_ON_CPU", "true")
    plugin = GASLoCPlugin(local_steps=7)
    assert (plugin.topology, plugin.local_steps, plugin.outer_lr) == ("1peer", 7, 0.5)
    assert plugin.anchor_on_cpu is True


def test_cli_flags_through_hf_argument_parser(monkeypatch):
    monkeypatch.setenv("ACCELERATE_GASLOC_SEED", "9")
    parser = HfArgumentParser(GASLoCArguments)
    (arguments,) = parser.parse_args_into_dataclasses([
        "--gasloc_topology", "complete", "--gasloc_outer_optimizer", "sgd",
        "--gasloc_outer_lr", "1", "--gasloc_outer_momentum", "0",
        "--gasloc_local_steps", "4,4,2",
    ])
    plugin = arguments.to_plugin()
    assert isinstance(plugin, GASLoCPlugin)
    assert (plugin.topology, plugin.outer_optimizer, plugin.outer_lr) == ("complete", "sgd", 1.0)
    assert (plugin.outer_momentum, plugin.local_steps, plugin.seed) == (0.0, [4, 4, 2], 9)


def test_every_setting_has_a_flag():
    names = {f.name for f in GASLoCConfig.__dataclass_fields__.values()}
    assert {"gasloc_" + n for n in names} == set(GASLoCArguments.__dataclass_fields__)
    assert {"topology", "local_steps", "outer_optimizer", "outer_lr", "outer_momentum",
            "gossip_weight", "seed"} <= names


def test_a_bad_value_from_the_environment_names_its_variable(monkeypatch):
    monkeypatch.setenv("ACCELERATE_GASLOC_TOPOLOGY", "2peers")
    with pytest.raises(ValueError, match="read from the environment: "
                                         "ACCELERATE_GASLOC_TOPOLOGY='2peers'; fix or unset"):
        GASLoCConfig()
    assert GASLoCConfig(topology="1peer").topology == "1peer"  # a keyword wins, unchecked env


def test_an_unknown_variable_is_warned_about_with_the_closest_name(monkeypatch, caplog):
    monkeypatch.setenv("ACCELERATE_GASLOC_OUTER_LRR", "0.5")
    with caplog.at_level("WARNING", logger="hf_gasloc.config"):
        GASLoCConfig()
    assert ("ACCELERATE_GASLOC_OUTER_LRR is not a GASLoC setting and is ignored; did you mean "
            "ACCELERATE_GASLOC_OUTER_LR?") in caplog.text


def test_a_short_peer_timeout_is_warned_about(caplog):
    with caplog.at_level("WARNING", logger="hf_gasloc.config"):
        GASLoCConfig(peer_timeout=5)
    assert "peer_timeout=5 s is short" in caplog.text


def test_what_needs_the_world_size_or_the_model_is_checked_before_any_work():
    with pytest.raises(ValueError, match="local_steps lists 3 values .* but world_size is 4"):
        GASLoCConfig(local_steps="3,3,2").check_world(4)
    with pytest.raises(ValueError, match="static topology edge 0-5 is invalid for world_size=4"):
        GASLoCConfig(topology="static:0-1,0-5").check_world(4)
    with pytest.raises(ValueError, match="gossip_weight=0.6 is too large for topology '2peer'"):
        GASLoCConfig(gossip_weight=0.6).check_world(4)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="fragments=3 but the model has 2 layers"):
        GASLoCConfig(fragments=3).check_model(model)
    GASLoCConfig(topology="none", fragments=3).check_model(model)  # plain DDP: not GASLoC's


def test_workers_of_several_processes_must_fit_the_world_and_take_fixed_steps():
    assert GASLoCConfig(worker_size=4).workers(8) == 2
    GASLoCConfig(worker_size=2, local_steps="3,6").check_world(4)  # one H_i per worker
    with pytest.raises(ValueError, match=r"worker_size=4 \(--gasloc_worker_size\): 6 processes"):
        GASLoCConfig(worker_size=4).workers(6)
    with pytest.raises(ValueError, match="do not form at least 2 workers of 2"):
        GASLoCConfig(worker_size=2).check_world(2)
    with pytest.raises(ValueError, match="local_steps lists 4 values .* but world_size is 2"):
        GASLoCConfig(worker_size=2, local_steps="3,3,3,3").check_world(4)
    with pytest.raises(ValueError, match="give a fixed local_steps"):
        GASLoCConfig(worker_size=2, local_steps="auto:10").check_world(4)
    with pytest.raises(ValueError, match="worker_size"):
        GASLoCConfig(worker_size=0)
