"""The training pieces shared by the comparison benchmarks: data, model, schedule, evaluation."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
TINY_LLAMA = ROOT / "examples" / "configs" / "tiny-llama"
# Where the text comes from (``--data``): the repository's own sample (every clone has it), or
# the larger corpus of the same schema that the project's machines keep beside the repository.
DATA_SOURCES = {
    "embedded": (ROOT / "examples" / "data" / "pydocs_train.parquet",
                 ROOT / "examples" / "data" / "pydocs_validation.parquet"),
    "shared": (ROOT.parent / "shared" / "data" / "pydocs" / "train.parquet",
               ROOT.parent / "shared" / "data" / "pydocs" / "validation.parquet"),
}
DATA_HELP = ("text to train on: 'embedded' (examples/data, in every clone), 'shared' "
             "(../shared/data/pydocs, the larger corpus beside the repository on the project's "
             "machines), or a folder holding train.parquet and validation.parquet")


def data_files(source: str) -> tuple[Path, Path]:
    """The train and validation parquet files of a ``--data`` value, checked to exist."""
    folder = Path(source)
    files = DATA_SOURCES.get(source, (folder / "train.parquet", folder / "validation.parquet"))
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise SystemExit(f"--data {source}: {', '.join(missing)} not found ({DATA_HELP}).")
    return files


def prepare_data(folder: Path, block_size: int, source: str = "embedded",
                 tokens: str = "bpe") -> str:
    """Tokenize and pack the ``--data`` text once into ``folder``; every run reads the same
    tensors. ``tokens``: the embedded BPE tokenizer, or ``bytes`` (UTF-8 bytes, vocabulary
    256, byte 0 ending each document)."""
    from hf_gasloc.integrations.data import load_text_dataset, pack_into_blocks

    train, validation = data_files(source)
    name = source if source in DATA_SOURCES else "custom-" + hashlib.sha1(
        str(Path(source).resolve()).encode()).hexdigest()[:8]
    cache = folder / f"{name}_{tokens}_blocks{block_size}.pt"
    if not cache.exists():
        folder.mkdir(parents=True, exist_ok=True)
        raw = load_text_dataset(train_file=str(train), validation_file=str(validation))
        tokenizer = ByteTokenizer() if tokens == "bytes" else _bpe_tokenizer()
        packed = pack_into_blocks(raw, tokenizer, block_size)
        torch.save({split: torch.tensor(packed[split]["input_ids"]) for split in packed}, cache)
    return str(cache)


def _bpe_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ROOT / "examples" / "data" / "tokenizer")


class ByteTokenizer:
    """UTF-8 bytes as tokens (what ``pack_into_blocks`` needs of a tokenizer)."""

    eos_token_id = 0
    vocab_size = 256

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict:
        return {"input_ids": [list(text.encode("utf-8")) for text in texts]}


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
