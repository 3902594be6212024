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
from pathlib import Path

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


def run_local_workers_if_alone(workers: int, script: str, argv: list[str]) -> bool:
    """Started alone on a machine without GPUs: run ``script argv`` on ``workers`` local GASLoC
    workers, wait for them, and return ``True`` (the caller stops). Otherwise return ``False``
    (the caller trains in this process), with a warning when this process will train alone."""
    if not launched_alone():
        return False
    command = gpu_command(script, argv)
    if command is not None or torch.cuda.is_available():
        logger.warning("%s runs as a single process on a machine with %d GPU(s): GASLoC needs at "
                       "least 2 workers. %s", Path(script).name, torch.cuda.device_count(),
                       f"Use them all with: {command}" if command else
                       "With one GPU, start workers on several machines (docs/guide/recipes.md).")
        return False
    if workers <= 0:
        logger.warning("%s: --local_workers 0: this single process trains alone, which is plain "
                       "AdamW, not decentralized training.", Path(script).name)
        return False
    print(f"{Path(script).name}: no launcher started several processes and this machine has no "
          f"GPU: starting {workers} local GASLoC workers (torch elastic launcher, gloo); "
          "--local_workers N changes that, 0 trains alone.", flush=True)
    start_local_workers(workers, script, argv)
    return True


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
