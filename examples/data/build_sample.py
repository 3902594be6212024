"""Rebuild the embedded default data sample and tokenizer from ../shared/data/pydocs.

    python examples/data/build_sample.py --source ../shared/data/pydocs

Takes the first documents (in file order) up to 1.6 MB of text for training and
0.2 MB for validation, keeps FineWeb's columns, and trains a 4096-token
byte-level BPE tokenizer on the training text.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

HERE = Path(__file__).parent
BUDGET = {"train": 1_600_000, "validation": 200_000}
VOCAB_SIZE = 4096


def cut(table: pa.Table, budget: int) -> pa.Table:
    lengths = [len(text) for text in table.column("text").to_pylist()]
    total, keep = 0, 0
    while keep < len(lengths) and total + lengths[keep] <= budget:
        total += lengths[keep]
        keep += 1
    return table.slice(0, keep)


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>", model_max_length=2048,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(HERE.parents[1] / ".." / "shared/data/pydocs"))
    args = parser.parse_args()
    for split, budget in BUDGET.items():
        table = cut(pq.read_table(Path(args.source) / f"{split}.parquet"), budget)
        pq.write_table(table, HERE / f"pydocs_{split}.parquet")
        print(f"{split}: {table.num_rows} documents")
    texts = pq.read_table(HERE / "pydocs_train.parquet").column("text").to_pylist()
    train_tokenizer(texts).save_pretrained(HERE / "tokenizer")


if __name__ == "__main__":
    main()
