"""Topologies are pure: checked exhaustively, without processes."""

import itertools

import pytest

from hf_gasloc.schedule.topology import TOPOLOGIES, build_topology

SPARSE = ("1peer", "2peer", "ring", "exponential")


def assert_valid_mixing(graph, tolerance=1e-12):
    w = graph.matrix()
    n = len(w)
    for i, j in itertools.product(range(n), repeat=2):
        assert w[i][j] == w[j][i], f"W not symmetric at ({i},{j})"
        assert w[i][j] >= -tolerance, f"negative weight at ({i},{j})"
        if i != j and w[i][j] != 0:
            assert i in graph.peers[j], "weight on a pair that is not an edge"
    for i in range(n):
        assert abs(sum(w[i]) - 1) < tolerance, f"row {i} sums to {sum(w[i])}"
        assert abs(sum(row[i] for row in w) - 1) < tolerance, f"column {i}"


@pytest.mark.parametrize("name", SPARSE + ("complete",))
def test_weights_symmetric_doubly_stochastic_for_many_seeds_and_sizes(name):
    for world_size in range(2, 65):
        for seed in range(3):
            topology = build_topology(name, world_size, seed)
            for t in range(4):
                assert_valid_mixing(topology.graph(t))


def test_one_peer_is_a_perfect_matching_and_odd_sizes_sit_one_out():
    for world_size in range(2, 40):
        topology = build_topology("1peer", world_size, seed=7)
        for t in range(10):
            graph = topology.graph(t)
            degrees = [len(p) for p in graph.peers]
            assert all(d <= 1 for d in degrees)
            assert degrees.count(0) == world_size % 2
            for i, peers in enumerate(graph.peers):
                for j, weight in peers.items():
                    assert weight == 0.5 and graph.peers[j] == {i: 0.5}


def test_two_peer_is_a_random_ring_with_thirds():
    topology = build_topology("2peer", 8, seed=1)
    rings = set()
    for t in range(20):
        graph = topology.graph(t)
        assert all(peers and set(peers.values()) == {1 / 3} and len(peers) == 2
                   for peers in graph.peers)
        # A single cycle through every worker.
        seen, previous, current = [0], None, 0
        while True:
            nxt = next(j for j in graph.peers[current] if j != previous)
            if nxt == 0:
                break
            seen.append(nxt)
            previous, current = current, nxt
        assert sorted(seen) == list(range(8))
        rings.add(tuple(sorted(tuple(sorted(p)) for p in graph.peers)))
    assert len(rings) > 10, "2peer should draw a new ring every round"


def test_two_peer_on_two_workers_is_one_exchange_at_one_half():
    """Documented behaviour: both ring neighbours are the same peer, so 2peer == 1peer."""
    for t in range(5):
        assert build_topology("2peer", 2, seed=3).graph(t).matrix() == [[0.5, 0.5], [0.5, 0.5]]


def test_ring_and_exponential_edges():
    ring = build_topology("ring", 5).graph(0)
    assert ring.peers[0] == {1: 1 / 3, 4: 1 / 3}
    exponential = build_topology("exponential", 8)
    assert [exponential.graph(t).peers[0] for t in range(4)] == [
        {1: 0.5}, {2: 0.5}, {4: 0.5}, {1: 0.5}]
    odd = build_topology("exponential", 6).graph(2)  # partners 0^4=4, 1^4=5, 2^4=6 (absent)
    assert odd.peers[2] == {} and odd.peers[3] == {} and odd.peers[0] == {4: 0.5}


def test_static_graph_metropolis_weights():
    graph = build_topology("static:0-1,1-2,1-3", 4).graph(0)
    assert_valid_mixing(graph)
    assert graph.peers[1] == {0: 0.25, 2: 0.25, 3: 0.25}
    assert graph.peers[0] == {1: 0.25} and graph.self_weight(0) == 0.75


def test_gossip_weight_sets_every_edge_and_is_bounded():
    graph = build_topology("2peer", 6, seed=0, gossip_weight=0.25).graph(3)
    assert_valid_mixing(graph)
    assert all(set(p.values()) == {0.25} for p in graph.peers)
    with pytest.raises(ValueError, match="gossip_weight=0.6 is too large.*at most 1/2"):
        build_topology("ring", 6, gossip_weight=0.6).graph(0)
    with pytest.raises(ValueError, match="not used by topology 'complete'"):
        build_topology("complete", 4, gossip_weight=0.5)


def test_same_seed_same_graphs_new_seed_new_graphs():
    """Invariant 4 (pure part): graphs depend only on (seed, round), not on the object."""
    for name in ("1peer", "2peer"):
        a = [build_topology(name, 16, seed=5).graph(t) for t in range(30)]
        b = [build_topology(name, 16, seed=5).graph(t) for t in range(30)]
        c = [build_topology(name, 16, seed=6).graph(t) for t in range(30)]
        assert a == b
        assert a != c
        assert build_topology(name, 16, 5).fingerprint() == build_topology(name, 16, 5).fingerprint()


@pytest.mark.parametrize("spec,message", [
    ("3peer", "unknown topology '3peer'"),
    ("static", "needs its edges"),
    ("static:0-9", "edge 0-9 is invalid for world_size=4"),
    ("static:0_1", "cannot read static topology edge"),
])
def test_bad_topologies_are_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        build_topology(spec, 4)


def test_world_size_one_is_refused():
    for name in TOPOLOGIES[:-1]:
        with pytest.raises(ValueError, match="at least 2 workers, got world_size=1"):
            build_topology(name, 1)
