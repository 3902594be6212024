"""The inner optimizer, seen from GASLoC: the real ``torch.optim`` object and a hook on its step."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.hooks import RemovableHandle


def innermost_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The real ``torch.optim`` optimizer under wrappers such as accelerate's."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class InnerStepHook:
    """Calls ``callback`` after every real step of one inner optimizer at a time.

    The hook sits on the innermost ``torch.optim`` optimizer's ``step``: a step
    that AMP skips (inf/NaN gradients) never calls it, and gradient accumulation
    counts one step per optimizer step.
    """

    def __init__(self, callback: Callable[..., Any]):
        self._callback = callback
        self._handle: RemovableHandle | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        if self._handle is not None:
            raise RuntimeError("GASLoC is already attached to an inner optimizer; detach() first.")
        self.optimizer = innermost_optimizer(optimizer)
        self._handle = self.optimizer.register_step_post_hook(self._callback)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
            self.optimizer = None
