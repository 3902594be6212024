"""Causal-LM text data: local files (parquet, json, text, csv) or a hub dataset, packed into blocks.

A local parquet shard of FineWeb's schema (a ``text`` column) loads exactly like
``HuggingFaceFW/fineweb`` streamed from the hub, so recipes run offline on
``../shared/data/pydocs`` and online on FineWeb without a code change.
"""

from __future__ import annotations

import glob
from itertools import chain
from pathlib import Path
from typing import Any

from datasets import DatasetDict, IterableDatasetDict, load_dataset

_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".txt": "text",
             ".text": "text", ".csv": "csv"}


def data_files_builder(paths: list[str]) -> str:
    """The ``datasets`` builder for local files (globs allowed), checking that they exist first."""
    for path in paths:
        if not glob.glob(path):
            raise FileNotFoundError(
                f"data file {path!r} does not exist (--train_file / --validation_file): "
                "give a local parquet, json, jsonl, text or csv file."
            )
    suffixes = {Path(path).suffix.lower() for path in paths}
    if len(suffixes) != 1 or next(iter(suffixes)) not in _BUILDERS:
        raise ValueError(
            f"cannot tell the format of {paths}: use one extension among "
            f"{', '.join(sorted(_BUILDERS))} for all data files."
        )
    return _BUILDERS[suffixes.pop()]


def load_text_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    streaming: bool = False,
    validation_split_percentage: int = 5,
    validation_documents: int = 1000,
) -> DatasetDict | IterableDatasetDict:
    """``train`` and ``validation`` splits from local files or a hub dataset.

    A dataset without a validation split gets one cut from its train split:
    ``validation_split_percentage`` percent of it, or, when streaming (FineWeb
    has a train split only), its first ``validation_documents`` documents,
    which training then skips.
    """
    if dataset_name is None and train_file is None:
        raise ValueError("give a dataset: --dataset_name (hub) or --train_file (local file).")
    if train_file is not None:
        files = {"train": train_file}
        if validation_file is not None:
            files["validation"] = validation_file
        builder = data_files_builder(list(files.values()))
        raw = load_dataset(builder, data_files=files, streaming=streaming)
    else:
        raw = load_dataset(dataset_name, dataset_config_name, streaming=streaming)
    if "validation" not in raw:
        if streaming:
            stream = raw["train"]
            return IterableDatasetDict(
                train=stream.skip(validation_documents), validation=stream.take(validation_documents)
            )
        split = raw["train"].train_test_split(test_size=validation_split_percentage / 100, seed=0)
        raw = DatasetDict(train=split["train"], validation=split["test"])
    return raw


def pack_into_blocks(raw: Any, tokenizer: Any, block_size: int, text_column: str = "text") -> Any:
    """Tokenize (an EOS token ends each document), concatenate and cut into ``block_size`` blocks.

    The tail that does not fill a block is dropped. Works on map-style and
    streaming datasets alike; labels are the inputs (the model shifts them).
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}.")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]
        return {"input_ids": [doc + eos for doc in ids]}

    def group(batch: dict[str, list]) -> dict[str, list]:
        stream = list(chain.from_iterable(batch["input_ids"]))
        usable = len(stream) // block_size * block_size
        blocks = [stream[i : i + block_size] for i in range(0, usable, block_size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    texts = raw.select_columns([text_column])
    tokenized = texts.map(tokenize, batched=True, remove_columns=[text_column])
    return tokenized.map(group, batched=True, batch_size=1000)
