"""What each GASLoC round reports, ready for a logger."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class RoundMetrics:
    """One outer step on one worker.

    ``peer_distance`` is free: the mean of ``||z_i - z_j||^2 / ||z_i||^2`` over
    this round's peers. ``consensus_distance`` is exact,
    ``mean_i ||z_i - z_bar||^2 / ||z_bar||^2`` over all workers, and is only
    computed on the rounds that ``consensus_every`` asks for (one extra All-Reduce).
    ``bytes_sent`` counts what this worker sent: headers and messages (for the
    complete graph, the ``2 (n - 1) / n`` model sizes a ring All-Reduce sends).
    ``wait_seconds`` is the time spent waiting for the peers to reach the
    exchange (their header's arrival), ``comm_seconds`` the transfer after that,
    ``encode_seconds`` the codec's own time (encoding and decoding; 0 for
    ``native``), ``blocked_seconds`` how long the training loop was held by the
    round's outer steps (their math and any wait), ``outer_step_seconds`` their
    math alone.
    """

    round: int
    inner_steps: int
    bytes_sent: int
    comm_seconds: float
    outer_step_seconds: float
    peer_distance: float | None = None
    consensus_distance: float | None = None
    wait_seconds: float | None = None
    encode_seconds: float = 0.0
    blocked_seconds: float = 0.0


@dataclass
class Totals:
    """Running sums over the whole run, saved with checkpoints."""

    rounds: int = 0  # rounds that landed
    bytes_sent: int = 0
    comm_seconds: float = 0.0

    def add(self, metrics: RoundMetrics) -> None:
        self.rounds += 1
        self.bytes_sent += metrics.bytes_sent
        self.comm_seconds += metrics.comm_seconds

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def as_log(metrics: RoundMetrics | None, totals: Totals, inner_steps: int, unfinished: int,
           prefix: str = "gasloc/") -> dict[str, float]:
    """Flat, numeric values for ``Trainer.log`` / ``accelerator.log``. ``inner_steps``: every
    inner step taken; ``unfinished``: how many of them belong to the round in progress."""
    log: dict[str, float] = {
        "rounds": totals.rounds,
        "inner_steps_total": inner_steps,
        "inner_steps_unfinished": unfinished,
        "bytes_sent_total": totals.bytes_sent,
        "comm_seconds_total": totals.comm_seconds,
    }
    if metrics is not None:
        log.update(
            inner_steps=metrics.inner_steps,
            bytes_sent=metrics.bytes_sent,
            comm_seconds=metrics.comm_seconds,
            outer_step_seconds=metrics.outer_step_seconds,
        )
        if metrics.peer_distance is not None:
            log["peer_distance"] = metrics.peer_distance
        if metrics.consensus_distance is not None:
            log["consensus_distance"] = metrics.consensus_distance
        if metrics.wait_seconds is not None:
            log["wait_seconds"] = metrics.wait_seconds
        if metrics.encode_seconds:
            log["encode_seconds"] = metrics.encode_seconds
        log["blocked_seconds"] = metrics.blocked_seconds
    return {prefix + key: value for key, value in log.items()}
