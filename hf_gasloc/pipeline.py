"""The outer step as a pipeline of named stages, one job each.

One round on worker ``i`` (``docs/algorithm.md``)::

    propose       z = a - eta (a - x)                    flat buffers, fp32
    check         probes of the proposal (consensus distance when asked)
    encode        z -> messages in the wire format
    exchange      swap messages with the round's peers (complete: All-Reduce)
    combine       decode, z_hat = sum_j W[i, j] z_j
    outer_update  G = (a - z_hat) / eta, outer optimizer step on a
    install       x <- a

A new capability is a new stage or a new object behind one stage; the others
do not change.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .consensus import consensus_distance
from .exchange import ExchangeStats, GossipExchange
from .flat import FlatModel
from .local_steps import LocalStepsPolicy
from .metrics import RoundMetrics
from .topology import RoundGraph


@dataclass
class Round:
    """What one round's stages hand each other."""

    index: int
    graph: RoundGraph
    eta: float
    inner_steps: int
    started: float = field(default_factory=time.perf_counter)
    messages: list[torch.Tensor] = field(default_factory=list)
    stats: ExchangeStats | None = None
    peer_distance: float | None = None
    consensus_distance: float | None = None
    wait_seconds: float | None = None


class OuterStep:
    """Runs the stages of one round in order and reports its metrics."""

    def __init__(self, flat: FlatModel, exchange: GossipExchange,
                 outer_optimizer: torch.optim.Optimizer, local_steps: LocalStepsPolicy,
                 consensus_every: int):
        self.flat = flat
        self.gossip = exchange
        self.outer_optimizer = outer_optimizer
        self.local_steps_policy = local_steps
        self.consensus_every = consensus_every

    @torch.no_grad()
    def run(self, round_: Round) -> RoundMetrics:
        for stage in (self.propose, self.check, self.encode, self.exchange, self.combine,
                      self.outer_update, self.install):
            stage(round_)
        stats = round_.stats
        return RoundMetrics(
            round=round_.index,
            inner_steps=round_.inner_steps,
            bytes_sent=stats.bytes_sent,
            comm_seconds=stats.seconds,
            outer_step_seconds=time.perf_counter() - round_.started,
            peer_distance=round_.peer_distance,
            consensus_distance=round_.consensus_distance,
            wait_seconds=round_.wait_seconds,
        )

    def propose(self, round_: Round) -> None:
        """``z = a - eta (a - x)``: exactly ``x`` when ``eta = 1``."""
        self.flat.load_live()
        for g in self.flat.groups:
            torch.lerp(g.anchor, g.work, round_.eta, out=g.work)

    def check(self, round_: Round) -> None:
        every = self.consensus_every
        if every and round_.index % every == 0:
            round_.consensus_distance = consensus_distance(self.flat.works, self.gossip.comm)

    def encode(self, round_: Round) -> None:
        round_.messages = self.gossip.encode()

    def exchange(self, round_: Round) -> None:
        """Swap messages with the round's peers; an adaptive ``H_i`` first swaps link tables."""
        table = self.local_steps_policy.table()
        if table is not None:
            start = time.perf_counter()
            for received in self.gossip.swap_small(table, round_.graph):
                self.local_steps_policy.merge(received)
            round_.wait_seconds = time.perf_counter() - start
        round_.stats = self.gossip.exchange(round_.graph, round_.messages)

    def combine(self, round_: Round) -> None:
        round_.peer_distance = self.gossip.combine(round_.graph, round_.messages)

    def outer_update(self, round_: Round) -> None:
        """``G = (a - z_hat) / eta`` in the anchors' ``.grad``, then the outer optimizer's step."""
        for g in self.flat.groups:
            g.work.sub_(g.anchor).div_(-round_.eta)  # work is the anchors' .grad
        self.outer_optimizer.step()

    def install(self, round_: Round) -> None:
        self.flat.store_anchor()
