"""Keep DistributedDataParallel from communicating between workers: they train alone between
rounds.

``no_sync()`` only covers the steps run inside it. Instead a forward pre-hook on
the DDP wrapper turns off, before every forward, both the gradient All-Reduce
(``require_backward_grad_sync``) and the buffer broadcast
(``require_forward_param_sync``). ``no_sync()`` restores the value it found,
which is already ``False``, so Trainer's per-micro-batch ``no_sync`` keeps it off.

A worker of several processes (``worker_size > 1``) keeps its gradient
All-Reduce, over its own processes only: a DDP communication hook averages each
bucket on the worker's group; only the buffer broadcast (over every process) is
turned off.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel
from torch.utils.hooks import RemovableHandle

_HOOK_FLAG = "_hf_gasloc_sync_disabled"


def _stop_sync(ddp: DistributedDataParallel, *_: Any) -> None:
    ddp.require_backward_grad_sync = False
    ddp.require_forward_param_sync = False


def _stop_buffer_sync(ddp: DistributedDataParallel, *_: Any) -> None:
    ddp.require_forward_param_sync = False


def disable_gradient_sync(model: torch.nn.Module, inside: dist.ProcessGroup | None = None
                          ) -> RemovableHandle | None:
    """Stop DDP's gradient All-Reduce and buffer broadcast on every step from now on; with
    ``inside`` (the group of a worker of several processes), average gradients over that
    group only.

    Returns the hook's handle (``None`` if ``model`` is not DDP-wrapped or is
    already handled). Sharded wrappers cannot run GASLoC and are refused.
    """
    _refuse_sharded(model)
    if not isinstance(model, DistributedDataParallel) or getattr(model, _HOOK_FLAG, False):
        return None
    stop = _stop_sync if inside is None else _stop_buffer_sync
    if inside is not None:
        model.register_comm_hook(inside, allreduce_hook)
    stop(model)
    handle = model.register_forward_pre_hook(stop)
    setattr(model, _HOOK_FLAG, True)
    return handle


def _refuse_sharded(model: torch.nn.Module) -> None:
    kind = type(model).__name__
    if kind in ("FullyShardedDataParallel", "DeepSpeedEngine") or hasattr(model, "_fsdp_wrapped_module"):
        raise ValueError(
            f"GASLoC needs a full model replica on every worker, but the model is wrapped in "
            f"{kind}, which shards it. Launch with plain data parallelism (DDP) instead."
        )
