"""GASLoC with its defaults against the alternatives already in a user's toolbox: accelerate's own
``LocalSGD`` class and DDP, in one raw Accelerate harness.

    python benchmarks/vs_localsgd.py                         # embedded sample; resumable
    python benchmarks/vs_localsgd.py --data shared           # ../shared/data/pydocs, when present

4 gloo ranks started here, each an ``Accelerator(cpu=True)`` process; the tiny
LLaMA of the README's default run (``examples/configs/tiny-llama``); AdamW lr
3e-3, weight decay 0.1, 5 % warm-up then cosine decay; 8 blocks of 64 tokens
per worker per step; one global data order (worker ``i`` of ``n`` takes the
``i``-th batch of each step); ``H = 10``; two budgets, 120 and 600 steps (12 and
60 rounds). Every method starts from the same initialisation; the score is the
validation loss of the consensus (the workers' mean) on 256 held-out blocks.

- ``DDP``: ``accelerator.prepare`` and nothing else;
- ``LocalSGD``: ``accelerate.local_sgd.LocalSGD(local_sgd_steps=H)``, as its docs use it;
- ``GASLoC <topology>``: ``GASLoCPlugin(topology=..., local_steps=H).attach(...)`` with every
  other setting left at its default;
- ``GASLoC <topology>, DiLoCo's 0.7 / 0.9``: DiLoCo's published outer setting, for reference.

Each finished run is a JSON line in ``--output``; a rerun skips it.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from common import command, machine, spawn, table
from hf_gasloc.round.outer_defaults import choose_outer
from training import (DATA_HELP, ROOT, TINY_LLAMA, DataOrder, cosine_with_warmup, evaluate,
                      new_model, prepare_data)

H = 10
BUDGETS = (120, 600)
WORKERS = 4
BATCH = 8


@dataclass(frozen=True)
class Method:
    name: str
    topology: str | None = None  # GASLoC only
    outer: tuple[float, float] | None = None  # (lr, momentum): Nesterov; None: the defaults


METHODS = (Method("DDP"), Method("LocalSGD"),
           Method("GASLoC complete", "complete"), Method("GASLoC 2peer", "2peer"),
           Method("GASLoC 1peer", "1peer"),
           Method("GASLoC complete, DiLoCo's 0.7 / 0.9", "complete", (0.7, 0.9)),
           Method("GASLoC 2peer, DiLoCo's 0.7 / 0.9", "2peer", (0.7, 0.9)))


def _train(rank: int, world_size: int, method: Method, cache: str, steps: int) -> dict:
    from accelerate import Accelerator
    from accelerate.local_sgd import LocalSGD

    from hf_gasloc import GASLoCPlugin

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == world_size, "accelerate must see every rank"
    data = torch.load(cache, weights_only=True)
    model = new_model(TINY_LLAMA, torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    schedule = cosine_with_warmup(optimizer, steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    order = DataOrder(data["train"], BATCH, rank, world_size)
    engine = None
    if method.topology is not None:
        outer = {} if method.outer is None else dict(
            outer_optimizer="nesterov" if method.outer[1] else "sgd", outer_lr=method.outer[0],
            outer_momentum=method.outer[1])
        engine = GASLoCPlugin(topology=method.topology, local_steps=H, **outer).attach(
            accelerator, model, optimizer, total_steps=steps)
    local_sgd = LocalSGD(accelerator, model, local_sgd_steps=H,
                         enabled=method.name == "LocalSGD")
    began = time.perf_counter()
    with local_sgd:
        for step in range(steps):
            batch = order.batch(step)
            accelerator.backward(model(input_ids=batch, labels=batch).loss)
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()
            local_sgd.step()
    seconds = time.perf_counter() - began
    unwrapped = accelerator.unwrap_model(model)
    if engine is not None:
        with engine.consensus_model():
            loss = evaluate(unwrapped, data["validation"][:256], rank, world_size)
        settings = engine.config.to_dict()
        outer = (settings["outer_optimizer"], settings["outer_lr"], settings["outer_momentum"])
    else:  # DDP's replicas are equal; LocalSGD averaged them on leaving its block
        loss = evaluate(unwrapped, data["validation"][:256], rank, world_size)
        outer = None
    return {"final_loss": loss, "seconds": seconds, "outer": outer}


def default_outer(steps: int) -> tuple:
    """What GASLoC picks, with nothing set, for ``H`` and this many steps."""
    chosen = choose_outer(None, None, None, H, steps // H)
    return chosen.optimizer, chosen.lr, chosen.momentum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="embedded", help=DATA_HELP)
    parser.add_argument("--output", default=None,
                        help="results file (default outputs/vs_localsgd_<data>.jsonl)")
    parser.add_argument("--outer", nargs="*", default=[], metavar="'LR MOMENTUM'",
                        help="more GASLoC points: outer Nesterov (outer SGD for momentum 0) at "
                             "these settings, on complete and 2peer")
    args = parser.parse_args()
    methods = list(METHODS)
    for point in args.outer:
        lr, momentum = map(float, point.split())
        methods += [Method(f"GASLoC {t}, outer {lr:g} / {momentum:g}", t, (lr, momentum))
                    for t in ("complete", "2peer")]
    cache = prepare_data(ROOT / "outputs" / "vs_localsgd", 64, args.data)
    output = Path(args.output or ROOT / "outputs" / f"vs_localsgd_{Path(args.data).name}.jsonl")
    output.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if output.exists():  # a run of the defaults counts only if the defaults have not changed
        done = {(r["method"]["name"], r["steps"]): r for r in map(json.loads,
                                                                   output.read_text().splitlines())
                if r["method"]["outer"] is not None or r["outer"] is None
                or list(r["outer"]) == list(default_outer(r["steps"]))}
    for steps in BUDGETS:
        for method in methods:
            if (method.name, steps) in done:
                continue
            result = spawn(_train, WORKERS, method, cache, steps, init=False)[0]
            record = {"method": asdict(method), "steps": steps, **result}
            done[(method.name, steps)] = record
            with output.open("a") as out:
                out.write(json.dumps(record) + "\n")
            print(f"{method.name}, {steps} steps: {result['final_loss']:.4f}", flush=True)
    rows = []
    for method in methods:
        cells = [done[(method.name, steps)] for steps in BUDGETS]
        vs = [c["final_loss"] / done[("LocalSGD", c["steps"])]["final_loss"] - 1 for c in cells]
        outer = cells[0]["outer"]
        rows.append([method.name, "-" if outer is None else f"{outer[0]} {outer[1]:g} / {outer[2]:g}"]
                    + [f"{c['final_loss']:.3f} ({v:+.1%})" for c, v in zip(cells, vs)]
                    + [f"{cells[-1]['seconds']:.0f}"])
    print(f"\nCommand: `{command()}`\nMachine: {machine()}\nData: {args.data}\n")
    print(table(["method", "outer (optimizer lr / momentum)",
                 *[f"{s} steps ({s // H} rounds): loss (vs LocalSGD)" for s in BUDGETS],
                 f"train s ({BUDGETS[-1]} steps)"], rows))


if __name__ == "__main__":
    main()
