"""Payload codecs by hand: sizes, error bounds, exact zeros and extremes, names."""

import pytest
import torch

from hf_gasloc.wire.codec import BlockInt8Codec, make_codec


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
