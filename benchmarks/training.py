"""The training pieces shared by the comparison benchmarks: data, model, schedule, evaluation."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
PYDOCS = ROOT.parent / "shared" / "data" / "pydocs"
TINY_LLAMA = ROOT / "examples" / "configs" / "tiny-llama"


def prepare_data(folder: Path, block_size: int) -> str:
    """Tokenize and pack pydocs once into ``folder``; every run reads the same tensors."""
    from transformers import AutoTokenizer

    from hf_gasloc.data import load_text_dataset, pack_into_blocks

    cache = folder / f"pydocs_blocks{block_size}.pt"
    if not cache.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tokenizer = AutoTokenizer.from_pretrained(ROOT / "examples" / "data" / "tokenizer")
        raw = load_text_dataset(train_file=str(PYDOCS / "train.parquet"),
                                validation_file=str(PYDOCS / "validation.parquet"))
        packed = pack_into_blocks(raw, tokenizer, block_size)
        torch.save({split: torch.tensor(packed[split]["input_ids"]) for split in packed}, cache)
    return str(cache)


def new_model(config_dir: str | Path, device: torch.device) -> torch.nn.Module:
    """The same initialisation on every rank and in every run."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir)).to(device)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(
        (s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))


class DataOrder:
    """One global shuffled order of the blocks; at step ``s`` worker ``i`` of ``n`` takes
    the ``(s n + i)``-th batch, so every method sees the same data."""

    def __init__(self, blocks: torch.Tensor, batch_size: int, rank: int, world_size: int,
                 seed: int = 0):
        self.blocks, self.batch_size, self.rank, self.world_size = blocks, batch_size, rank, world_size
        self.order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))

    def batch(self, step: int) -> torch.Tensor:
        first = (step * self.world_size + self.rank) * self.batch_size
        positions = torch.arange(first, first + self.batch_size) % len(self.blocks)
        return self.blocks[self.order[positions]]


@torch.no_grad()
def evaluate(model: torch.nn.Module, validation: torch.Tensor, rank: int, world_size: int) -> float:
    """Mean loss over ``validation``, each rank taking its share (collective)."""
    device = next(model.parameters()).device
    shard = validation[rank::world_size].to(device)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    model.eval()
    for i in range(0, len(shard), 16):
        batch = shard[i : i + 16]
        total[0] += model(input_ids=batch, labels=batch).loss.double() * len(batch)
        total[1] += len(batch)
    model.train()
    dist.all_reduce(total)
    return float(total[0] / total[1])


@torch.no_grad()
def consensus_distance(model: torch.nn.Module, world_size: int) -> float:
    """Exact ``mean_i ||x_i - x_bar||^2 / ||x_bar||^2`` of the live parameters (collective)."""
    mine = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    mean = mine.clone()
    dist.all_reduce(mean)
    mean /= world_size
    spread = torch.tensor([float((mine - mean).pow(2).sum())], dtype=torch.float64)
    dist.all_reduce(spread)
    return float(spread) / world_size / float(mean.pow(2).sum())
