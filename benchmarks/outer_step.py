"""Time one GASLoC outer step, its bytes per rank, and the inner-step overhead of the hook.

    python benchmarks/outer_step.py                       # 1M, 10M, 100M params; 2 and 4 ranks
    python benchmarks/outer_step.py --sizes 1 --ranks 2   # a quick look
    python benchmarks/outer_step.py --sizes 100 --ranks 2 --topologies 1peer --anchor_on_cpu

Models are stacks of 1M-parameter fp32 matrices (the engine sees only numel and
tensor count). Each figure is the median over ``--repeats`` rounds started
together on all ranks (rank 0's clock): the whole outer step as the training
loop sees it, the exchange (waiting for the peers and the transfer, from the
round's metrics), and the math (the rest: every memory pass over the model).
The overhead part alternates bare and attached blocks of inner steps on a
4-layer MLP so drift hits both equally.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import command, machine, median_ms, spawn, table, timed
from hf_gasloc import GASLoC

MATRIX = 1000  # 1000 x 1000 = 1M parameters per tensor


def _outer_step(rank, world_size, millions, topology, repeats, anchor_on_cpu):
    params = [torch.nn.Parameter(torch.randn(MATRIX, MATRIX)) for _ in range(millions)]
    engine = GASLoC(params, None, topology=topology, anchor_on_cpu=anchor_on_cpu)
    engine.outer_step()  # warm-up: first contact, buffer allocation
    exchange = []

    def one_round() -> None:
        metrics = engine.outer_step()
        exchange.append(metrics.comm_seconds + (metrics.wait_seconds or 0.0))

    times = timed(one_round, repeats)
    return {"ms": median_ms(times), "comm_ms": median_ms(exchange),
            "math_ms": median_ms([t - e for t, e in zip(times, exchange)]),
            "bytes": engine.last_round.bytes_sent}


def _inner_overhead(rank, world_size, steps, blocks):
    torch.manual_seed(0)
    width = 1024
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(4)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = torch.randn(64, width)

    def run_block() -> float:
        start = time.perf_counter()
        for _ in range(steps):
            model(data).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        return (time.perf_counter() - start) / steps

    run_block()  # warm-up
    engine = GASLoC(model, None, topology="1peer", local_steps=10**9)
    bare, attached = [], []
    for _ in range(blocks):
        bare.append(run_block())
        with engine.attached(optimizer):
            attached.append(run_block())
    return {"bare_ms": median_ms(bare), "attached_ms": median_ms(attached)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100],
                        help="model sizes in millions of parameters")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--topologies", nargs="+", default=["1peer", "2peer", "complete"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--overhead_steps", type=int, default=20)
    parser.add_argument("--overhead_blocks", type=int, default=15)
    parser.add_argument("--anchor_on_cpu", action="store_true")
    parser.add_argument("--skip_overhead", action="store_true")
    args = parser.parse_args()

    rows = []
    for world_size in args.ranks:
        for millions in args.sizes:
            for topology in args.topologies:
                result = spawn(_outer_step, world_size, millions, topology, args.repeats,
                               args.anchor_on_cpu)[0]
                rows.append([f"{millions}M", world_size, topology, f"{result['ms']:.1f}",
                             f"{result['comm_ms']:.1f}", f"{result['math_ms']:.1f}",
                             f"{result['bytes'] / 1e6:.1f}"])
                print(rows[-1], flush=True)
    print(f"\nCommand: `{command()}`\nMachine: {machine()}\n")
    print("One outer step (exchange + outer optimizer + copies), fp32, rank 0, median:\n")
    print(table(["params", "ranks", "topology", "outer step ms", "exchange ms", "math ms",
                 "MB sent per rank"], rows))
    if args.skip_overhead:
        return
    overhead = spawn(_inner_overhead, 2, args.overhead_steps, args.overhead_blocks)
    print("\nInner-step time, hook attached vs. bare loop (4x1024x1024 MLP, AdamW, 2 ranks):\n")
    overhead_rows = []
    for rank, result in enumerate(overhead):
        slowdown = 100 * (result["attached_ms"] / result["bare_ms"] - 1)
        overhead_rows.append([rank, f"{result['bare_ms']:.2f}", f"{result['attached_ms']:.2f}",
                              f"{slowdown:+.2f} %"])
    print(table(["rank", "bare ms/step", "attached ms/step", "slowdown"], overhead_rows))


if __name__ == "__main__":
    main()
