"""Pretrain a causal LM with GASLoC: the Hugging Face ``run_clm.py`` plus one callback.

    # embedded data/tokenizer/tiny LLaMA; alone on a CPU-only machine it starts 4 local workers:
    accelerate launch examples/run_clm.py --gasloc_topology 2peer

    # your own data and model, on GPUs:
    accelerate launch examples/run_clm.py --config_name CONFIG --tokenizer_name TOKENIZER \
        --train_file shard-*.parquet --validation_file val.parquet --block_size 1024 \
        --do_train --do_eval --max_steps 10000 --gasloc_topology 1peer --gasloc_local_steps 30

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
from typing import NamedTuple, Optional

import datasets
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

from hf_gasloc import GASLoCArguments, GASLoCCallback, GASLoCConfig, GASLoCPlugin
from hf_gasloc.integrations import (
    Recipe,
    data_files_builder,
    load_recipe,
    load_text_dataset,
    newest_complete_checkpoint,
    pack_into_blocks,
    run_local_workers_if_alone,
)

HERE = Path(__file__).resolve().parent
logger = logging.getLogger(__name__)

# Only for the embedded default run (no model and no data flag): a few minutes on 2 CPU cores.
EMBEDDED_DEFAULTS = dict(
    output_dir="outputs/run_clm",
    do_train=True,
    do_eval=True,
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
    gasloc_local_steps="10",  # 15 rounds in 150 steps
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
    gasloc_worker_size=1,  # one process per worker: the smoke test runs on 2 processes
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

    def __post_init__(self):
        if self.config_overrides is not None and self.model_name_or_path is not None:
            raise ValueError("--config_overrides can't be used with --model_name_or_path: it "
                             "resizes a model trained from scratch (--config_name).")


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

    def __post_init__(self):
        if self.dataset_name is None and self.train_file is None:
            raise ValueError("give a dataset: --dataset_name (hub) or --train_file (local file); "
                             "with neither, and no model flag, the script trains on its embedded "
                             "sample.")
        files = [f for f in (self.train_file, self.validation_file) if f]
        if files:
            data_files_builder(files)  # they exist, in one known format
        if self.block_size is not None and self.block_size < 2:
            raise ValueError(f"--block_size must be at least 2, got {self.block_size}.")


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


class Arguments(NamedTuple):
    model: ModelArguments
    data: DataTrainingArguments
    training: TrainingArguments
    gasloc: GASLoCPlugin
    script: ScriptArguments
    embedded: bool  # no model or data flag: the embedded sample, tokenizer and tiny LLaMA
    recipe: Optional[Recipe]


ARGUMENT_CLASSES = (ModelArguments, DataTrainingArguments, TrainingArguments, GASLoCArguments,
                    ScriptArguments)
SOURCES = {"model_name_or_path", "config_name", "dataset_name", "train_file"}


def parse_arguments(argv: Optional[list[str]] = None) -> Arguments:
    """Parse and check every flag: the command line over the recipe over the embedded defaults,
    through ``HfArgumentParser.parse_dict``; bad input exits here, before any data is read."""
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    recipe_path, smoke = _recipe_flags(argv)
    try:
        recipe = load_recipe(recipe_path, [a.dest for a in parser._actions]) if recipe_path else None
        given = _given(parser, argv)
        values = dict(recipe.arguments) if recipe else {}
        embedded = not (set(given) | set(values)) & SOURCES
        if embedded:  # a variable ACCELERATE_GASLOC_<NAME> wins over an embedded default
            values = {name: value for name, value in EMBEDDED_DEFAULTS.items()
                      if GASLoCConfig.environment_variable(name.removeprefix("gasloc_"))
                      not in os.environ} | values
            values.update(train_file=str(HERE / "data" / "pydocs_train.parquet"),
                          validation_file=str(HERE / "data" / "pydocs_validation.parquet"))
        if recipe:
            values.setdefault("do_train", True)
            values.setdefault("do_eval", True)
        values.update(SMOKE_TEST if smoke else {})
        values.setdefault("use_cpu", not torch.cuda.is_available())
        values.update(given)
        model_args, data_args, training_args, gasloc_args, script_args = parser.parse_dict(values)
        gasloc = gasloc_args.to_plugin()
        _check_together(data_args, training_args, gasloc, recipe, "max_steps" in values)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    return Arguments(model_args, data_args, training_args, gasloc, script_args, embedded, recipe)


def _given(parser: HfArgumentParser, argv: list[str]) -> dict:
    """The values of the flags written on the command line (typed by the parser)."""
    namespace = parser.parse_args(argv)
    dests = {action.dest for action in parser._actions}
    named = {arg.split("=")[0].lstrip("-") for arg in argv if arg.startswith("--")}
    named = {name if name in dests else name.removeprefix("no_") for name in named}
    return {name: getattr(namespace, name) for name in named if name in dests}


def _recipe_flags(argv: list[str]) -> tuple[Optional[str], bool]:
    """``--recipe`` and ``--recipe_smoke_test`` are needed before the full parse."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--recipe")
    early.add_argument("--recipe_smoke_test", nargs="?", const="true", default="false")
    known, _ = early.parse_known_args(argv)
    return known.recipe, str(known.recipe_smoke_test).lower() in ("true", "1", "yes")


def _check_together(data_args, training_args, gasloc: GASLoCPlugin, recipe: Optional[Recipe],
                    max_steps_given: bool):
    """What no single argument class can check alone."""
    if not (training_args.do_train or training_args.do_eval):
        raise ValueError("nothing to do: pass --do_train and/or --do_eval (the embedded default "
                         "run and the recipes do both).")
    if recipe and not max_steps_given:  # the recipe's token budget, on this run's world size
        training_args.max_steps = recipe.max_steps(
            training_args.world_size, training_args.per_device_train_batch_size,
            training_args.gradient_accumulation_steps, data_args.block_size or 1024)
    if data_args.streaming and training_args.do_train and training_args.max_steps <= 0:
        raise ValueError("--streaming needs --max_steps (a stream has no length).")
    if training_args.world_size > 1:  # a launched worker: the graph and per-rank H, checked now
        gasloc.check_world(training_args.world_size)


def main() -> None:
    argv = sys.argv[1:]
    arguments = parse_arguments(argv)
    alone = arguments.gasloc.enabled and run_local_workers_if_alone(
        arguments.script.local_workers, str(Path(__file__).resolve()), argv)
    if not alone:
        run(arguments)
        if dist.is_initialized():
            dist.destroy_process_group()


def run(arguments: Arguments, callbacks: Optional[list] = None) -> Trainer:
    """Train, evaluate and save; every rank calls it. ``callbacks``: instead of GASLoC's.
    Returns the Trainer."""
    model_args, data_args, training_args, gasloc, script = arguments[:5]
    _set_up_logging(training_args)
    _find_checkpoint(training_args, gasloc, script)
    if arguments.recipe and arguments.recipe.workers != training_args.world_size:
        logger.warning("recipe %s was planned for %d workers; this run has %d (max_steps=%d keeps "
                       "its token budget)", arguments.recipe.path, arguments.recipe.workers,
                       training_args.world_size, training_args.max_steps)
    set_seed(training_args.seed)

    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or model_args.model_name_or_path or HERE / "data" / "tokenizer"
    )
    model = load_model(model_args, len(tokenizer))
    gasloc.check_model(model)  # e.g. fragments: before any data is read or evaluation is run
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
        train_dataset=train_blocks if training_args.do_train else None,
        eval_dataset=eval_blocks if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=compute_metrics if training_args.do_eval else None,
        preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(dim=-1),
        callbacks=callbacks,
    )
    gasloc_callback = None
    if callbacks is None and gasloc.enabled:
        gasloc_callback = GASLoCCallback(gasloc).bind(trainer)

    if training_args.do_train:
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

    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["perplexity"] = _perplexity(metrics["eval_loss"])
        start = [h for h in trainer.state.log_history if h.get("step") == 0 and "eval_loss" in h]
        if start:  # --eval_on_start
            metrics["start_eval_loss"] = start[0]["eval_loss"]
            metrics["start_perplexity"] = _perplexity(start[0]["eval_loss"])
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    summary = {"world_size": training_args.world_size, "gasloc_topology": gasloc.topology}
    if gasloc_callback is not None and gasloc_callback.engine is not None:
        summary.update(gasloc_callback.summary())
    trainer.save_metrics("gasloc", summary)
    card = {"finetuned_from": model_args.model_name_or_path}
    if data_args.dataset_name is not None:  # a hub dataset: the card's results name it
        card.update(tasks="text-generation", dataset_tags=data_args.dataset_name,
                    dataset=data_args.dataset_name, dataset_args=data_args.dataset_config_name)
    else:  # local files: no hub dataset for the card's results to name, so none are listed
        card.update(tasks=[], tags=["text-generation"])
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        trainer.create_model_card(**card)
    trainer.accelerator.wait_for_everyone()  # a barrier before the group goes away
    return trainer


def _set_up_logging(training_args: TrainingArguments) -> None:
    """Rank 0 says what it does (``--log_level``); the other ranks only warn
    (``--log_level_replica``), as in transformers' examples."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=[logging.StreamHandler(sys.stdout)])
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    level = training_args.get_process_log_level()
    for name in (__name__, "hf_gasloc"):
        logging.getLogger(name).setLevel(level)
    datasets.utils.logging.set_verbosity_warning()  # its cache lines are not worth a screen
    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def _find_checkpoint(training_args: TrainingArguments, gasloc: GASLoCPlugin,
                     script: ScriptArguments) -> None:
    """``--auto_resume``: resume from the newest complete checkpoint in ``--output_dir``."""
    if not script.auto_resume or training_args.resume_from_checkpoint is not None:
        return
    found = newest_complete_checkpoint(training_args.output_dir, gasloc=gasloc.enabled)
    if found is not None:
        training_args.resume_from_checkpoint = str(found)
        if training_args.process_index == 0:
            logger.warning("resuming from %s, the newest complete checkpoint in %s "
                           "(--auto_resume false starts afresh)", found, training_args.output_dir)


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
