"""A worker of several processes: consecutive ranks form a worker, GASLoC runs between workers.

With ``worker_size`` S, ranks ``w S .. w S + S - 1`` are worker ``w`` and rank
``w S + p`` is at position ``p`` in it. Inside a worker the processes average
their gradients every step (DDP's All-Reduce on the ``inside`` group), so they
hold the same parameters. Between workers, each process gossips with the
processes at its own position in the other workers (the ``between`` group): S
identical GASLoC runs side by side, one per position. What a process decides
from the clock (a peer that did not answer in time, and is therefore lost) is
agreed on inside the worker, so that its processes stay identical: a peer
missing at any position is missing at every position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .comm import device_for, gather_json
from .membership import LostPeers


@dataclass(frozen=True)
class WorkerGroups:
    """This process's worker (``worker`` of ``workers``), its ``position`` in it, and the two
    process groups: ``inside`` the worker and ``between`` same-position processes."""

    size: int
    worker: int
    position: int
    workers: int
    inside: dist.ProcessGroup
    between: dist.ProcessGroup

    @classmethod
    def build(cls, size: int) -> WorkerGroups:
        """Every rank builds every group, in the same order (collective over the world)."""
        world, rank = dist.get_world_size(), dist.get_rank()
        inside = between = None
        for worker in range(world // size):
            group = dist.new_group(list(range(worker * size, (worker + 1) * size)))
            inside = group if rank // size == worker else inside
        for position in range(size):
            group = dist.new_group(list(range(position, world, size)))
            between = group if rank % size == position else between
        return cls(size, rank // size, rank % size, world // size, inside, between)

    def all_gather_json(self, value: Any) -> list[Any]:
        """Every process's ``value`` (JSON), over the whole run, in global rank order."""
        return gather_json(value, None, device_for(None))

    def first_position(self, value: Any) -> Any:
        """Position 0's ``value``, on every process of the worker (JSON)."""
        return gather_json(value, self.inside, device_for(self.inside))[0]

    def agree_on_peers(self, weights: dict[int, float], lost: LostPeers,
                       when: str) -> dict[int, float]:
        """The peers in ``weights`` whose messages every position of the worker received;
        a peer lost at any position is marked lost here too (collective inside the worker)."""
        present = torch.zeros(self.workers, dtype=torch.float64)
        present[list(weights)] = 1.0
        alive = 1.0 - torch.tensor(lost.flags, dtype=torch.float64)
        agreed = torch.cat([present, alive]).to(device_for(self.inside))
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=self.inside)
        agreed = agreed.cpu()
        for peer in range(self.workers):
            if agreed[self.workers + peer] == 0:
                lost.mark(peer, when, "another process of this worker lost it")
        return {peer: weight for peer, weight in weights.items() if agreed[peer] == 1}
