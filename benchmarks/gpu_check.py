"""The CUDA path, checked and measured on one GPU in a few minutes (``gpu_check.sh``).

    bash benchmarks/gpu_check.sh                 # on a machine with a GPU (< 8 min on an H100)
    bash benchmarks/gpu_check.sh --dry_run       # the same steps on the CPU, tiny: does it start?

1. Exactness with CUDA parameters, 2 gloo ranks sharing GPU 0 (gloo stages the
   messages through the CPU): complete == DiLoCo, the mean anchor follows DiLoCo
   on 1peer, bf16 parameters with fp32 anchors, ``anchor_on_cpu``, an int8 payload,
   a delayed outer step. NCCL needs one device per rank: with one GPU its path
   stays untested (said in the table), with two or more it is run too.
2. The engine's cost for the 134M and 1B LLaMA configs (bf16 autocast, fp32
   master weights): inner-step time with the hook attached vs bare, the outer
   step's time, with and without ``anchor_on_cpu``, and peak memory.
3. ``run_clm.py --recipe recipes/llama-134m-gasloc-2peer.yaml`` shrunk to a few
   dozen steps on the embedded data (one process per GPU: the inner training,
   which is what the recipes' hours depend on): tokens per second and peak
   memory; the same for 1B at the recipe's batch size, halved until it fits.

Prints a table and writes it to ``$OUT/gpu_check.md`` when ``OUT`` is set.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from common import machine, spawn, table
from training import ROOT

SMALL = "hidden_size=64,intermediate_size=128,num_hidden_layers=2,num_attention_heads=2," \
        "num_key_value_heads=2,head_dim=32,vocab_size=4096"


def _device(rank: int, dry_run: bool) -> torch.device:
    if dry_run:
        return torch.device("cpu")
    torch.cuda.set_device(0)  # both ranks share GPU 0
    return torch.device("cuda", 0)


def _exactness(rank, world_size, dry_run):
    from hf_gasloc import GASLoC

    device = _device(rank, dry_run)
    torch.manual_seed(0)

    def model(dtype=torch.float32):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(),
                                   torch.nn.Linear(16, 4)).to(device, dtype)

    def local_steps(net, inner, rounds_step):
        generator = torch.Generator().manual_seed(1000 * rank + rounds_step)
        x = torch.randn(8, 16, generator=generator).to(device, next(net.parameters()).dtype)
        net(x).pow(2).mean().backward()
        inner.step()
        inner.zero_grad()

    def flat(net):
        return torch.cat([p.detach().float().reshape(-1) for p in net.parameters()])

    def mean_of(tensor):
        out = tensor.clone().cpu()
        torch.distributed.all_reduce(out)
        return out.to(tensor.device) / world_size

    results = {}
    for name, settings in {
        "complete == DiLoCo (Nesterov)": dict(topology="complete"),
        "1peer: mean anchor == DiLoCo": dict(topology="1peer"),
        "bf16 params, fp32 anchors": dict(topology="complete", dtype=torch.bfloat16),
        "anchor_on_cpu": dict(topology="complete", anchor_on_cpu=True),
        "int8 payload: finite, rounds land": dict(topology="complete", payload="int8"),
        "outer_delay 1: finite, rounds land": dict(topology="1peer", outer_delay=1),
    }.items():
        dtype = settings.pop("dtype", torch.float32)
        net = model(dtype)
        inner = torch.optim.SGD(net.parameters(), lr=0.05)
        lives = []
        inner.register_step_post_hook(lambda *_: lives.append(flat(net)))  # before GASLoC's
        engine = GASLoC(net, inner, local_steps=2, outer_optimizer="nesterov", outer_lr=0.7,
                        outer_momentum=0.9, **settings)  # DiLoCo's, written out below
        anchor, momentum, worst = mean_of(flat(net)), torch.zeros_like(flat(net)), 0.0
        for round_index in range(3):
            start = flat(net)  # this rank's anchor: on 1peer, the mean of them follows DiLoCo
            for step in range(2):
                local_steps(net, inner, 2 * round_index + step)
            if settings.get("outer_delay") or settings.get("payload"):
                continue
            delta = mean_of(start - lives[-1])
            momentum = 0.9 * momentum + delta
            anchor = anchor - 0.7 * (delta + 0.9 * momentum)
            worst = max(worst, float((mean_of(flat(net)) - anchor).abs().max()))
        finite = bool(torch.isfinite(flat(net)).all())
        tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
        if settings.get("outer_delay") or settings.get("payload"):
            results[name] = "pass" if finite and engine.round >= 3 else f"FAIL (finite {finite})"
        else:
            results[name] = (f"pass (max error {worst:.1e})" if worst < tolerance and finite
                             else f"FAIL (max error {worst:.1e})")
    return results


def _engine_cost(rank, world_size, config_dir, dry_run, anchor_on_cpu):
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_gasloc import GASLoC

    device = _device(rank, dry_run)
    config = AutoConfig.from_pretrained(config_dir)
    if dry_run:
        config.update_from_string(SMALL)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(device)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(0, config.vocab_size, (1, 128 if dry_run else 512), device=device)

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        inner.step()
        inner.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    step()
    engine = GASLoC(model, None, topology="1peer", anchor_on_cpu=anchor_on_cpu,
                    local_steps=10 ** 9)
    bare = [step() for _ in range(3)]
    with engine.attached(inner):
        attached = [step() for _ in range(3)]
    engine.outer_step()
    outer = []
    for _ in range(2):
        start = time.perf_counter()
        engine.outer_step()
        outer.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    return {"bare": min(bare), "attached": min(attached), "outer": min(outer), "peak_gb": peak,
            "params": sum(p.numel() for p in model.parameters())}


def _run_clm(recipe: str, dry_run: bool, batch: int | None) -> dict:
    sys.path.insert(0, str(ROOT / "examples"))  # a script beside this one's
    import run_clm

    output = Path(os.environ.get("OUT", ROOT / "outputs")) / f"gpu_check_{Path(recipe).stem}"
    flags = ["--recipe", recipe, "--output_dir", str(output), "--local_workers", "0",
             "--train_file", str(ROOT / "examples/data/pydocs_train.parquet"),
             "--validation_file", str(ROOT / "examples/data/pydocs_validation.parquet"),
             "--streaming", "false", "--max_steps", "6" if dry_run else "30",
             "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none",
             "--logging_steps", "10", "--max_eval_samples", "8", "--auto_resume", "false"]
    if dry_run:
        flags += ["--recipe_smoke_test"]
    if batch is not None:
        flags += ["--per_device_train_batch_size", str(batch)]
    arguments = run_clm.parse_arguments(flags)
    data_args, training_args = arguments.data, arguments.training
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = run_clm.run(arguments)
    runtime = next(h["train_runtime"] for h in trainer.state.log_history if "train_runtime" in h)
    tokens = (trainer.state.global_step * training_args.per_device_train_batch_size
              * training_args.gradient_accumulation_steps * (data_args.block_size or 1024))
    peak = (torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available()
            else float("nan"))
    return {"tokens_per_second": tokens / runtime, "peak_gb": peak,
            "batch": training_args.per_device_train_batch_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry_run", action="store_true", help="tiny, on the CPU")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no GPU here: run with --dry_run to check that the script starts.")
    rows, started = [], time.perf_counter()

    def check(name, job):
        began = time.perf_counter()
        try:
            result = job()
        except Exception:  # noqa: BLE001 - one failing part must not hide the others
            result = "FAIL: " + traceback.format_exc().strip().splitlines()[-1][:150]
        rows.append([name, result, f"{time.perf_counter() - began:.0f}"])
        print(rows[-1], flush=True)

    for name, result in spawn(_exactness, 2, args.dry_run)[0].items():
        rows.append([f"exactness, gloo, 2 ranks on one {'CPU' if args.dry_run else 'GPU'}: {name}",
                     result, ""])
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    rows.append(["exactness, NCCL", "untested: NCCL needs one GPU per rank" if gpus < 2 else
                 "run tests/test_invariants.py with backend nccl (2+ GPUs)", ""])
    for size in ("134m", "1b"):
        config = ROOT / "recipes" / "models" / f"llama-{size}"
        for on_cpu in (False, True):
            def cost(config=config, on_cpu=on_cpu):
                r = spawn(_engine_cost, 2, str(config), args.dry_run, on_cpu)[0]
                return (f"{r['params'] / 1e6:.0f}M params: step {r['bare'] * 1000:.1f} ms bare, "
                        f"{r['attached'] * 1000:.1f} ms hooked; outer step "
                        f"{r['outer'] * 1000:.0f} ms; peak {r['peak_gb']:.1f} GB")
            check(f"engine cost, {size}, bf16 autocast{', anchor_on_cpu' if on_cpu else ''}", cost)
    for size, batch in (("134m", None), ("1b", None)):
        recipe = str(ROOT / "recipes" / f"llama-{size}-gasloc-2peer.yaml")

        def throughput(recipe=recipe, batch=batch):
            while True:
                try:
                    r = _run_clm(recipe, args.dry_run, batch)
                    break
                except torch.cuda.OutOfMemoryError:
                    batch = max(1, (batch or 32) // 2)
                    torch.cuda.empty_cache()
            return (f"{r['tokens_per_second']:,.0f} tokens/s per GPU at batch {r['batch']}; "
                    f"peak {r['peak_gb']:.1f} GB")
        check(f"run_clm --recipe llama-{size}-gasloc-2peer, shrunk", throughput)
    card = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(0)
    text = (f"GPU check on {card}; {machine()}; {time.perf_counter() - started:.0f} s\n\n"
            + table(["check", "result", "s"], rows))
    print("\n" + text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
