"""Payload codecs: sizes and errors by hand, DiLoCo with a codec, the mean kept, resume exact."""

import pytest
import torch

from hf_gasloc import GASLoC
from hf_gasloc.wire.codec import BlockInt8Codec, make_codec

from .distributed import run_ranks
from .workers import (DiLoCoReference, TinyNet, flat, gather, load_training, local_step, mean,
                      mean_anchor_against_diloco, train_rounds)


@pytest.mark.parametrize("name,bytes_per_parameter,worst", [
    ("bf16", 2.0, 2 ** -8), ("fp16", 2.0, 2 ** -11), ("int8", 1 + 4 / 64, 1 / 254)])
def test_codecs_state_their_size_and_bound_their_error(name, bytes_per_parameter, worst):
    codec = make_codec(name)
    assert codec.bytes_per_parameter == bytes_per_parameter
    generator = torch.Generator().manual_seed(0)
    for numel in (1, 63, 64, 65, 1000, (1 << 20) + 70):  # short last blocks, several chunks
        x = torch.randn(numel, generator=generator) * 0.02
        wire = torch.empty(codec.wire_bytes(numel), dtype=torch.uint8)
        codec.encode_(x, wire)
        y = torch.empty(numel)
        codec.decode_(wire, y)
        if name == "int8":  # half a step of the block's scale, absmax / 127
            blocks = torch.nn.functional.pad(x.abs(), (0, -numel % 64)).view(-1, 64).amax(1)
            bound = (blocks / 254).repeat_interleave(64)[:numel] * (1 + 1e-4)  # fp32 ulps
            assert bool(((y - x).abs() <= bound).all())
            assert codec.wire_bytes(numel) == 64 * -(-numel // 64) * (1 + 4 / 64)
        else:  # half an ulp (fp16 below 6e-5: half its subnormal spacing, 2^-25)
            floor = 2.0 ** -25 if name == "fp16" else 0.0
            assert bool(((y - x).abs() <= x.abs() * worst + floor).all())
            assert codec.wire_bytes(numel) == 2 * numel


def test_int8_keeps_zero_blocks_and_extremes_exact():
    codec = BlockInt8Codec()
    x = torch.zeros(130)
    x[64:128] = torch.linspace(-3, 3, 64)
    wire = torch.empty(codec.wire_bytes(130), dtype=torch.uint8)
    codec.encode_(x, wire)
    y = torch.full((130,), float("nan"))
    codec.decode_(wire, y)
    assert torch.equal(y[:64], x[:64]) and y[64] == -3 and y[127] == 3 and torch.equal(y[128:], x[128:])


def test_an_unknown_payload_is_a_clear_error():
    from hf_gasloc import GASLoCConfig
    with pytest.raises(ValueError, match="unknown payload 'int4' .*--gasloc_payload.*int8"):
        GASLoCConfig(payload="int4")


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
        engine = GASLoC(model, None, topology="complete", payload=name, local_steps=3)
        reference, quantize = DiLoCoReference(flat(model), "nesterov", 0.7, 0.9), Quantized(name)
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
    engine = GASLoC(model, None, topology="2peer", payload=payload, local_steps=3, seed=11)
    worst, spread = mean_anchor_against_diloco(model, inner, engine, rank, 6, 3)
    wire = engine.fragments[0].wire.messages[0].numel()
    return worst, spread, engine.last_round.bytes_sent, wire, len(engine.topology.graph(5).peers[rank])


@pytest.mark.parametrize("payload", ["bf16", "int8"])
def test_with_a_codec_the_mean_anchor_still_follows_diloco_exactly(payload):
    for worst, spread, sent, wire, peers in run_ranks(_sparse_mean_follows_diloco, 4, payload):
        assert worst < 1e-6, f"{payload}: mean anchor off by {worst}"
        assert spread > 1e-4
        assert sent == (wire + (2 + 4) * 8) * peers  # the payload and the fp64 header, per peer


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
