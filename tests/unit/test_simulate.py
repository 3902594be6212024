"""The utilization model against cases computed by hand."""

import pytest

from hf_gasloc.simulate import GBIT, Cluster, ddp, diloco, gasloc, main, with_stragglers

# 1e9 params in bf16: M = 2e9 bytes; 1e9 bytes/s links; 1 s steps; H = 10; no latency.
FAST = 1e9


def cluster(*bandwidths, latency=0.0):
    return Cluster(params=1e9, step_time=1.0, bandwidths=bandwidths, latency=latency, local_steps=10)


def test_two_fast_workers():
    c = cluster(FAST, FAST)
    # Ring All-Reduce: 2 (n-1)/n M / B = 2 s.
    assert ddp(c) == pytest.approx(1 / 3)
    assert diloco(c) == pytest.approx(10 / 12)
    # One pair, one message each way: M / B = 2 s, the same as the All-Reduce of 2 workers.
    assert gasloc(c, "1peer") == pytest.approx(10 / 12)


def test_one_straggler_at_a_fifth_of_the_bandwidth():
    c = cluster(FAST, FAST, FAST, 0.2 * FAST)
    # DiLoCo: 2 * 3/4 * 2e9 / 2e8 = 15 s of All-Reduce every 10 s of compute.
    assert diloco(c) == pytest.approx(10 / 25)
    # GASLoC 1-peer: the straggler and its partner exchange in 10 s, the other pair in 2 s.
    # Both members of the slow pair take 10 - (10 - 2) / 1 = 2 steps; a round takes 12 s.
    assert gasloc(c, "1peer") == pytest.approx((10 + 10 + 2 + 2) / (4 * 12))
    # Fixed H: every round waits for the slow pair: 10 + 10 = 20 s.
    assert gasloc(c, "1peer", adaptive=False) == pytest.approx(10 / 20)


def test_two_peer_ring_of_four_with_a_straggler():
    c = cluster(FAST, FAST, FAST, 0.2 * FAST)
    # Each worker sends 2 messages: 4 s on a fast link, 20 s on the slow one. The straggler
    # and its two ring neighbours wait 20 s: 10 - 16 < 1 step, so they take 1 step and the
    # round takes max(1 + 20, 10 + 4) = 21 s; the fourth worker computes 10 steps.
    assert gasloc(c, "2peer") == pytest.approx((1 + 1 + 1 + 10) / (4 * 21))


def test_latency_counts_per_message():
    c = cluster(FAST, FAST, latency=0.5)
    assert diloco(c) == pytest.approx(10 / (10 + 2 + 2 * 1 * 0.5))
    assert gasloc(c, "1peer") == pytest.approx(10 / (10 + 2 + 0.5))


def test_bandwidth_helpers_and_cli(capsys, tmp_path):
    assert with_stragglers(10, 4, 0.2) == (10 * GBIT,) * 3 + (2 * GBIT,)
    main(["--params", "1e9", "--workers", "4", "--bandwidth_gbps", "8", "--step_time", "1",
          "--local_steps", "10", "--latency_ms", "0", "--plot", str(tmp_path / "u.png")])
    out = capsys.readouterr().out
    assert "DiLoCo" in out and "GASLoC 1-peer, adaptive H_i" in out
    assert (tmp_path / "u.png").stat().st_size > 10_000
    with pytest.raises(SystemExit):
        main(["--bandwidths_gbps", "10"])


def test_workers_of_two_processes_add_the_all_reduce_inside_and_send_a_model_per_process():
    c = Cluster(params=1e9, step_time=1.0, bandwidths=(FAST, FAST), local_steps=10,
                worker_size=2, inside_bandwidth=4 * FAST)
    # Inside: 2 * 1/2 * 2e9 / 4e9 = 0.5 s per step. Between: DDP one model (2 s), DiLoCo and
    # GASLoC a model per process: 2 * 1/2 * 4e9 / 1e9 = 4 s, and M S / B = 4 s for the pair.
    assert ddp(c) == pytest.approx(1 / (1.5 + 2))
    assert diloco(c) == pytest.approx(10 / (15 + 4))
    assert gasloc(c, "1peer") == pytest.approx(10 / (15 + 4))
