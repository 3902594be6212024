"""Build the outer optimizer that steps the fp32 anchors with the outer gradient."""

from __future__ import annotations

import torch

from .config import OuterOptimizer


def build_outer_optimizer(
    spec: OuterOptimizer, lr: float, momentum: float | None, anchors: list[torch.Tensor]
) -> torch.optim.Optimizer:
    """``spec`` is ``sgd``/``sgdm``/``nesterov``, a ``params -> Optimizer`` factory
    (a ``torch.optim`` class or a ``functools.partial`` of one), or an optimizer
    instance whose class and hyper-parameters are reused on ``anchors``."""
    if isinstance(spec, str):
        return torch.optim.SGD(
            anchors, lr=lr, momentum=momentum or 0.0, nesterov=spec == "nesterov"
        )
    if isinstance(spec, torch.optim.Optimizer):
        settings = [{k: v for k, v in g.items() if k != "params"} for g in spec.param_groups]
        if any(s != settings[0] for s in settings[1:]):
            raise ValueError(
                "outer_optimizer has several parameter groups with different settings; "
                "GASLoC steps one set of anchors, so pass a single-group optimizer or a "
                "factory such as functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9)."
            )
        return type(spec)(anchors, **settings[0])
    optimizer = spec(anchors)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"outer_optimizer factory returned {type(optimizer).__name__}, not a "
            "torch.optim.Optimizer."
        )
    return optimizer
