"""What a worker saves and restores: its anchor, outer optimizer, ``H_i`` policy and counters."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from .metrics import Totals

if TYPE_CHECKING:
    from .engine import GASLoC


def engine_state(engine: "GASLoC") -> dict[str, Any]:
    """This rank's GASLoC state (each rank saves its own)."""
    return {
        "rank": engine.rank,
        "world_size": engine.world_size,
        "topology": engine.config.topology,
        "seed": engine.config.seed,
        "payload": engine.config.payload,
        "local_steps_policy": engine.local_steps_policy.state_dict(),
        "round": engine.round,
        "steps_in_round": engine.steps_in_round,
        "anchors": engine.flat.anchors,
        "outer_optimizer": engine.outer_optimizer.state_dict(),
        "totals": dataclasses.asdict(engine.totals),
        "health": engine.health.state_dict(),
        "lost_peers": engine.lost.state_dict(),
        "wire": engine.wire.state_dict(),
    }


@torch.no_grad()
def restore_engine_state(engine: "GASLoC", state: dict[str, Any], resized: bool = False) -> None:
    """Restore what ``engine_state`` saved on this rank.

    ``resized``: the run resumes on another number of workers, so the rank and
    world size may differ, and what depends on them (position in the round,
    ``H_i`` measurements, lost peers) starts afresh; the caller sets the round.
    """
    expected = {"topology": engine.config.topology, "seed": engine.config.seed,
                "payload": engine.config.payload}
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
    engine.outer_optimizer.load_state_dict(state["outer_optimizer"])
    engine.totals = Totals(**state["totals"])
    engine.health.load_state_dict(state["health"])
    engine.wire.load_state_dict(state["wire"])
    if not resized:
        engine.round = state["round"]
        engine.steps_in_round = state["steps_in_round"]
        engine.local_steps_policy.load_state_dict(state["local_steps_policy"])
        engine.lost.load_state_dict(state["lost_peers"])
