"""``GASLoCPlugin``: GASLoC for a raw Accelerate training loop.

``Accelerator(kwargs_handlers=[...])`` rejects foreign handler classes, so the
plugin is a settings dataclass with ``attach``, called after
``accelerator.prepare`` (the shape of accelerate's ``LocalSGD``)::

    gasloc = GASLoCPlugin(topology="2peer", local_steps=30)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    engine = gasloc.attach(accelerator, model, optimizer)
    ...  # the usual loop: backward, optimizer.step(), zero_grad()
    with engine.consensus_model():
        accelerator.unwrap_model(model).save_pretrained(...)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import GASLoCConfig
from .ddp import disable_gradient_sync
from ..engine import GASLoC

_SHARDED = ("DEEPSPEED", "FSDP", "MEGATRON_LM", "XLA")


@dataclass
class GASLoCPlugin(GASLoCConfig):
    """Every GASLoC setting (see ``GASLoCConfig``), plus ``attach`` for Accelerate."""

    def attach(self, accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               total_steps: int | None = None) -> GASLoC:
        """Disable DDP's gradient All-Reduce between workers and hook GASLoC on ``optimizer``.

        Call it on every rank after ``accelerator.prepare``; ``total_steps``, the optimizer
        steps the loop will take, lets unset outer settings fit the number of rounds. Returns
        the engine.
        """
        kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
        if kind.upper() in _SHARDED:
            raise ValueError(
                f"GASLoC needs a full model replica per worker, but accelerate runs {kind}, "
                "which shards the model. Use a plain multi-GPU / multi-CPU (DDP) config."
            )
        if accelerator.num_processes < 2:
            raise ValueError(
                f"GASLoC needs at least 2 processes, but accelerate started "
                f"{accelerator.num_processes}. Launch with `accelerate launch --multi_gpu "
                "--num_processes N` (on CPU too; `--cpu --num_processes N` starts one process) "
                "or torchrun --nproc_per_node N."
            )
        self.check_world(accelerator.num_processes)
        engine = GASLoC(accelerator.unwrap_model(model), optimizer, self, total_steps=total_steps)
        disable_gradient_sync(model, None if engine.groups is None else engine.groups.inside)
        return engine
