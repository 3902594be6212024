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


@torch.no_grad()
def reset_nonfinite_state(optimizer: torch.optim.Optimizer) -> int:
    """Start afresh the state of every parameter whose state holds a NaN or an inf.

    Its floating-point state tensors (AdamW's moments) are zeroed and its step
    count set to 0, as for a parameter the optimizer has not stepped yet.
    Returns how many parameters were reset.
    """
    reset = 0
    for state in innermost_optimizer(optimizer).state.values():
        tensors = [v for v in state.values() if torch.is_tensor(v) and v.is_floating_point()]
        if all(bool(torch.isfinite(t).all()) for t in tensors):
            continue
        for key, value in state.items():
            if torch.is_tensor(value) and value.is_floating_point():
                value.zero_()
            elif key == "step":
                state[key] = 0
        reset += 1
    return reset


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

    @property
    def attached(self) -> bool:
        return self._handle is not None

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
