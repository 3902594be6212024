"""A script that finds itself alone starts its GASLoC workers itself, on this machine.

``accelerate launch script.py`` without a config, or ``python script.py``, starts
**one** process on a machine without GPUs; GASLoC needs at least two workers,
and a single process would silently train plain AdamW. ``start_local_workers``
re-runs the script on ``N`` local processes through torch.distributed's elastic
launcher (what ``torchrun --standalone`` uses): gloo on CPU, a c10d rendezvous
on a free local port, every worker's output on this terminal.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid

import torch

logger = logging.getLogger(__name__)

LAUNCHED = ("WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")


def launched_alone() -> bool:
    """True when no launcher started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not any(
        key in os.environ for key in LAUNCHED[1:])


def gpu_command(script: str, argv: list[str]) -> str | None:
    """The command that would use every GPU of this machine, when there are several."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        return None
    return (f"accelerate launch --multi_gpu --num_processes {count} {script} " + " ".join(argv)
            ).strip()


def start_local_workers(workers: int, script: str, argv: list[str]) -> None:
    """Run ``python script argv`` on ``workers`` local processes and wait for them.

    Raises ``ChildFailedError`` (torch's, naming the failed rank) when one fails.
    """
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the workers share this machine's cores
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=workers,
                          run_id=f"hf_gasloc-{uuid.uuid4().hex[:8]}", rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5)
    elastic_launch(config, sys.executable)(script, *argv)
