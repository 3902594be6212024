"""When fragments start and land, what a round reports, and a worker's state: saved mid-round and
mid-flight, restored bit for bit, refused when it belongs to another run."""

import io

import pytest
import torch

from hf_gasloc import GASLoC
from hf_gasloc.errors import RunMismatchError
from hf_gasloc.schedule.fragments import split_fragments, start_steps

from ..clm import tiny_llama
from ..fake_fabric import run_workers
from ..workers import TinyNet, flat, local_step


def _timeline(rank, comm, local_steps, fragments, delay, rounds):
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = GASLoC(model, inner, comm=comm, topology="complete", local_steps=local_steps,
                    fragments=fragments, outer_delay=delay)
    timeline = []
    while engine.round < rounds:
        local_step(model, inner, rank, engine.inner_step)
        timeline.append(sorted((f.fragment, f.finish_at) for f in engine.rounds.scheduler.in_flight))
    return timeline, engine.totals.rounds, engine.totals.bytes_sent


def test_fragments_start_at_their_step_and_land_outer_delay_steps_later():
    timeline, _, _ = run_workers(_timeline, 2, 4, 2, 1, 2)[0]
    # H = 4, 2 fragments: fragment 0 starts at step 2, fragment 1 at step 4; each lands a step later.
    assert timeline == [[], [(0, 3)], [], [(1, 5)], [], [(0, 7)], [], [(1, 9)]]


def test_a_round_that_lands_because_its_fragment_starts_again_is_reported():
    """``outer_delay`` longer than the round: the previous round lands when the next starts."""
    timeline, rounds, sent = run_workers(_timeline, 2, 2, 1, 5, 4)[0]
    assert [len(t) for t in timeline] == [0, 1, 1, 1, 1, 1, 1, 1]
    assert rounds == 3 and sent > 0  # rounds 0, 1, 2 landed; round 3 is in flight


def _save_and_resume(rank, comm, settings, save_at, steps):
    def build():
        model = TinyNet()
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, inner, GASLoC(model, inner, comm=comm, **settings)

    model, inner, engine = build()
    saved = None
    for step in range(steps):
        local_step(model, inner, rank, step)
        if step == save_at:
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "inner": inner.state_dict(),
                        "engine": engine.state_dict()}, buffer)
            saved = buffer.getvalue()
    uninterrupted = flat(model)
    engine.detach()
    model, inner, engine = build()
    state = torch.load(io.BytesIO(saved), weights_only=True)
    model.load_state_dict(state["model"])
    inner.load_state_dict(state["inner"])
    engine.load_state_dict(state["engine"])
    for step in range(save_at + 1, steps):
        local_step(model, inner, rank, step)
    return uninterrupted, flat(model)


@pytest.mark.parametrize("settings,save_at", [
    (dict(topology="2peer", local_steps=3, seed=2), 4),  # mid-round
    (dict(topology="2peer", local_steps=3, payload="int8", outer_delay=2, fragments=2), 5),
    (dict(topology="complete", local_steps=2, outer_delay=1, outer_optimizer="iterate_momentum",
          outer_lr=1.0, outer_momentum=0.5), 2),  # saved while an exchange is in flight
])
def test_a_resume_from_a_saved_state_is_bit_exact(settings, save_at):
    for uninterrupted, resumed in run_workers(_save_and_resume, 4, settings, save_at, 14):
        assert torch.equal(uninterrupted, resumed)


def _foreign_state(rank, comm):
    model = TinyNet()
    state = GASLoC(model, None, comm=comm, topology="1peer", payload="bf16").state_dict()
    other = GASLoC(model, None, comm=comm, topology="1peer", payload="int8")
    try:
        other.load_state_dict(state)
    except RunMismatchError as error:
        return str(error)
    return None


def test_a_state_of_another_run_is_refused_with_what_differs():
    for error in run_workers(_foreign_state, 2):
        assert "saved with payload='bf16' but this run has payload='int8'" in error


def _new_worker(rank, comm):
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = GASLoC(model, inner, comm=comm, topology="2peer", payload="int8", fragments=2,
                    local_steps=1)
    for step in range(3):
        local_step(model, inner, rank, step)
    owed = [float(f.wire.residuals[0].abs().sum()) for f in engine.fragments]
    engine.start_as_new_worker()
    return owed, [float(f.wire.residuals[0].abs().sum()) for f in engine.fragments], \
        torch.equal(torch.cat([a.reshape(-1) for a in engine.flat.anchors]), flat(model))


def test_a_new_worker_owes_nothing_on_any_fragment_and_its_anchor_is_its_model():
    for owed, after, anchored in run_workers(_new_worker, 4):
        assert all(r > 0 for r in owed) and after == [0.0, 0.0] and anchored


def test_fragments_are_whole_layers_in_order_of_about_equal_size():
    model = tiny_llama()
    parts = split_fragments(model, 3)
    names = {id(p): n for n, p in model.named_parameters()}
    layers = [sorted({".".join(names[id(p)].split(".")[:3]) for p in part}) for part in parts]
    flat_order = [names[id(p)] for part in parts for p in part]
    assert flat_order == [n for n, p in model.named_parameters()]  # in order, none twice
    assert not set(layers[0]) & set(layers[1]) and not set(layers[1]) & set(layers[2])
    assert [len(part) for part in parts] == [1, 9, 10]  # the tied embedding, then layers 0, 1
    equal = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(6)])
    assert [len(part) for part in split_fragments(equal, 3)] == [4, 4, 4]  # 2 layers each
    assert start_steps(30, 3) == [10, 20, 30] and start_steps(2, 4) == [1, 1, 2, 2]
    with pytest.raises(ValueError, match="fragments=9 but the model has 5 layers"):
        split_fragments(torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(5)]), 9)


def _resume_changed(rank, comm, changed):
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = GASLoC(model, inner, comm=comm, topology="1peer", local_steps=2,
                    outer_optimizer="nesterov", outer_lr=0.7, outer_momentum=0.9)
    for step in range(3):
        local_step(model, inner, rank, step)
    state = engine.state_dict()
    engine.detach()
    resumed = GASLoC(model, None, comm=comm, topology="1peer", **{
        "local_steps": 2, "outer_optimizer": "nesterov", "outer_lr": 0.7,
        "outer_momentum": 0.9, **changed})
    try:
        resumed.load_state_dict(state)
    except RunMismatchError as error:
        return str(error)
    group = resumed.fragments[0].outer.optimizer.param_groups[0]
    return resumed.changed_at_resume, (group["lr"], group["momentum"]), resumed.round_length


def test_a_resume_uses_the_new_lr_momentum_and_h_and_refuses_another_outer_optimizer():
    for changed, (lr, momentum), h in run_workers(_resume_changed, 2, dict(
            outer_lr=0.5, outer_momentum=0.6, local_steps=3)):
        assert changed == {"local_steps": (2, 3), "outer_lr": (0.7, 0.5),
                           "outer_momentum": (0.9, 0.6)}
        assert (lr, momentum, h) == (0.5, 0.6, 3)
    for error in run_workers(_resume_changed, 2, dict(outer_optimizer="sgd", outer_momentum=0)):
        assert "saved with outer_optimizer='nesterov' and this run has outer_optimizer='sgd'" \
            in error


def _resume_with_outer_unset(rank, comm):
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    # 200 steps of H = 20: 10 rounds, so the defaults average plainly.
    engine = GASLoC(model, inner, comm=comm, topology="1peer", local_steps=20, total_steps=200)
    chosen = engine.config.outer_optimizer
    for step in range(21):
        local_step(model, inner, rank, step)
    state = engine.state_dict()
    engine.detach()
    # Resumed for 2000 steps: 100 rounds, where the rule alone would pick Nesterov.
    fresh = GASLoC(TinyNet(), None, comm=comm, topology="1peer", local_steps=20,
                   total_steps=2000)
    resumed = GASLoC(model, None, comm=comm, topology="1peer", local_steps=20,
                     total_steps=2000)
    resumed.load_state_dict(state)
    by_hand = GASLoC(model, None, comm=comm, topology="1peer", local_steps=20,
                     total_steps=2000, outer_lr=0.3)
    by_hand.load_state_dict(state)
    return (chosen, fresh.config.outer_optimizer, resumed.config.to_dict(),
            resumed.outer_choice.why, type(resumed.fragments[0].outer.optimizer).__name__,
            resumed.fragments[0].outer.optimizer.param_groups[0]["momentum"],
            by_hand.config.outer_lr, by_hand.changed_at_resume)


def test_outer_settings_left_unset_continue_as_the_resumed_run_chose_them():
    for chosen, fresh, config, why, kind, momentum, lr, changed in run_workers(
            _resume_with_outer_unset, 2):
        assert (chosen, fresh) == ("sgd", "nesterov")  # the rule differs between the two
        assert (config["outer_optimizer"], config["outer_lr"], config["outer_momentum"]) == (
            "sgd", 1.0, 0.0)
        assert why.endswith("as the resumed run chose them")
        assert (kind, momentum) == ("SGD", 0.0)
        assert lr == 0.3 and changed == {"outer_lr": (1.0, 0.3)}  # a value set by hand wins
