"""Where a worker stands in its run: the round, and the steps counted in it and over the run.

A round ends after the worker's ``H_i`` inner steps. In lockstep (``round_steps``:
the Trainer with unequal ``H_i``) every round lasts ``round_steps`` of the
caller's steps on every rank, idle ones included ("ticks"), and rounds in flight
land by that clock instead of by inner steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class RoundPosition:
    """The round in progress and the step counters; saved with the worker's state."""

    round_steps: int | None = None  # lockstep: the caller's steps per round
    round: int = 0
    steps_in_round: int = 0  # inner steps of the round in progress
    inner_step: int = 0  # inner steps over the run
    ticks: int = 0  # lockstep: the caller's steps over the run, idle ones included
    ticks_in_round: int = 0

    @property
    def lockstep(self) -> bool:
        return self.round_steps is not None

    @property
    def clock(self) -> int:
        """What rounds in flight land by: inner steps, or in lockstep the caller's steps."""
        return self.ticks if self.lockstep else self.inner_step

    def count(self, real: bool) -> None:
        """One step of the caller: an inner step (``real``) or, in lockstep, an idle one."""
        if real:
            self.steps_in_round += 1
            self.inner_step += 1
        if self.lockstep:
            self.ticks += 1
            self.ticks_in_round += 1

    def is_idle(self, round_length: int) -> bool:
        """Lockstep: this worker's ``H_i`` steps of the round are done."""
        return self.lockstep and self.steps_in_round >= round_length

    def round_is_over(self, round_length: int) -> bool:
        if self.lockstep:
            return self.ticks_in_round >= self.round_steps
        return self.steps_in_round >= round_length

    def lands_at(self, outer_delay: int) -> int:
        """When an exchange started now lands: ``outer_delay`` steps on, and in lockstep not
        before the round's last step (every peer has posted by then)."""
        lands = self.clock + outer_delay
        if self.lockstep:
            lands = max(lands, self.ticks - self.ticks_in_round + self.round_steps)
        return lands

    def start_round(self, index: int) -> None:
        """Go on at the start of round ``index``."""
        self.round, self.steps_in_round, self.ticks_in_round = index, 0, 0

    def restart_round(self) -> None:
        """The round in progress starts over (its steps were dropped)."""
        self.start_round(self.round)

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "steps_in_round": self.steps_in_round,
                "inner_step": self.inner_step, "ticks": self.ticks,
                "ticks_in_round": self.ticks_in_round}

    def load_state_dict(self, state: dict[str, Any], resized: bool = False) -> None:
        """Restore the counters; ``resized`` (another number of workers) keeps only those over
        the run: the position in the round starts afresh."""
        self.inner_step, self.ticks = state["inner_step"], state["ticks"]
        if not resized:
            self.round, self.steps_in_round = state["round"], state["steps_in_round"]
            self.ticks_in_round = state["ticks_in_round"]
