"""Compare ways to average a flat buffer with a random peer (1peer rounds) on gloo.

    python benchmarks/exchange_options.py --megabytes 40 --ranks 2 4

Options: ``batch_isend_irecv`` (what ``hf_gasloc.fabric`` uses); All-Reduce on
pair groups built once and cached; a ``new_group`` built for each round's pairs.
Median wall time per round over ``--rounds`` rounds, rank 0's clock.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.distributed as dist

from common import command, machine, median_ms, spawn, table, timed
from hf_gasloc.schedule.topology import build_topology


def _peer(rank: int, graph) -> int | None:
    return next(iter(graph.peers[rank]), None)


def _p2p(buffer, received, rank, graph, _):
    peer = _peer(rank, graph)
    if peer is None:
        return
    ops = [dist.P2POp(dist.isend, buffer, peer), dist.P2POp(dist.irecv, received, peer)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    buffer.add_(received).div_(2)


def _cached_pair_group(buffer, received, rank, graph, groups):
    peer = _peer(rank, graph)
    if peer is not None:
        dist.all_reduce(buffer, group=groups[tuple(sorted((rank, peer)))])
        buffer.div_(2)


def _new_group_per_round(buffer, received, rank, graph, _):
    mine = None
    pairs = sorted({tuple(sorted((i, j))) for i, peers in enumerate(graph.peers) for j in peers})
    for pair in pairs:  # new_group is collective: every rank builds every pair, in order
        group = dist.new_group(list(pair))
        if rank in pair:
            mine = group
    if mine is not None:
        dist.all_reduce(buffer, group=mine)
        buffer.div_(2)


OPTIONS = {"batch_isend_irecv": _p2p, "cached pair groups": _cached_pair_group,
           "new_group per round": _new_group_per_round}


def _run(rank, world_size, megabytes, rounds):
    buffer = torch.randn(megabytes * 250_000)
    received = torch.empty_like(buffer)
    topology = build_topology("1peer", world_size, seed=0)
    groups = {pair: dist.new_group(list(pair))
              for pair in itertools.combinations(range(world_size), 2)}
    results = {}
    for name, option in OPTIONS.items():
        round_index = iter(range(10**9))

        def one_round() -> None:
            option(buffer, received, rank, topology.graph(next(round_index)), groups)

        one_round()  # warm-up
        results[name] = median_ms(timed(one_round, rounds))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=40)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    rows = []
    for world_size in args.ranks:
        result = spawn(_run, world_size, args.megabytes, args.rounds)[0]
        rows += [[world_size, name, f"{ms:.1f}"] for name, ms in result.items()]
    print(f"Command: `{command()}`\nMachine: {machine()}\n")
    print(f"Averaging {args.megabytes} MB with a random peer, median ms per round:\n")
    print(table(["ranks", "option", "ms per round"], rows))


if __name__ == "__main__":
    main()
