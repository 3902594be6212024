"""GASLoC against its baselines on real text: DDP, DiLoCo, gossip AdamW, GASLoC topologies.

    python benchmarks/compare.py --grid all          # every grid below, 4 and 8 workers
    python benchmarks/compare.py --grid main --workers 4
    python benchmarks/compare.py --grid h_sweep --device cuda --model_config CONFIG_DIR

Every run trains the same tiny LLaMA (``examples/configs/tiny-llama``, 1.3M
parameters) from the same initialisation on the ``--data`` text (the results in docs/results used ``--data shared``) with the
same global data order and the same token budget (``--tokens``): with ``n``
workers each step consumes ``n`` batches, worker ``i`` taking the ``i``-th. The
inner optimizer is AdamW with warmup and cosine decay for every method. Every
``--eval_every`` steps the consensus model (the workers' average) is evaluated on
the validation split. Each finished run is a JSON file in ``--output_dir/runs``:
a rerun skips it, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from common import command, machine, spawn, table
from hf_gasloc.round.outer_defaults import choose_outer
from training import (
    ROOT,
    TINY_LLAMA,
    DataOrder,
    consensus_distance,
    cosine_with_warmup,
    evaluate,
    new_model,
    DATA_HELP,
    prepare_data,
)


@dataclass(frozen=True)
class Run:
    """One training run of the comparison."""

    method: str
    topology: str  # "none": DDP
    workers: int
    local_steps: int = 30
    outer_optimizer: str = "nesterov"
    outer_lr: float = 0.7
    outer_momentum: float | None = None
    payload: str = "native"
    payload_form: str = "auto"
    outer_delay: int = 0
    fragments: int = 1

    @property
    def key(self) -> str:
        momentum = "" if self.outer_momentum is None else f"-m{self.outer_momentum}"
        payload = "" if self.payload == "native" else f"-{self.payload}"
        form = "" if self.payload_form == "auto" else f"-{self.payload_form}"
        delay = "" if not self.outer_delay else f"-D{self.outer_delay}"
        fragments = "" if self.fragments == 1 else f"-F{self.fragments}"
        return (f"{self.method}-{self.topology}-n{self.workers}-H{self.local_steps}-"
                f"{self.outer_optimizer}-lr{self.outer_lr}{momentum}{payload}{form}{delay}"
                f"{fragments}")


def main_grid(workers: int) -> list[Run]:
    runs = [Run("DDP", "none", workers, 1),
            Run("DiLoCo", "complete", workers, 30),
            Run("gossip AdamW", "1peer", workers, 1, "sgd", 1.0)]
    for topology in ("1peer", "2peer", "ring", "exponential"):
        runs += [Run("GASLoC", topology, workers, h) for h in (1, 30)]
    return runs


def h_sweep(workers: int) -> list[Run]:
    return [Run(method, topology, workers, h)
            for method, topology in (("DiLoCo", "complete"), ("GASLoC", "2peer"))
            for h in (1, 5, 10, 30, 60)]


def outer_grid(workers: int) -> list[Run]:
    return [Run(method, topology, workers, 30, name, 0.7 if name != "sgd" else 1.0)
            for method, topology in (("DiLoCo", "complete"), ("GASLoC", "2peer"))
            for name in ("sgd", "sgdm", "nesterov")]


def lr_momentum_grid(workers: int) -> list[Run]:
    return [Run(method, topology, workers, 30, "nesterov", lr, momentum)
            for method, topology in (("DiLoCo", "complete"), ("GASLoC", "2peer"))
            for lr in (0.4, 0.7, 1.0) for momentum in (0.5, 0.7, 0.9)]


def h1_gentle(workers: int) -> list[Run]:
    """GASLoC at H = 1 with a gentler outer Nesterov (lr 1, momentum 0.5) than DiLoCo's."""
    return [Run("GASLoC", topology, workers, 1, "nesterov", 1.0, 0.5)
            for topology in ("1peer", "2peer", "ring", "exponential")]


def long_runs(workers: int) -> list[Run]:
    """The methods that matter, for a budget where rounds number in the hundreds."""
    return [Run("DDP", "none", workers, 1),
            Run("DiLoCo", "complete", workers, 30),
            Run("GASLoC", "2peer", workers, 30),
            Run("GASLoC", "1peer", workers, 30)]


def long_defaults(workers: int) -> list[Run]:
    """The long budget with the outer step the default rule picks there (H = 30, about 100
    rounds: Nesterov 0.7 / 0.5), beside plain averaging on the complete graph (accelerate's
    LocalSGD, exactly)."""
    chosen = choose_outer(None, None, None, 30, 97)
    default = (chosen.optimizer, chosen.lr, chosen.momentum)
    return [Run("LocalSGD", "complete", workers, 30, "sgd", 1.0),
            Run("DiLoCo", "complete", workers, 30, *default),
            Run("GASLoC", "2peer", workers, 30, *default)]


def codecs(workers: int) -> list[Run]:
    """Every payload at H = 30 and at H = 1 (gentle outer) for DiLoCo and GASLoC 2peer, and for
    sparse graphs both things a payload can carry (docs/guide/settings.md#payloads-what-travels)."""
    runs = []
    for payload in ("native", "bf16", "fp16", "int8"):
        runs += [Run("DiLoCo", "complete", workers, 30, payload=payload),
                 Run("GASLoC", "2peer", workers, 30, payload=payload),
                 Run("DiLoCo", "complete", workers, 1, "nesterov", 1.0, 0.5, payload=payload),
                 Run("GASLoC", "2peer", workers, 1, "nesterov", 1.0, 0.5, payload=payload)]
    for payload in ("bf16", "int8"):
        runs += [Run("GASLoC", "2peer", workers, 30, payload=payload,
                     payload_form="pseudo_gradient"),
                 Run("GASLoC", "2peer", workers, 1, "nesterov", 1.0, 0.5, payload=payload,
                     payload_form="pseudo_gradient")]
    return runs


def overlap(workers: int) -> list[Run]:
    """Delayed and streamed rounds at H = 30 against the blocking ones."""
    return [Run(method, topology, workers, 30, outer_delay=delay, fragments=fragments)
            for method, topology in (("DiLoCo", "complete"), ("GASLoC", "2peer"))
            for delay, fragments in ((0, 1), (1, 1), (5, 1), (15, 1), (0, 2), (0, 4))]


GRIDS = {"main": main_grid, "h_sweep": h_sweep, "outer": outer_grid,
         "lr_momentum": lr_momentum_grid, "h1_gentle": h1_gentle, "long": long_runs,
         "long_defaults": long_defaults,
         "codecs": codecs, "overlap": overlap}
# The sweeps run at the first worker count only; "main" runs at every count.
SWEEPS_AT_FIRST_COUNT = ("h_sweep", "outer", "lr_momentum", "h1_gentle", "long",
                         "long_defaults", "codecs", "overlap")


@dataclass(frozen=True)
class Settings:
    model_config: str
    tokens: int
    batch_size: int
    block_size: int
    learning_rate: float
    eval_every: int
    eval_blocks: int
    device: str
    data_cache: str


def _train(rank: int, world_size: int, run: Run, settings: Settings) -> dict:
    from hf_gasloc import GASLoC

    device = torch.device(f"cuda:{rank}" if settings.device == "cuda" else "cpu")
    data = torch.load(settings.data_cache)
    validation = data["validation"][: settings.eval_blocks]
    order = DataOrder(data["train"], settings.batch_size, rank, world_size)
    steps = settings.tokens // (world_size * settings.batch_size * settings.block_size)
    model = new_model(settings.model_config, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.1)
    schedule = cosine_with_warmup(optimizer, steps)
    engine = None
    if run.topology == "none":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        engine = GASLoC(model, optimizer, topology=run.topology, local_steps=run.local_steps,
                        outer_optimizer=run.outer_optimizer, outer_lr=run.outer_lr,
                        outer_momentum=run.outer_momentum, payload=run.payload,
                        payload_form=run.payload_form, outer_delay=run.outer_delay,
                        fragments=run.fragments)
    numel = sum(p.numel() for p in model.parameters())

    def consensus_evaluate() -> float:
        if engine is None:
            return evaluate(model.module, validation, rank, world_size)
        with engine.consensus_model():
            return evaluate(model, validation, rank, world_size)

    curve, eval_seconds, start = [], 0.0, time.perf_counter()
    for step in range(steps):
        batch = order.batch(step).to(device)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        if (step + 1) % settings.eval_every == 0 or step + 1 == steps:
            tick = time.perf_counter()
            curve.append((step + 1, consensus_evaluate()))
            eval_seconds += time.perf_counter() - tick
    wall = time.perf_counter() - start - eval_seconds
    distance = consensus_distance(model, world_size)
    if engine is None:  # gradient All-Reduce every step: a ring sends 2 (n-1)/n of the model
        bytes_sent = steps * 2 * (world_size - 1) * numel * 4 // world_size
    else:
        bytes_sent = engine.totals.bytes_sent
    return {"run": asdict(run), "key": run.key, "steps": steps, "curve": curve,
            "final_loss": curve[-1][1], "consensus_distance": distance,
            "bytes_sent_per_worker": bytes_sent, "train_seconds": wall,
            "tokens": steps * world_size * settings.batch_size * settings.block_size}


def _payload(run: dict) -> str:
    payload, form = run.get("payload", "native"), run.get("payload_form", "auto")
    text = payload if form == "auto" else f"{payload} ({form})"
    if run.get("outer_delay"):
        text += f", outer_delay {run['outer_delay']}"
    if run.get("fragments", 1) > 1:
        text += f", {run['fragments']} fragments"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", nargs="+", default=["all"], choices=[*GRIDS, "all"])
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--output_dir", default=str(ROOT / "outputs" / "compare"))
    parser.add_argument("--model_config", default=str(TINY_LLAMA))
    parser.add_argument("--tokens", type=int, default=600_000, help="token budget of every run")
    parser.add_argument("--batch_size", type=int, default=8, help="blocks per worker per step")
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--eval_every", type=int, default=25)
    parser.add_argument("--eval_blocks", type=int, default=256)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--data", default="embedded", help=DATA_HELP)
    args = parser.parse_args()

    output = Path(args.output_dir)
    (output / "runs").mkdir(parents=True, exist_ok=True)
    settings = Settings(args.model_config, args.tokens, args.batch_size, args.block_size,
                        args.learning_rate, args.eval_every, args.eval_blocks, args.device,
                        prepare_data(output, args.block_size, args.data))
    grids = list(GRIDS) if "all" in args.grid else args.grid
    runs: dict[str, Run] = {}
    for name in grids:
        counts = args.workers[:1] if name in SWEEPS_AT_FIRST_COUNT else args.workers
        for workers in counts:
            runs.update({run.key: run for run in GRIDS[name](workers)})
    done = {p.stem for p in (output / "runs").glob("*.json")}
    todo = [run for key, run in runs.items() if key not in done]
    print(f"{len(runs)} runs in {', '.join(grids)}; {len(runs) - len(todo)} already done")
    backend = "nccl" if args.device == "cuda" else "gloo"
    for run in tqdm(todo, desc="runs"):
        result = spawn(_train, run.workers, run, settings, backend=backend)[0]
        result["settings"] = {k: v for k, v in asdict(settings).items() if k != "data_cache"}
        (output / "runs" / f"{run.key}.json").write_text(json.dumps(result, indent=1))
        tqdm.write(f"{run.key}: final loss {result['final_loss']:.3f} "
                   f"in {result['train_seconds']:.0f}s")
    results = [json.loads((output / "runs" / f"{key}.json").read_text()) for key in runs]
    rows = [[r["run"]["method"], r["run"]["topology"], r["run"]["workers"],
             r["run"]["local_steps"], r["run"]["outer_optimizer"], r["run"]["outer_lr"],
             r["run"]["outer_momentum"] if r["run"]["outer_momentum"] is not None else "-",
             f"{r['final_loss']:.3f}", f"{r['consensus_distance']:.2e}",
             f"{r['bytes_sent_per_worker'] / 1e6:.0f}", f"{r['train_seconds']:.0f}",
             _payload(r["run"])]
            for r in results]
    summary = (f"Command: `{command()}`\nMachine: {machine()}\n\n" + table(
        ["method", "topology", "workers", "H", "outer", "outer lr", "momentum",
         "final val loss", "consensus dist.", "MB sent / worker", "train s", "payload"], rows))
    (output / "summary.md").write_text(summary + "\n")
    print(summary)


if __name__ == "__main__":
    main()
