"""Who talks to whom: the registry of topology names, their help and errors, and ``build_topology``.

The graphs themselves are in ``graphs.py`` (pure, seeded by round).
"""

from __future__ import annotations

from .graphs import (
    Complete,
    Exponential,
    OnePeer,
    Ring,
    RoundGraph,
    Static,
    Topology,
    TwoPeer,
)

__all__ = ["NO_GOSSIP", "TOPOLOGIES", "TOPOLOGY_HELP", "RoundGraph", "Topology",
           "build_topology", "check_topology", "parse_edges"]

TOPOLOGIES = ("1peer", "2peer", "complete", "ring", "exponential", "static")
NO_GOSSIP = "none"  # plain DDP: a setting, not a graph
TOPOLOGY_HELP = (
    "gossip graph: 1peer, 2peer, complete (DiLoCo), ring, exponential, "
    "'static:0-1,1-2,...', or none (plain DDP, no GASLoC)"
)
_CHOICES = "1peer, 2peer, complete, ring, exponential, 'static:0-1,1-2,...', or none"


def parse_edges(text: str) -> list[tuple[int, int]]:
    """Parse ``"0-1,1-2,2-3"`` into ``[(0, 1), (1, 2), (2, 3)]``."""
    edges = []
    for item in text.replace(" ", "").split(","):
        left, sep, right = item.partition("-")
        if not sep or not left.isdigit() or not right.isdigit():
            raise ValueError(
                f"cannot read static topology edge {item!r}: write edges as "
                "'static:0-1,1-2,2-3' (rank-rank pairs separated by commas)."
            )
        edges.append((int(left), int(right)))
    return edges


_BY_NAME = {cls.name: cls for cls in (OnePeer, TwoPeer, Complete, Ring, Exponential)}


def check_topology(spec: str) -> str:
    """Validate a ``topology`` setting (``none`` included) before any work; return it stripped."""
    spec = str(spec).strip()
    name, colon, edges = spec.partition(":")
    if name == "static" and edges:
        parse_edges(edges)
    elif spec not in (*_BY_NAME, NO_GOSSIP):
        hint = (" ('static' needs its edges, e.g. 'static:0-1,1-2,2-3,3-0')"
                if name == "static" else "")
        raise ValueError(
            f"unknown topology {spec!r} (--gasloc_topology / topology=){hint}: choose one of "
            f"{_CHOICES}."
        )
    return spec


def build_topology(
    spec: str, world_size: int, seed: int = 0, gossip_weight: float | None = None
) -> Topology:
    """Build a topology from its name, or ``"static:0-1,1-2,..."`` for a fixed graph."""
    spec = check_topology(spec)
    if spec == NO_GOSSIP:
        raise ValueError("topology 'none' is plain DDP: it has no gossip graph.")
    name, _, edges = spec.partition(":")
    if name == "static":
        return Static(world_size, parse_edges(edges), seed, gossip_weight)
    return _BY_NAME[name](world_size, seed, gossip_weight)
