"""Adaptive ``H_i`` (``local_steps="auto"`` or ``"auto:H"``): a worker on a slow link takes fewer steps.

The rule, on every worker ``i`` after every round::

    s_i     moving average (factor 0.3) of its inner-step time
    l_i     its link time: the fastest of its last 8 transfers (the model exchange
            alone, after a tiny message has told it that its peers are ready)
    l_fast  the fastest link time anywhere, spread by gossip: each round a worker
            sends min(l_i, what its peers said last round) along with the ready message
    H_i     = clamp(round(H - (l_i - l_fast) / s_i), 1, H)

So a round of worker ``i`` takes about ``H_i s_i + l_i = H s_i + l_fast``: the round
time of a worker at ``H`` on the fastest link. Taking the fastest recent transfer
makes ``l_i`` a property of the worker's own link: a fast worker that was paired
with a straggler once still sees its fast transfers. On a complete graph every
transfer is paced by the slowest link, so every ``l_i`` is the same and ``H_i = H``:
DiLoCo cannot adapt. Round 0 uses ``H``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

EMA = 0.3
WINDOW = 8


@dataclass(frozen=True)
class Auto:
    """``local_steps="auto:H"``: adapt ``H_i`` around the target ``H``."""

    target: int

    def __str__(self) -> str:
        return f"auto:{self.target}"


class AdaptiveLocalSteps:
    """The measurements and the rule above, for one worker."""

    def __init__(self, target: int):
        self.target = target
        self.step_seconds: float | None = None
        self.transfers: deque[float] = deque(maxlen=WINDOW)
        self.fastest_link: float | None = None

    @property
    def link_seconds(self) -> float | None:
        return min(self.transfers) if self.transfers else None

    def observe_step(self, seconds: float) -> None:
        previous = self.step_seconds
        self.step_seconds = seconds if previous is None else (1 - EMA) * previous + EMA * seconds

    def observe_round(self, transfer_seconds: float, peers_fastest: list[float]) -> None:
        """Record this round's transfer and what the peers believe is the fastest link."""
        self.transfers.append(transfer_seconds)
        self.fastest_link = min([self.link_seconds, *peers_fastest])

    def advertised_fastest(self) -> float:
        """What this worker tells its peers (infinity before it has measured anything)."""
        known = [v for v in (self.link_seconds, self.fastest_link) if v is not None]
        return min(known) if known else float("inf")

    def next_local_steps(self) -> int:
        if self.step_seconds is None or self.link_seconds is None or self.fastest_link is None:
            return self.target
        spare = (self.link_seconds - self.fastest_link) / max(self.step_seconds, 1e-9)
        return max(1, min(self.target, round(self.target - spare)))

    def state_dict(self) -> dict[str, Any]:
        return {"step_seconds": self.step_seconds, "transfers": list(self.transfers),
                "fastest_link": self.fastest_link}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_seconds = state["step_seconds"]
        self.transfers = deque(state["transfers"], maxlen=WINDOW)
        self.fastest_link = state["fastest_link"]
