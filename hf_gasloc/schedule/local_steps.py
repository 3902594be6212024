"""``H_i``, the inner steps a worker takes per round: the setting and the policy that owns it.

The setting ``local_steps`` is one number (every worker), one number per rank
(``"30,30,30,15"``), or ``"auto:H"`` (adapted to the links, ``schedule/adaptive.py``).
The engine always holds one policy, asks it ``current`` (``H_i`` of the round in
progress), lets it observe step and transfer times, calls ``plan(peers)`` before
each round, and saves its state with the engine's.
"""

from __future__ import annotations

from typing import Any, Protocol, Union

import torch

from .adaptive import AdaptiveLocalSteps, Auto

LOCAL_STEPS_HELP = (
    "inner steps per round H: one number, one per rank ('30,30,30,15'), or 'auto:30' "
    "(each worker adapts H_i to its link around the target 30; 'auto' = 'auto:30')"
)
DEFAULT_TARGET = 30

LocalStepsSetting = Union[int, list[int], Auto]


class LocalStepsPolicy(Protocol):
    """What the engine asks about ``H_i``."""

    current: int

    def observe_step(self, seconds: float) -> None: ...
    def observe_transfer(self, round_index: int, seconds: float) -> None: ...
    def table(self) -> torch.Tensor | None: ...
    def merge(self, table: torch.Tensor) -> None: ...
    def plan(self, peers: list[int]) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class FixedLocalSteps:
    """The same ``H_i`` every round; measures nothing and tells its peers nothing."""

    def __init__(self, steps: int):
        self.current = steps

    def observe_step(self, seconds: float) -> None:
        pass

    def observe_transfer(self, round_index: int, seconds: float) -> None:
        pass

    def table(self) -> None:
        return None

    def merge(self, table: torch.Tensor) -> None:
        pass

    def plan(self, peers: list[int]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore: ``H_i`` is a setting (a resume may change it)."""


def parse_local_steps(value: Any) -> LocalStepsSetting:
    """Read the setting: ``30``, ``"30,30,15"`` / ``[30, 30, 15]``, ``"auto"`` or ``"auto:30"``."""
    if isinstance(value, Auto):
        return value
    if isinstance(value, str) and value.strip().startswith("auto"):
        _, _, target = value.strip().partition(":")
        if target and not target.isdigit() or target == "0":
            raise ValueError(
                f"cannot read local_steps={value!r}: write 'auto' or 'auto:H' with a target H >= 1."
            )
        return Auto(int(target or DEFAULT_TARGET))
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
        if not all(item.lstrip("-").isdigit() for item in items):
            raise ValueError(
                f"cannot read local_steps={value!r} (--gasloc_local_steps): give a positive "
                "integer such as 30, one per rank such as 30,30,30,15, or auto:30."
            )
        value = [int(item) for item in items]
        value = value[0] if len(value) == 1 else value
    steps = [value] if isinstance(value, int) else list(value)
    if not steps or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in steps):
        raise ValueError(
            f"local_steps must be >= 1 on every rank, got {value!r} (--gasloc_local_steps): "
            "it is the number of inner optimizer steps between two gossip rounds."
        )
    return steps[0] if isinstance(value, int) else steps


def describe_local_steps(setting: LocalStepsSetting) -> int | list[int] | str:
    return str(setting) if isinstance(setting, Auto) else setting


def nominal_steps(setting: LocalStepsSetting) -> int:
    """The ``H`` a setting stands for: the number, the largest of a per-rank list (a full-speed
    worker's), or the target of ``auto:H``."""
    if isinstance(setting, Auto):
        return setting.target
    return setting if isinstance(setting, int) else max(setting)


def steps_for_rank(setting: LocalStepsSetting, rank: int, world_size: int) -> int:
    """``H_i`` of ``rank`` (the target for ``auto``); a per-rank list needs one value per rank."""
    if isinstance(setting, Auto):
        return setting.target
    if isinstance(setting, int):
        return setting
    if len(setting) != world_size:
        raise ValueError(
            f"local_steps lists {len(setting)} values ({','.join(map(str, setting))}) "
            f"but world_size is {world_size}: give one value for every rank, or a single "
            "number for all."
        )
    return setting[rank]


def local_steps_policy(
    setting: LocalStepsSetting, rank: int, world_size: int, synchronous: bool
) -> LocalStepsPolicy:
    """The policy for this worker; ``auto`` adapts only on a topology that is not synchronous."""
    steps = steps_for_rank(setting, rank, world_size)
    if isinstance(setting, Auto) and not synchronous:
        return AdaptiveLocalSteps(setting.target, rank, world_size)
    return FixedLocalSteps(steps)
