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

from .fragments import start_steps
from .metrics import RoundMetrics
from .pipeline import OuterStep, Round


@dataclass
class InFlight:
    """One fragment's round between its start and its finish."""

    fragment: int
    round: Round
    finish_at: int  # the inner step (counted over the run) at which it finishes


@dataclass
class RoundReport:
    """A round's metrics, summed over its fragments as they finish."""

    index: int
    inner_steps: int
    expected: int  # fragments to finish before the round is complete
    fragments: list[Round] = field(default_factory=list)
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

    def __init__(self, pipelines: list[OuterStep], delay: int):
        self.pipelines, self.delay = pipelines, delay
        self.in_flight: list[InFlight] = []
        self.reports: dict[int, RoundReport] = {}
        self.started = 0  # fragments started in the round in progress

    def due(self, steps_in_round: int, round_length: int) -> list[int]:
        """The fragments that start at this step of the round."""
        starts = start_steps(round_length, len(self.pipelines))
        return [f for f in range(self.started, len(starts)) if starts[f] <= steps_in_round]

    def start(self, fragment: int, round_: Round, step: int) -> None:
        began = time.perf_counter()
        earlier = [flight for flight in self.in_flight if flight.fragment == fragment]
        for flight in earlier:  # still in flight from the last round: it lands first
            self.finish(flight)
        self.pipelines[fragment].start(round_)
        self.in_flight.append(InFlight(fragment, round_, step + self.delay))
        report = self.reports.setdefault(round_.index, RoundReport(
            round_.index, round_.inner_steps, len(self.pipelines)))
        report.blocked_seconds += time.perf_counter() - began
        self.started += 1

    def finish_due(self, step: int) -> list[RoundMetrics]:
        """Finish what is due at inner step ``step``; returns the rounds now complete."""
        done = []
        for flight in [f for f in self.in_flight if f.finish_at <= step]:
            done += self.finish(flight)
        return done

    def finish(self, flight: InFlight) -> list[RoundMetrics]:
        began = time.perf_counter()
        self.pipelines[flight.fragment].finish(flight.round)
        self.in_flight.remove(flight)
        report = self.reports[flight.round.index]
        report.blocked_seconds += time.perf_counter() - began
        report.fragments.append(flight.round)
        if len(report.fragments) < report.expected:
            return []
        del self.reports[flight.round.index]
        return [report.metrics()]

    def finish_all(self) -> list[RoundMetrics]:
        done = []
        for flight in list(self.in_flight):
            done += self.finish(flight)
        return done

    def settle_all(self) -> None:
        """Wait for every exchange in flight and mix it, without applying it (for a checkpoint)."""
        for flight in self.in_flight:
            self.pipelines[flight.fragment].settle(flight.round)
