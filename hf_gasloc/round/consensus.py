"""The workers' average: swapped in for evaluation and saving, installed at the end, measured.

Every function here is collective: all ranks must call it together. The average
leaves out workers whose parameters are not finite (a tiny count All-Reduce
first); with no finite worker, or with a lost worker (the All-Reduce needs every
rank), it refuses with an error.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from ..errors import NonFiniteError, PeerLostError
from ..fabric import Comm, LostPeers
from ..state.flat import FlatModel
from .health import all_finite


class Consensus:
    """The average of all workers' live parameters, on every rank."""

    def __init__(self, flat: FlatModel, comm: Comm, lost: LostPeers, spare_buffers: bool):
        self.flat, self.comm, self.lost = flat, comm, lost
        # The work buffers are free between rounds when each round is settled at its last
        # step; when an exchange may be in flight in them (``spare_buffers``), the average
        # gets buffers of its own.
        self._buffers = [torch.empty_like(w) for w in flat.works] if spare_buffers else None

    @property
    def buffers(self) -> list[torch.Tensor]:
        return self.flat.works if self._buffers is None else self._buffers

    @torch.no_grad()
    def start_from_first_rank(self) -> None:
        """Every rank takes rank 0's parameters as its parameters and anchor."""
        self.flat.load_live()
        self.comm.broadcast_from_first_(self.flat.works)
        self.flat.store_work()
        self.flat.set_anchor_from_work()
        for g in self.flat.groups:
            g.anchor.grad = g.work  # the outer gradient is computed in the work buffer

    @torch.no_grad()
    def _average_live_into_work(self) -> None:
        """``work <- mean`` of the finite workers' live parameters."""
        if self.lost.lost:
            raise PeerLostError(
                f"GASLoC rank {self.comm.rank}: the consensus needs every worker, but "
                + ", ".join(self.lost.describe(r) for r in self.lost.lost)
                + " stopped answering. Save this worker's own model instead, or restart the "
                "job with the workers that are alive (docs/guide/reliability.md)."
            )
        self.flat.load_live(self._buffers)
        buffers = self.buffers
        finite = all_finite(buffers)
        if not finite:
            for buffer in buffers:
                buffer.zero_()
        count = torch.tensor([float(finite)], dtype=torch.float64)
        self.comm.all_reduce_sum_([count])
        if not count.item():
            raise NonFiniteError("GASLoC: every worker's parameters are non-finite; there is no "
                                 "consensus to evaluate or save.")
        self.comm.all_reduce_sum_(buffers)
        for buffer in buffers:
            buffer.div_(count.item())

    @torch.no_grad()
    def _store(self, into_anchor: bool = False) -> None:
        self.flat.store_work(self._buffers)
        if into_anchor:
            for anchor, buffer in zip(self.flat.anchors, self.buffers):
                anchor.copy_(buffer)

    def swap_in(self) -> list[list[torch.Tensor]]:
        """Put the average into the model; returns this rank's own parameters for ``restore``."""
        backup = self.flat.backup_live()
        self._average_live_into_work()
        self._store()
        return backup

    def restore(self, backup: list[list[torch.Tensor]]) -> None:
        """Give this rank back the parameters ``swap_in`` returned, bit for bit."""
        self.flat.restore_live(backup)

    @contextmanager
    def model(self) -> Iterator[None]:
        """Inside the block every rank holds the average; on exit, its own parameters again."""
        backup = self.swap_in()
        try:
            yield
        finally:
            self.restore(backup)

    @torch.no_grad()
    def install(self) -> None:
        """Replace parameters and anchors on every rank by the average."""
        self._average_live_into_work()
        self._store(into_anchor=True)


def consensus_spread(proposals: list[torch.Tensor], comm: Comm) -> tuple[float, float]:
    """``(mean_i ||z_i - z_bar||^2, ||z_bar||^2)`` (one model-sized All-Reduce); their ratio is
    the exact consensus distance."""
    means = [z.clone() for z in proposals]
    comm.all_reduce_mean_(means)
    spread = sum(float(torch.dist(z, m) ** 2) for z, m in zip(proposals, means))
    norm = sum(float(torch.dot(m, m)) for m in means)
    total = torch.tensor([spread], dtype=torch.float64)
    comm.all_reduce_mean_([total])
    return float(total), norm
