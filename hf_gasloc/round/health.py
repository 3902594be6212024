"""Non-finite containment, in one place: a worker whose proposal is NaN/inf recovers instead of
poisoning its peers.

The policy, stage by stage (the mechanics live with each stage; every decision is here):

- **check**: one ``dot(z, z)`` per flat buffer, which the exchange needs anyway
  for the peer distance: a proposal whose squared norm is not finite (a NaN or
  an inf in it, or a norm past fp32's range) is *unhealthy*;
- **recover**: the unhealthy worker's non-finite live parameters roll back (to
  the start of their exchange in flight, else to their anchor) and the
  non-finite part of its inner optimizer's state is reset; after
  ``max_bad_rounds`` unhealthy rounds in a row it stops with ``NonFiniteError``;
- **send**: it sends zeros flagged unhealthy in its header, so nobody mixes them;
- **mix**: it takes the average of its healthy peers' proposals for the round,
  or its own last anchor when no peer is healthy; a healthy worker leaves out
  any received message that is not finite (``finite_peers``);
- **save and evaluate**: a checkpoint is taken only after a recovery
  (``recover_before_save``), and the consensus leaves out non-finite workers.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Iterable, Protocol

import torch

from ..errors import NonFiniteError
from ..state.flat import FlatModel

logger = logging.getLogger(__name__)


def squared_norm(buffers: Iterable[torch.Tensor]) -> float:
    """``sum ||b||^2`` in fp32: not finite exactly when a buffer holds a NaN or an inf
    (or when the norm overflows)."""
    return sum(float(torch.dot(b, b)) for b in buffers)


def all_finite(buffers: Iterable[torch.Tensor]) -> bool:
    return math.isfinite(squared_norm(buffers))


def params_finite(flat: FlatModel) -> bool:
    """Are the live parameters (any dtype) all finite?"""
    return all(bool(torch.isfinite(p).all()) for g in flat.groups for p in g.params)


@torch.no_grad()
def reset_nonfinite_state(optimizer: torch.optim.Optimizer) -> int:
    """Start afresh the state of every parameter whose state holds a NaN or an inf.

    Its floating-point state tensors (AdamW's moments) are zeroed and its step
    count set to 0, as for a parameter the optimizer has not stepped yet.
    Returns how many parameters were reset.
    """
    reset = 0
    for state in optimizer.state.values():
        tensors = [v for v in state.values() if torch.is_tensor(v) and v.is_floating_point()]
        if all(bool(torch.isfinite(t).all()) for t in tensors):
            continue
        for key, value in state.items():
            if torch.is_tensor(value) and value.is_floating_point():
                value.zero_()
            elif key == "step":
                state[key] = 0
        reset += 1
    return reset


class RollsBack(Protocol):
    """A part of the model that can put its live parameters back where its round started."""

    flat: FlatModel

    def roll_back(self) -> None: ...


class Health:
    """This worker's health: its recoveries (a metric), its unhealthy rounds in a row (to give
    up), and the recovery itself. A round with several fragments is unhealthy once, however
    many of them were."""

    def __init__(self, rank: int, max_bad_rounds: int):
        self.rank, self.max_bad_rounds = rank, max_bad_rounds
        self._parts: list[RollsBack] = []
        self._inner: Callable[[], torch.optim.Optimizer | None] = lambda: None
        self.reset()

    def watch(self, parts: list[RollsBack],
              inner_optimizer: Callable[[], torch.optim.Optimizer | None]) -> None:
        """What a recovery rolls back and resets."""
        self._parts, self._inner = parts, inner_optimizer

    # ---------------------------------------------------------------- decisions
    def proposal_is_healthy(self, norm: float, round_index: int, inner_step: int) -> bool:
        """The check stage: a proposal of squared norm ``norm``; an unhealthy one is counted
        and recovered from (or ends the run after ``max_bad_rounds`` in a row)."""
        if math.isfinite(norm):
            return True
        self._unhealthy_round(round_index, inner_step,
                              "it takes its healthy peers' proposals for this round")
        return False

    def finite_peers(self, measures: dict[int, float], round_index: int) -> list[int]:
        """The peers whose received message measured finite; the others are left out."""
        kept = [peer for peer, value in measures.items() if math.isfinite(value)]
        for peer in [peer for peer in measures if peer not in kept]:
            logger.warning("GASLoC rank %d: the message of rank %d in round %d is not finite; "
                           "left out.", self.rank, peer, round_index)
        return kept

    def recover_before_save(self, round_index: int, inner_step: int) -> bool:
        """Recover a worker whose live parameters are not finite before its state is saved."""
        if all(params_finite(part.flat) for part in self._parts):
            return False
        self._unhealthy_round(round_index, inner_step, "it rolls back")
        return True

    def _unhealthy_round(self, round_index: int, inner_step: int, what: str) -> None:
        self.recoveries += 1
        if round_index != self.last_bad:
            self.in_a_row = self.in_a_row + 1 if round_index == self.last_bad + 1 else 1
            self.last_bad = round_index
        if self.in_a_row >= self.max_bad_rounds:
            raise NonFiniteError(
                f"GASLoC rank {self.rank}: its parameters were non-finite in {self.in_a_row} "
                f"rounds in a row (the last: round {round_index}, inner step {inner_step}); the "
                "inner optimizer diverges on this worker. Lower the learning rate, enable "
                "gradient clipping, or check this worker's data; max_bad_rounds sets how many "
                "rounds in a row are recovered before this error."
            )
        logger.warning("GASLoC rank %d: non-finite parameters at round %d, inner step %d; %s, its "
                       "non-finite parameters roll back and its inner optimizer's non-finite "
                       "state is reset (%d recoveries so far).",
                       self.rank, round_index, inner_step, what, self.recoveries)
        self._recover()

    @torch.no_grad()
    def _recover(self) -> None:
        """Roll non-finite parts back and reset the inner optimizer's non-finite state: a NaN
        in one fragment would otherwise come back through the next forward pass."""
        for part in self._parts:
            if not params_finite(part.flat):
                part.roll_back()
        optimizer = self._inner()
        if optimizer is not None:
            reset_nonfinite_state(optimizer)

    # -------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"in_a_row": self.in_a_row, "recoveries": self.recoveries,
                "last_bad": self.last_bad}

    def load_state_dict(self, state: dict) -> None:
        self.in_a_row, self.recoveries = state["in_a_row"], state["recoveries"]
        self.last_bad = state["last_bad"]

    def reset(self) -> None:
        self.in_a_row, self.recoveries, self.last_bad = 0, 0, -2
