"""The same 8 processes as 8 workers of 1, 4 of 2 and 2 of 4: DDP inside a worker, GASLoC between.

    python benchmarks/worker_size.py                  # embedded sample
    python benchmarks/worker_size.py --data shared    # ../shared/data/pydocs, when present

8 gloo ranks started here; every configuration trains the byte-level tiny GPT
of ``tiny_gpt.py`` on the same tokens (4 blocks of 64 bytes per process per
step, one global data order), AdamW lr 4e-3 with warm-up and cosine decay,
``H = 10``, ``2peer`` with the default outer settings, for ``--steps`` steps.
A worker of ``S`` processes averages its gradients over them every step (DDP
inside the worker) and gossips between workers, each process with its
counterpart. The score is the validation loss of the consensus; "bytes per
worker" is what a worker's processes sent to other workers, summed; the time
is the slowest rank's wall time (8 processes share this machine's cores, so
only the relative times mean anything here).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn.parallel import DistributedDataParallel

from common import command, machine, spawn, table
from tiny_gpt import new_tiny_gpt
from training import DATA_HELP, ROOT, DataOrder, cosine_with_warmup, evaluate, prepare_data

PROCESSES, H, BATCH = 8, 10, 4


def _train(rank: int, world_size: int, worker_size: int, cache: str, steps: int) -> dict:
    from hf_gasloc import GASLoC
    from hf_gasloc.integrations.ddp import disable_gradient_sync

    data = torch.load(cache, weights_only=True)
    model = new_tiny_gpt(0, vocab=256)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=0.1)
    schedule = cosine_with_warmup(optimizer, steps)
    engine = GASLoC(model, optimizer, topology="2peer", local_steps=H, worker_size=worker_size,
                    total_steps=steps)
    disable_gradient_sync(ddp, None if engine.groups is None else engine.groups.inside)
    order = DataOrder(data["train"], BATCH, rank, world_size)
    began = time.perf_counter()
    for step in range(steps):
        ddp(input_ids=order.batch(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
    seconds = time.perf_counter() - began
    with engine.consensus_model():
        loss = evaluate(model, data["validation"][:256], rank, world_size)
    return dict(loss=loss, bytes=engine.totals.bytes_sent, seconds=seconds,
                rounds=engine.totals.rounds, workers=engine.world_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="embedded", help=DATA_HELP)
    parser.add_argument("--steps", type=int, default=120)
    args = parser.parse_args()
    cache = prepare_data(ROOT / "outputs" / "worker_size", 64, args.data, "bytes")
    print(f"Command: `{command()}`\nMachine: {machine()}\n", flush=True)
    rows = []
    for worker_size in (1, 2, 4):
        results = spawn(_train, PROCESSES, worker_size, cache, args.steps)
        first = results[0]
        per_worker = sum(r["bytes"] for r in results) // first["workers"]
        rows.append([f"{first['workers']} x {worker_size}", first["rounds"], f"{first['loss']:.4f}",
                     f"{per_worker:,}", f"{max(r['seconds'] for r in results):.1f}"])
        print(rows[-1], flush=True)
    print(table(["workers x processes", "rounds", "consensus loss", "bytes sent per worker",
                 "wall seconds"], rows))


if __name__ == "__main__":
    main()
