"""What a worker saves and restores: anchors, outer optimizers, ``H_i`` policy, residuals,
counters, and the exchanges in flight (waited for and mixed, not yet applied)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from .exchange import ExchangeStats
from .metrics import Totals
from .overlap import InFlight, RoundReport
from .pipeline import Round

if TYPE_CHECKING:
    from .engine import GASLoC


def engine_state(engine: "GASLoC") -> dict[str, Any]:
    """This rank's GASLoC state (each rank saves its own); in-flight rounds must be settled."""
    return {
        "rank": engine.rank,
        "world_size": engine.world_size,
        "topology": engine.config.topology,
        "seed": engine.config.seed,
        "payload": engine.config.payload,
        "fragments": engine.config.fragments,
        "local_steps_policy": engine.local_steps_policy.state_dict(),
        "round": engine.round,
        "steps_in_round": engine.steps_in_round,
        "inner_step": engine.inner_step,
        "fragments_started": engine.scheduler.started,
        "anchors": engine.flat.anchors,
        "outer_optimizers": [o.state_dict() for o in engine.outer_optimizers],
        "totals": dataclasses.asdict(engine.totals),
        "health": engine.health.state_dict(),
        "lost_peers": engine.lost.state_dict(),
        "wires": [w.state_dict() for w in engine.wires],
        "in_flight": [_flight_state(engine, f) for f in engine.scheduler.in_flight],
    }


def _flight_state(engine: "GASLoC", flight: InFlight) -> dict[str, Any]:
    """A settled round in flight: its mixed proposal, its start snapshot, when it lands."""
    pipeline = engine.scheduler.pipelines[flight.fragment]
    r = flight.round
    return {"fragment": flight.fragment, "finish_at": flight.finish_at, "index": r.index,
            "eta": r.eta, "inner_steps": r.inner_steps, "inner_step": r.inner_step,
            "peer_distance": r.peer_distance, "spread": r.spread,
            "stats": dataclasses.asdict(r.stats),
            "works": [w.clone() for w in pipeline.flat.works],
            "snapshots": [s.clone() for s in pipeline.snapshots or []]}


@torch.no_grad()
def restore_engine_state(engine: "GASLoC", state: dict[str, Any], resized: bool = False) -> None:
    """Restore what ``engine_state`` saved on this rank.

    ``resized``: the run resumes on another number of workers, so the rank and
    world size may differ, and what depends on them (position in the round,
    ``H_i`` measurements, lost peers) starts afresh; the caller sets the round.
    """
    expected = {"topology": engine.config.topology, "seed": engine.config.seed,
                "payload": engine.config.payload, "fragments": engine.config.fragments}
    if not resized:
        expected.update(rank=engine.rank, world_size=engine.world_size)
    for key, value in expected.items():
        if state.get(key) != value:
            raise ValueError(
                f"cannot resume GASLoC state: it was saved with {key}={state.get(key)!r} "
                f"but this run has {key}={value!r}. Resume with the same launch settings."
            )
    for anchor, saved in zip(engine.flat.anchors, state["anchors"], strict=True):
        anchor.copy_(saved)
    for optimizer, saved in zip(engine.outer_optimizers, state["outer_optimizers"], strict=True):
        optimizer.load_state_dict(saved)
    for wire, saved in zip(engine.wires, state["wires"], strict=True):
        wire.load_state_dict(saved)
    engine.totals = Totals(**state["totals"])
    engine.health.load_state_dict(state["health"])
    engine.inner_step = state["inner_step"]
    if not resized:
        engine.round = state["round"]
        engine.steps_in_round = state["steps_in_round"]
        engine.scheduler.started = state["fragments_started"]
        engine.local_steps_policy.load_state_dict(state["local_steps_policy"])
        engine.lost.load_state_dict(state["lost_peers"])
    engine.scheduler.in_flight = [_restore_flight(engine, saved) for saved in state["in_flight"]]
    for flight in engine.scheduler.in_flight:  # a round's metrics count its fragments from here
        index = flight.round.index
        report = engine.scheduler.reports.setdefault(
            index, RoundReport(index, flight.round.inner_steps, 0))
        report.expected += 1


def _restore_flight(engine: "GASLoC", saved: dict[str, Any]) -> InFlight:
    pipeline = engine.scheduler.pipelines[saved["fragment"]]
    for work, value in zip(pipeline.flat.works, saved["works"], strict=True):
        work.copy_(value)
    for snapshot, value in zip(pipeline.snapshots or [], saved["snapshots"], strict=True):
        snapshot.copy_(value)
    round_ = Round(saved["index"], engine.topology.graph(saved["index"]), saved["eta"],
                   saved["inner_steps"], saved["inner_step"], settled=True,
                   peer_distance=saved["peer_distance"],
                   spread=None if saved["spread"] is None else tuple(saved["spread"]),
                   stats=ExchangeStats(**saved["stats"]))
    return InFlight(saved["fragment"], round_, saved["finish_at"])
