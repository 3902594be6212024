"""Payload codecs: fp32 flat buffers to the bytes that travel, and back.

| codec | bytes per parameter | what it keeps |
|---|---|---|
| ``bf16`` | 2 | 8 bits of mantissa, fp32's range |
| ``fp16`` | 2 | 11 bits of mantissa, range 6e-5 .. 65504 (values outside are lost) |
| ``int8`` | 1 + 4/64 = 1.0625 | per block of 64 values: ``round(x / s)`` in [-127, 127] with ``s = absmax / 127`` (an fp32 scale per block) |

``native`` is not a codec: it sends the parameters' own dtype. Block
size 64 is the smallest that keeps ``int8`` at or below 0.27x of fp32 with its
scales (32 would be 1.125 bytes, 0.28x); ``benchmarks/codecs.py`` measures the
error against the block size. Every codec works on any length (the last block
of ``int8`` may be short) and in chunks, so no model-sized temporary is made.
"""

from __future__ import annotations

import math

import torch

PAYLOADS = ("native", "bf16", "fp16", "int8")
FORMS = ("auto", "proposal", "pseudo_gradient")  # what an encoded payload carries
PAYLOAD_HELP = (
    "what a message carries: native (the parameters' dtype), bf16 or fp16 "
    "(2 bytes per parameter), int8 (block-wise absmax, 1.06 bytes); with error feedback"
)
CHUNK = 1 << 20  # elements per pass of the int8 codec


class CastCodec:
    """A floating-point dtype on the wire (``bf16``, ``fp16``)."""

    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype
        self.bytes_per_parameter = torch.finfo(dtype).bits / 8

    def wire_bytes(self, numel: int) -> int:
        return numel * int(self.bytes_per_parameter)

    def encode_(self, source: torch.Tensor, wire: torch.Tensor) -> None:
        wire.view(self.dtype).copy_(source)

    def decode_(self, wire: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(wire.view(self.dtype))


class BlockInt8Codec:
    """Block-wise absmax int8: ``numel`` codes, then one fp32 scale per block."""

    name = "int8"

    def __init__(self, block: int = 64):
        if block % 4:
            raise ValueError("the int8 block size must be a multiple of 4 (fp32 scales align).")
        self.block = block
        self.bytes_per_parameter = 1 + 4 / block

    def _blocks(self, numel: int) -> int:
        return math.ceil(numel / self.block)

    def wire_bytes(self, numel: int) -> int:
        blocks = self._blocks(numel)
        return blocks * self.block + 4 * blocks

    def _parts(self, wire: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = self._blocks(numel)
        codes = wire[: blocks * self.block].view(torch.int8)
        scales = wire[blocks * self.block : blocks * self.block + 4 * blocks].view(torch.float32)
        return codes, scales

    @torch.no_grad()
    def encode_(self, source: torch.Tensor, wire: torch.Tensor) -> None:
        codes, scales = self._parts(wire, source.numel())
        for x, block_codes, block_scales in self._chunks(source, codes, scales):
            absmax = x.abs().amax(dim=1)
            torch.div(absmax, 127.0, out=block_scales)
            inverse = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
            block_codes.copy_(torch.round(x * inverse[:, None]).clamp_(-127, 127))

    @torch.no_grad()
    def decode_(self, wire: torch.Tensor, out: torch.Tensor) -> None:
        codes, scales = self._parts(wire, out.numel())
        for x, block_codes, block_scales in self._chunks(out, codes, scales):
            torch.mul(block_codes.to(torch.float32), block_scales[:, None], out=x)

    def _chunks(self, values: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor):
        """``(values, codes, scales)`` as ``[blocks, block]`` views, a chunk at a time.

        The last, short block is padded with zeros in a small copy (``values`` is
        written back by the caller through the same view when decoding).
        """
        numel, block = values.numel(), self.block
        full = numel // block * block
        step = CHUNK // block * block
        for start in range(0, full, step):
            stop = min(full, start + step)
            yield (values[start:stop].view(-1, block),
                   codes[start:stop].view(-1, block), scales[start // block : stop // block])
        if full < numel:
            tail = torch.zeros(block, dtype=values.dtype, device=values.device)
            tail[: numel - full] = values[full:]
            padded = tail.view(1, block)
            yield (padded, codes[full : full + block].view(1, block),
                   scales[full // block :])
            values[full:] = tail[: numel - full]  # decoding wrote into the copy


def make_codec(payload: str) -> CastCodec | BlockInt8Codec | None:
    """The codec of a ``payload`` setting; ``None`` for ``native``."""
    if payload == "native":
        return None
    if payload == "bf16":
        return CastCodec("bf16", torch.bfloat16)
    if payload == "fp16":
        return CastCodec("fp16", torch.float16)
    if payload == "int8":
        return BlockInt8Codec()
    raise ValueError(f"unknown payload {payload!r} (--gasloc_payload): choose one of "
                     f"{', '.join(PAYLOADS)}.")
