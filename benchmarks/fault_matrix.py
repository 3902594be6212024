"""The fault matrix, measured: inject each fault into real processes and time what happens.

    python benchmarks/fault_matrix.py                    # every fault, peer_timeout 10 s
    python benchmarks/fault_matrix.py --faults frozen --peer_timeout 5

Faults (4 gloo workers on this machine, the tiny LLaMA on the embedded data):

- ``nan``: a worker's parameters turn NaN at step 7 (raw loop with the engine,
  1peer, ``H = 3``), against the same run without the fault;
- ``frozen-loop``: a worker is stopped (SIGSTOP) in a raw loop: the others go on;
- ``frozen``: a worker of ``torchrun examples/run_clm.py`` is stopped;
- ``killed``: one of 4 elastic torchrun nodes (agent and worker) is killed after
  a checkpoint; the survivors restart and finish on 3 workers.

Every process started is ended by its id, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import tempfile
import time
from pathlib import Path

import torch

from common import command, machine, spawn, table
from launchers import ROOT, TINY, Launched, is_gone, torchrun
from training import DATA_HELP, TINY_LLAMA, DataOrder, evaluate, new_model, prepare_data

STEPS = 60


def _raw_loop(rank, world_size, cache, fault, peer_timeout):
    from hf_gasloc import GASLoC

    data = torch.load(cache)
    order = DataOrder(data["train"], 8, rank, world_size)
    model = new_model(TINY_LLAMA, torch.device("cpu"))
    inner = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    engine = GASLoC(model, inner, topology="1peer", local_steps=3, peer_timeout=peer_timeout,
                    seed=1)
    started = time.perf_counter()
    for step in range(1, STEPS + 1):
        if fault == "frozen-loop" and rank == 3 and step == 7:
            os.kill(os.getpid(), signal.SIGSTOP)
        batch = order.batch(step)
        model(input_ids=batch, labels=batch).loss.backward()
        inner.step()
        inner.zero_grad()
        if fault == "nan" and rank == 2 and step == 7:
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))
    seconds = time.perf_counter() - started
    if fault == "frozen-loop":
        return {"seconds": seconds, "lost": engine.lost_peers}
    with engine.consensus_model():
        loss = evaluate(model, data["validation"][:128], rank, world_size)
    return {"seconds": seconds, "loss": loss, "recoveries": engine.health.recoveries}


def nan(args, cache) -> list:
    clean = spawn(_raw_loop, 4, cache, "none", args.peer_timeout)
    faulty = spawn(_raw_loop, 4, cache, "nan", args.peer_timeout)
    delta = faulty[0]["loss"] / clean[0]["loss"] - 1
    return ["NaN parameters on one worker (step 7)",
            f"recovered from its peer at the round's end ({faulty[2]['recoveries']} recovery); "
            f"nobody else affected; final loss {faulty[0]['loss']:.3f} vs {clean[0]['loss']:.3f} "
            f"without the fault ({delta:+.1%})",
            "at its round's end (step 9)", "nothing (the NaN worker's steps 7-9)"]


def frozen_loop(args, cache) -> list:
    clean = spawn(_raw_loop, 4, cache, "none", args.peer_timeout)
    results = spawn(_raw_loop, 4, cache, "frozen-loop", args.peer_timeout, abandon=(3,))
    extra = max(r["seconds"] for r in results[:3]) - max(r["seconds"] for r in clean[:3])
    return ["worker stopped (SIGSTOP), raw loop",
            f"its partner waits peer_timeout, pings it, goes on without it; the news spreads "
            f"in the round headers (lost on every survivor: {results[0]['lost']}); the 3 "
            f"survivors finish all {STEPS} steps", f"{extra:.1f} s of waiting in all",
            "the stopped worker's contribution; consensus needs a restart"]


def frozen(args, output: Path) -> list:
    flags = ["--gasloc_topology", "1peer", "--gasloc_local_steps", "3", "--gasloc_peer_timeout",
             str(args.peer_timeout), "--max_steps", "100000", "--logging_steps", "100000", *TINY]
    with Launched() as run:
        agent = run.start(torchrun("--nproc_per_node", "4", str(ROOT / "examples/run_clm.py"),
                                   "--output_dir", str(output / "frozen"), *flags),
                          output / "frozen.log")
        run.wait_for(lambda: re.search(r"\b[4-9]/100000", run.text()), 600, "training")
        victim = run.workers(agent)[3]
        os.kill(victim, signal.SIGSTOP)
        detected = run.wait_for(lambda: "stopped answering" in run.text(), 600, "detection")
        others = [pid for rank, pid in run.workers(agent).items() if rank != 3]
        ended = run.wait_for(lambda: all(is_gone(p) for p in others), 600, "the others' exit")
    return ["worker stopped (SIGSTOP), Trainer + torchrun",
            "its partner waits peer_timeout, pings it, and the run stops with PeerLostError "
            "naming rank, host and round; torchrun ends the rest (restart it to resume)",
            f"{detected:.1f} s to the error, {detected + ended:.1f} s to the survivors' exit",
            "the steps since the last checkpoint"]


def killed(args, output: Path) -> list:
    flags = ["--gasloc_topology", "1peer", "--gasloc_local_steps", "4", "--gasloc_peer_timeout",
             str(args.peer_timeout), "--max_steps", "48", "--save_strategy", "steps",
             "--save_steps", "8", "--logging_steps", "4", *TINY]
    folder = output / "killed"
    with Launched() as run:
        agents = run.start_elastic_nodes([str(ROOT / "examples/run_clm.py"), "--output_dir",
                                          str(folder), *flags], output, "matrix")
        run.wait_for(lambda: (folder / "checkpoint-16/gasloc/manifest.json").exists(), 900,
                     "checkpoint-16")
        killed_at = time.monotonic()
        run.kill_node(agents[3])
        resumed = run.wait_for(lambda: "resuming 3 workers" in run.text(), 900, "the restart")
        run.wait(900)
    done = time.monotonic() - killed_at
    results = json.loads((folder / "all_results.json").read_text())
    state = json.loads((folder / "trainer_state.json").read_text())
    return ["worker killed (its node's agent too), elastic torchrun --nnodes 3:4",
            f"the survivors fail, restart, resume from the newest complete checkpoint on "
            f"{results['world_size']} workers and finish step {state['global_step']} (eval loss "
            f"{results['eval_loss']:.3f}, finite: {math.isfinite(results['eval_loss'])})",
            f"{resumed:.1f} s to training again, {done:.1f} s to the end",
            "the steps since checkpoint-16"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", nargs="+", default=["nan", "frozen-loop", "frozen", "killed"],
                        choices=["nan", "frozen-loop", "frozen", "killed"])
    parser.add_argument("--peer_timeout", type=float, default=10.0)
    parser.add_argument("--data", default="embedded", help=DATA_HELP)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder)
        cache = prepare_data(ROOT / "outputs" / "fault_matrix", 64, args.data)
        rows = []
        for fault in args.faults:
            print(f"injecting {fault} ...", flush=True)
            if fault == "nan":
                rows.append(nan(args, cache))
            elif fault == "frozen-loop":
                rows.append(frozen_loop(args, cache))
            else:
                rows.append({"frozen": frozen, "killed": killed}[fault](args, output))
            print(rows[-1], flush=True)
    print(f"\nCommand: `{command()}`\nMachine: {machine()}\npeer_timeout {args.peer_timeout:g} s, "
          "4 gloo workers on one machine\n")
    print(table(["fault", "what happens", "time to detect / recover", "what is lost"], rows))


if __name__ == "__main__":
    main()
