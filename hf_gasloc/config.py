"""Every GASLoC setting in one dataclass: defaults, environment variables, validation.

A setting left unset (``None``) is read from ``ACCELERATE_GASLOC_<NAME>`` and
otherwise takes its default, the way accelerate's own plugins read theirs. Each
setting's meaning and checks live with the idea it belongs to: topologies in
``topology.py``, ``H_i`` in ``local_steps.py``, the outer optimizer in
``round/outer.py``. Unset outer settings are chosen from ``H`` by a measured rule
(``round/outer_defaults.py``); ``H = 30`` is the GASLoC paper's
heterogeneous-worker setting.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

from .wire.codec import FORMS, PAYLOAD_HELP, PAYLOADS
from .schedule.adaptive import Auto
from .schedule.local_steps import (
    LOCAL_STEPS_HELP,
    LocalStepsSetting,
    describe_local_steps,
    nominal_steps,
    parse_local_steps,
    steps_for_rank,
)
from .round.outer import (
    OUTER_LR_HELP,
    OUTER_OPTIMIZERS,
    OUTER_MOMENTUM_HELP,
    OUTER_OPTIMIZER_HELP,
    OuterOptimizer,
    check_outer_settings,
    describe_outer_optimizer,
)
from .round.outer_defaults import OuterChoice, choose_outer, warn_if_known_to_hurt
from .schedule.fragments import split_fragments
from .schedule.topology import NO_GOSSIP, TOPOLOGY_HELP, build_topology, check_topology
from .values import boolean, choice, integer, positive_float

ENV_PREFIX = "ACCELERATE_GASLOC_"
OUTER_SETTINGS = ("outer_optimizer", "outer_lr", "outer_momentum")
MIN_PEER_TIMEOUT, SHORT_PEER_TIMEOUT = 1.0, 30.0
_warned_variables: set[str] = set()
logger = logging.getLogger(__name__)


def _setting(default: Any, help: str, cli: type) -> Any:
    """A setting that stays ``None`` until resolved; ``cli`` is its command-line type."""
    return field(default=None, metadata={"default": default, "help": help, "cli": cli})


@dataclass
class GASLoCConfig:
    """The settings of a GASLoC run; shared by the engine, the plugin and the callback."""

    topology: str | None = _setting("2peer", TOPOLOGY_HELP, str)
    local_steps: LocalStepsSetting | str | None = _setting(30, LOCAL_STEPS_HELP, str)
    outer_optimizer: OuterOptimizer | None = _setting(None, OUTER_OPTIMIZER_HELP, str)
    outer_lr: float | None = _setting(None, OUTER_LR_HELP, float)
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
        "the proposal on sparse graphs; docs/guide/settings.md#payloads-what-travels), proposal, or pseudo_gradient",
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
    worker_size: int | None = _setting(
        1,
        "processes per GASLoC worker: consecutive ranks form a worker (a node of 8 GPUs: 8) and "
        "average their gradients every step (DDP inside the worker); GASLoC runs between "
        "workers. 1: every process is a worker",
        int,
    )
    max_bad_rounds: int | None = _setting(
        3,
        "consecutive rounds a worker's proposal may be non-finite (NaN/inf), each recovered "
        "from a healthy peer, before training stops with an error",
        int,
    )

    def __post_init__(self) -> None:
        from_environment = {}
        for f in fields(GASLoCConfig):
            if getattr(self, f.name) is None:
                raw = os.environ.get(self.environment_variable(f.name))
                if raw is not None:
                    from_environment[f.name] = raw
                setattr(self, f.name, f.metadata["default"] if raw is None else raw)
        warn_about_unknown_variables()
        checks = {
            "topology": check_topology,
            "local_steps": parse_local_steps,
            "seed": lambda v: integer("seed", v, minimum=0),
            "anchor_on_cpu": lambda v: boolean("anchor_on_cpu", v),
            "consensus_every": lambda v: integer("consensus_every", v, minimum=0),
            "payload": lambda v: choice("payload", v, PAYLOADS),
            "payload_form": lambda v: choice("payload_form", v, FORMS),
            "outer_delay": lambda v: integer("outer_delay", v, minimum=0),
            "fragments": lambda v: integer("fragments", v, minimum=1),
            "worker_size": lambda v: integer("worker_size", v, minimum=1),
            "peer_timeout": check_peer_timeout,
            "max_bad_rounds": lambda v: integer("max_bad_rounds", v, minimum=1),
            "gossip_weight": lambda v: None if v is None else positive_float(
                "gossip_weight", v, at_most=1.0),
        }
        for name, check in checks.items():
            with _naming_the_source(name, from_environment):
                setattr(self, name, check(getattr(self, name)))
        with _naming_the_source(OUTER_SETTINGS, from_environment):
            self.outer_optimizer, self.outer_lr, self.outer_momentum = check_outer_settings(
                self.outer_optimizer, self.outer_lr, self.outer_momentum)

    @staticmethod
    def environment_variable(name: str) -> str:
        """The environment variable that sets ``name`` when it is not given: ``ACCELERATE_GASLOC_<NAME>``."""
        return ENV_PREFIX + name.upper()

    @property
    def enabled(self) -> bool:
        """False for ``topology='none'``: plain DDP, GASLoC stays out of the way."""
        return self.topology != NO_GOSSIP

    def with_outer_defaults(self, total_steps: int | None = None
                            ) -> tuple["GASLoCConfig", OuterChoice]:
        """A copy whose unset outer settings are filled from ``H`` and, when ``total_steps``
        (inner steps of the run) is known, the number of rounds (``round/outer_defaults.py``);
        and the choice, with why. A user setting known to overshoot gets a warning."""
        local_steps = nominal_steps(self.local_steps)
        rounds = total_steps // local_steps if total_steps and total_steps > 0 else None
        choice = choose_outer(self.outer_optimizer, self.outer_lr, self.outer_momentum,
                              local_steps, rounds)
        warn_if_known_to_hurt(choice, local_steps)
        return dataclasses.replace(self, outer_optimizer=choice.optimizer, outer_lr=choice.lr,
                                   outer_momentum=choice.momentum), choice

    def with_saved_outer_settings(self, saved: dict[str, Any], unset: list[str]
                                  ) -> tuple["GASLoCConfig", OuterChoice] | None:
        """A copy whose outer settings named in ``unset`` (left unset by the user) take the values
        a resumed run saved: the rule's choice depends on ``H`` and the number of rounds, which a
        resume may change. ``None`` when that changes nothing, or the saved run was given a
        ``torch.optim`` object (not rebuilt from a name)."""
        kept = {name: saved[name] for name in unset if name in saved}
        if (kept.get("outer_optimizer", "sgd") not in OUTER_OPTIMIZERS
                or all(getattr(self, name) == value for name, value in kept.items())):
            return None
        config = dataclasses.replace(self, **kept)
        return config, OuterChoice(
            config.outer_optimizer, config.outer_lr, config.outer_momentum,
            f"outer_optimizer {config.outer_optimizer}, outer_lr {config.outer_lr}, "
            f"outer_momentum {config.outer_momentum}: as the resumed run chose them")

    def local_steps_for(self, rank: int, world_size: int) -> int:
        """``H_i`` of ``rank`` (the target for ``auto``); a per-rank list needs one value per rank."""
        return steps_for_rank(self.local_steps, rank, world_size)

    def check_world(self, world_size: int) -> None:
        """What can be checked once the number of processes is known, before any model or data
        is loaded: that they split into workers of ``worker_size``, the graph over the workers
        (a static graph's ranks, ``gossip_weight`` against its degree) and a per-worker
        ``local_steps`` list."""
        if self.enabled:  # the first graphs, with their weights
            workers = self.workers(world_size)
            build_topology(self.topology, workers, self.seed, self.gossip_weight).fingerprint()
            steps_for_rank(self.local_steps, 0, workers)

    def workers(self, world_size: int) -> int:
        """The number of GASLoC workers ``world_size`` processes form (``worker_size`` each)."""
        size = self.worker_size
        if world_size % size or world_size // size < 2:
            raise ValueError(
                f"worker_size={size} (--gasloc_worker_size): {world_size} processes do not form "
                f"at least 2 workers of {size} processes; launch a multiple of {size} processes, "
                "at least twice as many, or change worker_size.")
        if size > 1 and isinstance(self.local_steps, Auto):
            raise ValueError(
                f"local_steps={describe_local_steps(self.local_steps)} with worker_size={size}: "
                "adaptive H_i is measured by each process, and the processes of a worker must "
                "take the same steps; give a fixed local_steps (one number, or one per worker).")
        return world_size // size

    def check_model(self, model: Any) -> None:
        """What needs the model: that it splits into ``fragments`` (before any evaluation)."""
        if self.enabled:
            split_fragments(model, self.fragments)

    def to_dict(self) -> dict[str, Any]:
        """Plain values only: for logging and for checking that all ranks agree."""
        values = {f.name: getattr(self, f.name) for f in fields(GASLoCConfig)}
        values["outer_optimizer"] = describe_outer_optimizer(self.outer_optimizer)
        values["local_steps"] = describe_local_steps(self.local_steps)
        return values


def check_peer_timeout(value: Any) -> float:
    """At least ``MIN_PEER_TIMEOUT`` seconds; a warning below ``SHORT_PEER_TIMEOUT``."""
    seconds = positive_float("peer_timeout", value, at_least=MIN_PEER_TIMEOUT)
    if seconds < SHORT_PEER_TIMEOUT:
        logger.warning("GASLoC: peer_timeout=%g s is short: a healthy peer that is evaluating, "
                       "saving or stalled by its machine for longer is left out of the gossip "
                       "(docs/guide/reliability.md).", seconds)
    return seconds


@contextmanager
def _naming_the_source(names: str | tuple[str, ...], from_environment: dict[str, str]):
    """A bad value's error also names the environment variable it was read from."""
    try:
        yield
    except ValueError as error:
        names = (names,) if isinstance(names, str) else names
        names = [n for n in names if n in str(error)] or names  # the ones the error is about
        sources = [f"{GASLoCConfig.environment_variable(n)}={from_environment[n]!r}"
                   for n in names if n in from_environment]
        if sources:
            where = (f"read from the environment: {', '.join(sources)}; fix or unset the "
                     "variable")
        elif "--gasloc_" in str(error):
            raise
        else:
            where = " or ".join(f"--gasloc_{n} / {n}=" for n in names)
        raise ValueError(f"{str(error).rstrip('.')} ({where}).") from None


def warn_about_unknown_variables() -> None:
    """An ``ACCELERATE_GASLOC_*`` variable that names no setting is a typo: say so, once."""
    known = [GASLoCConfig.environment_variable(f.name) for f in fields(GASLoCConfig)]
    for name in sorted(os.environ):
        if name.startswith(ENV_PREFIX) and name not in known and name not in _warned_variables:
            _warned_variables.add(name)
            close = difflib.get_close_matches(name, known, n=1)
            logger.warning("GASLoC: the environment variable %s is not a GASLoC setting and is "
                           "ignored%s", name, f"; did you mean {close[0]}?" if close else ".")
