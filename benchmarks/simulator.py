"""Many GASLoC workers in one process, exactly: stacked models trained with ``torch.func.vmap``.

``n`` workers' copies of a small causal LM (``tiny_gpt.py``) are stacked along a
leading dimension: AdamW is elementwise, so one AdamW on the stacked parameters
is ``n`` independent ones. Every ``H`` inner steps a round mixes the proposals
with the round's gossip matrix ``W_t`` from ``hf_gasloc.schedule.topology`` (the same
graphs as the engine; ``complete`` is ``11^T / n``, DiLoCo) and applies the
outer rule:

- ``sgd``: ``a <- W z`` (outer lr 1: plain averaging, accelerate's ``LocalSGD``
  on the complete graph, gossip AdamW at ``H = 1``);
- ``nesterov``: the engine's rule, torch's Nesterov SGD on the anchor with
  ``G = (a - W z) / eta``, ``z = a + eta (x - a)``;
- ``iterate_momentum``: ``theta <- W y + gamma (y - y_prev)``, ``y = theta + eta (x - theta)``.

Every run: the same initialisation, one global data order (worker ``i`` of
``n`` takes the ``i``-th batch of each step), AdamW with 5 % warm-up and cosine
decay; the score is the validation loss of the consensus (the workers' mean).
``gossip_sweep.py`` and ``outer_defaults.py`` check it against the real engine
on gloo ranks (the same loss to 5 decimals).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from tiny_gpt import new_tiny_gpt
from training import DataOrder, cosine_with_warmup

from hf_gasloc.schedule.topology import build_topology

RULES = ("sgd", "nesterov", "iterate_momentum")


@dataclass(frozen=True)
class Simulation:
    """One simulated run: ``workers`` workers, ``steps`` inner steps each, a round every
    ``local_steps``; ``seed`` draws the initialisation, data order and graphs."""

    rule: str
    topology: str
    workers: int
    local_steps: int
    steps: int
    inner_lr: float
    outer_lr: float = 1.0
    momentum: float = 0.0
    seed: int = 0


def simulate(run: Simulation, data: dict, batch: int, eval_blocks: int = 256,
             vocab: int = 4096) -> float:
    """Train the stacked workers; the consensus's final validation loss (``nan`` if diverged)."""
    if run.rule not in RULES:
        raise ValueError(f"unknown rule {run.rule!r}: one of {', '.join(RULES)}")
    n = run.workers
    base = new_tiny_gpt(run.seed, vocab)
    buffers = dict(base.named_buffers())
    stacked, _ = stack_module_state([base] * n)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in stacked.items()}
    inner = torch.optim.AdamW(params.values(), lr=run.inner_lr, weight_decay=0.1)
    schedule = cosine_with_warmup(inner, run.steps)
    anchor = {k: v.detach().clone() for k, v in params.items()}
    momentum = {k: torch.zeros_like(v) for k, v in params.items()}
    previous: dict[str, torch.Tensor] | None = None
    orders = [DataOrder(data["train"], batch, i, n, run.seed) for i in range(n)]
    graphs = build_topology(run.topology, n, 1 + run.seed)

    def loss(p, ids):
        return functional_call(base, ({**p}, buffers), (ids,)).loss

    step_grads = vmap(grad_and_value(loss))
    for step in range(run.steps):
        ids = torch.stack([order.batch(step) for order in orders])
        grads, _ = step_grads({k: v.detach() for k, v in params.items()}, ids)
        for k, v in params.items():
            v.grad = grads[k]
        inner.step()
        inner.zero_grad()
        schedule.step()
        if (step + 1) % run.local_steps:
            continue
        round_index = (step + 1) // run.local_steps - 1
        mixing = torch.tensor(graphs.graph(round_index).matrix(), dtype=torch.float32)
        with torch.no_grad():
            proposal = {k: torch.lerp(anchor[k], params[k], run.outer_lr) for k in params}
            mixed = {k: torch.einsum("ij,j...->i...", mixing, z) for k, z in proposal.items()}
            for k in params:
                if run.rule == "iterate_momentum":
                    new = mixed[k] if previous is None else mixed[k] + run.momentum * (
                        proposal[k] - previous[k])
                else:  # torch SGD (Nesterov when momentum > 0) on G = (a - z_hat) / eta
                    g = (anchor[k] - mixed[k]) / run.outer_lr
                    if run.momentum:
                        momentum[k].mul_(run.momentum).add_(g)
                        g = g + run.momentum * momentum[k]
                    new = anchor[k] - run.outer_lr * g
                anchor[k] = new
                params[k].copy_(new)
            previous = proposal
    consensus = {k: v.detach().mean(0) for k, v in params.items()}
    with torch.no_grad():
        base.load_state_dict({**consensus, **{k: v for k, v in base.state_dict().items()
                                              if k not in consensus}})
        validation = data["validation"][:eval_blocks]
        losses = [base.loss(validation[i : i + 64]).item() * len(validation[i : i + 64])
                  for i in range(0, len(validation), 64)]
    final = sum(losses) / len(validation)
    return final if math.isfinite(final) else float("nan")
