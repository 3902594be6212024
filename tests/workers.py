"""Small models, per-rank data and gathers shared by the multi-process tests."""

from __future__ import annotations

import torch
import torch.distributed as dist


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
