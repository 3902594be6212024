"""The outer optimizer: its names and checks, and the rule built on each fragment's anchors.

``sgd``, ``sgdm`` and ``nesterov`` are ``torch.optim.SGD`` without momentum, with
heavy-ball momentum and with Nesterov momentum. ``iterate_momentum`` is the
paper's accelerated form as transcribed publicly: momentum on the proposals
rather than on the anchor (``IterateMomentum``; ``docs/guide/algorithm.md``
relates it to ours and to DiLoCo). A ``torch.optim`` class or factory (``params
-> Optimizer``), or an instance whose class and hyper-parameters are reused, also
works. What an unset name, lr or momentum becomes: ``outer_defaults.py``.
"""

from __future__ import annotations

from typing import Any, Callable, Union

import torch

from ..values import number, positive_float

OUTER_OPTIMIZERS = ("sgd", "sgdm", "nesterov", "iterate_momentum")
OUTER_OPTIMIZER_HELP = (
    "outer optimizer: sgd, sgdm, nesterov, iterate_momentum (the paper's form: momentum on "
    "the proposals), a torch.optim class/factory, or an instance (its class and "
    "hyper-parameters are reused on the fp32 anchors); unset: chosen from H "
    "(hf_gasloc/round/outer_defaults.py)"
)
OUTER_LR_HELP = "outer learning rate eta; unset: chosen from H (hf_gasloc/round/outer_defaults.py)"
OUTER_MOMENTUM_HELP = ("outer momentum mu, in [0, 1); unset: chosen from H and the optimizer "
                       "(hf_gasloc/round/outer_defaults.py)")

OuterOptimizer = Union[str, Callable[..., torch.optim.Optimizer], torch.optim.Optimizer]


def check_outer_settings(spec: OuterOptimizer | None, lr: Any, momentum: Any
                         ) -> tuple[OuterOptimizer | None, float | None, float | None]:
    """Check the outer settings the user gave (``None``: left to the defaults) and normalise
    them: a known name, a finite ``lr > 0``, a momentum in ``[0, 1)`` that fits the name."""
    if lr is not None:
        lr = positive_float("outer_lr", lr)
    if momentum is not None:
        momentum = number("outer_momentum", momentum)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"outer_momentum must be in [0, 1), got {momentum} "
                             "(--gasloc_outer_momentum).")
    if spec is None:
        return None, lr, momentum
    if not isinstance(spec, str):
        if momentum is not None or lr is not None:
            raise ValueError(
                "outer_lr / outer_momentum are set, but outer_optimizer is a torch.optim object: "
                "put them in that optimizer and leave outer_lr and outer_momentum unset."
            )
        return spec, None, None
    name = spec.strip().lower()
    if name not in OUTER_OPTIMIZERS:
        raise ValueError(
            f"unknown outer_optimizer {name!r} (--gasloc_outer_optimizer): choose one of "
            f"{', '.join(OUTER_OPTIMIZERS)}, or pass a torch.optim optimizer."
        )
    if name == "sgd" and momentum:
        raise ValueError(
            f"outer_optimizer 'sgd' has no momentum but outer_momentum={momentum}: "
            "use outer_optimizer 'sgdm' or 'nesterov', or set outer_momentum 0."
        )
    if name in ("sgdm", "nesterov") and momentum == 0.0:
        raise ValueError(
            f"outer_optimizer {name!r} needs outer_momentum > 0: set a momentum "
            "or use outer_optimizer 'sgd'."
        )
    return name, lr, momentum


def describe_outer_optimizer(spec: OuterOptimizer) -> Any:
    """A plain value for logs and for comparing settings across ranks."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, torch.optim.Optimizer):
        hyper = {k: v for k, v in spec.param_groups[0].items() if k != "params"}
        return {"class": type(spec).__qualname__, **{k: repr(v) for k, v in hyper.items()}}
    return repr(spec)


class OuterRule:
    """The outer step of one fragment: a ``torch.optim`` optimizer on its fp32 anchors, which
    finds the outer gradient ``G = (a - z_hat) / eta`` in their ``.grad``."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    @property
    def eta(self) -> float:
        """The outer learning rate of the coming round (a schedule may change it)."""
        return float(self.optimizer.param_groups[0]["lr"])

    def observe_proposal(self, proposals: list[torch.Tensor] | None) -> None:
        """The round's proposal ``z`` (``None``: not finite); a rule on the anchor ignores it."""

    def step(self) -> None:
        self.optimizer.step()

    def set_hyperparameters(self, lr: float | None, momentum: float | None) -> None:
        """Use the run's own lr and momentum (after a state with others was loaded)."""
        for group in self.optimizer.param_groups:
            if lr is not None:
                group["lr"] = lr
            if momentum is not None and "momentum" in group:
                group["momentum"] = momentum

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def state_tensors(self) -> list[torch.Tensor]:
        """The floating-point state tensors (momentum buffers), in a fixed order."""
        return [value for state in self.optimizer.state.values() for value in state.values()
                if torch.is_tensor(value) and value.is_floating_point()]


class ProposalMomentumRule(OuterRule):
    """``iterate_momentum``: the rule keeps its momentum on the proposals it observes."""

    optimizer: "IterateMomentum"

    def observe_proposal(self, proposals: list[torch.Tensor] | None) -> None:
        self.optimizer.observe_proposal(proposals)


def build_outer_rule(spec: OuterOptimizer, lr: float, momentum: float | None,
                     anchors: list[torch.Tensor]) -> OuterRule:
    """The rule that steps ``anchors`` with the outer gradient in their ``.grad``."""
    if spec == "iterate_momentum":
        return ProposalMomentumRule(IterateMomentum(anchors, lr=lr, momentum=momentum))
    return OuterRule(_torch_optimizer(spec, lr, momentum, anchors))


def _torch_optimizer(spec: OuterOptimizer, lr: float, momentum: float | None,
                     anchors: list[torch.Tensor]) -> torch.optim.Optimizer:
    if isinstance(spec, str):
        # foreach: Nesterov adds the momentum into the gradient in place; the default on CPU
        # makes a model-sized temporary every round (same values, measured: docs/results/engine_costs.md).
        return torch.optim.SGD(
            anchors, lr=lr, momentum=momentum or 0.0, nesterov=spec == "nesterov", foreach=True
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


class IterateMomentum(torch.optim.Optimizer):
    """``theta_{t+1} = W y_t + gamma (y_t - y_{t-1})``, ``y_t = theta_t + eta (x_t - theta_t)``.

    ``y_t`` is the round's proposal ``z_t`` (given by ``observe_proposal``, or
    ``None`` when it was not finite) and ``W y_t`` the mixed ``z_hat``, read back
    from the outer gradient ``G = (a - z_hat) / eta`` in the anchor's ``.grad``.
    With ``gamma = 0`` it is outer SGD at lr ``eta``, bit for bit; without local
    progress (``x = theta``) it is heavy-ball momentum ``gamma`` on the anchor.
    """

    def __init__(self, params, lr: float, momentum: float):
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def observe_proposal(self, proposals: list[torch.Tensor] | None) -> None:
        params = [p for group in self.param_groups for p in group["params"]]
        for p, z in zip(params, proposals or [None] * len(params), strict=True):
            state = self.state[p]
            if z is None:
                state.pop("current", None)
            elif "current" in state:
                state["current"].copy_(z)
            else:
                state["current"] = z.clone()

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(p.grad, alpha=-group["lr"])  # z_hat
                state = self.state[p]
                current, previous = state.get("current"), state.get("previous")
                if group["momentum"] and current is not None and previous is not None:
                    p.add_(current - previous, alpha=group["momentum"])
                if current is None:
                    state.pop("previous", None)
                elif previous is None:
                    state["previous"] = current.clone()
                else:
                    previous.copy_(current)


@torch.no_grad()
def average_outer_states(rules: list[OuterRule], comm, contribute: bool) -> None:
    """Collective: the workers that do not ``contribute`` (new ones) take the mean of the
    others' outer state tensors (their momentum), which keep their own."""
    tensors = [t for rule in rules for t in rule.state_tensors()]
    sums = [t.clone() if contribute else torch.zeros_like(t) for t in tensors]
    count = torch.tensor([float(contribute)], dtype=torch.float64)
    comm.all_reduce_sum_(sums + [count])
    if not contribute:
        for value, total in zip(tensors, sums):
            value.copy_(total / count.item())
