"""Plot the results of ``benchmarks/compare.py`` as PNGs.

    python benchmarks/plot_compare.py --runs outputs/compare/runs --output_dir docs/results
    python benchmarks/plot_compare.py --long outputs/compare_long/runs --output_dir docs/results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common import table  # noqa: E402
from compare import (h1_gentle, h_sweep, long_runs, lr_momentum_grid, main_grid,  # noqa: E402
                     outer_grid)


def label(run: dict) -> str:
    if run["method"] in ("DDP", "DiLoCo", "gossip AdamW"):
        return run["method"]
    name = f"GASLoC {run['topology']} H={run['local_steps']}"
    if run["outer_momentum"] is not None:
        name += f" (lr {run['outer_lr']:g}, momentum {run['outer_momentum']:g})"
    return name


def load(folder: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}


def curves(results: dict, counts: list[int], path: Path) -> None:
    figure, axes = plt.subplots(1, len(counts), figsize=(6 * len(counts), 4.5), squeeze=False)
    for ax, workers in zip(axes[0], counts):
        ax.set_prop_cycle(color=plt.cm.tab20.colors)
        for run in main_grid(workers):
            result = results.get(run.key)
            if result:
                steps, losses = zip(*result["curve"])
                style = "--" if run.local_steps == 1 and run.method == "GASLoC" else "-"
                ax.plot(steps, losses, style, label=label(result["run"]))
        ax.set(title=f"{workers} workers", xlabel="step", ylabel="validation loss (consensus)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    _save(figure, path)


def long_curves(results: dict, workers: int, path: Path) -> None:
    """The long runs: validation loss against tokens, and the second half zoomed in."""
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    late: list[float] = []
    for run in long_runs(workers):
        result = results.get(run.key)
        if result:
            steps, losses = zip(*result["curve"])
            tokens = [s * result["tokens"] / result["steps"] / 1e6 for s in steps]
            half = tokens[-1] / 2
            late += [loss for t, loss in zip(tokens, losses) if t >= half]
            name = label(result["run"]) if run.method != "DiLoCo" else "DiLoCo H=30"
            for ax in axes:
                ax.plot(tokens, losses, label=name)
            axes[1].set_xlim(left=half)
    if late:
        margin = 0.05 * (max(late) - min(late) + 0.01)
        axes[1].set_ylim(min(late) - margin, max(late) + margin)
    for ax, title in zip(axes, ("whole run", "second half")):
        ax.set(title=f"{workers} workers, {title}", xlabel="tokens (M)",
               ylabel="validation loss (consensus)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(figure, path)


def loss_vs_h(results: dict, workers: int, path: Path) -> None:
    figure, ax = plt.subplots(figsize=(6, 4.5))
    for method in ("DiLoCo", "GASLoC"):
        points = sorted((r.local_steps, results[r.key]["final_loss"])
                        for r in h_sweep(workers) if r.method == method and r.key in results)
        if points:
            ax.plot(*zip(*points), "o-", label=method if method == "DiLoCo" else "GASLoC 2peer")
    ax.set(xscale="log", xlabel="local steps H", ylabel="final validation loss",
           title=f"final loss vs. H ({workers} workers)")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(figure, path)


def loss_vs_workers(results: dict, counts: list[int], path: Path) -> None:
    figure, ax = plt.subplots(figsize=(6, 4.5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for index, run in enumerate(main_grid(counts[0])):
        points = []
        for workers in counts:
            key = main_grid(workers)[index].key
            if key in results:
                points.append((workers, results[key]["final_loss"]))
        if points:
            name = label(results[run.key]["run"]) if run.key in results else run.method
            ax.plot(*zip(*points), "o-", label=name)
    ax.set(xlabel="workers (same token budget)", ylabel="final validation loss",
           title="final loss vs. number of workers", xticks=counts)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(figure, path)


def heat_maps(results: dict, workers: int, path: Path) -> None:
    runs = lr_momentum_grid(workers)
    lrs = sorted({r.outer_lr for r in runs})
    momenta = sorted({r.outer_momentum for r in runs})
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, method in zip(axes, ("DiLoCo", "GASLoC")):
        grid = [[float("nan")] * len(lrs) for _ in momenta]
        for r in runs:
            if r.method == method and r.key in results:
                grid[momenta.index(r.outer_momentum)][lrs.index(r.outer_lr)] = results[r.key]["final_loss"]
        image = ax.imshow(grid, origin="lower", cmap="viridis_r")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.3f}", ha="center", va="center", color="white", fontsize=9)
        ax.set(xticks=range(len(lrs)), xticklabels=lrs, yticks=range(len(momenta)),
               yticklabels=momenta, xlabel="outer lr", ylabel="outer momentum (Nesterov)",
               title="DiLoCo (complete)" if method == "DiLoCo" else "GASLoC 2peer")
        figure.colorbar(image, ax=ax, shrink=0.8)
    figure.suptitle(f"final validation loss, H=30, {workers} workers")
    _save(figure, path)


def tables(results: dict, counts: list[int]) -> str:
    """The tables of docs/results/comparison.md, in markdown."""

    def rows(runs):
        found = [results[r.key] for r in runs if r.key in results]
        return [[label(f["run"]), f["run"]["workers"], f["run"]["local_steps"],
                 f["run"]["outer_optimizer"], f["run"]["outer_lr"],
                 "-" if f["run"]["outer_momentum"] is None else f["run"]["outer_momentum"],
                 f"{f['final_loss']:.3f}", f"{f['consensus_distance']:.1e}",
                 f"{f['bytes_sent_per_worker'] / 1e6:.0f}", f"{f['train_seconds']:.0f}"] for f in found]

    header = ["method", "workers", "H", "outer", "outer lr", "momentum", "final val loss",
              "consensus dist.", "MB sent / worker", "train s"]
    sections = [("Baselines and topologies", [r for n in counts for r in main_grid(n)]),
                ("H sweep", h_sweep(counts[0])), ("Outer optimizers", outer_grid(counts[0])),
                ("Outer lr x momentum", lr_momentum_grid(counts[0])),
                ("H = 1 with a gentler outer Nesterov", h1_gentle(counts[0]))]
    return "\n\n".join(f"### {title}\n\n" + table(header, rows(runs)) for title, runs in sections)


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="outputs/compare/runs")
    parser.add_argument("--output_dir", default="docs/results")
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--long", help="plot the long runs in this folder instead")
    args = parser.parse_args()
    if args.long:
        long_curves(load(Path(args.long)), args.workers[0], Path(args.output_dir) / "compare_long.png")
        return
    results, out = load(Path(args.runs)), Path(args.output_dir)
    curves(results, args.workers, out / "compare_curves.png")
    loss_vs_h(results, args.workers[0], out / "compare_loss_vs_h.png")
    loss_vs_workers(results, args.workers, out / "compare_loss_vs_workers.png")
    heat_maps(results, args.workers[0], out / "compare_lr_momentum.png")
    print(tables(results, args.workers))


if __name__ == "__main__":
    main()
