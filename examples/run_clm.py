"""Pretrain a causal LM with GASLoC: the Hugging Face ``run_clm.py`` plus one callback.

    # embedded data/tokenizer/tiny LLaMA; alone on a CPU-only machine it starts 4 local workers:
    accelerate launch examples/run_clm.py --gasloc_topology 2peer

    # your own data and model, on GPUs:
    accelerate launch examples/run_clm.py --config_name CONFIG --tokenizer_name TOKENIZER \
        --train_file shard-*.parquet --validation_file val.parquet --block_size 1024 \
        --max_steps 10000 --gasloc_topology 1peer --gasloc_local_steps 30

With no model or data flag it trains the tiny LLaMA config of
``examples/configs/tiny-llama`` on the Python-docs sample of ``examples/data``
(attribution there), so it runs offline. ``--gasloc_topology none`` is plain
DDP, ``complete`` is DiLoCo. Writes ``all_results.json`` (eval loss,
perplexity, token accuracy, train and GASLoC metrics, world size), the
consensus model (``save_pretrained``) and its model card to ``--output_dir``;
after a restart it resumes from the newest complete checkpoint there.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import evaluate
import torch
import torch.distributed as dist
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from hf_gasloc import GASLoCArguments, GASLoCCallback
from hf_gasloc.state.checkpoint import complete_checkpoints
from hf_gasloc.config import ENV_PREFIX
from hf_gasloc.integrations.data import data_files_builder, load_text_dataset, pack_into_blocks
from hf_gasloc.integrations.launch import gpu_command, launched_alone, start_local_workers
from hf_gasloc.integrations.recipes import load_recipe

HERE = Path(__file__).resolve().parent
logger = logging.getLogger(__name__)

# Only for the embedded default run (no model and no data flag): a few minutes on 2 CPU cores.
EMBEDDED_DEFAULTS = dict(
    output_dir="outputs/run_clm",
    max_steps=150,
    per_device_train_batch_size=8,
    per_device_eval_batch_size=16,
    learning_rate=3e-3,
    weight_decay=0.1,
    warmup_steps=10,
    lr_scheduler_type="cosine",
    logging_steps=10,
    save_strategy="no",
    report_to="none",
    block_size=128,
    # GASLoC for a 150-step run (15 rounds): a gentler outer Nesterov than DiLoCo's published
    # 0.7 / 0.9, chosen by benchmarks/default_run.py (docs/results.md#the-default-run).
    gasloc_local_steps="10",
    gasloc_outer_lr=0.4,
    gasloc_outer_momentum=0.5,
)

# --recipe_smoke_test: the recipe's settings on a shrunk model, a few CPU steps, the embedded tokenizer.
SMOKE_TEST = dict(
    config_overrides="hidden_size=64,intermediate_size=128,num_hidden_layers=2,num_attention_heads=2,"
    "num_key_value_heads=2,head_dim=32,vocab_size=4096,max_position_embeddings=128",
    tokenizer_name=str(HERE / "data" / "tokenizer"),
    block_size=64,
    per_device_train_batch_size=2,
    per_device_eval_batch_size=4,
    gradient_accumulation_steps=1,
    max_steps=4,
    warmup_steps=0,
    max_eval_samples=8,
    validation_documents=16,
    eval_strategy="no",
    save_strategy="no",
    logging_steps=2,
    bf16=False,
    report_to="none",
    dataloader_num_workers=0,
    gasloc_local_steps="2",
)


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "pretrained weights to start from (local folder or hub id)"}
    )
    config_name: Optional[str] = field(
        default=None, metadata={"help": "model config to train from scratch (default: tiny LLaMA)"}
    )
    tokenizer_name: Optional[str] = field(
        default=None, metadata={"help": "tokenizer (default: the model's, else the embedded one)"}
    )
    config_overrides: Optional[str] = field(
        default=None, metadata={"help": "override config values: 'hidden_size=256,num_hidden_layers=6'"}
    )


@dataclass
class DataTrainingArguments:
    dataset_name: Optional[str] = field(
        default=None, metadata={"help": "hub dataset, e.g. HuggingFaceFW/fineweb"}
    )
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "e.g. sample-10BT"})
    train_file: Optional[str] = field(default=None, metadata={"help": "parquet, json(l), text or csv"})
    validation_file: Optional[str] = field(default=None, metadata={"help": "same formats"})
    text_column: str = field(default="text")
    block_size: Optional[int] = field(default=None, metadata={"help": "tokens per packed sequence"})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "keep the first N blocks"})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "keep the first N blocks"})
    streaming: bool = field(default=False, metadata={"help": "stream the dataset (needs --max_steps)"})
    validation_split_percentage: int = field(default=5)
    validation_documents: int = field(
        default=1000,
        metadata={"help": "streamed data without a validation split: hold out the first N documents"},
    )


@dataclass
class ScriptArguments:
    recipe: Optional[str] = field(default=None, metadata={"help": "a recipes/*.yaml file; flags override it"})
    recipe_smoke_test: bool = field(
        default=False, metadata={"help": "run the recipe on a shrunk model for a few CPU steps"}
    )
    local_workers: int = field(
        default=4,
        metadata={"help": "started alone (python or accelerate launch without a config) on a "
                          "machine without GPUs: run this many local workers (0: train alone)"},
    )
    auto_resume: bool = field(
        default=True,
        metadata={"help": "resume from the newest complete checkpoint in --output_dir when "
                          "--resume_from_checkpoint is not given (after a restart, on any number "
                          "of workers); --auto_resume false starts afresh"},
    )


ARGUMENT_CLASSES = (ModelArguments, DataTrainingArguments, TrainingArguments, GASLoCArguments,
                    ScriptArguments)


def parse_arguments(argv: Optional[list[str]] = None) -> tuple:
    """Parse and check every flag; bad input exits here, before any data is read."""
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    given = {arg.split("=")[0].lstrip("-") for arg in argv if arg.startswith("--")}
    recipe_path, smoke = _recipe_flags(argv)
    try:
        recipe = load_recipe(recipe_path, [a.dest for a in parser._actions]) if recipe_path else None
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    settings = dict(recipe.arguments) if recipe else {}
    sources = {"model_name_or_path", "config_name", "dataset_name", "train_file"}
    embedded = not (given | set(settings)) & sources
    defaults = {name: value for name, value in EMBEDDED_DEFAULTS.items()  # a set env var wins
                if ENV_PREFIX + name.removeprefix("gasloc_").upper() not in os.environ
                } if embedded else {}
    defaults.update(settings)
    defaults.update(SMOKE_TEST if smoke else {})
    defaults["use_cpu"] = not torch.cuda.is_available()
    parser.set_defaults(**defaults)
    model_args, data_args, training_args, gasloc_args, script_args = (
        parser.parse_args_into_dataclasses(argv))
    try:  # every bad flag fails here, before any data is read or any step is taken
        plugin = gasloc_args.to_plugin()
        files = [f for f in (data_args.train_file, data_args.validation_file) if f]
        if files:
            data_files_builder(files)
        if recipe and "max_steps" not in given | set(defaults):
            training_args.max_steps = recipe.max_steps(
                training_args.world_size, training_args.per_device_train_batch_size,
                training_args.gradient_accumulation_steps, data_args.block_size or 1024,
            )
        if data_args.streaming and training_args.max_steps <= 0:
            raise ValueError("--streaming needs --max_steps (a stream has no length).")
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    script_args.loaded_recipe = recipe
    return model_args, data_args, training_args, plugin, embedded, script_args


def prepare_run(training_args: TrainingArguments, plugin, script_args: ScriptArguments) -> None:
    """On the workers that train: where to resume from, and how the recipe fits this run."""
    if script_args.auto_resume and training_args.resume_from_checkpoint is None:
        found = complete_checkpoints(training_args.output_dir, gasloc=plugin.enabled)
        if found:
            training_args.resume_from_checkpoint = str(found[-1])
            if training_args.process_index == 0:
                logger.warning("resuming from %s, the newest complete checkpoint in %s "
                               "(--auto_resume false starts afresh)", found[-1],
                               training_args.output_dir)
    recipe = script_args.loaded_recipe
    if recipe and recipe.workers != training_args.world_size and training_args.process_index == 0:
        logger.warning("recipe %s was planned for %d workers; this run has %d (max_steps=%d keeps "
                       "its token budget)", recipe.path, recipe.workers, training_args.world_size,
                       training_args.max_steps)


def _recipe_flags(argv: list[str]) -> tuple[Optional[str], bool]:
    """``--recipe`` and ``--recipe_smoke_test`` are needed before the full parse."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--recipe")
    early.add_argument("--recipe_smoke_test", nargs="?", const="true", default="false")
    known, _ = early.parse_known_args(argv)
    return known.recipe, str(known.recipe_smoke_test).lower() in ("true", "1", "yes")


def local_workers_to_start(plugin, script_args: ScriptArguments, argv: list[str]) -> int:
    """How many local workers to start when this process runs alone (0: train here)."""
    if not launched_alone() or not plugin.enabled:
        return 0
    command = gpu_command("examples/run_clm.py", argv)
    if command is not None or torch.cuda.is_available():
        logger.warning("run_clm.py runs as a single process on a machine with %d GPU(s): GASLoC "
                       "needs at least 2 workers. %s", torch.cuda.device_count(),
                       f"Use them all with: {command}" if command else
                       "With one GPU, start workers on several machines (docs/recipes.md).")
        return 0
    if script_args.local_workers == 0:
        logger.warning("run_clm.py: --local_workers 0: this single process trains alone, which is "
                       "plain AdamW, not decentralized training.")
    return max(0, script_args.local_workers)


def main() -> None:
    argv = sys.argv[1:]
    model_args, data_args, training_args, plugin, embedded, script_args = parse_arguments(argv)
    workers = local_workers_to_start(plugin, script_args, argv)
    if workers:
        print(f"run_clm.py: no launcher started several processes and this machine has no GPU: "
              f"starting {workers} local GASLoC workers (torch elastic launcher, gloo); "
              "--local_workers N changes that, 0 trains alone.", flush=True)
        start_local_workers(workers, str(Path(__file__).resolve()), argv)
        return
    prepare_run(training_args, plugin, script_args)
    callbacks = [GASLoCCallback(plugin)] if plugin.enabled else []
    run(model_args, data_args, training_args, plugin, embedded, callbacks)
    if dist.is_initialized():
        dist.destroy_process_group()


def run(model_args, data_args, training_args, plugin, embedded, callbacks) -> Trainer:
    """Train, evaluate and save; every rank calls it. Returns the Trainer."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if training_args.should_log else logging.WARNING)
    transformers.utils.logging.set_verbosity(logging.INFO if training_args.should_log else logging.WARNING)
    logger.info("world size %d, GASLoC %s", training_args.world_size, plugin.to_dict())
    set_seed(training_args.seed)

    if embedded:
        data_args.train_file = str(HERE / "data" / "pydocs_train.parquet")
        data_args.validation_file = str(HERE / "data" / "pydocs_validation.parquet")
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or model_args.model_name_or_path or HERE / "data" / "tokenizer"
    )
    model = load_model(model_args, len(tokenizer))
    train_blocks, eval_blocks = load_blocks(data_args, training_args, tokenizer, model)

    if data_args.streaming:  # each worker reads its own shard; no per-step broadcast
        training_args.accelerator_config.dispatch_batches = False
    accuracy = evaluate.load(str(HERE / "metrics" / "token_accuracy"))

    def compute_metrics(prediction):
        predictions, labels = prediction
        # A token predicts the next one: shift, as the model's loss does.
        return accuracy.compute(predictions=predictions[:, :-1].reshape(-1),
                                references=labels[:, 1:].reshape(-1))

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_blocks,
        eval_dataset=eval_blocks,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(dim=-1),
        callbacks=callbacks,
    )

    start = trainer.evaluate(metric_key_prefix="start")
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    # After training every rank holds the consensus model (GASLoCCallback.on_train_end).
    trainer.save_model()
    trainer.accelerator.wait_for_everyone()  # rank 0's files are complete before anyone reads
    metrics = dict(result.metrics)
    if not data_args.streaming:
        metrics["train_samples"] = len(train_blocks)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()

    eval_metrics = trainer.evaluate()
    eval_metrics["perplexity"] = _perplexity(eval_metrics["eval_loss"])
    eval_metrics["start_eval_loss"] = start["start_loss"]
    eval_metrics["start_perplexity"] = _perplexity(start["start_loss"])
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("eval", eval_metrics)
    summary = {"world_size": training_args.world_size, "gasloc_topology": plugin.topology,
               "gasloc_config": plugin.to_dict()}
    for callback in callbacks:
        if getattr(callback, "engine", None) is not None:
            summary.update(callback.engine.metrics())
    trainer.save_metrics("gasloc", summary)
    card = {"tasks": "text-generation", "finetuned_from": model_args.model_name_or_path,
            "dataset": data_args.dataset_name or data_args.train_file}
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        trainer.create_model_card(**card)
    trainer.accelerator.wait_for_everyone()  # a barrier before the group goes away
    return trainer


def load_model(model_args: ModelArguments, vocab_size: int) -> torch.nn.Module:
    if model_args.model_name_or_path:
        return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
    config = AutoConfig.from_pretrained(model_args.config_name or HERE / "configs" / "tiny-llama")
    if model_args.config_overrides:
        config.update_from_string(model_args.config_overrides)
    if config.vocab_size < vocab_size:
        raise ValueError(f"the tokenizer has {vocab_size} tokens but the model config only "
                         f"{config.vocab_size}: pass --config_overrides vocab_size={vocab_size}.")
    model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    logger.info("training a new %s of %.2fM parameters", config.model_type, params / 1e6)
    return model


def load_blocks(data_args, training_args, tokenizer, model):
    raw = load_text_dataset(
        data_args.dataset_name, data_args.dataset_config_name, data_args.train_file,
        data_args.validation_file, data_args.streaming, data_args.validation_split_percentage,
        data_args.validation_documents,
    )
    block_size = data_args.block_size or min(1024, model.config.max_position_embeddings)
    with training_args.main_process_first(desc="tokenizing and packing"):
        blocks = pack_into_blocks(raw, tokenizer, block_size, data_args.text_column)
    train, validation = blocks["train"], blocks["validation"]
    train = _first(train, data_args.max_train_samples, data_args.streaming)
    validation = _first(validation, data_args.max_eval_samples, data_args.streaming)
    return train, validation


def _first(dataset, count: Optional[int], streaming: bool):
    if count is None:
        return dataset
    return dataset.take(count) if streaming else dataset.select(range(min(count, len(dataset))))


def _perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


if __name__ == "__main__":
    main()
