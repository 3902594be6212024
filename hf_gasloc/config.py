"""Every GASLoC setting in one dataclass: defaults, validation, environment variables.

A setting left unset (``None``) is read from ``ACCELERATE_GASLOC_<NAME>`` and
otherwise takes its default, the way accelerate's own plugins read theirs.
Defaults follow DiLoCo's paper (Douillard et al., 2023: Nesterov outer
optimizer, outer lr 0.7, momentum 0.9) where GASLoC has no reason to differ;
``H = 30`` is the GASLoC paper's heterogeneous-worker setting.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Union

import torch

from .adaptive import Auto
from .topology import TOPOLOGIES, parse_edges

ENV_PREFIX = "ACCELERATE_GASLOC_"
OUTER_OPTIMIZERS = ("sgd", "sgdm", "nesterov")
NO_GOSSIP = "none"

OuterOptimizer = Union[str, Callable[..., torch.optim.Optimizer], torch.optim.Optimizer]


def _setting(default: Any, help: str, cli: type) -> Any:
    """A setting that stays ``None`` until resolved; ``cli`` is its command-line type."""
    return field(default=None, metadata={"default": default, "help": help, "cli": cli})


@dataclass
class GASLoCConfig:
    """The settings of a GASLoC run; shared by the engine, the plugin and the callback."""

    topology: str | None = _setting(
        "2peer",
        "gossip graph: 1peer, 2peer, complete (DiLoCo), ring, exponential, "
        "'static:0-1,1-2,...', or none (plain DDP, no GASLoC)",
        str,
    )
    local_steps: int | list[int] | Auto | str | None = _setting(
        30,
        "inner steps per round H: one number, one per rank ('30,30,30,15'), or 'auto:30' "
        "(each worker adapts H_i to its link around the target 30; 'auto' = 'auto:30')",
        str,
    )
    outer_optimizer: OuterOptimizer | None = _setting(
        "nesterov",
        "outer optimizer: sgd, sgdm, nesterov, a torch.optim class/factory, or an instance "
        "(its class and hyper-parameters are reused on the fp32 anchors)",
        str,
    )
    outer_lr: float | None = _setting(0.7, "outer learning rate eta", float)
    outer_momentum: float | None = _setting(
        None, "outer momentum mu (default 0.9 for sgdm/nesterov, 0 for sgd)", float
    )
    gossip_weight: float | None = _setting(
        None,
        "weight given to each peer's proposal (default: Metropolis weights, 1/2 for a pair, "
        "1/3 on a ring)",
        float,
    )
    seed: int | None = _setting(
        0, "seed of the per-round graphs; must be the same on every rank", int
    )
    anchor_on_cpu: bool | None = _setting(
        False, "keep the fp32 anchor and outer optimizer state in CPU memory", bool
    )
    consensus_every: int | None = _setting(
        0,
        "compute the exact consensus distance every N rounds (one model All-Reduce); 0: never",
        int,
    )

    def __post_init__(self) -> None:
        for f in fields(GASLoCConfig):
            if getattr(self, f.name) is None:
                raw = os.environ.get(ENV_PREFIX + f.name.upper())
                setattr(self, f.name, f.metadata["default"] if raw is None else raw)
        self.topology = str(self.topology).strip()
        self.local_steps = _parse_local_steps(self.local_steps)
        self.outer_lr = _positive_float("outer_lr", self.outer_lr)
        self.seed = _integer("seed", self.seed)
        self.anchor_on_cpu = _boolean("anchor_on_cpu", self.anchor_on_cpu)
        self.consensus_every = _integer("consensus_every", self.consensus_every, minimum=0)
        if self.gossip_weight is not None:
            self.gossip_weight = _positive_float("gossip_weight", self.gossip_weight)
        self._check_topology()
        self._check_outer_optimizer()

    @property
    def enabled(self) -> bool:
        """False for ``topology='none'``: plain DDP, GASLoC stays out of the way."""
        return self.topology != NO_GOSSIP

    def local_steps_for(self, rank: int, world_size: int) -> int:
        """``H_i`` of ``rank`` (the target for ``auto``); a per-rank list needs one value per rank."""
        if isinstance(self.local_steps, Auto):
            return self.local_steps.target
        if isinstance(self.local_steps, int):
            return self.local_steps
        if len(self.local_steps) != world_size:
            raise ValueError(
                f"local_steps lists {len(self.local_steps)} values "
                f"({','.join(map(str, self.local_steps))}) but world_size is {world_size}: "
                "give one value for every rank, or a single number for all."
            )
        return self.local_steps[rank]

    def to_dict(self) -> dict[str, Any]:
        """Plain values only: for logging and for checking that all ranks agree."""
        values = {f.name: getattr(self, f.name) for f in fields(GASLoCConfig)}
        values["outer_optimizer"] = _describe_optimizer(self.outer_optimizer)
        if isinstance(self.local_steps, Auto):
            values["local_steps"] = str(self.local_steps)
        return values

    def _check_topology(self) -> None:
        name, _, edges = self.topology.partition(":")
        if name == "static" and edges:
            parse_edges(edges)
        elif self.topology not in TOPOLOGIES + (NO_GOSSIP,) or name == "static":
            raise ValueError(
                f"unknown topology {self.topology!r} (--gasloc_topology / topology=): choose one "
                "of 1peer, 2peer, complete, ring, exponential, 'static:0-1,1-2,...', or none."
            )

    def _check_outer_optimizer(self) -> None:
        name = self.outer_optimizer
        if not isinstance(name, str):
            if self.outer_momentum is not None:
                raise ValueError(
                    "outer_momentum is set, but outer_optimizer is a torch.optim object: put the "
                    "momentum in that optimizer and leave outer_momentum unset."
                )
            return
        name = name.strip().lower()
        if name not in OUTER_OPTIMIZERS:
            raise ValueError(
                f"unknown outer_optimizer {name!r} (--gasloc_outer_optimizer): choose one of "
                f"{', '.join(OUTER_OPTIMIZERS)}, or pass a torch.optim optimizer."
            )
        self.outer_optimizer = name
        default_momentum = 0.0 if name == "sgd" else 0.9
        momentum = default_momentum if self.outer_momentum is None else self.outer_momentum
        momentum = _float("outer_momentum", momentum)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"outer_momentum must be in [0, 1), got {momentum}.")
        if name == "sgd" and momentum != 0.0:
            raise ValueError(
                f"outer_optimizer 'sgd' has no momentum but outer_momentum={momentum}: "
                "use outer_optimizer 'sgdm' or 'nesterov', or set outer_momentum 0."
            )
        if name != "sgd" and momentum == 0.0:
            raise ValueError(
                f"outer_optimizer {name!r} needs outer_momentum > 0: set a momentum "
                "(DiLoCo uses 0.9) or use outer_optimizer 'sgd'."
            )
        self.outer_momentum = momentum


def _describe_optimizer(optimizer: OuterOptimizer) -> Any:
    if isinstance(optimizer, str):
        return optimizer
    if isinstance(optimizer, torch.optim.Optimizer):
        hyper = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        return {"class": type(optimizer).__qualname__, **{k: repr(v) for k, v in hyper.items()}}
    return repr(optimizer)


def _parse_local_steps(value: Any) -> int | list[int] | Auto:
    if isinstance(value, Auto):
        return value
    if isinstance(value, str) and value.strip().startswith("auto"):
        _, _, target = value.strip().partition(":")
        if target and not target.isdigit() or target == "0":
            raise ValueError(
                f"cannot read local_steps={value!r}: write 'auto' or 'auto:H' with a target H >= 1."
            )
        return Auto(int(target or 30))
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


def _float(name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}.") from None


def _positive_float(name: str, value: Any) -> float:
    number = _float(name, value)
    if not number > 0:
        raise ValueError(f"{name} must be > 0, got {number}.")
    return number


def _integer(name: str, value: Any, minimum: int | None = None) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}.") from None
    if number != float(value) or (minimum is not None and number < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{name} must be an integer{bound}, got {value!r}.")
    return number


def _boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}.")
