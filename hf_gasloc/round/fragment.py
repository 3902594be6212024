"""A fragment: a slice of the model (whole layers; the whole model unless ``fragments > 1``) with
its own anchors, outer rule, wire and exchange, taken through one round in two phases.

One round on worker ``i`` (``docs/guide/algorithm.md``)::

    start   propose       z = a - eta (a - x)                  flat buffers, fp32
            check         is z finite? (``health.py``); consensus distance when asked
            encode        z -> messages in the wire format (zeros if z is not finite)
            post          header + messages to the round's live peers (complete: collectives)
    finish  wait          for the peers, up to peer_timeout (pings past it)
            combine       z_hat = z + sum_j W[i, j] (z_j - z) over healthy messages
            outer_update  G = (a - z_hat) / eta, outer rule step on a
            install       x <- a, plus the progress made since the start when delayed

``start`` returns the round in flight (``Posted``); ``finish`` lands it and
returns what it cost (``FragmentReport``). ``finish`` runs right after
``start`` (``outer_delay = 0``) or ``outer_delay`` inner steps later, the
exchange travelling meanwhile (``scheduler.py``). A checkpoint in between
settles the round (waits and combines) and saves it as such.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..config import GASLoCConfig
from ..fabric import Comm, LostPeers, WorkerGroups
from ..schedule.graphs import RoundGraph
from ..schedule.local_steps import LocalStepsPolicy
from ..state.flat import FlatModel, views_of
from ..wire import ExchangeStats, GossipExchange, InTransit, make_wire
from .consensus import consensus_spread
from .health import Health, squared_norm
from .outer import OuterRule, build_outer_rule

TINY = torch.finfo(torch.float32).tiny

@dataclass(frozen=True)
class RoundPlan:
    """What the engine hands a fragment when its round starts."""

    index: int
    graph: RoundGraph
    inner_steps: int  # the worker's inner steps in this round so far
    inner_step: int = 0  # and over the run


@dataclass(frozen=True)
class FragmentReport:
    """What one fragment's round cost and measured."""

    stats: ExchangeStats
    peer_distance: float | None = None
    spread: tuple[float, float] | None = None  # consensus: (sum ||z_i - z_bar||^2 / n, ||z_bar||^2)
    math_seconds: float = 0.0
    encode_seconds: float = 0.0


@dataclass
class Posted:
    """A fragment's round between its start and its finish."""

    plan: RoundPlan
    eta: float
    healthy: bool
    norm: float = 0.0  # ||z||^2
    transit: InTransit | None = None  # None: no live peer, the worker sits the round out
    peers: dict[int, float] = field(default_factory=dict)  # the round's live peers
    spread: tuple[float, float] | None = None
    math_seconds: float = 0.0
    settled: FragmentReport | None = None  # waited for and combined, not yet applied


@dataclass(frozen=True)
class Worker:
    """What the fragments of one worker share."""

    comm: Comm
    health: Health
    lost: LostPeers
    local_steps: LocalStepsPolicy
    groups: WorkerGroups | None = None  # a worker of several processes


class Fragment:
    """One slice of the model through its rounds; owns its anchors, outer rule, wire and the
    snapshot a delayed round keeps."""

    def __init__(self, flat: FlatModel, worker: Worker, config: GASLoCConfig, synchronous: bool,
                 channel: int = 0):
        self.flat, self.worker = flat, worker
        self.outer: OuterRule = self.outer_rule(config)
        device = worker.comm.staging_device(flat.device)
        self.wire = make_wire(flat, device, config.payload, config.payload_form, synchronous)
        self.exchange = GossipExchange(self.wire, worker.comm, device, channel)
        self.consensus_every = config.consensus_every
        # Delayed: x at the start, to keep the progress made while the exchange travels.
        self.snapshots = ([torch.empty_like(w) for w in flat.works] if config.outer_delay
                          else None)
        self.snapshot_views = (None if self.snapshots is None else
                               [views_of(s, g.params) for s, g in zip(self.snapshots, flat.groups)])
        self.posted: Posted | None = None  # the round in flight

    def outer_rule(self, config: GASLoCConfig) -> OuterRule:
        """A fresh outer rule with ``config``'s outer settings, stepping this fragment's anchors."""
        return build_outer_rule(config.outer_optimizer, config.outer_lr, config.outer_momentum,
                                self.flat.anchors)

    # ------------------------------------------------------------------ start
    @torch.no_grad()
    def start(self, plan: RoundPlan) -> Posted:
        began = time.perf_counter()
        eta = self.outer.eta
        self._propose(eta)
        posted = Posted(plan, eta, healthy=True)
        self._check(posted)
        self.wire.encode(posted.healthy, eta)
        self._post(posted)
        posted.math_seconds += time.perf_counter() - began
        self.posted = posted
        return posted

    def _propose(self, eta: float) -> None:
        """``z = a - eta (a - x)``: exactly ``x`` when ``eta = 1``. fp32 parameters beside
        their buffers are read once, straight into the ``lerp``."""
        for b, g in enumerate(self.flat.groups):
            if self.snapshots is not None:
                torch._foreach_copy_(self.snapshot_views[b], g.params)
            if g.dtype == torch.float32 and g.params[0].device == g.work.device:
                for anchor, param, work in zip(g.anchor_views, g.params, g.work_views):
                    torch.lerp(anchor, param, eta, out=work)
            else:
                torch._foreach_copy_(g.work_views, g.params)
                torch.lerp(g.anchor, g.work, eta, out=g.work)

    def _check(self, posted: Posted) -> None:
        """Health (one ``dot`` per buffer, reused as the norm); the consensus distance when
        this round is one of every ``consensus_every``."""
        posted.norm = squared_norm(self.flat.works)
        posted.healthy = self.worker.health.proposal_is_healthy(
            posted.norm, posted.plan.index, posted.plan.inner_step)
        self.outer.observe_proposal(self.flat.works if posted.healthy else None)
        every = self.consensus_every
        if every and posted.plan.index % every == 0:
            posted.spread = consensus_spread(self.flat.works, self.worker.comm)

    def _post(self, posted: Posted) -> None:
        """Start the exchange: header and messages to the live peers (complete: collectives)."""
        if posted.plan.graph.all_reduce:
            posted.transit = self.exchange.post_all(posted.healthy)
            return
        worker = self.worker
        posted.peers = worker.lost.alive(posted.plan.graph.peers[worker.comm.rank])
        if posted.peers:  # else this worker sits the round out
            posted.transit = self.exchange.post(list(posted.peers), posted.plan.index,
                                                posted.healthy, list(worker.lost.flags),
                                                worker.local_steps.table())

    # ----------------------------------------------------------------- finish
    @torch.no_grad()
    def finish(self, posted: Posted) -> FragmentReport:
        """Land the round: wait and combine (unless settled), outer update, install."""
        report = self.settle(posted)
        began = time.perf_counter()
        for g in self.flat.groups:  # G = (a - z_hat) / eta; the work buffer is the anchors' .grad
            g.work.sub_(g.anchor).div_(-posted.eta)
        self.outer.step()
        self._install(posted)
        self.posted = None
        return FragmentReport(report.stats, report.peer_distance, report.spread,
                              report.math_seconds + time.perf_counter() - began,
                              report.encode_seconds)

    @torch.no_grad()
    def settle(self, posted: Posted) -> FragmentReport:
        """Wait for the peers and mix what arrived, once (a checkpoint may settle early)."""
        if posted.settled is None:
            stats, weights = self._wait(posted)
            began = time.perf_counter()
            distance = self._combine(posted, weights)
            math_seconds = posted.math_seconds + time.perf_counter() - began
            posted.settled = FragmentReport(stats, distance, posted.spread, math_seconds,
                                            self.wire.encode_seconds)
        return posted.settled

    def _wait(self, posted: Posted) -> tuple[ExchangeStats, dict[int, float]]:
        """Wait for the exchange; take the peers' news; return the healthy peers that answered
        (complete graph: the count of healthy workers, under key -1)."""
        if posted.transit is None:
            return ExchangeStats(), {}
        arrived = self.exchange.wait(posted.transit, posted.plan.index)
        if posted.plan.graph.all_reduce:
            return arrived.stats, {-1: arrived.count}
        worker, weights = self.worker, {}
        for peer, reason in arrived.failed.items():
            worker.lost.mark(peer, f"round {posted.plan.index}", reason)
        for peer, header in arrived.headers.items():
            if header.round_index != posted.plan.index:
                raise RuntimeError(
                    f"GASLoC rank {worker.comm.rank} in round {posted.plan.index} received rank "
                    f"{peer}'s message of round {header.round_index}: the workers' rounds are "
                    "out of step.")
            worker.lost.merge(header.lost, posted.plan.index)
            if header.table.numel():
                worker.local_steps.merge(header.table)
            if header.healthy:
                weights[peer] = posted.peers[peer]
        if worker.groups is not None:  # the processes of a worker decide alike
            weights = worker.groups.agree_on_peers(weights, worker.lost,
                                                   f"round {posted.plan.index}")
        worker.lost.check_not_isolated()
        return arrived.stats, weights

    def _combine(self, posted: Posted, weights: dict[int, float]) -> float | None:
        """``z_hat``; a worker with a non-finite ``z`` takes its healthy peers' average instead,
        or its own anchor when it has none. Returns the peer distance."""
        if posted.plan.graph.all_reduce:
            count = weights.get(-1, 0.0)
            if count:
                self.wire.average_all(count, posted.transit.gathered)
            else:
                self._keep_anchor()
            return None
        health, received = self.worker.health, self.exchange.received
        if posted.healthy:
            distances = self.wire.differences(received, list(weights))
            kept = health.finite_peers(distances, posted.plan.index)
            self.wire.mix({peer: weights[peer] for peer in kept})
            if not kept:
                return None
            return sum(distances[p] for p in kept) / len(kept) / max(posted.norm, TINY)
        norms = self.wire.values(received, list(weights))
        kept = health.finite_peers(norms, posted.plan.index)
        if kept:
            self.wire.average({peer: weights[peer] for peer in kept})
        else:
            self._keep_anchor()
        return None

    def _keep_anchor(self) -> None:
        """``z_hat = a``: no progress this round."""
        for g in self.flat.groups:
            g.work.copy_(g.anchor)

    def _install(self, posted: Posted) -> None:
        """``x <- a``; delayed: ``x <- a + (x - x_start)``, keeping the progress made meanwhile
        (not after a non-finite start: that progress is not finite either)."""
        if self.snapshots is None or not posted.healthy:
            self.flat.store_anchor()
            return
        for g, snapshot, views in zip(self.flat.groups, self.snapshots, self.snapshot_views):
            torch.sub(g.anchor, snapshot, out=snapshot)
            for param, change in zip(g.params, views):
                param.add_(change)

    # ------------------------------------------------------------- roll-back
    @torch.no_grad()
    def roll_back(self) -> None:
        """Live parameters back to the start of the round in flight, else to the anchor."""
        if self.posted is not None and self.snapshots is not None:
            for g, views in zip(self.flat.groups, self.snapshot_views):
                torch._foreach_copy_(g.params, views)
        else:
            self.flat.store_anchor()

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Anchors, outer rule and wire; a round in flight must be settled first."""
        state = {"anchors": self.flat.anchors, "outer": self.outer.state_dict(),
                 "wire": self.wire.state_dict(), "in_flight": None}
        posted = self.posted
        if posted is not None:
            report = posted.settled
            state["in_flight"] = {
                "index": posted.plan.index, "inner_steps": posted.plan.inner_steps,
                "inner_step": posted.plan.inner_step, "eta": posted.eta,
                "healthy": posted.healthy, "peer_distance": report.peer_distance,
                "spread": report.spread, "stats": dataclasses.asdict(report.stats),
                "works": [w.clone() for w in self.flat.works],
                "snapshots": [s.clone() for s in self.snapshots or []]}
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any],
                        graph_of: Callable[[int], RoundGraph]) -> Posted | None:
        """Restore what ``state_dict`` saved; returns the settled round in flight, if any."""
        for anchor, saved in zip(self.flat.anchors, state["anchors"], strict=True):
            anchor.copy_(saved)
        self.outer.load_state_dict(state["outer"])
        self.wire.load_state_dict(state["wire"])
        saved = state["in_flight"]
        self.posted = None
        if saved is None:
            return None
        for work, value in zip(self.flat.works, saved["works"], strict=True):
            work.copy_(value)
        for snapshot, value in zip(self.snapshots or [], saved["snapshots"], strict=True):
            snapshot.copy_(value)
        plan = RoundPlan(saved["index"], graph_of(saved["index"]), saved["inner_steps"],
                         saved["inner_step"])
        spread = None if saved["spread"] is None else tuple(saved["spread"])
        self.posted = Posted(plan, saved["eta"], saved["healthy"], settled=FragmentReport(
            ExchangeStats(**saved["stats"]), saved["peer_distance"], spread))
        return self.posted

    def reset(self) -> None:
        """A new worker: its anchor is its live parameters; nothing in flight, nothing owed."""
        self.flat.load_live()
        self.flat.set_anchor_from_work()
        self.wire.reset()
        self.posted = None
