"""Adaptive ``H_i`` (``local_steps="auto"`` or ``"auto:H"``): workers on slow links, or with slow
steps, take fewer steps.

A gossip exchange ends when its slowest transfer ends, and it blocks both ends.
So when worker ``i`` meets a peer on a slow link, **both** must start the exchange
early, or everyone they meet next round waits for them and the delay spreads to
the whole network. The rule, on every worker ``i``, before every round ``r``::

    s_i       moving average (factor 0.3) of its inner-step time
    l_j       link time of worker j: the fastest of j's last 8 transfers (the model
              exchange alone; a tiny message first tells it that its peers are ready).
              Every worker keeps a table of all l_j and s_j, merged with its peers'
              tables at each exchange, the freshest entry winning
    l_round   max of l_j over i and its peers in round r (the graph is known
              in advance: it comes from the shared seed)
    l_fast    min of all known l_j;  s_fast  min of all known s_j
    H_i(r)  = clamp(round((H s_fast - (l_round - l_fast)) / s_i), 1, H)

A round then takes about ``H_i s_i + l_round = H s_fast + l_fast`` everywhere:
the round time of the fastest worker at ``H`` on the fastest link; a worker whose
steps take twice as long takes about half the steps (with equal step times this
is ``H - (l_round - l_fast) / s_i``). Taking the fastest recent
transfer makes ``l_j`` a property of ``j``'s own link (a fast worker that met a
straggler once still shows its fast transfers). A synchronous topology
(``complete``) does not adapt: its All-Reduce is paced by the slowest link for
everyone, and shortening every worker's round would only lose compute (DiLoCo
cannot do this). Round 0, and any round before ``i`` has measured itself, uses ``H``.
``hf_gasloc.simulate`` models utilization with the same ``adapted_steps`` rule.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

EMA = 0.3
WINDOW = 8


@dataclass(frozen=True)
class Auto:
    """``local_steps="auto:H"``: adapt ``H_i`` around the target ``H``."""

    target: int

    def __str__(self) -> str:
        return f"auto:{self.target}"


def adapted_steps(target: int, extra_seconds: float, step_seconds: float,
                  fastest_step: float | None = None) -> int:
    """``clamp(round((H s_fast - extra) / s), 1, H)``: the steps of ``step_seconds`` that fit
    in the fastest worker's ``H`` steps (of ``fastest_step``, this worker's own if unknown)
    beside ``extra`` seconds of slower link."""
    fastest = step_seconds if fastest_step is None else fastest_step
    if fastest == step_seconds:  # the same as below, in the form that keeps H exact
        return max(1, min(target, round(target - extra_seconds / max(step_seconds, 1e-9))))
    steps = (target * fastest - extra_seconds) / max(step_seconds, 1e-9)
    return max(1, min(target, round(steps)))


class AdaptiveLocalSteps:
    """The measurements, the link table and the rule above, for one worker.

    ``current`` is ``H_i`` of the round in progress; ``plan(peers)`` sets it for
    the next round from what has been measured.
    """

    def __init__(self, target: int, rank: int, world_size: int):
        self.target, self.rank = target, rank
        self.current = target
        self.step_seconds: float | None = None
        self.transfers: deque[float] = deque(maxlen=WINDOW)
        self.links = [float("nan")] * world_size  # nan: not known yet
        self.step_times = [float("nan")] * world_size
        self.stamps = [-1] * world_size  # the round each entry was measured in

    def observe_step(self, seconds: float) -> None:
        previous = self.step_seconds
        self.step_seconds = seconds if previous is None else (1 - EMA) * previous + EMA * seconds

    def observe_transfer(self, round_index: int, seconds: float) -> None:
        self.transfers.append(seconds)
        self.links[self.rank] = min(self.transfers)
        if self.step_seconds is not None:
            self.step_times[self.rank] = self.step_seconds
        self.stamps[self.rank] = round_index

    def table(self) -> torch.Tensor:
        """What this worker sends its peers: every known link time, step time, round stamp."""
        return torch.tensor(self.links + self.step_times + [float(s) for s in self.stamps],
                            dtype=torch.float64)

    def merge(self, table: torch.Tensor) -> None:
        """Take the peer's entries that are fresher than ours."""
        n = len(self.links)
        values = table.tolist()
        for j in range(n):
            if values[2 * n + j] > self.stamps[j]:
                self.links[j], self.step_times[j] = values[j], values[n + j]
                self.stamps[j] = int(values[2 * n + j])

    def steps_for(self, peers: list[int]) -> int:
        """``H_i`` for a round in which this worker meets ``peers``."""
        mine = self.links[self.rank]
        if self.step_seconds is None or mine != mine:  # nan: not measured yet
            return self.target
        known = [link for link in self.links if link == link]
        slowest = max([mine] + [self.links[j] for j in peers if self.links[j] == self.links[j]])
        fastest_step = min([self.step_seconds] + [s for s in self.step_times if s == s])
        return adapted_steps(self.target, slowest - min(known), self.step_seconds, fastest_step)

    def plan(self, peers: list[int]) -> None:
        self.current = self.steps_for(peers)

    def state_dict(self) -> dict[str, Any]:
        return {"current": self.current, "step_seconds": self.step_seconds,
                "transfers": list(self.transfers), "links": list(self.links),
                "step_times": list(self.step_times), "stamps": list(self.stamps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.current = state["current"]
        self.step_seconds = state["step_seconds"]
        self.transfers = deque(state["transfers"], maxlen=WINDOW)
        self.links, self.stamps = list(state["links"]), list(state["stamps"])
        self.step_times = list(state["step_times"])
