"""Every GASLoC setting in one dataclass: defaults, environment variables, validation.

A setting left unset (``None``) is read from ``ACCELERATE_GASLOC_<NAME>`` and
otherwise takes its default, the way accelerate's own plugins read theirs. Each
setting's meaning and checks live with the idea it belongs to: topologies in
``topology.py``, ``H_i`` in ``local_steps.py``, the outer optimizer in
``outer_optimizer.py``. Defaults follow DiLoCo's paper (Douillard et al., 2023:
Nesterov outer optimizer, outer lr 0.7, momentum 0.9) where GASLoC has no reason
to differ; ``H = 30`` is the GASLoC paper's heterogeneous-worker setting.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from .wire.codec import FORMS, PAYLOAD_HELP, PAYLOADS
from .schedule.local_steps import (
    LOCAL_STEPS_HELP,
    LocalStepsSetting,
    describe_local_steps,
    parse_local_steps,
    steps_for_rank,
)
from .round.outer import (
    OUTER_MOMENTUM_HELP,
    OUTER_OPTIMIZER_HELP,
    OuterOptimizer,
    describe_outer_optimizer,
    resolve_outer_optimizer,
)
from .schedule.topology import NO_GOSSIP, TOPOLOGY_HELP, check_topology
from .values import boolean, choice, integer, positive_float

ENV_PREFIX = "ACCELERATE_GASLOC_"


def _setting(default: Any, help: str, cli: type) -> Any:
    """A setting that stays ``None`` until resolved; ``cli`` is its command-line type."""
    return field(default=None, metadata={"default": default, "help": help, "cli": cli})


@dataclass
class GASLoCConfig:
    """The settings of a GASLoC run; shared by the engine, the plugin and the callback."""

    topology: str | None = _setting("2peer", TOPOLOGY_HELP, str)
    local_steps: LocalStepsSetting | str | None = _setting(30, LOCAL_STEPS_HELP, str)
    outer_optimizer: OuterOptimizer | None = _setting("nesterov", OUTER_OPTIMIZER_HELP, str)
    outer_lr: float | None = _setting(0.7, "outer learning rate eta", float)
    outer_momentum: float | None = _setting(None, OUTER_MOMENTUM_HELP, float)
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
    payload: str | None = _setting("native", PAYLOAD_HELP, str)
    payload_form: str | None = _setting(
        "auto",
        "what an encoded payload carries: auto (the pseudo-gradient a - x on the complete graph, "
        "the proposal on sparse graphs; docs/algorithm.md), proposal, or pseudo_gradient",
        str,
    )
    outer_delay: int | None = _setting(
        0,
        "inner steps during which a round's exchange travels in the background before its outer "
        "update lands (the progress made meanwhile is kept); 0: the blocking round",
        int,
    )
    fragments: int | None = _setting(
        1,
        "split the model into this many fragments of whole layers, each exchanged at its own "
        "step of the round (streaming: the largest message is about 1/fragments of the model)",
        int,
    )
    peer_timeout: float | None = _setting(
        600.0,
        "seconds a worker waits for the peer of its round (its inner steps and the transfer) "
        "before going on without it and leaving it out of later rounds",
        float,
    )
    max_bad_rounds: int | None = _setting(
        3,
        "consecutive rounds a worker's proposal may be non-finite (NaN/inf), each recovered "
        "from a healthy peer, before training stops with an error",
        int,
    )

    def __post_init__(self) -> None:
        for f in fields(GASLoCConfig):
            if getattr(self, f.name) is None:
                raw = os.environ.get(ENV_PREFIX + f.name.upper())
                setattr(self, f.name, f.metadata["default"] if raw is None else raw)
        self.topology = check_topology(self.topology)
        self.local_steps = parse_local_steps(self.local_steps)
        self.outer_lr = positive_float("outer_lr", self.outer_lr)
        self.seed = integer("seed", self.seed)
        self.anchor_on_cpu = boolean("anchor_on_cpu", self.anchor_on_cpu)
        self.consensus_every = integer("consensus_every", self.consensus_every, minimum=0)
        self.payload = choice("payload", self.payload, PAYLOADS)
        self.payload_form = choice("payload_form", self.payload_form, FORMS)
        self.outer_delay = integer("outer_delay", self.outer_delay, minimum=0)
        self.fragments = integer("fragments", self.fragments, minimum=1)
        self.peer_timeout = positive_float("peer_timeout", self.peer_timeout)
        self.max_bad_rounds = integer("max_bad_rounds", self.max_bad_rounds, minimum=1)
        if self.gossip_weight is not None:
            self.gossip_weight = positive_float("gossip_weight", self.gossip_weight)
        self.outer_optimizer, self.outer_momentum = resolve_outer_optimizer(
            self.outer_optimizer, self.outer_momentum
        )

    @property
    def enabled(self) -> bool:
        """False for ``topology='none'``: plain DDP, GASLoC stays out of the way."""
        return self.topology != NO_GOSSIP

    def local_steps_for(self, rank: int, world_size: int) -> int:
        """``H_i`` of ``rank`` (the target for ``auto``); a per-rank list needs one value per rank."""
        return steps_for_rank(self.local_steps, rank, world_size)

    def to_dict(self) -> dict[str, Any]:
        """Plain values only: for logging and for checking that all ranks agree."""
        values = {f.name: getattr(self, f.name) for f in fields(GASLoCConfig)}
        values["outer_optimizer"] = describe_outer_optimizer(self.outer_optimizer)
        values["local_steps"] = describe_local_steps(self.local_steps)
        return values
