"""The engine on real gloo ranks beyond the invariants: averaging every step, metrics and the
consensus, settings checked across processes (the rest of its logic: tests/unit)."""

import pytest
import torch
import torch.distributed as dist

from hf_gasloc import GASLoC

from .distributed import run_ranks
from .workers import TinyNet, flat, gather, local_step, mean


def _h1_complete_sgd_is_parameter_averaging(rank, world_size):
    model = TinyNet()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    captured = []
    inner.register_step_post_hook(lambda *_: captured.append(flat(model)))  # runs before GASLoC's
    GASLoC(model, inner, topology="complete", outer_optimizer="sgd", outer_lr=1.0, local_steps=1)
    worst = 0.0
    for step in range(5):
        local_step(model, inner, rank, step)
        worst = max(worst, float((flat(model) - mean(gather(captured[-1]))).abs().max()))
    return worst, gather(flat(model))


def test_h1_complete_sgd_lr1_is_plain_parameter_averaging_every_step():
    for worst, finals in run_ranks(_h1_complete_sgd_is_parameter_averaging, 3):
        assert worst < 1e-6
        assert all(torch.equal(f, finals[0]) for f in finals)


def _metrics_and_consensus(rank, world_size):
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = GASLoC(model, None, topology="2peer", consensus_every=1, outer_lr=1.0,
                    outer_optimizer="sgd", seed=4, anchor_on_cpu=True)
    local_step(model, inner, rank, 0)
    proposals = gather(flat(model))  # eta = 1: z_i = x_i
    metrics = engine.outer_step()
    peers = engine.topology.graph(0).peers[rank]
    z = proposals[rank]
    expected_peer = sum(float((proposals[j] - z).pow(2).sum()) for j in peers) / len(peers)
    expected_peer /= float(z.pow(2).sum())
    z_bar = mean(proposals)
    expected_consensus = float(mean([(p - z_bar).pow(2).sum() for p in proposals]))
    expected_consensus /= float(z_bar.pow(2).sum())
    local_step(model, inner, rank, 1)
    own = flat(model)
    with engine.consensus_model():
        inside = flat(model)
    after = flat(model)
    engine.install_consensus()
    installed = gather(flat(model))
    return dict(
        metrics=metrics, expected_peer=expected_peer, expected_consensus=expected_consensus,
        numel=own.numel(), peers=len(peers), inside=gather(inside), own_mean=mean(gather(own)),
        restored=torch.equal(own, after), installed=installed, log=engine.metrics(),
    )


def test_metrics_and_consensus_model():
    for r in run_ranks(_metrics_and_consensus, 4):
        metrics = r["metrics"]
        header = (4 + 4) * 8  # fp64: round, health, layout (2), lost flags of the 4 ranks
        assert metrics.bytes_sent == (r["numel"] * 4 + header) * r["peers"] and r["peers"] == 2
        assert metrics.peer_distance == pytest.approx(r["expected_peer"], rel=1e-4)
        assert metrics.consensus_distance == pytest.approx(r["expected_consensus"], rel=1e-4)
        assert metrics.comm_seconds > 0 and metrics.inner_steps == 0
        assert all(torch.allclose(x, r["own_mean"], atol=1e-6) for x in r["inside"])
        assert r["restored"], "consensus_model() must give each rank its own parameters back"
        assert all(torch.equal(x, r["installed"][0]) for x in r["installed"])
        assert r["log"]["gasloc/bytes_sent_total"] == metrics.bytes_sent
        assert r["log"]["gasloc/consensus_distance"] == metrics.consensus_distance


def _bad_setting(rank, world_size, settings_per_rank):
    try:
        GASLoC(TinyNet(), None, **settings_per_rank[rank])
    except (ValueError, RuntimeError) as error:
        return str(error)
    return None


@pytest.mark.parametrize("settings_per_rank,message", [
    ([{"local_steps": [1, 2, 3]}] * 2, "local_steps lists 3 values .* but world_size is 2"),
    ([{"outer_lr": 0.7}, {"outer_lr": 0.5}], "outer_lr differs .*rank 0: 0.7, rank 1: 0.5"),
])
def test_bad_settings_fail_on_every_rank_before_training(settings_per_rank, message):
    for error in run_ranks(_bad_setting, 2, settings_per_rank):
        assert error is not None
        assert __import__("re").search(message, error), error


def test_world_size_one_is_a_clear_error():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised with at least 2"):
        GASLoC(TinyNet(), None)
    [error] = run_ranks(_bad_setting, 1, [{}])
    assert "at least 2 workers, got world_size=1" in error


