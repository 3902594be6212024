"""Lost and late peers on the fake fabric: deadlines, news of a loss, the end of gossip."""

import pytest
import torch


from hf_gasloc import GASLoC
from hf_gasloc.errors import PeerLostError
from hf_gasloc.schedule.topology import build_topology
from hf_gasloc.wire.header import layout_of

from ..fake_fabric import Fault, run_workers
from ..workers import TinyNet, flat, local_step

ROUNDS = 8


def _survivor(rank, comm):
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = GASLoC(model, inner, comm=comm, topology="1peer", local_steps=1, seed=7)
    if rank == 3:
        return None  # it stops right after the start: it never answers again
    while engine.round < ROUNDS:
        local_step(model, inner, rank, engine.round)
    try:
        with engine.consensus_model():
            refused = None
    except PeerLostError as error:
        refused = str(error)
    return engine.lost_peers, dict(engine.lost.when), bool(torch.isfinite(flat(model)).all()), refused


def test_a_silent_peer_is_lost_after_peer_timeout_and_the_news_spreads():
    """A survivor learns of the loss when it meets the silent rank, or earlier from a peer that
    knew (the news rides in the headers); seed 7: rank 0 never meets rank 3."""
    graphs = build_topology("1peer", 4, seed=7)
    meets = {r: next((t for t in range(ROUNDS) if 3 in graphs.graph(t).peers[r]), ROUNDS)
             for r in range(3)}
    assert meets[0] == ROUNDS
    results = run_workers(_survivor, 4, peer_timeout=0.3)
    for rank, (lost, when, finite, refused) in enumerate(results[:3]):
        assert lost == [3] and finite, rank
        learnt = int(when[3].split()[1].rstrip(","))
        if "as a peer told" in when[3]:
            assert learnt < meets[rank], (rank, when)
        else:
            assert learnt == meets[rank], (rank, when)
        assert "consensus needs every worker" in refused and "rank 3" in refused
    assert "as a peer told" in results[0][1][3]


def _two(rank, comm, rounds=3):
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = GASLoC(model, inner, comm=comm, topology="1peer", local_steps=1)
    try:
        while engine.round < rounds:
            local_step(model, inner, rank, engine.round)
    except PeerLostError as error:
        return engine.lost_peers, str(error)
    return engine.lost_peers, None


def test_a_broken_connection_is_a_loss_at_once_and_an_isolated_worker_stops(caplog):
    (lost0, error0), (lost1, error1) = run_workers(_two, 2, faults=[Fault("fail", sender=1)],
                                                   peer_timeout=0.5)
    assert (lost0, lost1) == ([1], [0])
    assert "rank 1 (thread1) in round 0" in error0 and "every other worker is lost" in error0
    assert "Connection closed by peer 1" in caplog.text


def test_a_late_peer_within_peer_timeout_is_waited_for():
    results = run_workers(_two, 2, faults=[Fault("delay", sender=1, seconds=0.3, times=2)],
                          peer_timeout=2.0)
    assert results == [([], None), ([], None)]


def _alone(rank, comm):
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = GASLoC(model, inner, comm=comm, topology="1peer", local_steps=1)
    if rank == 0:
        local_step(model, inner, rank, 0)
    return engine.round


def test_the_last_survivor_is_told_why_it_stops():
    with pytest.raises(AssertionError, match="every other worker is lost"):
        run_workers(_alone, 2, peer_timeout=0.2)

def _odd_layout(rank, comm, odd):
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = GASLoC(model, inner, comm=comm, topology="2peer", local_steps=1, seed=3)
    if rank == odd:  # a peer whose messages are longer than everyone else's
        exchange = engine.fragments[0].exchange
        engine.fragments[0].wire.messages[0] = torch.zeros(1000)
        exchange.layout = layout_of(engine.fragments[0].wire.messages, "native")
    try:
        while engine.round < 3:
            local_step(model, inner, rank, engine.round)
    except PeerLostError as error:
        return engine.lost_peers, dict(engine.lost.when), str(error), flat(model)
    return engine.lost_peers, dict(engine.lost.when), None, flat(model)


def test_a_peer_whose_messages_are_laid_out_differently_is_left_out_by_both_ends(caplog):
    results = run_workers(_odd_layout, 4, 3)
    for rank, (lost, when, error, live) in enumerate(results[:3]):
        assert lost == [3] and error is None and torch.isfinite(live).all(), rank
    assert results[3][0] == [0, 1, 2] and "every other worker is lost" in results[3][2]
    assert "rank 3 announced 4000 bytes of messages laid out differently" in caplog.text
