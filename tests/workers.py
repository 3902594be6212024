"""Small models, per-rank data and gathers shared by the multi-process tests."""

from __future__ import annotations

import torch
import torch.distributed as dist


# DiLoCo's published outer step: the equivalence tests pin it (the defaults follow H).
DILOCO_OUTER = dict(outer_optimizer="nesterov", outer_lr=0.7, outer_momentum=0.9)


class TinyNet(torch.nn.Module):
    """Two layers and a buffer (DDP would broadcast it every forward)."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.hidden = torch.nn.Linear(6, 5, dtype=dtype)
        self.out = torch.nn.Linear(5, 2, dtype=dtype)
        self.register_buffer("scale", torch.ones(1, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x))) * self.scale


def local_step(model, optimizer, rank: int, step: int) -> None:
    """One inner step on data that differs per rank and per step."""
    generator = torch.Generator().manual_seed(1000 * rank + step)
    dtype = next(model.parameters()).dtype
    x = torch.randn(8, 6, generator=generator).to(dtype)
    y = torch.randn(8, 2, generator=generator).to(dtype)
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


def gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor)
    return out


def mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(tensors).mean(0)


class DiLoCoReference:
    """DiLoCo's outer step, written out by hand: SGD, heavy ball or Nesterov on ``mean Delta``."""

    def __init__(self, anchor: torch.Tensor, optimizer: str, lr: float, momentum: float):
        self.anchor = anchor.clone()
        self.optimizer, self.lr, self.momentum = optimizer, lr, momentum
        self.buffer = torch.zeros_like(anchor)

    @classmethod
    def following(cls, anchor: torch.Tensor, config) -> DiLoCoReference:
        """The reference with an engine's outer settings (``engine.config``)."""
        return cls(anchor, config.outer_optimizer, config.outer_lr, config.outer_momentum)

    def step(self, pseudo_gradient: torch.Tensor) -> torch.Tensor:
        if self.optimizer == "sgd":
            update = pseudo_gradient
        else:
            self.buffer = self.momentum * self.buffer + pseudo_gradient
            update = self.buffer
            if self.optimizer == "nesterov":
                update = pseudo_gradient + self.momentum * self.buffer
        self.anchor = self.anchor - self.lr * update
        return self.anchor


def save_training(model, inner, engine, path: str) -> None:
    """What a checkpoint holds for a resume: the model, the inner optimizer and the engine."""
    torch.save({"model": model.state_dict(), "inner": inner.state_dict(),
                "engine": engine.state_dict()}, path)


def load_training(model, inner, engine, path: str) -> None:
    saved = torch.load(path, weights_only=True)
    model.load_state_dict(saved["model"])
    inner.load_state_dict(saved["inner"])
    engine.load_state_dict(saved["engine"])


def train_rounds(model, inner, engine, rank: int, rounds: int, save_to: str | None = None) -> None:
    """Inner steps until ``engine.round == rounds``; with ``save_to``, save mid-round 3."""
    while engine.round < rounds:
        local_step(model, inner, rank, 100 * engine.round + engine.steps_in_round)
        if save_to and engine.round == 3 and engine.steps_in_round == 1:
            save_training(model, inner, engine, save_to)
            save_to = None


def mean_anchor_against_diloco(model, inner, engine, rank: int, rounds: int,
                               steps: int) -> tuple[float, float]:
    """Invariant 2, round by round: the workers' mean anchor against DiLoCo, with the engine's
    outer settings, on the mean pseudo-gradient. Returns the worst gap and the anchors' spread."""
    reference = DiLoCoReference.following(flat(model), engine.config)
    worst, spread = 0.0, 0.0
    for round_index in range(rounds):
        anchors = gather(flat(model))  # x_i == a_i at the start of a round
        for step in range(steps):
            local_step(model, inner, rank, round_index * steps + step)
        lives = gather(flat(model))
        reference.step(mean([a - x for a, x in zip(anchors, lives)]))
        engine.outer_step()
        new_anchors = gather(flat(model))
        worst = max(worst, float((mean(new_anchors) - reference.anchor).abs().max()))
        spread = max(spread, float((new_anchors[0] - new_anchors[-1]).abs().max()))
    return worst, spread
