"""``GASLoC``: the outer loop around any inner optimizer, composed of its parts.

The engine builds the parts, counts inner steps, starts and ends rounds, and
composes the parts' state; each part owns one idea and its own state (graphs and
``H_i`` in ``schedule/``; fragments, scheduler, health, consensus in ``round/``;
lost peers in ``fabric/``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist

from .config import GASLoCConfig
from .fabric import Comm, LostPeers
from .identity import (agreement, changed_at_resume, check_ranks_agree, check_resumable,
                       checkpoint_identity)
from .round.consensus import Consensus
from .round.fragment import Fragment, RoundPlan, Worker
from .round.health import Health
from .round.inner import InnerStepHook
from .round.metrics import RoundMetrics, Totals, as_log
from .round.outer import OUTER_OPTIMIZERS, build_outer_rule
from .round.outer_defaults import OuterChoice
from .round.scheduler import RoundScheduler
from .schedule.fragments import split_fragments
from .schedule.local_steps import local_steps_policy
from .schedule.topology import build_topology
from .state.flat import FlatModel

STATE_FORMAT = 2
OUTER_SETTINGS = ("outer_optimizer", "outer_lr", "outer_momentum")
logger = logging.getLogger(__name__)


class GASLoC:
    """Counts the inner optimizer's steps and runs the outer step every ``H_i`` of them.

    ``GASLoC(model, inner_optimizer, config)`` (or keyword settings) hooks the inner
    optimizer's ``step`` (or call ``attach(optimizer)`` later, or ``outer_step()``
    yourself). Collective: every rank checks that all ranks have the same settings,
    then takes rank 0's parameters as the common starting anchor. ``total_steps``: the
    inner steps the run will take, when known (unset outer settings depend on the number of
    rounds). ``round_steps`` puts the workers in lockstep (the Trainer with unequal ``H_i``):
    every round lasts that many of the caller's steps on every rank, and a worker whose ``H_i``
    steps are done idles (``step_is_idle``, ``idle_step``) until the round ends. ``comm``
    replaces the process group by another fabric (the tests' in-process one).
    """

    def __init__(self, model: torch.nn.Module | Iterable[torch.Tensor],
                 inner_optimizer: torch.optim.Optimizer | None = None,
                 config: GASLoCConfig | None = None, *,
                 process_group: dist.ProcessGroup | None = None, comm: Comm | None = None,
                 total_steps: int | None = None, round_steps: int | None = None,
                 **settings: Any):
        config = GASLoCConfig(**settings) if config is None else dataclasses.replace(
            config, **settings)
        if not config.enabled:
            raise ValueError("topology 'none' is plain DDP: do not attach a GASLoC engine.")
        # Outer settings left unset: a resumed run keeps those of the run it continues.
        self._outer_unset = [name for name in OUTER_SETTINGS if getattr(config, name) is None]
        self.config, self.outer_choice = config.with_outer_defaults(total_steps)
        config = self.config
        self.comm = comm or Comm(process_group, config.peer_timeout)
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        self.topology = build_topology(config.topology, self.world_size, config.seed,
                                       config.gossip_weight)
        self.local_steps = local_steps_policy(config.local_steps, self.rank, self.world_size,
                                              self.topology.synchronous)
        parts = [FlatModel(p, config.anchor_on_cpu) for p in split_fragments(model, config.fragments)]
        self.flat = FlatModel.of_groups([g for part in parts for g in part.groups])
        check_ranks_agree(agreement(config, self.topology, self.flat), self.comm)
        self.run_id = self.comm.run_id  # a resumed run takes its checkpoint's
        self.lost = LostPeers(self.rank, self.comm.hosts)
        self.health = Health(self.rank, config.max_bad_rounds)
        # An exchange may be in flight in the work buffers during a round: delayed rounds, and
        # lockstep rounds (it lands at the round's end, after this worker's H_i steps).
        self.consensus = Consensus(self.flat, self.comm, self.lost,
                                   config.outer_delay > 0 or round_steps is not None)
        self.consensus.start_from_first_rank()
        worker = Worker(self.comm, self.health, self.lost, self.local_steps)
        self.fragments = [Fragment(part, build_outer_rule(config.outer_optimizer, config.outer_lr,
                                                          config.outer_momentum, part.anchors),
                                   worker, config, self.topology.synchronous, channel)
                          for channel, part in enumerate(parts)]
        self.scheduler = RoundScheduler(self.fragments)
        self.round_steps = round_steps
        self._hook = InnerStepHook(self._after_inner_step)
        self.health.watch(self.fragments, lambda: self._hook.optimizer)
        self.round = self.steps_in_round = self.inner_step = 0  # inner_step: over the run
        self.ticks = self.ticks_in_round = 0  # lockstep: the caller's steps, idle ones included
        self.totals, self.last_round = Totals(), None
        self._last_step_end: float | None = None
        self._steps_timed_by_caller = False
        self.changed_at_resume: dict[str, tuple[Any, Any]] = {}  # setting: (saved, used)
        if self.rank == 0:
            logger.info("GASLoC on %d workers: %s (%s).", self.world_size,
                        ", ".join(f"{k} {v}" for k, v in config.to_dict().items()),
                        self.outer_choice.why)
        if inner_optimizer is not None:
            self.attach(inner_optimizer)

    # ---------------------------------------------------- the inner optimizer
    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Count ``optimizer``'s steps and run the outer step every ``H_i`` of them."""
        self._hook.attach(optimizer)

    def detach(self) -> None:
        """Stop counting inner steps; the model keeps its current parameters."""
        self._hook.detach()

    @contextmanager
    def attached(self, optimizer: torch.optim.Optimizer) -> Iterator["GASLoC"]:
        """``attach`` for the duration of a block."""
        self.attach(optimizer)
        try:
            yield self
        finally:
            self.detach()

    def _after_inner_step(self, *_: Any) -> None:
        self.comm.beat()
        now = time.perf_counter()
        if self._last_step_end is not None and not self._steps_timed_by_caller:
            self.local_steps.observe_step(now - self._last_step_end)
        self.steps_in_round += 1
        self.inner_step += 1
        self._advance(real=True)
        self._last_step_end = time.perf_counter()  # the next step's time excludes the outer step

    def observe_step_seconds(self, seconds: float) -> None:
        """The caller times this worker's inner steps itself (their compute alone, without the
        waits of its own collectives); adaptive ``H_i`` uses these times from now on."""
        self._steps_timed_by_caller = True
        self.local_steps.observe_step(seconds)

    def step_is_idle(self) -> bool:
        """Lockstep: this worker's ``H_i`` steps of the round are done; it idles until the
        round's last step."""
        return self.round_steps is not None and self.steps_in_round >= self.round_length

    def idle_step(self) -> None:
        """Lockstep: count a step this worker skips."""
        self.comm.beat()
        self._last_step_end = None  # an idle step is not step time
        self._advance(real=False)

    def _advance(self, real: bool) -> None:
        if self.round_steps is not None:
            self.ticks += 1
            self.ticks_in_round += 1
        self._report(self.scheduler.finish_due(self.clock))
        if real:
            for fragment in self.scheduler.due(self.steps_in_round, self.round_length):
                self._start(fragment)
        if (self.steps_in_round >= self.round_length if self.round_steps is None
                else self.ticks_in_round >= self.round_steps):
            self._end_round()

    # ------------------------------------------------------------- the round
    @property
    def round_length(self) -> int:
        """``H_i`` of the round in progress."""
        return self.local_steps.current

    @property
    def clock(self) -> int:
        """What rounds in flight land by: inner steps, or in lockstep the caller's steps."""
        return self.inner_step if self.round_steps is None else self.ticks

    def outer_step(self) -> RoundMetrics:
        """End the round now: start the fragments not started yet and finish every exchange
        in flight (normally the inner-optimizer hook runs each part at its step)."""
        for fragment in self.scheduler.not_started():
            self._start(fragment)
        self._report(self.scheduler.finish_all())
        self._end_round()
        return self.last_round

    def _start(self, fragment: int) -> None:
        plan = RoundPlan(self.round, self.topology.graph(self.round), self.steps_in_round,
                         self.inner_step)
        finish_at = self.clock + self.config.outer_delay
        if self.round_steps is not None:  # not before every peer posted: the round's last step
            finish_at = max(finish_at, self.ticks - self.ticks_in_round + self.round_steps)
        self._report(self.scheduler.start(fragment, plan, finish_at))
        self._report(self.scheduler.finish_due(self.clock))

    def _report(self, finished: list[RoundMetrics]) -> None:
        for metrics in finished:
            self.totals.add(metrics)
            self.last_round = metrics
            if metrics.wait_seconds is not None:  # a worker sitting out measured nothing
                self.local_steps.observe_transfer(metrics.round, metrics.comm_seconds)

    def _end_round(self) -> None:
        self.round += 1
        self.steps_in_round = self.ticks_in_round = 0
        self.scheduler.new_round()
        self.local_steps.plan(list(self.lost.alive(self.topology.graph(self.round).peers[self.rank])))

    @property
    def lost_peers(self) -> list[int]:
        """Ranks this worker no longer waits for (it timed out on them, or heard so)."""
        return self.lost.lost

    def metrics(self, prefix: str = "gasloc/") -> dict[str, float]:
        """The last round's metrics and the run's totals, flat, for a logger."""
        log = as_log(self.last_round, self.totals, self.inner_step, self.steps_in_round, prefix)
        log[prefix + "recoveries"] = self.health.recoveries
        log[prefix + "lost_peers"] = len(self.lost.lost)
        return log

    # ------------------------------------------------ consensus for eval/save
    def consensus_model(self):
        """Evaluate or save the workers' average inside this block (every rank must enter it)."""
        return self.consensus.model()

    def install_consensus(self) -> None:
        """Replace parameters and anchors on every rank by their average (collective).

        Exchanges in flight land first; the round in progress is dropped, except in
        lockstep, where every rank is at the same step and some may have posted theirs:
        there the round ends now, short. Outer optimizer state is kept.
        """
        if self.round_steps is not None and self.ticks_in_round:
            self.outer_step()
        self._report(self.scheduler.finish_all())
        self.consensus.install()
        self.steps_in_round = self.ticks_in_round = 0
        self.scheduler.new_round()

    # ------------------------------------------------------------ state
    def identity(self) -> dict[str, Any]:
        """What a checkpoint of this worker records of its run (``identity.py``)."""
        return checkpoint_identity(self.config, self.flat, self.rank, self.world_size)

    def state_dict(self) -> dict[str, Any]:
        """This rank's GASLoC state (each rank saves its own); exchanges in flight are waited
        for and mixed first, and saved as such, so that a resumed run lands them on time."""
        self.scheduler.settle_all()
        return {"format": STATE_FORMAT, "identity": self.identity(),
                "settings": self.config.to_dict(), "round": self.round,
                "steps_in_round": self.steps_in_round, "inner_step": self.inner_step,
                "ticks": self.ticks, "ticks_in_round": self.ticks_in_round,
                "local_steps": self.local_steps.state_dict(), "lost_peers": self.lost.state_dict(),
                "health": self.health.state_dict(), "totals": self.totals.state_dict(),
                "fragments": [f.state_dict() for f in self.fragments],
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any], resized: bool = False) -> None:
        """Restore what ``state_dict`` saved on this rank of this run (``resized``: saved by a
        run with another number of workers; the position in the round starts afresh)."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"this GASLoC state has format {state.get('format')!r}, not "
                             f"{STATE_FORMAT}: it was saved by another version of hf_gasloc.")
        check_resumable(state["identity"], self.identity(), "the GASLoC state", resized)
        in_flight = any(saved["in_flight"] for saved in state["fragments"])
        self._keep_saved_outer_settings(state["settings"])
        self.changed_at_resume = changed_at_resume(state["settings"], self.config.to_dict(),
                                                   "the GASLoC state", in_flight)
        for fragment, saved in zip(self.fragments, state["fragments"], strict=True):
            fragment.load_state_dict(saved, self.topology.graph)
            fragment.outer.set_hyperparameters(self.config.outer_lr, self.config.outer_momentum)
        self.scheduler.load_state_dict(state["scheduler"])
        self.totals.load_state_dict(state["totals"])
        self.health.load_state_dict(state["health"])
        self.inner_step, self.ticks = state["inner_step"], state["ticks"]
        if not resized:
            self.round, self.steps_in_round = state["round"], state["steps_in_round"]
            self.ticks_in_round = state["ticks_in_round"]
            self.local_steps.load_state_dict(state["local_steps"])
            self.lost.load_state_dict(state["lost_peers"])

    def _keep_saved_outer_settings(self, saved: dict[str, Any]) -> None:
        """Outer settings the user left unset continue as the saved run chose them: the rule's
        choice depends on ``H`` and the number of rounds, which a resume may change."""
        kept = {name: saved[name] for name in self._outer_unset if name in saved}
        if kept.get("outer_optimizer", "sgd") not in OUTER_OPTIMIZERS:
            return  # a torch.optim object the saved run was given: not rebuilt from a name
        if all(getattr(self.config, name) == value for name, value in kept.items()):
            return
        self.config = dataclasses.replace(self.config, **kept)
        config = self.config
        self.outer_choice = OuterChoice(
            config.outer_optimizer, config.outer_lr, config.outer_momentum,
            f"outer_optimizer {config.outer_optimizer}, outer_lr {config.outer_lr}, "
            f"outer_momentum {config.outer_momentum}: as the resumed run chose them")
        for fragment in self.fragments:
            fragment.outer = build_outer_rule(config.outer_optimizer, config.outer_lr,
                                              config.outer_momentum, fragment.flat.anchors)
        if self.rank == 0:
            logger.info("GASLoC: %s.", self.outer_choice.why)

    def start_round(self, index: int) -> None:
        """Go on at the start of round ``index`` (a resume on another number of workers)."""
        self.round, self.steps_in_round, self.ticks_in_round = index, 0, 0
        self.scheduler.new_round()
        self.local_steps.plan(list(self.topology.graph(index).peers[self.rank]))

    def start_as_new_worker(self) -> None:
        """A worker that joins with no state of its own: its parameters (the consensus) are its
        anchor; nothing in flight, no residual, no recovery owed."""
        for fragment in self.fragments:
            fragment.reset()
        self.scheduler.reset()
        self.health.reset()
        self.totals = Totals()
