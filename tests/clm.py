"""A tiny causal LM on the embedded sample, for Trainer tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainingArguments

from hf_gasloc.integrations.data import load_text_dataset, pack_into_blocks

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def blocks(train_blocks: int = 64, eval_blocks: int = 16, block_size: int = 32):
    tokenizer = AutoTokenizer.from_pretrained(DATA / "tokenizer")
    raw = load_text_dataset(train_file=str(DATA / "pydocs_train.parquet"),
                            validation_file=str(DATA / "pydocs_validation.parquet"))
    packed = pack_into_blocks(raw, tokenizer, block_size)
    return packed["train"].select(range(train_blocks)), packed["validation"].select(range(eval_blocks))


def training_arguments(output_dir: str, **overrides) -> TrainingArguments:
    settings = dict(output_dir=output_dir, use_cpu=True, per_device_train_batch_size=4,
                    per_device_eval_batch_size=8, learning_rate=3e-3, max_steps=6,
                    logging_steps=3, save_strategy="no", eval_strategy="no", report_to=[],
                    seed=0, data_seed=0, disable_tqdm=True, lr_scheduler_type="constant")
    settings.update(overrides)
    return TrainingArguments(**settings)
