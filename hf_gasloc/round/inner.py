"""The inner optimizer, seen from GASLoC: the real ``torch.optim`` object and a hook on its step."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch.utils.hooks import RemovableHandle


def innermost_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The real ``torch.optim`` optimizer under wrappers such as accelerate's."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class InnerStepHook:
    """Calls ``callback(seconds)`` after every real step of one inner optimizer at a time.

    The hook sits on the innermost ``torch.optim`` optimizer's ``step``: a step
    that AMP skips (inf/NaN gradients) never calls it, and gradient accumulation
    counts one step per optimizer step. ``seconds`` is the step's time, from the
    end of the previous callback (so without the outer step) to the end of this
    step; ``None`` when unknown (the first step, the step after ``pause``, or
    when the caller times its steps itself: ``timed_by_caller``).
    """

    def __init__(self, callback: Callable[[float | None], Any]):
        self._callback = callback
        self._handle: RemovableHandle | None = None
        self._last_end: float | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.timed_by_caller = False

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        if self._handle is not None:
            raise RuntimeError("GASLoC is already attached to an inner optimizer; detach() first.")
        self.optimizer = innermost_optimizer(optimizer)
        self._handle = self.optimizer.register_step_post_hook(self._after_step)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
            self.optimizer = None

    def pause(self) -> None:
        """Time elapsed until the next step is not step time (an idle step in lockstep)."""
        self._last_end = None

    def _after_step(self, *_: Any) -> None:
        ended = time.perf_counter()
        timed = self._last_end is not None and not self.timed_by_caller
        self._callback(ended - self._last_end if timed else None)
        self._last_end = time.perf_counter()
