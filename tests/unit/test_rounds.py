"""One round's stages on the in-process fabric: propose, mix, outer update, install."""

import torch

from hf_gasloc import GASLoC
from hf_gasloc.schedule.topology import build_topology

from ..fake_fabric import run_workers
from ..workers import TinyNet, flat, local_step


def _one_round(rank, comm, settings, steps=2):
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = GASLoC(model, None, comm=comm, **settings)
    anchor = flat(model)
    for step in range(steps):
        local_step(model, inner, rank, step)
    live = flat(model)
    engine.outer_step()
    return anchor, live, flat(model), engine


def test_outer_sgd_lands_on_the_mixed_proposals_with_metropolis_weights():
    """``a <- W z`` with ``z = a + eta (x - a)``: 2peer on 4 workers mixes 1/3 with each
    neighbour of the round's random ring."""
    settings = dict(topology="2peer", outer_optimizer="sgd", outer_lr=0.5, seed=5)
    results = run_workers(_one_round, 4, settings)
    graph = build_topology("2peer", 4, seed=5).graph(0)
    proposals = [a + 0.5 * (x - a) for a, x, _, _ in results]
    for rank, (_, _, new, _) in enumerate(results):
        expected = graph.self_weight(rank) * proposals[rank] + sum(
            w * proposals[j] for j, w in graph.peers[rank].items())
        assert torch.allclose(new, expected, atol=1e-6)
    assert all(len(graph.peers[r]) == 2 and set(graph.peers[r].values()) == {1 / 3}
               for r in range(4))


def test_a_worker_without_a_peer_sits_the_round_out_and_keeps_its_proposal():
    """1peer on 3 workers: one worker of each round has no partner."""
    graph = build_topology("1peer", 3, seed=0).graph(0)
    alone = next(r for r in range(3) if not graph.peers[r])
    results = run_workers(_one_round, 3, dict(topology="1peer", outer_optimizer="sgd",
                                               outer_lr=0.8))
    anchor, live, new, engine = results[alone]
    assert torch.allclose(new, anchor + 0.8 * (live - anchor), atol=1e-7)
    assert engine.last_round.bytes_sent == 0 and engine.last_round.wait_seconds is None


def _delayed(rank, comm):
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = GASLoC(model, inner, comm=comm, topology="complete", outer_optimizer="sgd",
                    outer_lr=1.0, local_steps=2, outer_delay=1)
    seen = []
    for step in range(3):  # the round starts at step 2 and lands at step 3
        local_step(model, inner, rank, step)
        seen.append((flat(model), len(engine.rounds.scheduler.in_flight)))
    return seen


def test_a_delayed_round_lands_later_and_keeps_the_progress_made_meanwhile():
    """``x <- a_new + (x - x_start)``, where ``x_start`` is ``x`` when the round started."""
    results = run_workers(_delayed, 2)
    for seen in results:
        assert [in_flight for _, in_flight in seen] == [0, 1, 0]
    starts = [seen[1][0] for seen in results]  # x when the round started (eta 1: z = x)
    anchor = torch.stack(starts).mean(0)
    for rank, seen in enumerate(results):
        # Step 3 ran with the round in flight; its change is kept on top of the new anchor.
        before_landing = _step_without_landing(rank, starts[rank])
        assert torch.allclose(seen[2][0], anchor + (before_landing - starts[rank]), atol=1e-6)


def _step_without_landing(rank, start):
    """The live parameters after one more local step from ``start`` (no GASLoC)."""
    model = TinyNet()
    with torch.no_grad():
        offset = 0
        for p in model.parameters():
            p.copy_(start[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
    local_step(model, torch.optim.SGD(model.parameters(), lr=0.1), rank, 2)
    return flat(model)


def _per_rank(rank, comm):
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = GASLoC(model, inner, comm=comm, topology="1peer", local_steps=[2, 3],
                    outer_optimizer="sgd", outer_lr=1.0)
    rounds = []
    while engine.round < 3:
        local_step(model, inner, rank, engine.inner_step)
        rounds.append(engine.round)
    return rounds, engine.inner_step, engine.last_round.inner_steps


def test_each_worker_takes_its_own_h_and_every_worker_does_the_same_rounds():
    (rounds0, steps0, last0), (rounds1, steps1, last1) = run_workers(_per_rank, 2)
    assert rounds0 == [0, 1, 1, 2, 2, 3] and rounds1 == [0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert (steps0, steps1, last0, last1) == (6, 9, 2, 3)


def _hooked(rank, comm):
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = GASLoC(model, inner, comm=comm, topology="1peer", local_steps=2)
    for micro_batch in range(6):  # accumulate 3 micro-batches per optimizer step
        model(torch.randn(4, 6, generator=torch.Generator().manual_seed(micro_batch))).sum().backward()
        if micro_batch % 3 == 2:
            inner.step()
            inner.zero_grad()
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.randn(4, 6)).sum() * float("inf")).backward()
    scaler.step(inner)  # inf gradients: AMP skips the step, and it must not count
    scaler.update()
    inner.zero_grad()
    counted = (engine.round, engine.steps_in_round)
    try:
        engine.attach(inner)
        double_attach = None
    except RuntimeError as error:
        double_attach = str(error)
    engine.detach()
    local_step(model, inner, rank, 0)  # detached: not counted
    detached = (engine.round, engine.steps_in_round)
    with engine.attached(inner):
        local_step(model, inner, rank, 1)
    local_step(model, inner, rank, 2)  # after the block: detached again
    return counted, double_attach, detached, (engine.round, engine.steps_in_round)


def test_the_hook_counts_real_optimizer_steps_only_while_attached():
    for counted, double_attach, detached, reattached in run_workers(_hooked, 2):
        assert counted == (1, 0)
        assert "already attached" in double_attach
        assert detached == (1, 0) and reattached == (1, 1)


def _bf16(rank, comm):
    model = TinyNet(torch.bfloat16)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = GASLoC(model, None, comm=comm, topology="complete", outer_optimizer="sgd",
                    outer_lr=1.0)
    local_step(model, inner, rank, 0)
    live = flat(model)
    engine.outer_step()
    return live, flat(model), engine


def test_bf16_parameters_keep_fp32_anchors_and_average():
    results = run_workers(_bf16, 2)
    mean = torch.stack([live for live, _, _ in results]).mean(0)
    for _, new, engine in results:
        assert {a.dtype for a in engine.flat.anchors} == {torch.float32}
        assert {g.dtype for g in engine.flat.groups} == {torch.bfloat16}
        assert torch.allclose(new, mean, atol=1e-2, rtol=1e-2)


def _outer_specs(rank, comm):
    import functools
    finals = []
    for spec in ("nesterov",
                 torch.optim.SGD(TinyNet().parameters(), lr=0.7, momentum=0.9, nesterov=True),
                 functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)):
        model = TinyNet()
        inner = torch.optim.SGD(model.parameters(), lr=0.1)
        settings = dict(outer_lr=0.7, outer_momentum=0.9) if spec == "nesterov" else {}
        engine = GASLoC(model, None, comm=comm, topology="1peer", outer_optimizer=spec,
                        **settings)
        for round_index in range(3):
            local_step(model, inner, rank, round_index)
            engine.outer_step()
        finals.append(flat(model))
    return finals


def test_an_outer_optimizer_by_name_instance_or_factory_is_the_same_update():
    for by_name, instance, factory in run_workers(_outer_specs, 2):
        assert torch.equal(by_name, instance) and torch.equal(by_name, factory)


def _lockstep(rank, comm, local_steps, delay):
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = GASLoC(model, inner, comm=comm, topology="1peer", local_steps=local_steps,
                    outer_delay=delay, round_steps=4)
    idle, landed = [], []
    for tick in range(12):
        if engine.step_is_idle():
            engine.idle_step()
            idle.append(tick)
        else:
            local_step(model, inner, rank, tick)
        landed.append(engine.totals.rounds)
    return idle, landed, engine.round, engine.inner_step


def test_in_lockstep_a_worker_idles_after_its_h_and_rounds_land_at_the_round_end():
    """Every round lasts 4 of the caller's steps on every rank; rank 1 (H = 2) idles for the
    last two of each round, and its exchange lands no earlier than the round's last step,
    after every peer posted (so a Trainer collective in between never waits on it)."""
    (idle0, landed0, rounds0, steps0), (idle1, landed1, rounds1, steps1) = run_workers(
        _lockstep, 2, "4,2", 0)
    assert idle0 == [] and idle1 == [2, 3, 6, 7, 10, 11]
    assert (rounds0, rounds1, steps0, steps1) == (3, 3, 12, 6)
    assert landed0 == landed1 == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3]
    (_, landed0, _, _), (_, landed1, _, _) = run_workers(_lockstep, 2, "4,2", 1)
    assert landed0 == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]  # outer_delay 1: a step later
    assert landed1 == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3]  # at the round's end, delay spent
