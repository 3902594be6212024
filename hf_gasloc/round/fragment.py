"""The outer step as a pipeline of named stages, one job each.

One round of one fragment on worker ``i`` (``docs/algorithm.md``)::

    start   propose       z = a - eta (a - x)                  flat buffers, fp32
            check         is z finite? (health); consensus distance when asked
            encode        z -> messages in the wire format (zeros if z is not finite)
            post          header + messages to the round's live peers (complete: collectives)
    finish  wait          for the peers, up to peer_timeout (pings past it)
            combine       z_hat = z + sum_j W[i, j] (z_j - z) over healthy messages
            outer_update  G = (a - z_hat) / eta, outer optimizer step on a
            install       x <- a, plus the progress made since the start when delayed

``finish`` runs right after ``start`` (``outer_delay = 0``) or ``outer_delay``
inner steps later, the exchange travelling meanwhile. A new capability is a new
stage or a new object behind one stage; the others do not change.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .consensus import consensus_spread
from .exchange import ExchangeStats, GossipExchange
from .flat import FlatModel, views_of
from .health import Health, squared_norm
from .local_steps import LocalStepsPolicy
from .peers import LostPeers, header_tensor, read_header
from .topology import RoundGraph
from .wires import Wire


@dataclass
class Round:
    """What one round's stages hand each other (for one fragment)."""

    index: int
    graph: RoundGraph
    eta: float
    inner_steps: int
    inner_step: int = 0  # this worker's inner steps so far, for messages
    healthy: bool = True
    norm: float = 0.0  # ||z||^2
    posted: Any = None  # what the exchange is waiting for
    header: torch.Tensor | None = None
    peers: dict[int, float] = field(default_factory=dict)  # the live peers of the round
    weights: dict[int, float] = field(default_factory=dict)  # healthy peers that answered
    count: float = 0.0  # complete graph: healthy workers
    settled: bool = False  # waited for and combined
    stats: ExchangeStats = field(default_factory=ExchangeStats)
    peer_distance: float | None = None
    spread: tuple[float, float] | None = None  # consensus: (sum ||z_i - z_bar||^2 / n, ||z_bar||^2)
    math_seconds: float = 0.0
    encode_seconds: float = 0.0


class OuterStep:
    """Runs the stages of one fragment's rounds."""

    def __init__(self, flat: FlatModel, wire: Wire, exchange: GossipExchange,
                 outer_optimizer: torch.optim.Optimizer, local_steps: LocalStepsPolicy,
                 lost: LostPeers, health: Health, recover: Callable[[], None],
                 consensus_every: int, delayed: bool):
        self.flat = flat
        self.wire = wire
        self.gossip = exchange
        self.outer_optimizer = outer_optimizer
        self.local_steps_policy = local_steps
        self.lost = lost
        self.health = health
        self.recover = recover
        self.consensus_every = consensus_every
        # Delayed: x at the start, to keep the progress made while the exchange travels.
        self.snapshots = [torch.empty_like(w) for w in flat.works] if delayed else None
        self.snapshot_views = (None if self.snapshots is None else
                               [views_of(s, g.params) for s, g in zip(self.snapshots, flat.groups)])

    # ---------------------------------------------------------------- start
    @torch.no_grad()
    def start(self, round_: Round) -> None:
        began = time.perf_counter()
        self.propose(round_)
        self.check(round_)
        self.encode(round_)
        self.post(round_)
        round_.math_seconds += time.perf_counter() - began

    def propose(self, round_: Round) -> None:
        """``z = a - eta (a - x)``: exactly ``x`` when ``eta = 1``. fp32 parameters beside
        their buffers are read once, straight into the ``lerp``."""
        for b, g in enumerate(self.flat.groups):
            if self.snapshots is not None:
                torch._foreach_copy_(self.snapshot_views[b], g.params)
            if g.dtype == torch.float32 and g.params[0].device == g.work.device:
                for anchor, param, work in zip(g.anchor_views, g.params, g.work_views):
                    torch.lerp(anchor, param, round_.eta, out=work)
            else:
                torch._foreach_copy_(g.work_views, g.params)
                torch.lerp(g.anchor, g.work, round_.eta, out=g.work)

    def check(self, round_: Round) -> None:
        """Health: is the proposal finite? (one ``dot`` per buffer, reused as the norm)."""
        round_.norm = squared_norm(self.flat.works)
        round_.healthy = math.isfinite(round_.norm)
        observe = getattr(self.outer_optimizer, "observe_proposal", None)
        if observe is not None:  # the paper's form keeps its momentum on the proposals
            observe(self.flat.works if round_.healthy else None)
        if not round_.healthy:
            self.health.unhealthy_round(round_.index, round_.inner_step,
                                        "it takes its healthy peers' proposals for this round")
            self.recover()
        every = self.consensus_every
        if every and round_.index % every == 0:
            round_.spread = consensus_spread(self.flat.works, self.gossip.comm)

    def encode(self, round_: Round) -> None:
        """The wire's messages (native dtype, or a codec with error feedback)."""
        self.wire.encode(round_.healthy, round_.eta)

    def post(self, round_: Round) -> None:
        """Start the exchange: header and messages to the live peers (complete: collectives)."""
        if round_.graph.all_reduce:
            round_.posted = self.gossip.post_all(round_.healthy, self.wire)
            return
        round_.peers = self.lost.alive(round_.graph.peers[self.gossip.comm.rank])
        if round_.peers:  # else this worker sits the round out
            round_.header = header_tensor(round_.index, round_.healthy, self.lost,
                                          self.local_steps_policy.table())
            round_.posted = self.gossip.post(list(round_.peers), round_.header)

    # ---------------------------------------------------------------- finish
    @torch.no_grad()
    def finish(self, round_: Round) -> None:
        self.settle(round_)
        began = time.perf_counter()
        self.outer_update(round_)
        self.install(round_)
        round_.math_seconds += time.perf_counter() - began

    def settle(self, round_: Round) -> None:
        """Wait for the peers and mix what arrived (once; a checkpoint may settle early)."""
        if not round_.settled:
            self.wait(round_)
            began = time.perf_counter()
            self.combine(round_)
            round_.math_seconds += time.perf_counter() - began
            round_.encode_seconds = self.wire.encode_seconds
            round_.settled = True

    def wait(self, round_: Round) -> None:
        if round_.graph.all_reduce:
            round_.count, round_.stats = self.gossip.wait_all(round_.posted, self.wire,
                                                              round_.index)
            return
        if not round_.peers:
            return
        arrived = self.gossip.wait(round_.posted, round_.header)
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
                round_.weights[peer] = round_.peers[peer]
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
        """``x <- a``; delayed: ``x <- a + (x - x_start)``, keeping the progress made meanwhile
        (not after a non-finite start: that progress is not finite either)."""
        if self.snapshots is None or not round_.healthy:
            self.flat.store_anchor()
            return
        for g, snapshot, views in zip(self.flat.groups, self.snapshots, self.snapshot_views):
            torch.sub(g.anchor, snapshot, out=snapshot)
            for param, change in zip(g.params, views):
                param.add_(change)
