"""The in-process fabric itself: the engine on threads behaves as on gloo ranks."""

import torch

from hf_gasloc import GASLoC

from ..fake_fabric import run_workers
from ..workers import DiLoCoReference, TinyNet, flat, local_step

H = 3


def _complete_against_diloco(rank, comm, name, momentum):
    model = TinyNet()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = GASLoC(model, None, comm=comm, topology="complete", outer_optimizer=name,
                    outer_lr=0.7, outer_momentum=momentum, local_steps=H)
    start = flat(model)
    lives = []
    for round_index in range(3):
        for step in range(H):
            local_step(model, inner, rank, round_index * H + step)
        lives.append(flat(model))
        engine.outer_step()
    return start, lives, flat(model)


def test_on_the_fake_fabric_complete_is_diloco():
    for name, momentum in (("sgd", 0.0), ("nesterov", 0.9)):
        results = run_workers(_complete_against_diloco, 3, name, momentum)
        reference = DiLoCoReference(results[0][0], name, 0.7, momentum)
        for round_index in range(3):
            lives = [r[1][round_index] for r in results]
            expected = reference.step(torch.stack([reference.anchor - x for x in lives]).mean(0))
        for _, _, final in results:
            assert torch.allclose(final, expected, atol=1e-6), name
