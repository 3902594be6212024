"""Payload codecs: sizes and errors by hand, DiLoCo with a codec, the mean kept, resume exact."""

import pytest
import torch

from hf_gasloc import GASLoC
from hf_gasloc.wire.codec import make_codec

from .distributed import run_ranks
from .workers import (DILOCO_OUTER, DiLoCoReference, TinyNet, flat, gather, load_training,
                      local_step, mean, mean_anchor_against_diloco, train_rounds)


class Quantized:
    """DiLoCo with a codec on the pseudo-gradient and error feedback, written out by hand."""

    def __init__(self, name):
        self.codec, self.residual = make_codec(name), None

    def __call__(self, delta):
        if self.residual is None:
            self.residual = torch.zeros_like(delta)
        u = delta + self.residual
        wire = torch.empty(self.codec.wire_bytes(u.numel()), dtype=torch.uint8)
        self.codec.encode_(u, wire)
        decoded = torch.empty_like(u)
        self.codec.decode_(wire, decoded)
        self.residual = u - decoded
        return decoded


def _complete_with_codec_is_diloco_with_codec(rank, world_size):
    errors, sent = {}, {}
    for name in ("bf16", "fp16", "int8"):
        model = TinyNet()
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
        engine = GASLoC(model, None, topology="complete", payload=name, local_steps=3,
                        **DILOCO_OUTER)
        reference, quantize = DiLoCoReference.following(flat(model), engine.config), Quantized(name)
        worst = 0.0
        for round_index in range(4):
            # Each round starts the reference from the engine's state: quantization is not
            # continuous, so a rounding difference of 1e-9 in one round could flip a code in
            # the next; one round must match, from anchor, momentum and residual alike.
            reference.anchor = flat(model)
            momentum = engine.fragments[0].outer.optimizer.state[engine.flat.anchors[0]]
            reference.buffer = momentum["momentum_buffer"].clone() if momentum else 0 * flat(model)
            quantize.residual = engine.fragments[0].wire.residuals[0].clone()
            for step in range(3):
                local_step(model, inner, rank, round_index * 3 + step)
            decoded = quantize(reference.anchor - flat(model))  # this rank's payload, decoded
            expected = reference.step(mean(gather(decoded)))
            engine.outer_step()
            worst = max(worst, float((flat(model) - expected).abs().max()))
            assert torch.equal(quantize.residual, engine.fragments[0].wire.residuals[0])
        errors[name] = worst
        sent[name] = (engine.last_round.bytes_sent, engine.last_round.encode_seconds)
    return errors, sent, flat(model).numel()


def test_complete_with_a_codec_is_diloco_with_that_codec_on_the_pseudo_gradient():
    for errors, sent, numel in run_ranks(_complete_with_codec_is_diloco_with_codec, 3):
        for name, error in errors.items():
            assert error < 1e-6, f"{name}: {error}"
        # An all-gather sends the payload to each of the n - 1 others.
        assert sent["bf16"][0] == 2 * 2 * numel
        assert sent["int8"][0] == 2 * make_codec("int8").wire_bytes(numel)
        assert all(seconds > 0 for _, seconds in sent.values())


def _sparse_mean_follows_diloco(rank, world_size, payload):
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = GASLoC(model, None, topology="2peer", payload=payload, local_steps=3, seed=11,
                    **DILOCO_OUTER)
    worst, spread = mean_anchor_against_diloco(model, inner, engine, rank, 6, 3)
    wire = engine.fragments[0].wire.messages[0].numel()
    return worst, spread, engine.last_round.bytes_sent, wire, len(engine.topology.graph(5).peers[rank])


@pytest.mark.parametrize("payload", ["bf16", "int8"])
def test_with_a_codec_the_mean_anchor_still_follows_diloco_exactly(payload):
    for worst, spread, sent, wire, peers in run_ranks(_sparse_mean_follows_diloco, 4, payload):
        assert worst < 1e-6, f"{payload}: mean anchor off by {worst}"
        assert spread > 1e-4
        # Per peer: the payload and the fp64 header (round, health, layout's 2, 4 lost flags).
        assert sent == (wire + (4 + 4) * 8) * peers


def _resume_with_residuals(rank, world_size, folder):
    def run(rounds, resume=False):
        model = TinyNet()
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
        engine = GASLoC(model, inner, topology="1peer", payload="int8", seed=21, local_steps=2)
        checkpoint = f"{folder}/rank{rank}.pt"
        if resume:
            load_training(model, inner, engine, checkpoint)
        train_rounds(model, inner, engine, rank, rounds, save_to=None if resume else checkpoint)
        return flat(model), engine.fragments[0].wire.residuals[0].abs().sum()
    uninterrupted, residual = run(6)
    resumed, _ = run(6, resume=True)
    return uninterrupted, resumed, float(residual)


def test_resume_with_error_feedback_is_bit_exact(tmp_path):
    for uninterrupted, resumed, residual in run_ranks(_resume_with_residuals, 2, str(tmp_path)):
        assert residual > 0, "int8 leaves a residual to feed back"
        assert torch.equal(uninterrupted, resumed)
