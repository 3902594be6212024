"""Which outer lr and momentum for which H: the grid behind GASLoC's default outer settings.

    python benchmarks/outer_defaults.py --validate         # the simulator against the engine, H = 3
    python benchmarks/outer_defaults.py --tune_inner_lr    # the inner lr, for plain averaging
    python benchmarks/outer_defaults.py --grid             # every cell (resumable), then the tables
    python benchmarks/outer_defaults.py --plot docs/results/outer_defaults.png

A cell is ``H`` x topology x workers x budget: ``H`` in {1, 3, 10, 30, 100},
``1peer``, ``2peer``, ``complete`` (DiLoCo), 4 and 8 workers, and a short and a
long budget: ``max(12 rounds, 120 steps)`` and ``max(60 rounds, 600 steps)``
(at ``H = 1`` and ``3`` a round is too short for 12 of them to train anything).
In each cell every point of ``OUTER_POINTS`` runs (outer SGD lr 1 is plain
averaging: accelerate's ``LocalSGD`` on the complete graph), and so do the
point ``hf_gasloc``'s default rule picks and gossip AdamW (``H = 1``, outer
SGD lr 1) on the same graph and steps. Runs use the stacked-worker simulator
(``simulator.py``, exact against the engine: ``--validate``) on a byte-level
tiny GPT, so that the ~700 runs fit on 2 CPU cores; every finished run is a
JSON line in ``--output``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

import simulator
from common import command, machine, spawn, table
from simulator import Simulation
from tiny_gpt import new_tiny_gpt
from training import DATA_HELP, ROOT, DataOrder, cosine_with_warmup, evaluate, prepare_data

from hf_gasloc.round.outer_defaults import choose_outer

LOCAL_STEPS = (1, 3, 10, 30, 100)
TOPOLOGIES = ("complete", "2peer", "1peer")
WORKERS = (4, 8)
BUDGETS = {"short": (12, 120), "long": (60, 600)}  # (rounds, at least this many steps)
# (outer optimizer, outer lr, momentum): plain averaging, gentle to DiLoCo's published setting.
OUTER_POINTS = (("sgd", 1.0, 0.0), ("nesterov", 0.4, 0.5), ("nesterov", 0.7, 0.3),
                ("nesterov", 0.7, 0.5), ("nesterov", 0.3, 0.7), ("nesterov", 0.5, 0.7),
                ("nesterov", 0.3, 0.9), ("nesterov", 0.7, 0.9))
PLAIN = OUTER_POINTS[0]
OLD_DEFAULT = ("nesterov", 0.7, 0.9)
# At 8 workers only the points that led somewhere at 4 workers run (plain averaging, outer lr
# 0.7 with momentum 0.3 and 0.5), beside DiLoCo's published setting, the reference: the others
# lost to plain averaging in the 4-worker cells (on two cores the grid must fit in hours).
AT_8 = (("sgd", 1.0, 0.0), ("nesterov", 0.7, 0.3), ("nesterov", 0.7, 0.5), OLD_DEFAULT)
INNER_LRS = (2e-3, 4e-3, 8e-3, 1.6e-2)
BATCH = 4  # blocks of 64 bytes per worker per step


def steps_of(local_steps: int, budget: str) -> int:
    rounds, at_least = BUDGETS[budget]
    return max(rounds * local_steps, at_least)


def cells() -> list[tuple[int, str, int, str]]:
    """Every cell, cheapest first (worker-steps), so that an interrupted grid has the most cells."""
    return sorted(itertools.product(LOCAL_STEPS, TOPOLOGIES, WORKERS, BUDGETS),
                  key=lambda c: (c[2] * steps_of(c[0], c[3]), c[2], c[1]))


def default_point(local_steps: int, topology: str, budget: str) -> tuple[str, float, float]:
    """What the library picks when the user sets no outer optimizer, lr or momentum."""
    chosen = choose_outer(None, None, None, local_steps, steps_of(local_steps, budget) // local_steps)
    return chosen.optimizer, chosen.lr, chosen.momentum


def runs_of(cell: tuple[int, str, int, str], inner_lr: float) -> list[Simulation]:
    """The grid's points in a cell, the default rule's point, and gossip AdamW."""
    local_steps, topology, workers, budget = cell
    steps = steps_of(local_steps, budget)
    grid = list(OUTER_POINTS if workers == WORKERS[0] else AT_8)
    points = list(dict.fromkeys(grid + [default_point(local_steps, topology, budget)]))
    runs = [Simulation(rule, topology, workers, local_steps, steps, inner_lr, lr, momentum)
            for rule, lr, momentum in points]
    return runs + [Simulation("sgd", topology, workers, 1, steps, inner_lr)]


def key(run: Simulation) -> str:
    return "-".join(str(v) for v in asdict(run).values())


def load(output: Path) -> dict[str, dict]:
    if not output.exists():
        return {}
    return {r["key"]: r for r in map(json.loads, output.read_text().splitlines())}


def run_all(todo: list[Simulation], done: dict, output: Path, data: dict, what: str) -> None:
    for run in tqdm(todo, desc=what):
        began = time.perf_counter()
        loss = simulator.simulate(run, data, BATCH, vocab=256)
        result = {"key": key(run), "run": asdict(run), "final_loss": loss,
                  "seconds": time.perf_counter() - began}
        done[result["key"]] = result
        with output.open("a") as out:
            out.write(json.dumps(result) + "\n")


def best_inner_lr(done: dict) -> float | None:
    """Plain averaging's best inner lr at H = 10, complete, 4 workers, over both budgets."""
    scores = {}
    for lr in INNER_LRS:
        losses = [done.get(key(run)) for run in tuning_runs(lr)]
        if all(losses):
            scores[lr] = sum(r["final_loss"] for r in losses)
    return min(scores, key=scores.get) if len(scores) == len(INNER_LRS) else None


def tuning_runs(lr: float) -> list[Simulation]:
    return [Simulation("sgd", "complete", 4, 10, steps_of(10, budget), lr) for budget in BUDGETS]


# ----------------------------------------------------------------- the tables
def loss_of(done: dict, run: Simulation) -> float | None:
    found = done.get(key(run))
    return None if found is None else found["final_loss"]


def cell_results(done: dict, cell, inner_lr: float) -> dict | None:
    """A finished cell: each point's loss, the best, plain averaging, the default, gossip."""
    runs = runs_of(cell, inner_lr)
    losses = {run: loss_of(done, run) for run in runs}
    if None in [losses[run] for run in runs[:-1]]:  # gossip AdamW is a reference: optional
        return None
    # The last run is gossip AdamW; at H = 1 it is also the grid's plain point.
    grid = {(r.rule, r.outer_lr, r.momentum): losses[r] for r in runs[:-1]}
    finite = {p: loss for p, loss in grid.items() if loss == loss}
    best = min(finite, key=finite.get)
    local_steps, topology, _, budget = cell
    return {"grid": grid, "best": best, "plain": grid[PLAIN], "old": grid[OLD_DEFAULT],
            "default": default_point(local_steps, topology, budget),
            "gossip": losses[runs[-1]]}


def describe(point) -> str:
    rule, lr, momentum = point
    return f"sgd {lr:g}" if rule == "sgd" else f"{rule} {lr:g} / {momentum:g}"


def summary(done: dict, inner_lr: float) -> str:
    rows, worst = [], {"vs best": 0.0, "vs plain": -1.0}
    for cell in sorted(cells()):
        found = cell_results(done, cell, inner_lr)
        if found is None:
            continue
        local_steps, topology, workers, budget = cell
        default = found["grid"][found["default"]]
        vs_best = default / found["grid"][found["best"]] - 1
        vs_plain = default / found["plain"] - 1
        worst["vs best"] = max(worst["vs best"], vs_best)
        worst["vs plain"] = max(worst["vs plain"], vs_plain)
        rows.append([local_steps, topology, workers, f"{budget} ({steps_of(local_steps, budget)})",
                     describe(found["default"]), f"{default:.3f}", f"{found['plain']:.3f}",
                     f"{vs_plain:+.1%}",
                     "not run" if found["gossip"] is None else f"{found['gossip']:.3f}",
                     f"{found['grid'][found['best']]:.3f} ({describe(found['best'])})",
                     f"{vs_best:+.1%}", f"{found['old']:.3f}"])
    header = ["H", "topology", "workers", "budget (steps)", "default", "default loss",
              "plain averaging", "default vs plain", "gossip AdamW (H = 1)", "best grid point",
              "default vs best", "DiLoCo 0.7 / 0.9"]
    return (table(header, rows) + f"\n\n{len(rows)} cells; the default is at most "
            f"{worst['vs best']:+.1%} from the cell's best point and at most "
            f"{worst['vs plain']:+.1%} from plain averaging.")


def plot(done: dict, inner_lr: float, path: str) -> None:
    """Each point's loss relative to plain averaging, against H, one panel per topology x budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(BUDGETS), len(TOPOLOGIES), figsize=(15, 8), squeeze=False,
                                sharey=True)
    for (b, budget), (t, topology) in itertools.product(enumerate(BUDGETS), enumerate(TOPOLOGIES)):
        ax = axes[b][t]
        for workers, style in zip(WORKERS, ("-", "--")):
            found = {h: cell_results(done, (h, topology, workers, budget), inner_lr)
                     for h in LOCAL_STEPS}
            found = {h: f for h, f in found.items() if f is not None}
            if not found:
                continue
            hs = sorted(found)
            for k, point in enumerate(OUTER_POINTS[1:]):
                if any(point not in found[h]["grid"] for h in hs):
                    continue
                ax.plot(hs, [100 * (found[h]["grid"][point] / found[h]["plain"] - 1) for h in hs],
                        style, marker="o", markersize=3, color=f"C{k}", alpha=0.7,
                        label=describe(point) if workers == WORKERS[0] else None)
            ax.plot(hs, [100 * (found[h]["grid"][found[h]["default"]] / found[h]["plain"] - 1)
                         for h in hs], style, color="black", linewidth=2.5,
                    label="default rule" if workers == WORKERS[0] else None)
        ax.axhline(0, color="grey", linewidth=1)
        ax.set(xscale="log", title=f"{topology}, {budget} budget (solid: 4 workers, dashed: 8)",
               xlabel="H (inner steps per round)", ylim=(-8, 12))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final loss vs plain averaging (%)")
    axes[1][0].set_ylabel("final loss vs plain averaging (%)")
    axes[0][-1].legend(fontsize=7)
    figure.suptitle("Outer settings against plain averaging (outer SGD lr 1): lower is better")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    print(f"wrote {path}")


# ------------------------------------------------------------- the validation
def _engine(rank: int, world_size: int, run: Simulation, cache: str) -> float:
    """The same run through the real engine: one worker per gloo rank."""
    from hf_gasloc import GASLoC

    data = torch.load(cache, weights_only=True)
    model = new_tiny_gpt(run.seed, vocab=256)
    optimizer = torch.optim.AdamW(model.parameters(), lr=run.inner_lr, weight_decay=0.1)
    schedule = cosine_with_warmup(optimizer, run.steps)
    engine = GASLoC(model, optimizer, topology=run.topology, local_steps=run.local_steps,
                    seed=1 + run.seed, outer_optimizer=run.rule, outer_lr=run.outer_lr,
                    outer_momentum=run.momentum)
    order = DataOrder(data["train"], BATCH, rank, world_size, run.seed)
    for step in range(run.steps):
        model(input_ids=order.batch(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
    with engine.consensus_model():
        return evaluate(model, data["validation"][:256], rank, world_size)


VALIDATION = (Simulation("nesterov", "complete", 4, 3, 30, 4e-3, 0.4, 0.5),
              Simulation("nesterov", "2peer", 4, 3, 30, 4e-3, 0.7, 0.9),
              Simulation("sgd", "1peer", 4, 3, 30, 4e-3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--validate", action="store_true")
    parser.add_argument("--tune_inner_lr", action="store_true")
    parser.add_argument("--grid", action="store_true")
    parser.add_argument("--data", default="shared", help=DATA_HELP)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=str(ROOT / "outputs" / "outer_defaults.jsonl"))
    parser.add_argument("--plot", help="write the grid's figure to this PNG")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache = prepare_data(ROOT / "outputs" / "outer_defaults", 64, args.data, "bytes")
    data = torch.load(cache, weights_only=True)
    print(f"Command: `{command()}`\nMachine: {machine()}\n", flush=True)
    if args.validate:
        for run in VALIDATION:
            simulated = simulator.simulate(run, data, BATCH, vocab=256)
            engine = spawn(_engine, run.workers, run, cache)[0]
            print(f"{key(run)}: simulator {simulated:.5f}, engine {engine:.5f}", flush=True)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    done = load(output)
    if args.tune_inner_lr or args.grid:
        todo = [r for lr in INNER_LRS for r in tuning_runs(lr) if key(r) not in done]
        run_all(todo, done, output, data, "inner lr")
        print(f"inner lr: {best_inner_lr(done):g} (plain averaging, H = 10, complete, 4 workers)")
    inner_lr = best_inner_lr(done)
    if args.grid:
        todo = [r for c in cells() for r in runs_of(c, inner_lr) if key(r) not in done]
        run_all(list(dict.fromkeys(todo)), done, output, data, "grid")
    if inner_lr is not None:
        print(summary(done, inner_lr))
        if args.plot:
            plot(done, inner_lr, args.plot)


if __name__ == "__main__":
    main()
