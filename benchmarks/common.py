"""Shared by the benchmarks: spawn gloo ranks on this machine, time things, print tables."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo",
          abandon: tuple[int, ...] = (), init: bool = True) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ranks of one process group; return their results.

    ``backend="nccl"`` puts rank ``r`` on ``cuda:r``. Ranks in ``abandon`` (a
    fault benchmark stops them) are not waited for: once the others have
    answered, they are killed and their result is ``None``. With ``init=False``
    the ranks get torchrun's environment variables and no process group, for
    code that makes its own (accelerate).
    """
    with tempfile.TemporaryDirectory() as folder:
        queue = mp.get_context("spawn").SimpleQueue()
        context = mp.start_processes(_entry, (world_size, folder, queue, fn, args, backend,
                                              bool(abandon), init, _free_port()),
                                     nprocs=world_size, start_method="spawn", join=False)
        try:
            results: dict[int, Any] = {}
            while len(results) < world_size - len(abandon):
                while not queue.empty():
                    rank, value = queue.get()
                    results[rank] = value
                failed = [r for r, p in enumerate(context.processes)
                          if p.exitcode not in (None, 0) and r not in abandon]
                if failed and len(results) < world_size - len(abandon):
                    raise RuntimeError(f"ranks {failed} of {fn.__name__} failed "
                                       f"(exit codes {[context.processes[r].exitcode for r in failed]})")
                time.sleep(0.05)
        finally:
            for rank in abandon:
                context.processes[rank].kill()
            for process in context.processes:
                process.join()
    return [results.get(rank) for rank in range(world_size)]


def _entry(rank, world_size, folder, queue, fn, args, backend, abandoning, init, port):
    threads = max(1, (os.cpu_count() or 1) // world_size)
    torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if init:
        store = dist.FileStore(os.path.join(folder, "store"), world_size)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(minutes=10))
    try:
        queue.put((rank, fn(rank, world_size, *args)))
        if not abandoning:
            dist.barrier()
    except BaseException:
        traceback.print_exc()  # torch's spawn keeps it to itself: say why this rank failed
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Wall times of ``repeats`` calls, each started together on all ranks."""
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_ms(times: list[float]) -> float:
    return 1000 * statistics.median(times)


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def command() -> str:
    return "python " + " ".join(sys.argv)


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
