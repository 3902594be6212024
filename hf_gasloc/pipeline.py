"""The outer step as a pipeline of named stages, one job each.

One round on worker ``i`` (``docs/algorithm.md``)::

    propose       z = a - eta (a - x)                    flat buffers, fp32
    check         is z finite? (health); consensus distance when asked
    encode        z -> messages in the wire format (zeros if z is not finite)
    exchange      header + messages with the round's live peers (complete: All-Reduce)
    combine       decode, z_hat = z + sum_j W[i, j] (z_j - z) over healthy messages
    outer_update  G = (a - z_hat) / eta, outer optimizer step on a
    install       x <- a

A new capability is a new stage or a new object behind one stage; the others
do not change.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .consensus import consensus_distance
from .exchange import ExchangeStats, GossipExchange
from .flat import FlatModel
from .health import Health, squared_norm
from .local_steps import LocalStepsPolicy
from .wires import Wire
from .metrics import RoundMetrics
from .peers import LostPeers, header_tensor, read_header
from .topology import RoundGraph


@dataclass
class Round:
    """What one round's stages hand each other."""

    index: int
    graph: RoundGraph
    eta: float
    inner_steps: int
    inner_step: int = 0  # this worker's inner steps so far, for messages
    started: float = field(default_factory=time.perf_counter)
    healthy: bool = True
    norm: float = 0.0  # ||z||^2
    weights: dict[int, float] = field(default_factory=dict)  # healthy peers that answered
    count: float = 0.0  # complete graph: healthy workers
    stats: ExchangeStats = field(default_factory=ExchangeStats)
    peer_distance: float | None = None
    consensus_distance: float | None = None


class OuterStep:
    """Runs the stages of one round in order and reports its metrics."""

    def __init__(self, flat: FlatModel, wire: Wire, exchange: GossipExchange,
                 outer_optimizer: torch.optim.Optimizer, local_steps: LocalStepsPolicy,
                 lost: LostPeers, health: Health, reset_inner_state: Callable[[], None],
                 consensus_every: int):
        self.flat = flat
        self.wire = wire
        self.gossip = exchange
        self.outer_optimizer = outer_optimizer
        self.local_steps_policy = local_steps
        self.lost = lost
        self.health = health
        self.reset_inner_state = reset_inner_state
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
            wait_seconds=stats.wait_seconds,
            encode_seconds=self.wire.encode_seconds,
        )

    def propose(self, round_: Round) -> None:
        """``z = a - eta (a - x)``: exactly ``x`` when ``eta = 1``."""
        self.flat.load_live()
        for g in self.flat.groups:
            torch.lerp(g.anchor, g.work, round_.eta, out=g.work)

    def check(self, round_: Round) -> None:
        """Health: is the proposal finite? (one ``dot`` per buffer, reused as the norm)."""
        round_.norm = squared_norm(self.flat.works)
        round_.healthy = math.isfinite(round_.norm)
        if round_.healthy:
            self.health.healthy_round()
        else:
            self.health.unhealthy_round(round_.index, round_.inner_step,
                                        "it takes its healthy peers' proposals for this round")
            self.reset_inner_state()
        every = self.consensus_every
        if every and round_.index % every == 0:
            round_.consensus_distance = consensus_distance(self.flat.works, self.gossip.comm)

    def encode(self, round_: Round) -> None:
        """The wire's messages (native dtype, or a codec with error feedback)."""
        self.wire.encode(round_.healthy, round_.eta)

    def exchange(self, round_: Round) -> None:
        """Swap header and messages with the round's live peers (complete: All-Reduce)."""
        if round_.graph.all_reduce:
            round_.count, waited = self.gossip.health_count(round_.healthy, round_.index)
            round_.stats = self.wire.exchange_all(round_.index)
            round_.stats.wait_seconds = waited
            return
        peers = self.lost.alive(round_.graph.peers[self.gossip.comm.rank])
        if not peers:  # this worker sits the round out
            return
        header = header_tensor(round_.index, round_.healthy, self.lost,
                               self.local_steps_policy.table())
        pending = self.gossip.post(list(peers), header)
        arrived = self.gossip.wait(pending, header)
        for peer, reason in arrived.failed.items():
            self.lost.mark(peer, f"round {round_.index}", reason)
        for peer, received in arrived.headers.items():
            index, healthy, lost, table = read_header(received, len(self.lost.flags))
            if index != round_.index:
                raise RuntimeError(
                    f"GASLoC rank {self.gossip.comm.rank} in round {round_.index} received rank "
                    f"{peer}'s message of round {index}: the workers' rounds are out of step.")
            self.lost.merge(lost, round_.index)
            if table.numel():
                self.local_steps_policy.merge(table)
            if healthy:
                round_.weights[peer] = peers[peer]
        round_.stats = arrived.stats
        self.lost.check_not_isolated()

    def combine(self, round_: Round) -> None:
        """``z_hat``; a worker with a non-finite ``z`` takes its healthy peers' average instead,
        or its own anchor when it has none."""
        received = self.gossip.received
        if round_.graph.all_reduce:
            if round_.count:
                self.wire.average_all(round_.count, round_.eta)
            else:
                self._roll_back()
        elif round_.healthy:
            round_.peer_distance, _ = self.wire.combine(received, round_.weights, round_.norm,
                                                        round_.index)
        elif not self.wire.take_average(received, round_.weights):
            self._roll_back()

    def _roll_back(self) -> None:
        """``z_hat = a``: no progress this round."""
        for g in self.flat.groups:
            g.work.copy_(g.anchor)

    def outer_update(self, round_: Round) -> None:
        """``G = (a - z_hat) / eta`` in the anchors' ``.grad``, then the outer optimizer's step."""
        for g in self.flat.groups:
            g.work.sub_(g.anchor).div_(-round_.eta)  # work is the anchors' .grad
        self.outer_optimizer.step()

    def install(self, round_: Round) -> None:
        self.flat.store_anchor()
