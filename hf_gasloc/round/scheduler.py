"""When each fragment's exchange starts and when its outer update lands.

Every inner step counts. In a round of ``H_i`` steps, fragment ``f`` of ``F``
starts its exchange at step ``ceil(H_i (f + 1) / F)`` (``fragments.start_steps``;
the last fragment ends the round) and finishes ``outer_delay`` inner steps
later, the exchange travelling in the background meanwhile; a fragment that is
due to start again while still in flight finishes first. With ``F = 1`` and
``outer_delay = 0`` this is the plain round: start and finish at the round's
last step. A round's metrics are reported once all its fragments finished.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..schedule.fragments import start_steps
from .fragment import Fragment, FragmentReport, Posted, RoundPlan
from .metrics import RoundMetrics


@dataclass
class InFlight:
    """One fragment's round between its start and its finish."""

    fragment: int
    posted: Posted
    finish_at: int  # the engine's clock (inner steps, or lockstep steps) at which it lands


@dataclass
class RoundReport:
    """A round's metrics, summed over its fragments as they finish."""

    index: int
    inner_steps: int
    expected: int  # fragments to finish before the round is complete
    fragments: list[FragmentReport] = field(default_factory=list)
    blocked_seconds: float = 0.0

    def metrics(self) -> RoundMetrics:
        stats = [r.stats for r in self.fragments]
        distances = [r.peer_distance for r in self.fragments if r.peer_distance is not None]
        spreads = [r.spread for r in self.fragments if r.spread is not None]
        waits = [s.wait_seconds for s in stats if s.wait_seconds is not None]
        return RoundMetrics(
            round=self.index,
            inner_steps=self.inner_steps,
            bytes_sent=sum(s.bytes_sent for s in stats),
            comm_seconds=sum(s.seconds for s in stats),
            outer_step_seconds=sum(r.math_seconds for r in self.fragments),
            peer_distance=sum(distances) / len(distances) if distances else None,
            consensus_distance=(sum(s for s, _ in spreads) / max(sum(n for _, n in spreads), 1e-38)
                                if spreads else None),
            wait_seconds=max(waits) if waits else None,
            encode_seconds=sum(r.encode_seconds for r in self.fragments),
            blocked_seconds=self.blocked_seconds,
        )


class RoundScheduler:
    """Starts and finishes the fragments' rounds as the inner steps come."""

    def __init__(self, fragments: list[Fragment]):
        self.fragments = fragments
        self.reset()

    def due(self, steps_in_round: int, round_length: int) -> list[int]:
        """The fragments that start at this step of the round."""
        starts = start_steps(round_length, len(self.fragments))
        return [f for f in range(self.started, len(starts)) if starts[f] <= steps_in_round]

    def not_started(self) -> list[int]:
        """The fragments that have not started in the round in progress."""
        return list(range(self.started, len(self.fragments)))

    def start(self, fragment: int, plan: RoundPlan, finish_at: int) -> list[RoundMetrics]:
        """Start ``fragment``'s round, to land at ``finish_at`` on the engine's clock (its
        previous round lands first if still in flight); returns the rounds this completed."""
        began = time.perf_counter()
        done = []
        for flight in [f for f in self.in_flight if f.fragment == fragment]:
            done += self.finish(flight)
        posted = self.fragments[fragment].start(plan)
        self.in_flight.append(InFlight(fragment, posted, finish_at))
        report = self.reports.setdefault(plan.index, RoundReport(
            plan.index, plan.inner_steps, len(self.fragments)))
        report.blocked_seconds += time.perf_counter() - began
        self.started += 1
        return done

    def finish_due(self, step: int) -> list[RoundMetrics]:
        """Finish what is due at inner step ``step``; returns the rounds now complete."""
        done = []
        for flight in [f for f in self.in_flight if f.finish_at <= step]:
            done += self.finish(flight)
        return done

    def finish(self, flight: InFlight) -> list[RoundMetrics]:
        began = time.perf_counter()
        fragment_report = self.fragments[flight.fragment].finish(flight.posted)
        self.in_flight.remove(flight)
        report = self.reports[flight.posted.plan.index]
        report.blocked_seconds += time.perf_counter() - began
        report.fragments.append(fragment_report)
        if len(report.fragments) < report.expected:
            return []
        del self.reports[flight.posted.plan.index]
        return [report.metrics()]

    def finish_all(self) -> list[RoundMetrics]:
        done = []
        for flight in list(self.in_flight):
            done += self.finish(flight)
        return done

    def settle_all(self) -> None:
        """Wait for every exchange in flight and mix it, without applying it (for a checkpoint)."""
        for flight in self.in_flight:
            self.fragments[flight.fragment].settle(flight.posted)

    def new_round(self) -> None:
        self.started = 0

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Where the round stands; the rounds in flight themselves are their fragments'."""
        return {"started": self.started,
                "in_flight": [{"fragment": f.fragment, "finish_at": f.finish_at}
                              for f in self.in_flight]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore after the fragments restored their rounds in flight; a round's metrics count
        its fragments from here."""
        self.reset()
        self.started = state["started"]
        for saved in state["in_flight"]:
            posted = self.fragments[saved["fragment"]].posted
            self.in_flight.append(InFlight(saved["fragment"], posted, saved["finish_at"]))
            plan = posted.plan
            report = self.reports.setdefault(plan.index, RoundReport(plan.index,
                                                                     plan.inner_steps, 0))
            report.expected += 1

    def reset(self) -> None:
        """No round in flight, none started."""
        self.in_flight: list[InFlight] = []
        self.reports: dict[int, RoundReport] = {}
        self.started = 0
