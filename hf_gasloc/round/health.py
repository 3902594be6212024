"""Non-finite containment: a worker whose proposal is NaN/inf recovers instead of poisoning its peers.

The check is one ``dot(z, z)`` per flat buffer, which the exchange needs anyway
for the peer distance: a proposal whose squared norm is not finite (a NaN or an
inf in it, or a norm past fp32's range) is *unhealthy*. An unhealthy worker
sends zeros flagged unhealthy in its header, so nobody mixes them, takes the
average of its healthy peers' proposals for the round (or its own last anchor
when no peer is healthy), and resets the non-finite part of its inner
optimizer's state. After ``max_bad_rounds`` unhealthy rounds in a row it stops
with ``NonFiniteError``.
"""

from __future__ import annotations

import logging
import math

import torch

from .errors import NonFiniteError
from .inner import reset_nonfinite_state

logger = logging.getLogger(__name__)


def squared_norm(buffers: list[torch.Tensor]) -> float:
    """``sum ||b||^2`` in fp32: not finite exactly when a buffer holds a NaN or an inf
    (or when the norm overflows)."""
    return sum(float(torch.dot(b, b)) for b in buffers)


def all_finite(buffers: list[torch.Tensor]) -> bool:
    return math.isfinite(squared_norm(buffers))


class Health:
    """Counts this worker's recoveries (a metric) and its unhealthy rounds in a row (to give
    up); a round with several fragments is unhealthy once, however many of them were."""

    def __init__(self, rank: int, max_bad_rounds: int):
        self.rank, self.max_bad_rounds = rank, max_bad_rounds
        self.in_a_row = 0
        self.recoveries = 0
        self.last_bad = -2  # the last unhealthy round

    def unhealthy_round(self, round_index: int, inner_step: int, where: str) -> None:
        """Log and count one recovery; raise once ``max_bad_rounds`` came in a row."""
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
                       self.rank, round_index, inner_step, where, self.recoveries)

    def state_dict(self) -> dict:
        return {"in_a_row": self.in_a_row, "recoveries": self.recoveries,
                "last_bad": self.last_bad}

    def load_state_dict(self, state: dict) -> None:
        self.in_a_row, self.recoveries = state["in_a_row"], state["recoveries"]
        self.last_bad = state["last_bad"]


def all_params_finite(flat) -> bool:
    return all(bool(torch.isfinite(p).all()) for g in flat.groups for p in g.params)


@torch.no_grad()
def roll_back_nonfinite(scheduler, optimizer: torch.optim.Optimizer | None) -> None:
    """Roll non-finite live parameters back (to the start of their exchange in flight, else to
    their anchor) and reset the inner optimizer's non-finite state: a NaN in one fragment
    would otherwise come back through the next forward pass."""
    in_flight = {flight.fragment for flight in scheduler.in_flight}
    for fragment, pipeline in enumerate(scheduler.pipelines):
        if all_params_finite(pipeline.flat):
            continue
        if fragment in in_flight and pipeline.snapshots is not None:
            for g, views in zip(pipeline.flat.groups, pipeline.snapshot_views):
                torch._foreach_copy_(g.params, views)
        else:
            pipeline.flat.store_anchor()
    if optimizer is not None:
        reset_nonfinite_state(optimizer)
