"""``GASLoC``: the outer loop around any inner optimizer, composed of its parts.

The engine builds the parts, counts inner steps, starts and ends rounds, and
composes the parts' state; each part owns one idea and its own state (graphs and
``H_i`` in ``schedule/``; fragments, the round loop and its scheduler, health,
consensus in ``round/``; lost peers in ``fabric/``).
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist

from .config import OUTER_SETTINGS, GASLoCConfig
from .fabric import Comm, LostPeers, WorkerGroups
from .identity import (agreement, changed_at_resume, check_ranks_agree, check_resumable,
                       checkpoint_identity)
from .round.consensus import Consensus
from .round.fragment import Fragment, Worker
from .round.health import Health
from .round.inner import InnerStepHook
from .round.metrics import RoundMetrics, as_log
from .round.outer_defaults import OuterChoice
from .round.rounds import RoundLoop
from .schedule.fragments import split_fragments
from .schedule.local_steps import local_steps_policy
from .schedule.topology import build_topology
from .state.flat import FlatModel

STATE_FORMAT = 2
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
        self._outer_unset = [name for name in OUTER_SETTINGS if getattr(config, name) is None]
        self.config, self.outer_choice = config.with_outer_defaults(total_steps)
        config = self.config
        self.groups = None  # a worker of several processes gossips with same-position processes
        if config.worker_size > 1 and comm is None and dist.is_initialized():
            if process_group is not None:
                raise ValueError("worker_size > 1 builds its groups over every process: leave "
                                 "process_group unset, or use worker_size 1.")
            config.workers(dist.get_world_size())  # the settings' errors first
            self.groups = WorkerGroups.build(config.worker_size)
        self.comm = comm or Comm(process_group if self.groups is None else self.groups.between,
                                 config.peer_timeout)
        self.rank, self.world_size = self.comm.rank, self.comm.world_size  # among workers
        self.topology = build_topology(config.topology, self.world_size, config.seed,
                                       config.gossip_weight)
        self.local_steps = local_steps_policy(config.local_steps, self.rank, self.world_size,
                                              self.topology.synchronous)
        parts = [FlatModel(p, config.anchor_on_cpu) for p in split_fragments(model, config.fragments)]
        self.flat = FlatModel.of_groups([g for part in parts for g in part.groups])
        check_ranks_agree(agreement(config, self.topology, self.flat), self.groups or self.comm)
        self.run_id = self.comm.run_id  # a resumed run takes its checkpoint's
        self.lost = LostPeers(self.rank, self.comm.hosts)
        self.health = Health(self.rank, config.max_bad_rounds)
        # An exchange may be in flight in the work buffers during a round: delayed rounds, and
        # lockstep rounds (it lands at the round's end, after this worker's H_i steps).
        self.consensus = Consensus(self.flat, self.comm, self.lost,
                                   config.outer_delay > 0 or round_steps is not None)
        self.consensus.start_from_first_rank()
        worker = Worker(self.comm, self.health, self.lost, self.local_steps, self.groups)
        self.fragments = [Fragment(part, worker, config, self.topology.synchronous, channel)
                          for channel, part in enumerate(parts)]
        self.rounds = RoundLoop(self.fragments, self.topology, self.local_steps, self.lost,
                                self.rank, config.outer_delay, round_steps)
        self._hook = InnerStepHook(self._after_inner_step)
        self.health.watch(self.fragments, lambda: self._hook.optimizer)
        self.changed_at_resume: dict[str, tuple[Any, Any]] = {}  # setting: (saved, used)
        if self.speaks:
            logger.info("GASLoC on %d workers: %s (%s).", self.world_size,
                        ", ".join(f"{k} {v}" for k, v in config.to_dict().items()),
                        self.outer_choice.why)
        if inner_optimizer is not None:
            self.attach(inner_optimizer)

    position = property(lambda self: self.rounds.position,
                        doc="The round in progress and the steps counted (``round/position.py``).")
    round = property(lambda self: self.position.round, doc="The round in progress.")
    steps_in_round = property(lambda self: self.position.steps_in_round,
                              doc="Inner steps taken in the round in progress.")
    inner_step = property(lambda self: self.position.inner_step,
                          doc="Inner steps taken over the run.")
    round_length = property(lambda self: self.local_steps.current,
                            doc="``H_i`` of the round in progress.")
    last_round = property(lambda self: self.rounds.last_round,
                          doc="The last round that landed: its ``RoundMetrics``.")
    totals = property(lambda self: self.rounds.totals, doc="Sums over the run.")
    speaks = property(lambda self: self.rank == 0 and getattr(self.groups, "position", 0) == 0,
                      doc="This process logs for the whole run (the first of worker 0).")

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

    def _after_inner_step(self, seconds: float | None) -> None:
        self.comm.beat()
        if seconds is not None:
            self.local_steps.observe_step(seconds)
        self.rounds.advance(real=True)

    def observe_step_seconds(self, seconds: float) -> None:
        """The caller times this worker's inner steps itself (their compute alone, without the
        waits of its own collectives); adaptive ``H_i`` uses these times from now on."""
        self._hook.timed_by_caller = True
        self.local_steps.observe_step(seconds)

    def step_is_idle(self) -> bool:
        """Lockstep: this worker's ``H_i`` steps of the round are done; it idles until the
        round's last step."""
        return self.position.is_idle(self.round_length)

    def idle_step(self) -> None:
        """Lockstep: count a step this worker skips."""
        self.comm.beat()
        self._hook.pause()
        self.rounds.advance(real=False)

    # ------------------------------------------------------------- the round
    def outer_step(self) -> RoundMetrics:
        """End the round now: start the fragments not started yet and finish every exchange
        in flight (normally the inner-optimizer hook runs each part at its step)."""
        return self.rounds.end_round()

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
        if self.position.lockstep and self.position.ticks_in_round:
            self.rounds.end_round()
        self.rounds.land_all()
        self.consensus.install()
        self.rounds.drop_round()

    # ------------------------------------------------------------ state
    def identity(self) -> dict[str, Any]:
        """What a checkpoint of this worker records of its run (``identity.py``)."""
        return checkpoint_identity(self.config, self.flat, self.rank, self.world_size)

    def state_dict(self) -> dict[str, Any]:
        """This rank's GASLoC state (each rank saves its own); exchanges in flight are waited
        for and mixed first, and saved as such, so that a resumed run lands them on time."""
        return {**self.rounds.state_dict(), "format": STATE_FORMAT, "identity": self.identity(),
                "settings": self.config.to_dict(), "local_steps": self.local_steps.state_dict(),
                "lost_peers": self.lost.state_dict(), "health": self.health.state_dict()}

    def load_state_dict(self, state: dict[str, Any], resized: bool = False) -> None:
        """Restore what ``state_dict`` saved on this rank of this run (``resized``: saved by a
        run with another number of workers; the position in the round starts afresh). Outer
        settings left unset continue as the saved run chose them."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"this GASLoC state has format {state.get('format')!r}, not "
                             f"{STATE_FORMAT}: it was saved by another version of hf_gasloc.")
        check_resumable(state["identity"], self.identity(), "the GASLoC state", resized)
        resumed = self.config.with_saved_outer_settings(state["settings"], self._outer_unset)
        if resumed is not None:
            self._use_outer(*resumed)
        self.changed_at_resume = changed_at_resume(
            state["settings"], self.config.to_dict(), "the GASLoC state",
            any(saved["in_flight"] for saved in state["fragments"]))
        self.rounds.load_state_dict(state, resized,
                                    (self.config.outer_lr, self.config.outer_momentum))
        self.health.load_state_dict(state["health"])
        if not resized:
            self.local_steps.load_state_dict(state["local_steps"])
            self.lost.load_state_dict(state["lost_peers"])

    def _use_outer(self, config: GASLoCConfig, choice: OuterChoice) -> None:
        self.config, self.outer_choice = config, choice
        for fragment in self.fragments:
            fragment.outer = fragment.outer_rule(config)
        if self.speaks:
            logger.info("GASLoC: %s.", choice.why)

    def start_round(self, index: int) -> None:
        """Go on at the start of round ``index`` (a resume on another number of workers)."""
        self.rounds.start_round(index)

    def start_as_new_worker(self) -> None:
        """A worker that joins with no state of its own: its parameters (the consensus) are its
        anchor; nothing in flight, no residual, no recovery owed."""
        self.rounds.reset()
        self.health.reset()
