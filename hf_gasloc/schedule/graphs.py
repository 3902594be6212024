"""The gossip graphs: each rank's peers and mixing weights in round ``t``.

Pure Python, no ``torch.distributed``: every rank computes the same graph from
the shared seed and the round number, so ranks agree without communicating and
a resumed run replays the same graphs. Names and parsing: ``topology.py``.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class RoundGraph:
    """The gossip matrix ``W_t`` of one round, stored as each rank's peer weights.

    ``peers[i]`` maps every neighbour ``j != i`` to ``W[i, j]``; the self weight
    is what makes the row sum to one. ``all_reduce`` marks the complete graph,
    which is exchanged with one All-Reduce instead of point-to-point messages.
    """

    world_size: int
    peers: tuple[dict[int, float], ...]
    all_reduce: bool = False

    def self_weight(self, rank: int) -> float:
        return 1.0 - sum(self.peers[rank].values())

    def matrix(self) -> list[list[float]]:
        """The dense ``n x n`` mixing matrix (for tests and inspection)."""
        rows = [[0.0] * self.world_size for _ in range(self.world_size)]
        for i, row in enumerate(rows):
            row[i] = self.self_weight(i)
            for j, weight in self.peers[i].items():
                row[j] = weight
        return rows


class Topology:
    """Base class: a family of gossip graphs indexed by the round number."""

    name = "topology"
    # True when every worker waits for every other each round (an All-Reduce):
    # then no worker gains anything by taking fewer local steps.
    synchronous = False

    def __init__(self, world_size: int, seed: int = 0, gossip_weight: float | None = None):
        if world_size < 2:
            raise ValueError(
                f"GASLoC needs at least 2 workers, got world_size={world_size}. "
                "Launch several processes (torchrun --nproc_per_node N, or accelerate launch "
                "with num_processes >= 2)."
            )
        self.world_size = world_size
        self.seed = seed
        self.gossip_weight = gossip_weight

    def neighbours(self, round_index: int) -> list[set[int]]:
        """The round's undirected edges, as the set of neighbours of each rank."""
        raise NotImplementedError

    def graph(self, round_index: int) -> RoundGraph:
        neighbours = self.neighbours(round_index)
        return RoundGraph(self.world_size, tuple(self._weights(neighbours)))

    def _weights(self, neighbours: list[set[int]]) -> list[dict[int, float]]:
        """Symmetric, doubly stochastic weights on the given edges.

        Without ``gossip_weight``: Metropolis-Hastings weights
        ``1 / (1 + max(deg_i, deg_j))`` (1/2 for a matching, 1/3 on a ring).
        With it: that weight on every edge, the rest on the diagonal.
        """
        degrees = [len(n) for n in neighbours]
        if self.gossip_weight is not None:
            worst = max(degrees)
            if worst and self.gossip_weight * worst > 1.0 + 1e-12:
                raise ValueError(
                    f"gossip_weight={self.gossip_weight} is too large for topology "
                    f"'{self.name}': a worker has {worst} peers, so the weight must be at most "
                    f"1/{worst} = {1.0 / worst:.4g} to keep the self weight non-negative."
                )
            return [{j: self.gossip_weight for j in n} for n in neighbours]
        return [
            {j: 1.0 / (1 + max(degrees[i], degrees[j])) for j in n}
            for i, n in enumerate(neighbours)
        ]

    def fingerprint(self, rounds: int = 8) -> str:
        """A short hash of the first ``rounds`` graphs, to check that all ranks agree."""
        digest = hashlib.sha256()
        for t in range(rounds):
            digest.update(repr(self.graph(t)).encode())
        return digest.hexdigest()[:16]

    def _rng(self, round_index: int) -> random.Random:
        # A string seed is hashed with SHA-512: the same on every rank and platform.
        return random.Random(f"hf_gasloc/{self.name}/{self.seed}/{round_index}")


def _edges_to_neighbours(world_size: int, edges: Sequence[tuple[int, int]]) -> list[set[int]]:
    neighbours: list[set[int]] = [set() for _ in range(world_size)]
    for i, j in edges:
        neighbours[i].add(j)
        neighbours[j].add(i)
    return neighbours


class OnePeer(Topology):
    """A uniformly random perfect matching each round; odd ``n``: one worker sits out."""

    name = "1peer"

    def neighbours(self, round_index: int) -> list[set[int]]:
        order = list(range(self.world_size))
        self._rng(round_index).shuffle(order)
        pairs = [(order[k], order[k + 1]) for k in range(0, self.world_size - 1, 2)]
        return _edges_to_neighbours(self.world_size, pairs)


class TwoPeer(Topology):
    """A random ring each round: each worker mixes with its two neighbours in a
    random permutation (weights 1/3). On 2 workers both neighbours are the same
    peer, so it is one exchange with weight 1/2, the same as ``1peer``."""

    name = "2peer"

    def neighbours(self, round_index: int) -> list[set[int]]:
        order = list(range(self.world_size))
        self._rng(round_index).shuffle(order)
        return _ring_neighbours(order)


def _ring_neighbours(order: Sequence[int]) -> list[set[int]]:
    n = len(order)
    edges = [(order[k], order[(k + 1) % n]) for k in range(n)]
    return _edges_to_neighbours(n, edges)


class Ring(Topology):
    """The static ring ``i - 1, i, i + 1`` (weights 1/3)."""

    name = "ring"

    def neighbours(self, round_index: int) -> list[set[int]]:
        return _ring_neighbours(range(self.world_size))


class Exponential(Topology):
    """One-peer exponential graph: pairs ``i xor 2^(t mod ceil(log2 n))``.

    When ``n`` is not a power of two, a worker whose partner does not exist sits
    the round out.
    """

    name = "exponential"

    def neighbours(self, round_index: int) -> list[set[int]]:
        hops = max(1, math.ceil(math.log2(self.world_size)))
        bit = 1 << (round_index % hops)
        pairs = [(i, i ^ bit) for i in range(self.world_size) if i < (i ^ bit) < self.world_size]
        return _edges_to_neighbours(self.world_size, pairs)


class Complete(Topology):
    """Every worker averages with every other (``W = 11^T / n``): DiLoCo."""

    name = "complete"
    synchronous = True

    def __init__(self, world_size: int, seed: int = 0, gossip_weight: float | None = None):
        if gossip_weight is not None:
            raise ValueError(
                "gossip_weight is not used by topology 'complete' (it always averages all "
                "workers); leave gossip_weight unset or pick a sparse topology."
            )
        super().__init__(world_size, seed, None)

    def neighbours(self, round_index: int) -> list[set[int]]:
        everyone = set(range(self.world_size))
        return [everyone - {i} for i in range(self.world_size)]

    def graph(self, round_index: int) -> RoundGraph:
        n = self.world_size
        peers = tuple({j: 1.0 / n for j in range(n) if j != i} for i in range(n))
        return RoundGraph(n, peers, all_reduce=True)


class Static(Topology):
    """A user-given undirected graph, the same every round."""

    name = "static"

    def __init__(
        self,
        world_size: int,
        edges: Sequence[tuple[int, int]],
        seed: int = 0,
        gossip_weight: float | None = None,
    ):
        super().__init__(world_size, seed, gossip_weight)
        for i, j in edges:
            if not (0 <= i < world_size and 0 <= j < world_size) or i == j:
                raise ValueError(
                    f"static topology edge {i}-{j} is invalid for world_size={world_size}: "
                    f"both ends must be distinct ranks in [0, {world_size - 1}]."
                )
        self.edges = tuple(sorted({(min(i, j), max(i, j)) for i, j in edges}))
        self._neighbours = _edges_to_neighbours(world_size, self.edges)

    def neighbours(self, round_index: int) -> list[set[int]]:
        return self._neighbours
