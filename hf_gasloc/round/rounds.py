"""A worker's rounds as its steps come: each fragment starts at its step and lands on time, the
round ends after ``H_i`` inner steps (in lockstep, after ``round_steps`` of the caller's
steps), and every round that lands is reported."""

from __future__ import annotations

from typing import Any

from ..fabric import LostPeers
from ..schedule.graphs import Topology
from ..schedule.local_steps import LocalStepsPolicy
from .fragment import Fragment, RoundPlan
from .metrics import RoundMetrics, Totals
from .position import RoundPosition
from .scheduler import RoundScheduler


class RoundLoop:
    """Runs the rounds of one worker; owns its position in the run, its scheduler and totals."""

    def __init__(self, fragments: list[Fragment], topology: Topology,
                 local_steps: LocalStepsPolicy, lost: LostPeers, rank: int, outer_delay: int,
                 round_steps: int | None):
        self.fragments, self.topology, self.local_steps = fragments, topology, local_steps
        self.lost, self.rank, self.outer_delay = lost, rank, outer_delay
        self.position = RoundPosition(round_steps)
        self.scheduler = RoundScheduler(fragments)
        self.totals, self.last_round = Totals(), None

    @property
    def round_length(self) -> int:
        """``H_i`` of the round in progress."""
        return self.local_steps.current

    def advance(self, real: bool) -> None:
        """One of the caller's steps: an inner step (``real``) or, in lockstep, an idle one."""
        position = self.position
        position.count(real)
        self._report(self.scheduler.finish_due(position.clock))
        if real:
            for fragment in self.scheduler.due(position.steps_in_round, self.round_length):
                self._start(fragment)
        if position.round_is_over(self.round_length):
            self.start_round(position.round + 1)

    def end_round(self) -> RoundMetrics | None:
        """End the round now: start the fragments not started yet, land every exchange."""
        for fragment in self.scheduler.not_started():
            self._start(fragment)
        self.land_all()
        self.start_round(self.position.round + 1)
        return self.last_round

    def land_all(self) -> None:
        """Land every exchange in flight."""
        self._report(self.scheduler.finish_all())

    def drop_round(self) -> None:
        """The round in progress starts over (its steps were replaced, e.g. by the consensus)."""
        self.position.restart_round()
        self.scheduler.new_round()

    def start_round(self, index: int) -> None:
        """Go on at the start of round ``index``, with the round's live peers planned for."""
        self.position.start_round(index)
        self.scheduler.new_round()
        self.local_steps.plan(list(self.lost.alive(self.topology.graph(index).peers[self.rank])))

    def _start(self, fragment: int) -> None:
        position = self.position
        plan = RoundPlan(position.round, self.topology.graph(position.round),
                         position.steps_in_round, position.inner_step)
        self._report(self.scheduler.start(fragment, plan, position.lands_at(self.outer_delay)))
        self._report(self.scheduler.finish_due(position.clock))

    def _report(self, finished: list[RoundMetrics]) -> None:
        for metrics in finished:
            self.totals.add(metrics)
            self.last_round = metrics
            if metrics.wait_seconds is not None:  # a worker sitting out measured nothing
                self.local_steps.observe_transfer(metrics.round, metrics.comm_seconds)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The position, the fragments (rounds in flight are waited for and mixed first, and
        saved as such), the scheduler and the totals."""
        self.scheduler.settle_all()
        return {**self.position.state_dict(), "totals": self.totals.state_dict(),
                "fragments": [f.state_dict() for f in self.fragments],
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any], resized: bool,
                        outer_settings: tuple[float | None, float | None]) -> None:
        """Restore ``state_dict``'s values; the outer rules keep this run's ``(lr, momentum)``;
        ``resized`` (another number of workers): the position in the round starts afresh."""
        for fragment, saved in zip(self.fragments, state["fragments"], strict=True):
            fragment.load_state_dict(saved, self.topology.graph)
            fragment.outer.set_hyperparameters(*outer_settings)
        self.scheduler.load_state_dict(state["scheduler"])
        self.totals.load_state_dict(state["totals"])
        self.position.load_state_dict(state, resized)

    def reset(self) -> None:
        """A new worker: its fragments' anchors are its parameters; nothing in flight, no
        totals."""
        for fragment in self.fragments:
            fragment.reset()
        self.scheduler.reset()
        self.totals = Totals()
