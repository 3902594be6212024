"""A fingerprint of the engine's arithmetic: hashes of the parameters many configurations end with.

    python benchmarks/fingerprints.py > before.txt     # on one commit
    python benchmarks/fingerprints.py > after.txt      # on another
    diff before.txt after.txt                          # a refactoring must print nothing

Each configuration trains a tiny model on 2-4 gloo ranks through the public
engine API (settings given explicitly, so a change of defaults does not show),
with a NaN injected, a mid-round save and resume, or overlapped rounds where
the configuration says so. A line holds the SHA-256 of every rank's final
parameters, of the consensus, and the byte and round counts.
"""

from __future__ import annotations

import hashlib
import io

import torch

from common import spawn

H = 3
ROUNDS = 5
CONFIGURATIONS: dict[str, tuple[int, dict]] = {
    "complete-nesterov": (3, dict(topology="complete", outer_optimizer="nesterov", outer_lr=0.7,
                                  outer_momentum=0.9)),
    "complete-sgdm": (3, dict(topology="complete", outer_optimizer="sgdm", outer_lr=0.7,
                              outer_momentum=0.9)),
    "2peer-nesterov": (4, dict(topology="2peer", outer_optimizer="nesterov", outer_lr=0.7,
                               outer_momentum=0.9, seed=3)),
    "1peer-sgd-h1": (4, dict(topology="1peer", outer_optimizer="sgd", outer_lr=1.0,
                             outer_momentum=0.0, local_steps=1)),
    "1peer-per-rank-h": (2, dict(topology="1peer", outer_optimizer="nesterov", outer_lr=0.4,
                                 outer_momentum=0.5, local_steps=[2, 3])),
    "ring-gossip-weight": (4, dict(topology="ring", outer_optimizer="nesterov", outer_lr=0.5,
                                   outer_momentum=0.5, gossip_weight=0.25)),
    "exponential-3": (3, dict(topology="exponential", outer_optimizer="sgdm", outer_lr=0.7,
                              outer_momentum=0.5)),
    "static": (3, dict(topology="static:0-1,1-2", outer_optimizer="sgd", outer_lr=0.8,
                       outer_momentum=0.0)),
    "iterate-momentum": (4, dict(topology="2peer", outer_optimizer="iterate_momentum",
                                 outer_lr=1.0, outer_momentum=0.5)),
    "int8-2peer": (4, dict(topology="2peer", payload="int8", outer_optimizer="nesterov",
                           outer_lr=0.7, outer_momentum=0.9)),
    "bf16-complete": (3, dict(topology="complete", payload="bf16", outer_optimizer="nesterov",
                              outer_lr=0.7, outer_momentum=0.9)),
    "fp16-2peer-pseudo-gradient": (4, dict(topology="2peer", payload="fp16",
                                           payload_form="pseudo_gradient",
                                           outer_optimizer="nesterov", outer_lr=0.7,
                                           outer_momentum=0.9)),
    "delay-complete": (3, dict(topology="complete", outer_delay=2, outer_optimizer="nesterov",
                               outer_lr=0.7, outer_momentum=0.9)),
    "delay-fragments-2peer": (4, dict(topology="2peer", outer_delay=1, fragments=2,
                                      outer_optimizer="nesterov", outer_lr=0.7,
                                      outer_momentum=0.9)),
    "fragments-complete-int8": (3, dict(topology="complete", fragments=2, payload="int8",
                                        outer_optimizer="nesterov", outer_lr=0.7,
                                        outer_momentum=0.9)),
    "anchor-on-cpu-consensus": (4, dict(topology="1peer", anchor_on_cpu=True, consensus_every=1,
                                        outer_optimizer="nesterov", outer_lr=0.7,
                                        outer_momentum=0.9)),
    "nan-1peer": (4, dict(topology="1peer", outer_optimizer="nesterov", outer_lr=0.7,
                          outer_momentum=0.9, seed=2, nan_at=(2, 4))),
    "nan-complete-delay": (3, dict(topology="complete", outer_delay=1, outer_optimizer="nesterov",
                                   outer_lr=0.7, outer_momentum=0.9, nan_at=(1, 4))),
    "resume-2peer-int8-delay": (4, dict(topology="2peer", payload="int8", outer_delay=1,
                                        outer_optimizer="nesterov", outer_lr=0.7,
                                        outer_momentum=0.9, resume_at=7)),
    "resume-complete-fragments": (3, dict(topology="complete", fragments=2,
                                          outer_optimizer="sgdm", outer_lr=0.7,
                                          outer_momentum=0.9, resume_at=5)),
    "bf16-params": (2, dict(topology="1peer", outer_optimizer="nesterov", outer_lr=0.7,
                            outer_momentum=0.9, dtype=torch.bfloat16)),
}


class Net(torch.nn.Module):
    def __init__(self, dtype: torch.dtype):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.Sequential(torch.nn.Linear(6, 8, dtype=dtype), torch.nn.Tanh(),
                                          torch.nn.Linear(8, 8, dtype=dtype), torch.nn.Tanh(),
                                          torch.nn.Linear(8, 2, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _step(model, inner, rank: int, step: int) -> None:
    generator = torch.Generator().manual_seed(1000 * rank + step)
    dtype = next(model.parameters()).dtype
    x, y = (torch.randn(8, k, generator=generator).to(dtype) for k in (6, 2))
    torch.nn.functional.mse_loss(model(x), y).backward()
    inner.step()
    inner.zero_grad()


def _digest(tensors) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _run(rank: int, world_size: int, settings: dict) -> tuple:
    from hf_gasloc import GASLoC

    settings = dict(settings)
    nan_at, resume_at = settings.pop("nan_at", None), settings.pop("resume_at", None)
    dtype = settings.pop("dtype", torch.float32)
    settings.setdefault("local_steps", H)

    def build():
        model = Net(dtype)
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, inner, GASLoC(model, inner, **settings)

    model, inner, engine = build()
    saved, step = None, 0
    while engine.round < ROUNDS:  # every rank does the same rounds, whatever its H_i
        _step(model, inner, rank, step)
        if nan_at and (rank, step) == (nan_at[0] % world_size, nan_at[1]):
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))
        if resume_at == step:
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "inner": inner.state_dict(),
                        "engine": engine.state_dict()}, buffer)
            saved = buffer.getvalue()
        step += 1
    if saved is not None:  # a second run: resume from the saved state and finish again
        engine.detach()
        model, inner, engine = build()
        state = torch.load(io.BytesIO(saved), weights_only=True)
        model.load_state_dict(state["model"])
        inner.load_state_dict(state["inner"])
        engine.load_state_dict(state["engine"])
        step = resume_at + 1
        while engine.round < ROUNDS:
            _step(model, inner, rank, step)
            step += 1
    own = _digest(model.parameters())
    with engine.consensus_model():
        consensus = _digest(model.parameters())
    return own, consensus, engine.totals.bytes_sent, engine.totals.rounds, engine.round


def main() -> None:
    for name, (world_size, settings) in CONFIGURATIONS.items():
        results = spawn(_run, world_size, settings)
        owns = " ".join(r[0] for r in results)
        print(f"{name}: own {owns} | consensus {results[0][1]} | bytes "
              f"{[r[2] for r in results]} | rounds {[r[3] for r in results]}", flush=True)


if __name__ == "__main__":
    main()
