"""A small causal LM written with plain tensor ops, so that ``torch.func.vmap`` can run many
workers' copies at once (``gossip_sweep.py``) and the engine can run one copy per process."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=-1)
        shape = (batch, length, self.heads, width // self.heads)
        q, k, v = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(width // self.heads)
        attention = torch.softmax(scores.masked_fill(mask[:length, :length], float("-inf")), -1)
        x = x + self.out((attention @ v).transpose(1, 2).reshape(batch, length, width))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyGPT(nn.Module):
    """Token and position embeddings, ``layers`` pre-norm blocks, a tied output head."""

    def __init__(self, vocab: int = 4096, width: int = 64, layers: int = 2, heads: int = 2,
                 context: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)
        self.register_buffer("mask", torch.ones(context, context).triu(1).bool(),
                             persistent=False)
        nn.init.normal_(self.embed.weight, std=0.02)

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.position[: ids.shape[1]]
        for block in self.blocks:
            x = block(x, self.mask)
        logits = self.norm(x) @ self.embed.weight.T
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               ids[:, 1:].reshape(-1))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        """The ``transformers`` call convention used by the benchmarks: ``.loss``."""
        return type("Output", (), {"loss": self.loss(input_ids)})()


def new_tiny_gpt(seed: int = 0, vocab: int = 4096) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(vocab)
