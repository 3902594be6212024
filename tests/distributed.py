"""Run a test function on N real gloo ranks (spawned processes, a FileStore rendezvous)."""

from __future__ import annotations

import collections
import os
import tempfile
import traceback
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hf_gasloc.round.metrics import RoundMetrics

torch.serialization.add_safe_globals([RoundMetrics])  # what some ranks return


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 240,
              init: bool = True, abandon: tuple[int, ...] = ()) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` processes; return each result.

    With ``init=False`` the ranks get the torchrun environment variables
    (RANK, WORLD_SIZE, MASTER_ADDR, ...) and no process group, for code that
    initialises its own (accelerate, Trainer). A failure on any rank fails the
    caller with that rank's traceback. Ranks in ``abandon`` (a fault test freezes
    them) are not waited for: once the others are done they are killed, and
    their result is ``None``; the others skip the final barrier.
    """
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder:
        port = _free_port()
        processes = [
            context.Process(target=_entry,
                            args=(fn, rank, world_size, folder, port, init, bool(abandon), args))
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        try:
            for rank, process in enumerate(processes):
                if rank not in abandon:
                    process.join(timeout)
        finally:
            for rank in abandon:
                if processes[rank].is_alive():
                    processes[rank].kill()  # SIGKILL ends a stopped process too
                    processes[rank].join()
        hung = [rank for rank, p in enumerate(processes) if p.is_alive()]
        for process in processes:
            if process.is_alive():
                process.kill()
        errors = []
        results = []
        for rank in range(world_size):
            path = os.path.join(folder, f"rank{rank}.pt")
            if rank in abandon:
                results.append(None)
                continue
            if not os.path.exists(path):
                errors.append(f"rank {rank}: no result (exit code {processes[rank].exitcode})")
                continue
            ok, value = torch.load(path, weights_only=True)
            if not ok:
                errors.append(f"rank {rank}:\n{value}")
            results.append(value)
        if hung:
            errors.insert(0, f"ranks {hung} still running after {timeout}s (deadlock?)")
        if errors:
            raise AssertionError("\n".join(errors))
        return results


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, folder, port, init, abandoning, args) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    try:
        if init:
            store = dist.FileStore(os.path.join(folder, "store"), world_size)
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                    timeout=timedelta(seconds=120))
        result = (True, fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - reported to the parent
        result = (False, traceback.format_exc())
    torch.save(result, os.path.join(folder, f"rank{rank}.pt"))
    if dist.is_initialized():
        if result[0] and not abandoning:
            dist.barrier()
        dist.destroy_process_group()


@contextmanager
def count_collectives() -> Iterator[collections.Counter]:
    """Count the gloo/NCCL operations (collectives and point-to-point) run inside the block."""
    counts: collections.Counter = collections.Counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        yield counts
    for event in profiler.events():
        if event.name.startswith(("gloo:", "nccl:")):
            counts[event.name] += 1
