"""GASLoCPlugin.attach in a raw Accelerate loop, with accelerate's own process group."""

import subprocess
import sys
from pathlib import Path

import torch

from hf_gasloc import GASLoCPlugin

from .distributed import count_collectives, run_ranks
from .workers import TinyNet, flat, gather, local_step

ROOT = Path(__file__).resolve().parents[1]


def _attached_loop(rank, world_size):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == world_size == 2, "accelerate must see both ranks"
    model = TinyNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    engine = GASLoCPlugin(topology="1peer", local_steps=3).attach(accelerator, model, optimizer)
    with count_collectives() as local_counts:
        for step in range(2):
            with accelerator.accumulate(model):
                local_step(model, optimizer, rank, step)
    lives = gather(flat(model))
    with count_collectives() as round_counts:
        local_step(model, optimizer, rank, 2)  # the third step runs the outer step
    return dict(local_counts), dict(round_counts), lives, engine.round, gather(flat(model))


def test_attach_disables_all_reduce_and_runs_rounds():
    for local_counts, round_counts, lives, rounds, after in run_ranks(_attached_loop, 2, init=False):
        assert local_counts == {}, f"collectives during local steps: {local_counts}"
        assert not torch.equal(lives[0], lives[1])
        # The header swap, from the training thread: the message follows from the thread
        # that waits for the peer's header (the profiler sees the calling thread only).
        assert round_counts == {"gloo:send": 1, "gloo:recv": 1}
        assert rounds == 1
        assert torch.allclose(after[0], after[1], atol=1e-6), "1peer on 2 workers averages both"


def test_accelerate_loop_example_trains_with_accelerate_launch(tmp_path):
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "examples/configs/cpu_4proc.yaml"), "--num_processes", "2",
        "--main_process_port", "0", str(ROOT / "examples/accelerate_loop.py"),
        "--steps", "12", "--gasloc_local_steps", "4", "--gasloc_topology", "1peer",
        "--output_dir", str(tmp_path / "model"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "'gasloc/rounds': 3" in done.stdout
    assert "consensus eval loss" in done.stdout
    assert (tmp_path / "model" / "config.json").exists()
