"""``GASLoC``: the outer loop around any inner optimizer.

It wires the pieces together and keeps the counters; each piece owns one idea:
``topology`` (who talks to whom), ``local_steps`` (``H_i``), ``fragments`` and
``flat`` (the fp32 buffers), ``comm`` (every transfer), ``wires`` and
``exchange`` (what travels and how it mixes), ``outer_optimizer``, ``pipeline``
(the stages of one round, listed in ``docs/algorithm.md``), ``overlap`` (when
each fragment starts and finishes), ``consensus`` (the average, for evaluation
and saving), ``health`` and ``peers`` (faults).
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist

from .agreement import check_ranks_agree, settings_to_agree_on
from .codec_wire import make_wire
from .comm import Comm
from .config import GASLoCConfig
from .consensus import Consensus
from .exchange import GossipExchange
from .flat import FlatModel
from .fragments import split_fragments
from .health import Health, all_params_finite, roll_back_nonfinite
from .inner import InnerStepHook
from .local_steps import local_steps_policy
from .metrics import RoundMetrics, Totals, as_log
from .outer_optimizer import build_outer_optimizer
from .overlap import RoundScheduler
from .peers import LostPeers
from .pipeline import OuterStep, Round
from .state import engine_state, restore_engine_state
from .topology import build_topology
from .wires import Wire


class GASLoC:
    """Counts the inner optimizer's steps and runs the outer step every ``H_i`` of them.

    ``GASLoC(model, inner_optimizer, config)`` (or keyword settings) attaches to
    the inner optimizer's ``step`` at once; without an optimizer, call
    ``attach(optimizer)`` later or ``outer_step()`` yourself. Construction is
    collective: every rank checks that all ranks have the same settings, then
    takes rank 0's parameters as the common starting anchor.
    """

    def __init__(
        self,
        model: torch.nn.Module | Iterable[torch.Tensor],
        inner_optimizer: torch.optim.Optimizer | None = None,
        config: GASLoCConfig | None = None,
        *,
        process_group: dist.ProcessGroup | None = None,
        **settings: Any,
    ):
        if config is None:
            config = GASLoCConfig(**settings)
        elif settings:
            config = dataclasses.replace(config, **settings)
        if not config.enabled:
            raise ValueError("topology 'none' is plain DDP: do not attach a GASLoC engine.")
        self.config = config
        self.comm = Comm(process_group, config.peer_timeout)
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        self.topology = build_topology(config.topology, self.world_size, config.seed,
                                       config.gossip_weight)
        self.local_steps_policy = local_steps_policy(
            config.local_steps, self.rank, self.world_size, self.topology.synchronous)
        fragments = [FlatModel(part, config.anchor_on_cpu)
                     for part in split_fragments(model, config.fragments)]
        self.flat = FlatModel.of_groups([g for f in fragments for g in f.groups])
        check_ranks_agree(settings_to_agree_on(config, self.topology, self.flat), self.comm)
        self.run_id = self.comm.run_id  # a resumed run takes its checkpoint's
        self.lost = LostPeers(self.rank, self.comm.hosts)
        self.health = Health(self.rank, config.max_bad_rounds)
        self.consensus = Consensus(self.flat, self.comm, self.lost, config.outer_delay > 0)
        self.consensus.start_from_first_rank()
        self.outer_optimizers = [build_outer_optimizer(config.outer_optimizer, config.outer_lr,
                                                       config.outer_momentum, f.anchors)
                                 for f in fragments]
        self.wires = [make_wire(f, self.comm, config.payload, config.payload_form,
                                self.topology.synchronous) for f in fragments]
        device = self.comm.staging_device(self.flat.device)
        self.scheduler = RoundScheduler([
            OuterStep(f, wire, GossipExchange(wire.messages, self.comm, device), optimizer,
                      self.local_steps_policy, self.lost, self.health, self._recover,
                      config.consensus_every, delayed=config.outer_delay > 0)
            for f, wire, optimizer in zip(fragments, self.wires, self.outer_optimizers)],
            config.outer_delay)
        self.round = 0
        self.steps_in_round = 0
        self.inner_step = 0  # inner steps taken over the run
        self.last_round: RoundMetrics | None = None
        self.totals = Totals()
        self._last_step_end: float | None = None
        self._hook = InnerStepHook(self._after_inner_step)
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
        if self._last_step_end is not None:
            self.local_steps_policy.observe_step(now - self._last_step_end)
        self.steps_in_round += 1
        self.inner_step += 1
        self._report(self.scheduler.finish_due(self.inner_step))
        for fragment in self.scheduler.due(self.steps_in_round, self.round_length):
            self._start(fragment)
        if self.steps_in_round >= self.round_length:
            self._end_round()
        self._last_step_end = time.perf_counter()  # the next step's time excludes the outer step

    # ------------------------------------------------------------- the round
    @property
    def round_length(self) -> int:
        """``H_i`` of the round in progress."""
        return self.local_steps_policy.current

    @property
    def outer_optimizer(self) -> torch.optim.Optimizer:
        """The (first fragment's) outer optimizer."""
        return self.outer_optimizers[0]

    @property
    def wire(self) -> Wire:
        """The (first fragment's) wire."""
        return self.wires[0]

    @property
    def outer_lr(self) -> float:
        """``eta``: the outer optimizer's current learning rate."""
        return float(self.outer_optimizer.param_groups[0]["lr"])

    @property
    def group(self) -> dist.ProcessGroup | None:
        return self.comm.group

    def outer_step(self) -> RoundMetrics:
        """End the round now: start the fragments not started yet and finish every exchange
        in flight (normally the inner-optimizer hook runs each part at its step)."""
        for fragment in range(self.scheduler.started, len(self.outer_optimizers)):
            self._start(fragment)
        self._report(self.scheduler.finish_all())
        self._end_round()
        return self.last_round

    def _start(self, fragment: int) -> None:
        eta = float(self.outer_optimizers[fragment].param_groups[0]["lr"])
        round_ = Round(self.round, self.topology.graph(self.round), eta, self.steps_in_round,
                       self.inner_step)
        self.scheduler.start(fragment, round_, self.inner_step)
        self._report(self.scheduler.finish_due(self.inner_step))

    def _report(self, finished: list[RoundMetrics]) -> None:
        for metrics in finished:
            self.totals.add(metrics)
            self.last_round = metrics
            if metrics.wait_seconds is not None:  # a worker sitting out measured nothing
                self.local_steps_policy.observe_transfer(metrics.round, metrics.comm_seconds)

    def _end_round(self) -> None:
        self.round += 1
        self.steps_in_round = 0
        self.scheduler.started = 0
        next_peers = self.lost.alive(self.topology.graph(self.round).peers[self.rank])
        self.local_steps_policy.plan(list(next_peers))

    @property
    def lost_peers(self) -> list[int]:
        """Ranks this worker no longer waits for (it timed out on them, or heard so)."""
        return self.lost.lost

    def check_peers(self, when: str) -> list[int]:
        """Roll call (collective): ranks that do not answer within ``peer_timeout`` become lost.

        For the moments where the caller is about to run collectives of its own
        (Trainer's logging, evaluation, checkpoints), which have no deadline.
        """
        for rank in self.comm.roll_call():
            self.lost.mark(rank, when, self.comm.silence)
        return self.lost_peers

    def _recover(self) -> None:
        roll_back_nonfinite(self.scheduler, self._hook.optimizer)

    def recover_if_nonfinite(self) -> bool:
        """Recover a worker with non-finite parameters before its state is saved."""
        if all_params_finite(self.flat):
            return False
        self.health.unhealthy_round(self.round, self.inner_step, "it rolls back")
        self._recover()
        return True

    def metrics(self, prefix: str = "gasloc/") -> dict[str, float]:
        """The last round's metrics and the run's totals, flat, for a logger."""
        log = as_log(self.last_round, self.totals, prefix)
        log[prefix + "recoveries"] = self.health.recoveries
        log[prefix + "lost_peers"] = len(self.lost.lost)
        return log

    # ------------------------------------------------ consensus for eval/save
    def consensus_model(self):
        """Evaluate or save the workers' average inside this block (every rank must enter it)."""
        return self.consensus.model()

    def install_consensus(self) -> None:
        """Replace parameters and anchors on every rank by their average (collective).

        Exchanges in flight land first; the round in progress is dropped; outer
        optimizer state is kept.
        """
        self._report(self.scheduler.finish_all())
        self.consensus.install()
        self.steps_in_round = 0
        self.scheduler.started = 0

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """This rank's GASLoC state (each rank saves its own); exchanges in flight are waited
        for and mixed first, and saved as such, so that a resumed run lands them on time."""
        self.scheduler.settle_all()
        return engine_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` saved on this same rank of the same run."""
        restore_engine_state(self, state)
