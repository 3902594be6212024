"""Many gossip workers in one process: the H = 1 sweep of GASLoC's outer rules, exactly.

    python benchmarks/gossip_sweep.py --validate         # simulator vs the engine, 4 workers
    python benchmarks/gossip_sweep.py --grid h1          # the sweep (resumable), then a summary
    python benchmarks/gossip_sweep.py --plot docs/results/h1_sweep.png

``n`` workers' copies of a small causal LM (``tiny_gpt.py``, 0.37M parameters)
are stacked along a leading dimension and trained with ``torch.func.vmap``:
AdamW is elementwise, so one AdamW on the stacked parameters is ``n``
independent ones; a round mixes the proposals with the round's gossip matrix
``W_t`` from ``hf_gasloc.schedule.topology`` (the same graphs as the engine). The rules:

- ``gossip``: plain gossip AdamW, ``a <- W x`` every round (outer SGD, lr 1);
- ``ours``: the engine's rule, outer Nesterov (torch SGD) on the anchor,
  ``G = (a - W z) / eta``, ``z = a + eta (x - a)``;
- ``paper``: ``theta <- W y + gamma (y - y_prev)``, ``y = theta + eta (x - theta)``
  (``outer_optimizer="iterate_momentum"``).

Every run: the same initialisation, the same global data order (worker ``i`` of
``n`` takes the ``i``-th batch of each step), the same token budget, AdamW with
5 % warmup and cosine decay; the consensus (the workers' mean) is evaluated on
256 validation blocks of the ``--data`` text (the results in docs/results used ``--data shared``). ``--validate`` runs the
same configuration through the real engine on ``n`` gloo ranks and prints both
losses. ``--grid h1`` first tunes gossip AdamW's inner lr in every (topology, workers) cell,
by factors of 2 until the best lies inside what was tried, then runs both outer rules at
``OUTER_POINTS`` on that lr. Each finished run is a JSON line in ``--output``; a rerun skips it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import simulator
from common import command, machine, spawn, table
from simulator import Simulation
from tiny_gpt import new_tiny_gpt
from training import DATA_HELP, ROOT, DataOrder, cosine_with_warmup, evaluate, prepare_data


@dataclass(frozen=True)
class Run:
    rule: str  # gossip | ours | paper
    topology: str
    workers: int
    inner_lr: float
    outer_lr: float = 1.0
    momentum: float = 0.0
    compensated: bool = False  # inner lr times (1 - momentum)
    repeat: int = 0  # > 0: another draw of the initialisation, data order and gossip graphs

    @property
    def key(self) -> str:
        return (f"{self.rule}-{self.topology}-n{self.workers}-ilr{self.inner_lr}-olr{self.outer_lr}"
                f"-m{self.momentum}{'-comp' if self.compensated else ''}"
                f"{f'-rep{self.repeat}' if self.repeat else ''}")


def simulate(run: Run, data: dict, tokens: int, batch: int = 8) -> dict:
    """Train ``run.workers`` stacked workers with H = 1; the consensus's final validation loss."""
    steps = tokens // (run.workers * batch * data["train"].shape[1])
    lr = run.inner_lr * ((1 - run.momentum) if run.compensated else 1.0)
    rule = {"gossip": "sgd", "ours": "nesterov", "paper": "iterate_momentum"}[run.rule]
    final = simulator.simulate(Simulation(rule, run.topology, run.workers, 1, steps, lr,
                                          run.outer_lr, run.momentum, run.repeat), data, batch)
    return {"run": asdict(run), "key": run.key, "steps": steps, "final_loss": final,
            "finite": math.isfinite(final)}


def _engine(rank, world_size, run: Run, cache: str, tokens: int, batch: int = 8):
    """The same run through the real engine: one worker per gloo rank."""
    from hf_gasloc import GASLoC

    data = torch.load(cache)
    steps = tokens // (world_size * batch * data["train"].shape[1])
    model = new_tiny_gpt()
    optimizer = torch.optim.AdamW(model.parameters(), lr=run.inner_lr, weight_decay=0.1)
    schedule = cosine_with_warmup(optimizer, steps)
    engine = GASLoC(model, optimizer, topology=run.topology, local_steps=1, seed=1,
                    outer_optimizer={"gossip": "sgd", "ours": "nesterov",
                                     "paper": "iterate_momentum"}[run.rule],
                    outer_lr=run.outer_lr,
                    outer_momentum=None if run.rule == "gossip" else run.momentum)
    order = DataOrder(data["train"], batch, rank, world_size)
    for step in range(steps):
        batch_ids = order.batch(step)
        model(input_ids=batch_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
    with engine.consensus_model():
        return evaluate(model, data["validation"][:256], rank, world_size)


TOPOLOGIES = ("1peer", "2peer", "ring", "exponential")
WORKERS = (4, 8, 16)
FIRST_INNER_LRS = (2e-3, 4e-3, 8e-3)
# (outer lr, momentum, inner lr x (1 - momentum)), most telling first, so that a sweep stopped
# early has the same points in every cell: eta 1 with light to heavy momentum, the compensated
# inner lr, then outer lr 0.5 and 2, those without momentum (one rule: at momentum 0 both
# forms are the same update, theta <- W (theta + eta (x - theta))), and the compensated inner
# lr at outer lr 0.5 and 2.
OUTER_POINTS = ((1.0, 0.3, False), (1.0, 0.6, False), (1.0, 0.9, False),
                (1.0, 0.6, True), (1.0, 0.9, True),
                (0.5, 0.3, False), (0.5, 0.6, False), (0.5, 0.9, False),
                (2.0, 0.3, False), (2.0, 0.6, False), (2.0, 0.9, False),
                (0.5, 0.0, False), (2.0, 0.0, False),
                (0.5, 0.6, True), (2.0, 0.6, True), (0.5, 0.9, True), (2.0, 0.9, True))


def inner_lr_runs(done: dict) -> list[Run]:
    """Gossip AdamW runs still needed so that each cell's best inner lr lies inside its grid.

    1peer starts from ``FIRST_INNER_LRS``; the other topologies from 1peer's best at the same
    worker count, halved and doubled. A best at either edge of what was tried adds the next
    factor of 2 beyond it.
    """
    runs: list[Run] = []
    best_lrs = best_inner_lrs(done)
    for topology, workers in itertools.product(TOPOLOGIES, WORKERS):
        if topology == "1peer":
            start = FIRST_INNER_LRS
        elif runs:  # 1peer first: the others start from its best
            break
        else:
            lr = best_lrs[("1peer", workers)]
            start = (lr / 2, lr, lr * 2)
        tried = sorted(r["run"]["inner_lr"] for r in cell(done, topology, workers)
                       if r["run"]["rule"] == "gossip")
        missing = [lr for lr in start if lr not in tried]
        best = best_lrs.get((topology, workers))
        if not missing and best == tried[-1]:
            missing = [best * 2]
        elif not missing and best == tried[0]:
            missing = [best / 2]
        runs += [Run("gossip", topology, workers, lr) for lr in missing]
    return runs


def outer_runs(done: dict) -> list[Run]:
    """Both outer forms at every point of ``OUTER_POINTS``, on each cell's tuned inner lr."""
    best = best_inner_lrs(done)
    runs = []
    for outer_lr, momentum, compensated in OUTER_POINTS:
        for (topology, workers), lr in best.items():
            rules = ("ours", "paper") if momentum else ("ours",)
            runs += [Run(rule, topology, workers, lr, outer_lr, momentum, compensated)
                     for rule in rules]
    return runs


def repeat_runs(done: dict) -> list[Run]:
    """Each cell's tuned gossip AdamW and its best run with outer momentum, on a fresh draw of
    initialisation, data order and graphs: how much of a gap is the luck of one draw."""
    runs = []
    for topology, workers in best_inner_lrs(done):
        runs += [Run(**{**r["run"], "repeat": 1}) for r in gossip_and_best_accelerated(
            done, topology, workers)]
    return runs


def gossip_and_best_accelerated(done: dict, topology: str, workers: int) -> list[dict]:
    """A cell's tuned gossip AdamW run, then its best run with outer momentum (if any)."""
    best = best_of_each(done, topology, workers)
    accelerated = [r for name, r in best.items() if r["run"]["momentum"]]
    return [best["gossip AdamW"]] + sorted(accelerated, key=lambda r: r["final_loss"])[:1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--validate", action="store_true")
    parser.add_argument("--grid", choices=["h1"])
    parser.add_argument("--tokens", type=int, default=320_000)
    parser.add_argument("--batch_size", type=int, default=4, help="blocks per worker per step")
    parser.add_argument("--output", default=str(ROOT / "outputs" / "gossip_sweep.jsonl"))
    parser.add_argument("--plot", help="write the sweep's figure to this PNG")
    parser.add_argument("--data", default="embedded", help=DATA_HELP)
    args = parser.parse_args()
    torch.set_num_threads(2)
    cache = prepare_data(ROOT / "outputs" / "gossip_sweep", 64, args.data)
    data = torch.load(cache)
    print(f"Command: `{command()}`\nMachine: {machine()}\n", flush=True)
    if args.validate:
        for run in (Run("ours", "1peer", 4, 4e-3, 1.0, 0.5), Run("paper", "2peer", 4, 4e-3, 1.0, 0.6),
                    Run("gossip", "exponential", 4, 4e-3)):
            simulated = simulate(run, data, args.tokens // 4, args.batch_size)["final_loss"]
            engine = spawn(_engine, run.workers, run, cache, args.tokens // 4, args.batch_size)[0]
            print(f"{run.key}: simulator {simulated:.5f}, engine {engine:.5f}", flush=True)
    output = Path(args.output)
    done = {}
    if output.exists():
        done = {r["key"]: r for r in map(json.loads, output.read_text().splitlines())}
    if args.grid:
        while todo := [r for r in inner_lr_runs(done) if r.key not in done]:
            run_all(todo, "gossip AdamW's inner lr", data, args, done, output)
        for stage, runs in (("outer rules", outer_runs), ("fresh draws", repeat_runs)):
            run_all([r for r in runs(done) if r.key not in done], stage, data, args, done, output)
        print(summary(done))
    if args.plot:
        plot(done, args.plot)


def run_all(todo: list[Run], stage: str, data: dict, args: argparse.Namespace, done: dict,
            output: Path) -> None:
    """Simulate each run and append its result to ``output`` as soon as it ends."""
    for run in tqdm(todo, desc=stage):
        start = time.perf_counter()
        result = simulate(run, data, args.tokens, args.batch_size)
        result["seconds"] = time.perf_counter() - start
        done[run.key] = result
        with output.open("a") as out:
            out.write(json.dumps(result) + "\n")


def best_inner_lrs(done: dict) -> dict[tuple[str, int], float]:
    """Each (topology, workers) cell's best gossip AdamW inner lr on the sweep's own draw."""
    best: dict[tuple[str, int], tuple[float, float]] = {}
    for r in done.values():
        run = r["run"]
        if run["rule"] == "gossip" and r["finite"] and not run.get("repeat", 0):
            key = (run["topology"], run["workers"])
            if key not in best or r["final_loss"] < best[key][0]:
                best[key] = (r["final_loss"], run["inner_lr"])
    order = sorted(best, key=lambda cell: (TOPOLOGIES.index(cell[0]), cell[1]))
    return {cell: best[cell][1] for cell in order}


METHODS = ("gossip AdamW", "ours", "paper", "ours, inner lr x (1 - m)",
           "paper, inner lr x (1 - m)", "outer lr alone (m = 0)")


def method(run: dict) -> str:
    """The name a run is reported under: its rule, or the outer lr alone at momentum 0."""
    if run["rule"] == "gossip":
        return "gossip AdamW"
    if not run["momentum"]:
        return "outer lr alone (m = 0)"
    return run["rule"] + (", inner lr x (1 - m)" if run["compensated"] else "")


def cell(done: dict, topology: str, workers: int) -> list[dict]:
    """The sweep's own draw in one (topology, workers) cell (fresh draws left out)."""
    return [r for r in done.values()
            if (r["run"]["topology"], r["run"]["workers"]) == (topology, workers)
            and not r["run"].get("repeat", 0)]


def best_of_each(done: dict, topology: str, workers: int) -> dict[str, dict]:
    """Each method's best finite run in one (topology, workers) cell."""
    best: dict[str, dict] = {}
    for r in cell(done, topology, workers):
        name = method(r["run"])
        if r["finite"] and (name not in best or r["final_loss"] < best[name]["final_loss"]):
            best[name] = r
    return best


def summary(done: dict) -> str:
    """One row per cell (each method's best loss, and its gap to tuned gossip AdamW), then
    the settings each best used."""
    rows, settings = [], []
    for topology, workers in best_inner_lrs(done):
        best = best_of_each(done, topology, workers)
        gossip = best["gossip AdamW"]["final_loss"]
        diverged = sum(not r["finite"] for r in cell(done, topology, workers))
        rows.append([topology, workers] + [
            f"{best[name]['final_loss']:.3f} ({best[name]['final_loss'] - gossip:+.3f})"
            if name in best else "" for name in METHODS] + [diverged])
        for name in METHODS:
            if name in best:
                run = best[name]["run"]
                inner_lr = run["inner_lr"] * ((1 - run["momentum"]) if run["compensated"] else 1)
                settings.append([topology, workers, name, f"{inner_lr:.3g}", run["outer_lr"],
                                 run["momentum"]])
    return "\n\n".join([
        table(["topology", "workers", *METHODS, "runs diverged"], rows),
        table(["topology", "workers", "method", "inner lr", "outer lr", "momentum"], settings),
        repeats_table(done)])


def repeats_table(done: dict) -> str:
    """Gossip AdamW and the best accelerated run of each cell, on the sweep's draw and a fresh one."""
    rows = []
    for topology, workers in best_inner_lrs(done):
        pair = gossip_and_best_accelerated(done, topology, workers)
        again = [done.get(Run(**{**r["run"], "repeat": 1}).key) for r in pair]
        if len(pair) < 2 or None in again:
            continue
        losses = [[r["final_loss"] for r in draw] for draw in (pair, again)]
        rows.append([topology, workers, method(pair[1]["run"])]
                    + [f"{g:.3f} / {a:.3f} ({a - g:+.3f})" for g, a in losses])
    return table(["topology", "workers", "best accelerated", "sweep's draw: gossip / accelerated",
                  "fresh draw: gossip / accelerated"], rows)


def on_curve(run: dict, rule: str, outer_lr: float, compensated: bool, tuned_lr: float) -> bool:
    """Whether ``run`` is a point of ``rule``'s curve at ``outer_lr``: momentum 0 is on every
    curve (both forms coincide there; at outer lr 1 it is gossip AdamW with the tuned lr)."""
    if run["outer_lr"] != outer_lr:
        return False
    if run["momentum"] == 0:
        return run["rule"] != "gossip" or run["inner_lr"] == tuned_lr
    return run["rule"] == rule and run["compensated"] == compensated


def plot(done: dict, path: str) -> None:
    """Final loss against momentum, one panel per cell; momentum 0 at outer lr 1 is gossip AdamW."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = best_inner_lrs(done)
    figure, axes = plt.subplots(len(WORKERS), len(TOPOLOGIES), figsize=(18, 12), squeeze=False)
    for (topology, workers), lr in cells.items():
        ax = axes[WORKERS.index(workers)][TOPOLOGIES.index(topology)]
        runs = [r for r in cell(done, topology, workers) if r["finite"]]
        gossip = best_of_each(done, topology, workers)["gossip AdamW"]["final_loss"]
        ax.axhline(gossip, color="black", linestyle=":", label="gossip AdamW (inner lr tuned)")
        for rule, compensated, style in (("ours", False, "o-"), ("paper", False, "s--"),
                                         ("ours", True, "o:"), ("paper", True, "s:")):
            for outer_lr, color in ((0.5, "tab:blue"), (1.0, "tab:orange"), (2.0, "tab:green")):
                points = sorted((r["run"]["momentum"], r["final_loss"]) for r in runs
                                if on_curve(r["run"], rule, outer_lr, compensated, lr))
                if len(points) > 1:
                    label = f"{rule} lr {outer_lr}" + (", inner lr x (1 - m)" if compensated else "")
                    ax.plot(*zip(*points), style, color=color, markersize=4, alpha=0.8,
                            label=label)
        ax.set(title=f"{topology}, {workers} workers (inner lr {lr:g})", xlabel="outer momentum",
               ylabel="final val loss", ylim=(min(r["final_loss"] for r in runs) - 0.05,
                                              gossip + 0.5))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.suptitle("H = 1, same tokens for every run: consensus's final validation loss")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
