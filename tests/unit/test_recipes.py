"""Every recipe parses, states its model size right, and maps onto run_clm.py's flags."""

from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from examples import run_clm
from hf_gasloc.integrations.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def flags() -> list[str]:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(run_clm.ARGUMENT_CLASSES)
    return [action.dest for action in parser._actions]


def test_there_is_a_recipe_per_method_and_size():
    names = {path.stem for path in RECIPES}
    for method in ("ddp", "diloco", "gasloc-1peer", "gasloc-2peer", "gasloc-2peer-straggler"):
        assert f"llama-134m-{method}" in names
    assert {f"llama-{size}-gasloc-2peer" for size in ("300m", "500m", "1b")} <= names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_parses_and_states_its_parameter_count(path):
    recipe = load_recipe(path, flags())
    assert recipe.workers in (4, 8, 16, 32) and recipe.tokens > 0
    config = AutoConfig.from_pretrained(ROOT / recipe.arguments["config_name"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - recipe.parameters) <= 0.02 * recipe.parameters
    size = path.stem.split("-")[1]
    expected = {"134m": 134e6, "300m": 300e6, "500m": 500e6, "1b": 1e9}[size]
    assert abs(count - expected) <= 0.12 * expected, f"{path.stem} has {count / 1e6:.0f}M"


def test_bad_recipe_keys_are_clear_errors(tmp_path):
    recipe = yaml.safe_load(RECIPES[0].read_text())
    recipe["arguments"]["learning_rat"] = 1e-3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match="arguments.learning_rat is not a run_clm.py flag"):
        load_recipe(bad, flags())
    recipe["arguments"].pop("learning_rat")
    recipe["notes"] = "x"
    bad.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['notes'\]"):
        load_recipe(bad, flags())


def test_flags_override_the_recipe_and_tokens_set_max_steps():
    recipe_path = str(ROOT / "recipes" / "llama-134m-gasloc-1peer.yaml")
    _, data_args, training_args, plugin, *_ = run_clm.parse_arguments(
        ["--recipe", recipe_path, "--gasloc_outer_lr", "0.5", "--learning_rate", "1e-3"])
    assert (plugin.topology, plugin.outer_lr, training_args.learning_rate) == ("1peer", 0.5, 1e-3)
    assert data_args.dataset_name == "HuggingFaceFW/fineweb-edu" and data_args.streaming
    recipe = load_recipe(recipe_path, flags())
    # One process here: the token budget takes world_size * batch * accumulation * block tokens per step.
    assert training_args.max_steps == recipe.tokens // (32 * 1 * 1024)
