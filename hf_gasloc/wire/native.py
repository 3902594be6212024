"""``NativeWire``: each flat buffer travels in the parameters' own dtype (a bf16 model sends bf16
proposals); ``m_j`` is the peer's proposal ``z_j`` and ``m_i = z``, so a sparse round mixes
``z <- z + sum_j w_j (z_j - z)`` and the complete graph averages the proposals."""

from __future__ import annotations

import torch

from ..state.flat import FlatModel
from .mixing import Mixing


class NativeWire(Mixing):
    """The parameters' dtype on the wire, no encoding and no state."""

    collective = "all_reduce"  # the complete graph sums the messages in place
    encoding = "native"

    def __init__(self, flat: FlatModel, device: torch.device):
        super().__init__()
        self.flat = flat
        self._direct = [g.work.dtype == g.dtype and g.work.device == device for g in flat.groups]
        self.messages = [g.work if direct else torch.empty(g.work.numel(), dtype=g.dtype,
                                                           device=device)
                         for g, direct in zip(flat.groups, self._direct)]
        self._scratch: dict[tuple[int, int], torch.Tensor] = {}
        self.encode_seconds = 0.0

    def encode(self, healthy: bool, eta: float) -> None:
        for g, message, direct in zip(self.flat.groups, self.messages, self._direct):
            if not healthy:
                message.zero_()  # a non-finite proposal never leaves this worker
            elif not direct:
                message.copy_(g.work)

    def _value(self, b: int, slot: int, message: torch.Tensor) -> torch.Tensor:
        z = self.flat.groups[b].work
        if message.dtype == z.dtype and message.device == z.device:
            return message
        scratch = self._scratch.get((b, slot))
        if scratch is None:
            scratch = self._scratch[(b, slot)] = torch.empty_like(z)
        return scratch.copy_(message)

    def _own(self, b: int) -> torch.Tensor:
        return self.flat.groups[b].work

    def _base_into(self, b: int) -> None:
        self.flat.groups[b].work.zero_()

    def average_all(self, count: float, gathered: list[list[torch.Tensor]] | None) -> None:
        """Complete graph: ``z <- sum / count`` (the healthy workers' mean; the sum arrived in
        ``messages``)."""
        for g, message, direct in zip(self.flat.groups, self.messages, self._direct):
            if not direct:
                g.work.copy_(message)
            g.work.div_(count)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def reset(self) -> None:
        pass
