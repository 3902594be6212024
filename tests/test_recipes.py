"""Every recipe runs a few CPU steps, shrunk, on the embedded sample (parsing: tests/unit)."""

import json
from pathlib import Path

from examples import run_clm

from .distributed import run_ranks

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
DATA = ROOT / "examples" / "data"


def _smoke(rank, world_size, output_dir):
    results = {}
    for path in RECIPES:
        out = f"{output_dir}/{path.stem}"
        arguments = run_clm.parse_arguments([
            "--recipe", str(path), "--recipe_smoke_test", "--output_dir", out,
            "--train_file", str(DATA / "pydocs_train.parquet"),
            "--validation_file", str(DATA / "pydocs_validation.parquet"), "--eval_on_start"])
        trainer = run_clm.run(arguments)
        results[path.stem] = (trainer.state.global_step, json.loads(
            (Path(out) / "all_results.json").read_text()) if rank == 0 else None)
    return results


def test_every_recipe_runs_a_few_steps_shrunk_on_the_embedded_sample(tmp_path):
    results = run_ranks(_smoke, 2, str(tmp_path), init=False, timeout=900)[0]
    assert set(results) == {p.stem for p in RECIPES}
    for name, (steps, summary) in results.items():
        assert steps == 4, name
        assert summary["world_size"] == 2
        assert summary["eval_loss"] < summary["start_eval_loss"] + 0.05, name
        if "ddp" not in name:
            assert summary["gasloc/rounds"] == 2, name
