"""Recipes: one YAML file per reproducible setting, read into ``run_clm.py`` flag defaults.

A recipe has these top-level keys::

    description: what it trains            reproduces: what it is compared with
    parameters: exact model size           workers: worker count it was planned for
    tokens: the token budget               estimate: {hardware, hours, gpu_hours, memory_per_gpu_gb}
    arguments: {run_clm flag name: value}  # e.g. config_name, gasloc_topology, learning_rate

Command-line flags override ``arguments``. ``tokens`` sets ``max_steps`` from the
run's actual world size, unless ``max_steps`` is given.

Only ``examples/run_clm.py`` reads recipes, yet the loader lives in the package:
the YAML format is part of what users reproduce with, a script derived from
``run_clm.py`` (the usual way HF examples are used) imports it from an installed
``hf_gasloc``, and the tests check every recipe through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

REQUIRED = ("description", "reproduces", "parameters", "workers", "tokens", "estimate", "arguments")
ESTIMATE = ("hardware", "hours", "gpu_hours", "memory_per_gpu_gb")


@dataclass(frozen=True)
class Recipe:
    path: Path
    description: str
    reproduces: str
    parameters: int
    workers: int
    tokens: int
    estimate: dict[str, Any]
    arguments: dict[str, Any]

    def max_steps(self, world_size: int, batch_size: int, accumulation: int, block_size: int) -> int:
        """Optimizer steps that spend ``tokens`` with this many workers."""
        per_step = world_size * batch_size * accumulation * block_size
        return max(1, self.tokens // per_step)


def load_recipe(path: str | Path, flags: Iterable[str]) -> Recipe:
    """Read and check a recipe; ``flags`` are the argument names it may set."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {str(path)!r} does not exist (--recipe); see recipes/.")
    content = yaml.safe_load(path.read_text())
    if not isinstance(content, dict):
        raise ValueError(f"recipe {path}: expected a mapping of {', '.join(REQUIRED)}.")
    unknown = sorted(set(content) - set(REQUIRED))
    missing = [key for key in REQUIRED if key not in content]
    if unknown or missing:
        raise ValueError(
            f"recipe {path}: unknown key(s) {unknown} / missing key(s) {missing}; "
            f"a recipe has exactly {', '.join(REQUIRED)}."
        )
    known = set(flags)
    bad = sorted(set(content["arguments"]) - known)
    if bad:
        raise ValueError(
            f"recipe {path}: arguments.{bad[0]} is not a run_clm.py flag"
            + (f" (nor are {bad[1:]})" if bad[1:] else "")
            + "; use the flag names of `python examples/run_clm.py --help` without the dashes."
        )
    missing_estimate = [key for key in ESTIMATE if key not in content["estimate"]]
    if missing_estimate:
        raise ValueError(f"recipe {path}: estimate needs {', '.join(missing_estimate)}.")
    for key in ("parameters", "workers", "tokens"):
        if not isinstance(content[key], int) or content[key] < 1:
            raise ValueError(f"recipe {path}: {key} must be a positive integer, got {content[key]!r}.")
    return Recipe(path=path, **{key: content[key] for key in REQUIRED})
