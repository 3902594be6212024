"""GASLoC in a raw Accelerate loop: the three lines marked ``# GASLoC``.

    accelerate launch --config_file examples/configs/cpu_4proc.yaml examples/accelerate_loop.py

Trains the tiny LLaMA on the embedded Python-docs sample; any GASLoC setting can
also come from ``ACCELERATE_GASLOC_*`` environment variables
(e.g. ``ACCELERATE_GASLOC_TOPOLOGY=1peer``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    default_data_collator,
)

from hf_gasloc import GASLoCArguments
from hf_gasloc.integrations.data import load_text_dataset, pack_into_blocks

HERE = Path(__file__).parent


@dataclass
class LoopArguments:
    steps: int = 60
    output_dir: str = "outputs/accelerate_loop"


def main() -> None:
    args, gasloc_args = HfArgumentParser((LoopArguments, GASLoCArguments)).parse_args_into_dataclasses()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    gasloc = gasloc_args.to_plugin()  # GASLoC: --gasloc_* flags, else ACCELERATE_GASLOC_* env vars
    tokenizer = AutoTokenizer.from_pretrained(HERE / "data" / "tokenizer")
    raw = load_text_dataset(
        train_file=str(HERE / "data" / "pydocs_train.parquet"),
        validation_file=str(HERE / "data" / "pydocs_validation.parquet"),
    )
    with accelerator.main_process_first():
        blocks = pack_into_blocks(raw, tokenizer, block_size=128).with_format("torch")
    # Each worker reads its own shard of the data (that is what makes them differ).
    train = blocks["train"].shard(accelerator.num_processes, accelerator.process_index)
    loader = DataLoader(train, batch_size=8, shuffle=True, collate_fn=default_data_collator)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(HERE / "configs" / "tiny-llama"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    engine = gasloc.attach(accelerator, model, optimizer)  # GASLoC: no more gradient All-Reduce

    step = 0
    while step < args.steps:
        for batch in loader:
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step % 10 == 0:
                accelerator.print(f"step {step}: local loss {loss.item():.3f}", engine.metrics())
            if step == args.steps:
                break

    unwrapped = accelerator.unwrap_model(model)
    with engine.consensus_model():  # GASLoC: evaluate and save the workers' average
        eval_loss = evaluate(unwrapped, blocks["validation"])
        if accelerator.is_main_process:
            unwrapped.save_pretrained(args.output_dir)
    accelerator.print(f"{accelerator.num_processes} workers, GASLoC totals: {engine.metrics()}")
    accelerator.print(f"consensus eval loss {eval_loss:.3f}, perplexity {math.exp(eval_loss):.1f}")
    accelerator.wait_for_everyone()
    dist.destroy_process_group()


@torch.no_grad()
def evaluate(model: torch.nn.Module, blocks) -> float:
    model.eval()
    losses = [model(**batch).loss.item() for batch in DataLoader(blocks, batch_size=16)]
    model.train()
    return sum(losses) / len(losses)


if __name__ == "__main__":
    main()
