"""The GASLoC outer step: anchor, pseudo-gradient, proposal, gossip, outer optimizer.

One round on worker ``i`` (``../shared/design/ALGORITHM.md``):
``z_i = a_i - eta (a_i - x_i)``, ``z_hat_i = sum_j W[i, j] z_j``,
``G_i = (a_i - z_hat_i) / eta``, outer optimizer step on ``a_i`` with ``G_i``,
then ``x_i <- a_i``. All outer math is fp32 on flat buffers, one per
(dtype, device) group of parameters; only two fp32 model copies are kept (the
anchor and a work buffer that holds ``x``, then ``z``, then ``G``), plus the
outer optimizer's state.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist

from .adaptive import AdaptiveLocalSteps, Auto
from .agreement import check_ranks_agree
from .comm import GossipExchange, all_reduce_mean_, communication_device
from .config import GASLoCConfig
from .metrics import RoundMetrics, Totals, as_log
from .outer_optimizer import build_outer_optimizer
from .topology import build_topology


@dataclasses.dataclass
class _FlatGroup:
    """Parameters of one dtype and device, with their fp32 anchor and work buffer."""

    params: list[torch.Tensor]
    anchor: torch.Tensor
    work: torch.Tensor

    def __post_init__(self) -> None:
        self.anchor_views = _views(self.anchor, self.params)
        self.work_views = _views(self.work, self.params)

    def load_live(self) -> None:
        """``work <- x`` (the live parameters, in fp32)."""
        torch._foreach_copy_(self.work_views, self.params)

    def store_live(self, views: list[torch.Tensor]) -> None:
        torch._foreach_copy_(self.params, views)


def _views(flat: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    views, offset = [], 0
    for p in params:
        views.append(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return views


def _trainable_parameters(model: torch.nn.Module | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    params = model.parameters() if isinstance(model, torch.nn.Module) else model
    unique: dict[int, torch.Tensor] = {}
    for p in params:
        if p.requires_grad:
            unique.setdefault(id(p), p)
    if not unique:
        raise ValueError("GASLoC found no trainable parameters (requires_grad=True) to average.")
    return list(unique.values())


def innermost_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The real ``torch.optim`` optimizer under wrappers such as accelerate's."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class GASLoC:
    """The GASLoC outer loop around any inner optimizer.

    ``GASLoC(model, inner_optimizer, config)`` (or keyword settings) hooks the
    inner optimizer's ``step``: every real step counts (gradient accumulation
    and skipped AMP steps included), and after ``H_i`` of them the outer step
    runs. Construction is collective: every rank checks that all ranks have the
    same settings, then takes rank 0's parameters as the common starting anchor.
    """

    def __init__(
        self,
        model: torch.nn.Module | Iterable[torch.Tensor],
        inner_optimizer: torch.optim.Optimizer | None = None,
        config: GASLoCConfig | None = None,
        *,
        process_group: dist.ProcessGroup | None = None,
        **settings: Any,
    ):
        if config is None:
            config = GASLoCConfig(**settings)
        elif settings:
            config = dataclasses.replace(config, **settings)
        if not config.enabled:
            raise ValueError("topology 'none' is plain DDP: do not attach a GASLoC engine.")
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "GASLoC needs torch.distributed initialised with at least 2 ranks; launch with "
                "`torchrun --nproc_per_node N` or `accelerate launch` (num_processes >= 2)."
            )
        self.config = config
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self.topology = build_topology(
            config.topology, self.world_size, config.seed, config.gossip_weight
        )
        self.local_steps = config.local_steps_for(self.rank, self.world_size)
        auto = config.local_steps if isinstance(config.local_steps, Auto) else None
        adapts = auto is not None and config.topology != "complete"
        self.adaptive = AdaptiveLocalSteps(auto.target, self.rank, self.world_size) if adapts else None
        self._last_step_end: float | None = None
        self._groups = self._allocate(_trainable_parameters(model))
        check_ranks_agree(self._settings_to_agree_on(), process_group)
        self._broadcast_from_rank0()
        for group in self._groups:
            group.anchor.copy_(group.work)
            group.anchor.grad = group.work
        self.outer_optimizer = build_outer_optimizer(
            config.outer_optimizer,
            config.outer_lr,
            config.outer_momentum,
            [g.anchor for g in self._groups],
        )
        param_device = self._groups[0].params[0].device
        self._exchange = GossipExchange(
            [g.work for g in self._groups],
            [g.params[0].dtype for g in self._groups],
            process_group,
            communication_device(process_group, param_device),
        )
        self.round = 0
        self.steps_in_round = 0
        self.last_round: RoundMetrics | None = None
        self.totals = Totals()
        self._hook = None
        if inner_optimizer is not None:
            self._hook = innermost_optimizer(inner_optimizer).register_step_post_hook(
                self._after_inner_step
            )

    # ------------------------------------------------------------------ setup
    def _allocate(self, params: list[torch.Tensor]) -> list[_FlatGroup]:
        by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for p in params:
            by_kind.setdefault((p.dtype, p.device), []).append(p)
        groups = []
        for (_, device), members in by_kind.items():
            numel = sum(p.numel() for p in members)
            where = torch.device("cpu") if self.config.anchor_on_cpu else device
            anchor = torch.empty(numel, dtype=torch.float32, device=where)
            groups.append(_FlatGroup(members, anchor, torch.empty_like(anchor)))
        return groups

    def _settings_to_agree_on(self) -> dict[str, Any]:
        settings = self.config.to_dict()
        # H_i may differ per rank on purpose, but the list (or rule) must be the same.
        settings["local_steps (all ranks)"] = settings.pop("local_steps")
        settings["world_size"] = self.world_size
        settings["graphs of the first rounds"] = self.topology.fingerprint()
        settings["parameters (dtype, numel)"] = [
            (str(g.params[0].dtype), g.anchor.numel()) for g in self._groups
        ]
        return settings

    @torch.no_grad()
    def _broadcast_from_rank0(self) -> None:
        source = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        for group in self._groups:
            group.load_live()
            device = communication_device(self.group, group.work.device)
            staged = group.work.to(device)
            dist.broadcast(staged, src=source, group=self.group)
            group.work.copy_(staged)
            group.store_live(group.work_views)

    # ------------------------------------------------------------- the round
    def _after_inner_step(self, *_: Any) -> None:
        now = time.perf_counter()
        if self.adaptive is not None and self._last_step_end is not None:
            self.adaptive.observe_step(now - self._last_step_end)
        self.steps_in_round += 1
        if self.steps_in_round >= self.local_steps:
            self.outer_step()
            now = time.perf_counter()  # the next step's time excludes the outer step
        self._last_step_end = now

    @property
    def outer_lr(self) -> float:
        """``eta``: the outer optimizer's current learning rate."""
        return float(self.outer_optimizer.param_groups[0]["lr"])

    @torch.no_grad()
    def outer_step(self) -> RoundMetrics:
        """Run one GASLoC round now (normally called by the inner-optimizer hook)."""
        start = time.perf_counter()
        eta = self.outer_lr
        works = [g.work for g in self._groups]
        for g in self._groups:
            g.load_live()
            torch.lerp(g.anchor, g.work, eta, out=g.work)  # z = a - eta (a - x); x when eta = 1
        every = self.config.consensus_every
        consensus = self._consensus_distance(works) if every and self.round % every == 0 else None
        graph = self.topology.graph(self.round)
        wait = None
        if self.adaptive is not None:
            wait, tables = self._exchange.ready_(self.adaptive.table(), graph)
            for table in tables:
                self.adaptive.merge(table)
        stats = self._exchange.mix_(graph)
        for g in self._groups:
            g.work.sub_(g.anchor).div_(-eta)  # G = (a - z_hat) / eta
        self.outer_optimizer.step()
        for g in self._groups:
            g.store_live(g.anchor_views)  # x <- a
        metrics = RoundMetrics(
            round=self.round,
            local_steps=self.steps_in_round,
            bytes_sent=stats.bytes_sent,
            comm_seconds=stats.seconds,
            outer_step_seconds=time.perf_counter() - start,
            peer_distance=stats.peer_distance,
            consensus_distance=consensus,
            wait_seconds=wait,
        )
        self.totals.add(metrics)
        self.last_round = metrics
        self.round += 1
        self.steps_in_round = 0
        if self.adaptive is not None:
            if graph.peers[self.rank]:  # a worker sitting the round out measured nothing
                self.adaptive.observe_transfer(metrics.round, stats.seconds)
            peers = list(self.topology.graph(self.round).peers[self.rank])
            self.local_steps = self.adaptive.local_steps(peers)
        return metrics

    def _consensus_distance(self, proposals: list[torch.Tensor]) -> float:
        """Exact ``mean_i ||z_i - z_bar||^2 / ||z_bar||^2`` (one model-sized All-Reduce)."""
        means = [z.clone() for z in proposals]
        all_reduce_mean_(means, self.group)
        spread = sum(float(torch.dist(z, m) ** 2) for z, m in zip(proposals, means))
        norm = sum(float(torch.dot(m, m)) for m in means)
        total = torch.tensor([spread], dtype=torch.float64)
        all_reduce_mean_([total], self.group)
        return float(total) / max(norm, torch.finfo(torch.float32).tiny)

    def metrics(self, prefix: str = "gasloc/") -> dict[str, float]:
        """The last round's metrics and the run's totals, flat, for a logger."""
        return as_log(self.last_round, self.totals, prefix)

    # ------------------------------------------------ consensus for eval/save
    @torch.no_grad()
    def _average_live_into_work(self) -> None:
        for g in self._groups:
            g.load_live()
        all_reduce_mean_([g.work for g in self._groups], self.group)

    @torch.no_grad()
    def swap_in_consensus(self) -> list[list[torch.Tensor]]:
        """Put the average of all workers' parameters into the model (collective).

        Returns this rank's own parameters, for ``restore_parameters``.
        """
        backup = [[p.detach().clone() for p in g.params] for g in self._groups]
        self._average_live_into_work()
        for g in self._groups:
            g.store_live(g.work_views)
        return backup

    @torch.no_grad()
    def restore_parameters(self, backup: list[list[torch.Tensor]]) -> None:
        """Give this rank back the parameters ``swap_in_consensus`` returned, bit for bit."""
        for g, own in zip(self._groups, backup, strict=True):
            g.store_live(own)

    @contextmanager
    def consensus_model(self) -> Iterator[None]:
        """Evaluate or save the workers' average inside this block (every rank must enter it).

        Inside, every rank holds the same consensus model (evaluate it, or
        ``save_pretrained`` on rank 0); on exit each rank gets its own
        parameters back.
        """
        backup = self.swap_in_consensus()
        try:
            yield
        finally:
            self.restore_parameters(backup)

    @torch.no_grad()
    def install_consensus(self) -> None:
        """Replace parameters and anchors on every rank by their average (collective).

        The round in progress is dropped; outer optimizer state is kept.
        """
        self._average_live_into_work()
        for g in self._groups:
            g.store_live(g.work_views)
            g.anchor.copy_(g.work)
        self.steps_in_round = 0

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """This rank's GASLoC state (each rank saves its own)."""
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "topology": self.config.topology,
            "seed": self.config.seed,
            "local_steps": self.local_steps,
            "round": self.round,
            "steps_in_round": self.steps_in_round,
            "anchors": [g.anchor for g in self._groups],
            "outer_optimizer": self.outer_optimizer.state_dict(),
            "totals": dataclasses.asdict(self.totals),
            "adaptive": None if self.adaptive is None else self.adaptive.state_dict(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` saved on this same rank of the same run."""
        expected = {
            "rank": self.rank,
            "world_size": self.world_size,
            "topology": self.config.topology,
            "seed": self.config.seed,
        }
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(
                    f"cannot resume GASLoC state: it was saved with {key}={state.get(key)!r} "
                    f"but this run has {key}={value!r}. Resume with the same launch settings."
                )
        for g, anchor in zip(self._groups, state["anchors"], strict=True):
            g.anchor.copy_(anchor)
        self.outer_optimizer.load_state_dict(state["outer_optimizer"])
        self.round = state["round"]
        self.steps_in_round = state["steps_in_round"]
        self.totals = Totals(**state["totals"])
        self.local_steps = state["local_steps"]
        if self.adaptive is not None and state.get("adaptive") is not None:
            self.adaptive.load_state_dict(state["adaptive"])

    def detach(self) -> None:
        """Stop counting inner steps; the model keeps its current parameters."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
