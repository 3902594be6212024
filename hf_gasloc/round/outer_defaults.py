"""The outer optimizer's defaults: chosen from ``H`` by a measured rule; values the user sets win.

DiLoCo's published outer setting (Nesterov, lr 0.7, momentum 0.9) was tuned at
``H = 500`` on large models, over thousands of rounds. At the ``H`` of tens and
the budgets of tens of rounds that decentralized runs often have, it moves about
``0.7 / (1 - 0.9) = 7`` times the mean pseudo-gradient per round and overshoots:
measured, it loses to plain averaging (outer SGD, lr 1: accelerate's
``LocalSGD``) by 2 % to 35 %. ``benchmarks/outer_defaults.py`` measured a grid
(``docs/results/outer_defaults.md``); what it found is the rule:

- ``H`` up to ``PLAIN_UP_TO``: outer SGD, lr 1 (plain averaging: on the complete
  graph exactly ``LocalSGD``, at ``H = 1`` exactly gossip AdamW). Every momentum
  setting tried was level with it or behind, by up to 35 %.
- larger ``H``: Nesterov, lr 0.7, momentum 0.5 (about 1.4 times the mean
  pseudo-gradient per round), ahead of plain averaging by about 1 % once there
  are many rounds;
- a run known to have fewer than ``FEW_ROUNDS`` rounds averages plainly whatever
  ``H``: momentum needs rounds to build up, and over 12 rounds it did not pay.

A user who picks only the optimizer gets the values of ``FOR_OPTIMIZER``; one
who sets only a momentum gets Nesterov (or ``sgd`` for 0). ``H`` is the
setting's nominal value: the number, the largest of a per-rank list, or the
target of ``auto:H``; the number of rounds is known when the run says how many
steps it takes (the Trainer does; ``GASLoCPlugin.attach(total_steps=...)``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OuterChoice:
    """The outer optimizer a run uses, and why (for logs, ``all_results.json``, model cards)."""

    optimizer: object
    lr: float | None
    momentum: float | None
    why: str


# Measured at H = 10 (plain averaging best) and H = 30 (momentum ahead): the bound between
# them is not measured.
PLAIN_UP_TO = 16
PLAIN = ("sgd", 1.0, 0.0)
ACCELERATED = ("nesterov", 0.7, 0.5)
FEW_ROUNDS = 30
# lr and momentum for an optimizer the user picks without them, in any band.
FOR_OPTIMIZER = {"sgd": (1.0, 0.0), "nesterov": (0.7, 0.5), "sgdm": (0.7, 0.5),
                 "iterate_momentum": (1.0, 0.3)}
# Beyond these the outer step is known to overshoot at small H (docs/results/outer_defaults.md).
RISKY_MOMENTUM, RISKY_STEP, SMALL_H = 0.9, 3.0, 100


def band_of(local_steps: int, rounds: int | None) -> tuple[str, float, float]:
    """The default (optimizer, lr, momentum) for ``H`` and, when known, the number of rounds."""
    if local_steps <= PLAIN_UP_TO or (rounds is not None and rounds < FEW_ROUNDS):
        return PLAIN
    return ACCELERATED


def choose_outer(optimizer: object | None, lr: float | None, momentum: float | None,
                 local_steps: int, rounds: int | None = None) -> OuterChoice:
    """Fill what the user left unset (``None``) from ``H`` and the number of rounds (``None``:
    not known, as in a raw loop); values the user set are kept."""
    if optimizer is not None and not isinstance(optimizer, str):
        return OuterChoice(optimizer, None, None, "a torch.optim optimizer given by the user")
    band = band_of(local_steps, rounds)
    given = {"outer_optimizer": optimizer, "outer_lr": lr, "outer_momentum": momentum}
    if optimizer is None:
        optimizer = band[0] if momentum is None else ("sgd" if momentum == 0 else "nesterov")
    defaults = band[1:] if optimizer == band[0] else FOR_OPTIMIZER[optimizer]
    chosen = {"outer_optimizer": optimizer, "outer_lr": lr if lr is not None else defaults[0],
              "outer_momentum": momentum if momentum is not None else defaults[1]}
    filled = [f"{name} {value}" for name, value in chosen.items() if given[name] is None]
    context = f"H = {local_steps}" + (f", {rounds} rounds" if rounds is not None else "")
    why = (f"{', '.join(filled)}: default for {context}" if filled
           else "every outer setting given by the user")
    return OuterChoice(optimizer, chosen["outer_lr"], chosen["outer_momentum"], why)


def warn_if_known_to_hurt(choice: OuterChoice, local_steps: int) -> None:
    """A user setting that the measurements say overshoots at this ``H`` gets a warning."""
    if choice.lr is None or not choice.momentum or local_steps >= SMALL_H:
        return
    step = choice.lr / (1 - choice.momentum)
    if choice.momentum >= RISKY_MOMENTUM or step > RISKY_STEP:
        logger.warning(
            "GASLoC: outer lr %g with momentum %g moves %.1f times the mean pseudo-gradient per "
            "round; at H = %d such settings lost to plain averaging by 2 to 35 %% in our "
            "measurements (docs/results/outer_defaults.md). Leave outer_lr and outer_momentum "
            "unset for the measured defaults.", choice.lr, choice.momentum, step, local_steps)
