"""A real slow link on one machine: DiLoCo vs GASLoC with one straggler (run as root).

    sudo python benchmarks/slow_link.py                       # stragglers at 10 % and 20 %
    sudo python benchmarks/slow_link.py --shares 0.2 --budget 60 --methods "DiLoCo" "GASLoC 1peer adaptive"

Each worker runs in its own Linux network namespace, joined by a veth pair to a
bridge that lives in one more namespace (the host's network is not touched).
``tc tbf`` limits every link in both directions to ``--fast_mbit``, and the last
worker's link to ``share * fast_mbit``. The workers talk over real TCP (gloo) on
addresses that exist only inside these namespaces, and train the tiny LLaMA on
the ``--data`` text for ``--budget`` seconds of training time (evaluation
time excluded), evaluating the consensus model every ``--eval_rounds`` rounds.
Everything created (namespaces, links, qdiscs, processes) is removed at the end,
on error and on Ctrl-C. Results go to ``--output_dir`` (one JSON per run, reused
on a rerun) and a table plus a plot of loss against wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import command, machine, table
from training import DATA_HELP

HERE = Path(__file__).resolve().parent
METHODS = {  # name: (topology, local_steps, payload, outer_delay, fragments)
    "DiLoCo": ("complete", "30", "native", 0, 1),
    "GASLoC 1peer": ("1peer", "30", "native", 0, 1),
    "GASLoC 1peer adaptive": ("1peer", "auto:30", "native", 0, 1),
    "GASLoC 2peer": ("2peer", "30", "native", 0, 1),
    "GASLoC 2peer adaptive": ("2peer", "auto:30", "native", 0, 1),
    **{f"{name} {payload}": (topology, "30", payload, 0, 1)
       for name, topology in (("DiLoCo", "complete"), ("GASLoC 1peer", "1peer"))
       for payload in ("bf16", "fp16", "int8")},
    **{f"{name} overlapped": (topology, "30", "native", 15, 1)
       for name, topology in (("DiLoCo", "complete"), ("GASLoC 1peer", "1peer"),
                              ("GASLoC 2peer", "2peer"))},
    "GASLoC 1peer streamed": ("1peer", "30", "native", 10, 3),
}
DEFAULT_METHODS = ["DiLoCo", "GASLoC 1peer", "GASLoC 1peer adaptive", "GASLoC 2peer",
                   "GASLoC 2peer adaptive"]
SUBNET = "10.231.0"


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


class Network:
    """Namespaces ``<prefix>w<i>`` for the workers and ``<prefix>sw`` for the bridge."""

    def __init__(self, workers: int, fast_mbit: float, share: float):
        self.prefix = f"glk{os.getpid() % 100000}"
        self.switch = f"{self.prefix}sw"
        self.workers = workers
        self.rates = [fast_mbit] * (workers - 1) + [fast_mbit * share]
        self.processes: list[subprocess.Popen] = []

    def namespace(self, rank: int) -> str:
        return f"{self.prefix}w{rank}"

    def __enter__(self) -> "Network":
        try:
            sh("ip", "netns", "add", self.switch)
            sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", self.switch, "link", "set", "br0", "up")
            for rank, rate in enumerate(self.rates):
                ns, inside, outside = self.namespace(rank), f"eth{rank}", f"port{rank}"
                sh("ip", "netns", "add", ns)
                sh("ip", "link", "add", inside, "netns", ns, "type", "veth", "peer", outside,
                   "netns", self.switch)
                sh("ip", "-n", ns, "addr", "add", f"{SUBNET}.{rank + 1}/24", "dev", inside)
                sh("ip", "-n", ns, "link", "set", inside, "up")
                sh("ip", "-n", ns, "link", "set", "lo", "up")
                sh("ip", "-n", self.switch, "link", "set", outside, "master", "br0", "up")
                for where, device in ((ns, inside), (self.switch, outside)):  # up and down
                    burst = max(16_000, int(rate * 1e6 / 8 / 100))
                    sh("ip", "netns", "exec", where, "tc", "qdisc", "add", "dev", device, "root",
                       "tbf", "rate", f"{rate}mbit", "burst", str(burst), "latency", "200ms")
        except BaseException:
            self.__exit__()
            raise
        return self

    def launch(self, rank: int, argv: list[str], env: dict[str, str], log: Path) -> None:
        environment = {**os.environ, **env, "RANK": str(rank), "WORLD_SIZE": str(self.workers),
                       "MASTER_ADDR": f"{SUBNET}.1", "GLOO_SOCKET_IFNAME": f"eth{rank}",
                       "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(log, "w") as out:
            self.processes.append(subprocess.Popen(
                ["ip", "netns", "exec", self.namespace(rank), *argv], env=environment,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True))

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for process in self.processes:
            codes.append(process.wait(timeout=max(1.0, deadline - time.monotonic())))
        return codes

    def __exit__(self, *_: object) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for ns in [self.namespace(r) for r in range(self.workers)] + [self.switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


# ------------------------------------------------------------------ a worker
def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from hf_gasloc import GASLoC
    from hf_gasloc.fabric import gather_json
    from training import TINY_LLAMA, DataOrder, evaluate, new_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    data = torch.load(args.data_cache)
    validation = data["validation"][: args.eval_blocks]
    order = DataOrder(data["train"], args.batch_size, rank, world_size)
    model = new_model(TINY_LLAMA, torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.1)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20))
    topology, local_steps, payload, delay, fragments = METHODS[args.method]
    engine = GASLoC(model, optimizer, topology=topology, local_steps=local_steps, seed=1,
                    payload=payload, outer_delay=delay, fragments=fragments)
    held, exchanged, counted = 0.0, 0.0, 0
    curve, steps, training, evaluated = [], 0, 0.0, 0
    start = time.perf_counter()
    while True:
        batch = order.batch(steps)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        warmup.step()
        steps += 1
        if engine.last_round is not None and engine.last_round.round >= counted:
            counted = engine.last_round.round + 1  # a round landed: what it held, what it took
            held += engine.last_round.blocked_seconds
            exchanged += engine.last_round.comm_seconds + (engine.last_round.wait_seconds or 0)
        if engine.steps_in_round or engine.round % args.eval_rounds or engine.round == evaluated:
            continue
        training += time.perf_counter() - start
        evaluated = engine.round
        with engine.consensus_model():
            curve.append((training, engine.round, evaluate(model, validation, rank, world_size)))
        done = torch.tensor([float(training >= args.budget)])
        dist.all_reduce(done, op=dist.ReduceOp.MAX)
        if done.item():
            break
        start = time.perf_counter()
    summary = {"rank": rank, "steps": steps, "rounds": engine.round,
               "bytes_sent": engine.totals.bytes_sent, "comm_seconds": engine.totals.comm_seconds,
               "blocked_per_round": held / max(counted, 1),
               "exchange_per_round": exchanged / max(counted, 1)}
    everyone = gather_json(summary)
    if rank == 0:
        Path(args.result).write_text(json.dumps({"method": args.method, "share": args.share,
                                                 "curve": curve, "workers": everyone}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------ the driver
def run_one(args: argparse.Namespace, method: str, share: float, cache: str, result: Path) -> None:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", "--method", method,
            "--share", str(share), "--budget", str(args.budget), "--data_cache", cache,
            "--result", str(result), "--eval_rounds", str(args.eval_rounds),
            "--batch_size", str(args.batch_size), "--learning_rate", str(args.learning_rate),
            "--eval_blocks", str(args.eval_blocks)]
    with Network(args.workers, args.fast_mbit, share) as network:
        for rank in range(args.workers):
            log = result.with_suffix(f".rank{rank}.log")
            network.launch(rank, argv, {"MASTER_PORT": "29611"}, log)
        codes = network.wait(timeout=args.budget * 4 + 300)
    if any(codes) or not result.exists():
        raise RuntimeError(f"{method} at {share:.0%} failed (exit codes {codes}); see {result.parent}")


def time_to_reach(curve: list, target: float) -> float | None:
    for seconds, _, loss in curve:
        if loss <= target:
            return seconds
    return None


def report(results: list[dict], output: Path) -> str:
    rows = []
    for share in sorted({r["share"] for r in results}):
        group = [r for r in results if r["share"] == share]
        target = max(min(loss for _, _, loss in r["curve"]) for r in group)  # reached by all
        diloco = next((r["curve"][-1][2] for r in group if r["method"] == "DiLoCo"), None)
        for r in group:
            steps = [w["steps"] for w in r["workers"]]
            reach = time_to_reach(r["curve"], target)
            to_diloco = None if diloco is None else time_to_reach(r["curve"], diloco)
            held = [w.get("blocked_per_round") for w in r["workers"]]
            moved = [w.get("exchange_per_round") for w in r["workers"]]
            blocked = ("-" if None in held else
                       f"{sum(held) / len(held):.2f} / {sum(moved) / len(moved):.2f}")
            rows.append([f"{share:.0%}", r["method"], r["curve"][-1][1], ", ".join(map(str, steps)),
                         f"{r['curve'][-1][2]:.3f}", f"{target:.3f}",
                         "-" if reach is None else f"{reach:.0f}",
                         "-" if to_diloco is None else f"{to_diloco:.0f}", blocked])
    _plot(results, output / "slow_link.png")
    return table(["straggler link", "method", "rounds", "inner steps per worker",
                  "final loss", "common loss", "seconds to reach it",
                  "seconds to DiLoCo's final loss", "blocked / exchange s per round"], rows)


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = sorted({r["share"] for r in results})
    figure, axes = plt.subplots(1, len(shares), figsize=(6 * len(shares), 4.5), squeeze=False)
    for ax, share in zip(axes[0], shares):
        for r in (r for r in results if r["share"] == share):
            seconds, _, losses = zip(*r["curve"])
            ax.plot(seconds, losses, "o-" if "adaptive" in r["method"] else "s--", label=r["method"],
                    markersize=3)
        title = "every link throttled alike" if share == 1 else f"one straggler at {share:.0%} bandwidth"
        ax.set(title=title, xlabel="training wall time (s)",
               ylabel="validation loss (consensus)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--share", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--data_cache", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--shares", type=float, nargs="+", default=[0.1, 0.2],
                        help="the straggler's bandwidth as a share of the others'")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--fast_mbit", type=float, default=100.0)
    parser.add_argument("--budget", type=float, default=120.0, help="training seconds per run")
    parser.add_argument("--eval_rounds", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--eval_blocks", type=int, default=128)
    parser.add_argument("--output_dir", default=str(HERE.parent / "outputs" / "slow_link"))
    parser.add_argument("--data", default="embedded", help=DATA_HELP)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if os.geteuid() != 0:
        parser.error("slow_link.py creates network namespaces and qdiscs: run it as root.")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # clean up on kill, as on Ctrl-C
    from training import prepare_data

    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    cache = prepare_data(output, 64, args.data)
    results = []
    for share in args.shares:
        for method in args.methods:
            result = output / f"{method.replace(' ', '_')}-{share}.json"
            if not result.exists():
                where = "every link alike" if share == 1 else f"the straggler at {share:.0%}"
                print(f"running {method} with {where} ...", flush=True)
                run_one(args, method, share, cache, result)
            results.append(json.loads(result.read_text()))
    summary = (f"Command: `{command()}`\nMachine: {machine()}\n{args.workers} workers, links "
               f"{args.fast_mbit:g} Mbit/s, {args.budget:g} s of training per run\n\n"
               + report(results, output))
    (output / "summary.md").write_text(summary + "\n")
    print(summary)


if __name__ == "__main__":
    main()
