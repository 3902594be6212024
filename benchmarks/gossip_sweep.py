"""Many gossip workers in one process: the H = 1 sweep of GASLoC's outer rules, exactly.

    python benchmarks/gossip_sweep.py --validate         # simulator vs the engine, 4 workers
    python benchmarks/gossip_sweep.py --grid h1          # the sweep (resumable), then a summary
    python benchmarks/gossip_sweep.py --plot docs/h1_sweep.png

``n`` workers' copies of a small causal LM (``tiny_gpt.py``, 0.37M parameters)
are stacked along a leading dimension and trained with ``torch.func.vmap``:
AdamW is elementwise, so one AdamW on the stacked parameters is ``n``
independent ones; a round mixes the proposals with the round's gossip matrix
``W_t`` from ``hf_gasloc.topology`` (the same graphs as the engine). The rules:

- ``gossip``: plain gossip AdamW, ``a <- W x`` every round (outer SGD, lr 1);
- ``ours``: the engine's rule, outer Nesterov (torch SGD) on the anchor,
  ``G = (a - W z) / eta``, ``z = a + eta (x - a)``;
- ``paper``: ``theta <- W y + gamma (y - y_prev)``, ``y = theta + eta (x - theta)``
  (``outer_optimizer="iterate_momentum"``).

Every run: the same initialisation, the same global data order (worker ``i`` of
``n`` takes the ``i``-th batch of each step), the same token budget, AdamW with
5 % warmup and cosine decay; the consensus (the workers' mean) is evaluated on
256 validation blocks of ``../shared/data/pydocs``. ``--validate`` runs the
same configuration through the real engine on ``n`` gloo ranks and prints both
losses. Each finished run is a JSON line in ``--output``; a rerun skips it.
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
from torch.func import functional_call, grad_and_value, stack_module_state, vmap
from tqdm import tqdm

from common import command, machine, spawn, table
from tiny_gpt import new_tiny_gpt
from training import ROOT, DataOrder, cosine_with_warmup, evaluate, prepare_data

from hf_gasloc.topology import build_topology


@dataclass(frozen=True)
class Run:
    rule: str  # gossip | ours | paper
    topology: str
    workers: int
    inner_lr: float
    outer_lr: float = 1.0
    momentum: float = 0.0
    compensated: bool = False  # inner lr times (1 - momentum)

    @property
    def key(self) -> str:
        return (f"{self.rule}-{self.topology}-n{self.workers}-ilr{self.inner_lr}-olr{self.outer_lr}"
                f"-m{self.momentum}{'-comp' if self.compensated else ''}")


def simulate(run: Run, data: dict, tokens: int, batch: int = 8, seed: int = 1) -> dict:
    """Train ``run.workers`` stacked workers with H = 1; the consensus's final validation loss."""
    n, block = run.workers, data["train"].shape[1]
    steps = tokens // (n * batch * block)
    base = new_tiny_gpt()
    buffers = dict(base.named_buffers())
    stacked, _ = stack_module_state([base] * n)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in stacked.items()}
    lr = run.inner_lr * ((1 - run.momentum) if run.compensated else 1.0)
    inner = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.1)
    schedule = cosine_with_warmup(inner, steps)
    anchor = {k: v.detach().clone() for k, v in params.items()}
    momentum = {k: torch.zeros_like(v) for k, v in params.items()}
    previous: dict[str, torch.Tensor] | None = None
    orders = [DataOrder(data["train"], batch, i, n) for i in range(n)]
    graphs = build_topology(run.topology, n, seed)

    def loss(p, ids):
        return functional_call(base, ({**p}, buffers), (ids,)).loss

    step_grads = vmap(grad_and_value(loss))
    for step in range(steps):
        ids = torch.stack([order.batch(step) for order in orders])
        grads, _ = step_grads({k: v.detach() for k, v in params.items()}, ids)
        for k, v in params.items():
            v.grad = grads[k]
        inner.step()
        inner.zero_grad()
        schedule.step()
        mixing = torch.tensor(graphs.graph(step).matrix(), dtype=torch.float32)
        with torch.no_grad():
            proposal = {k: torch.lerp(anchor[k], params[k], run.outer_lr) for k in params}
            mixed = {k: torch.einsum("ij,j...->i...", mixing, z) for k, z in proposal.items()}
            for k in params:
                if run.rule == "paper":
                    new = mixed[k] if previous is None else mixed[k] + run.momentum * (
                        proposal[k] - previous[k])
                else:  # torch SGD (Nesterov when momentum > 0) on G = (a - z_hat) / eta
                    g = (anchor[k] - mixed[k]) / run.outer_lr
                    if run.momentum:
                        momentum[k].mul_(run.momentum).add_(g)
                        g = g + run.momentum * momentum[k]
                    new = anchor[k] - run.outer_lr * g
                anchor[k] = new
                params[k].copy_(new)
            previous = proposal
    consensus = {k: v.detach().mean(0) for k, v in params.items()}
    with torch.no_grad():
        base.load_state_dict({**consensus, **{k: v for k, v in base.state_dict().items()
                                              if k not in consensus}})
        validation = data["validation"][:256]
        losses = [base.loss(validation[i : i + 64]).item() * len(validation[i : i + 64])
                  for i in range(0, len(validation), 64)]
    final = sum(losses) / len(validation)
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


def h1_grid() -> list[Run]:
    """Gossip AdamW's inner lr, tuned per worker count on 1peer, then on every topology."""
    runs = [Run("gossip", "1peer", workers, lr) for workers in (4, 8, 16)
            for lr in (2e-3, 4e-3, 8e-3, 1.6e-2)]  # 8e-3 was best everywhere: one above it
    return runs


def h1_baselines(best: dict[int, float]) -> list[Run]:
    return [Run("gossip", topology, workers, lr) for workers, lr in best.items()
            for topology in ("2peer", "ring", "exponential")]


def h1_outer(best: dict[int, float]) -> list[Run]:
    """Both outer forms, outer lr x momentum, the inner lr fixed or (1 - momentum)-scaled."""
    runs = []
    for (workers, lr), topology in itertools.product(best.items(), TOPOLOGIES):
        for rule in ("ours", "paper"):
            runs += [Run(rule, topology, workers, lr, outer_lr, momentum, compensated)
                     for outer_lr, momentum, compensated in OUTER_POINTS]
    return runs


TOPOLOGIES = ("1peer", "2peer", "ring", "exponential")
# (outer lr, momentum, inner lr x (1 - momentum)): light and heavy momentum at eta 1, the
# compensated heavy one, and an outer lr above 1 (the earlier 4-worker trials: lr 0.7, momentum
# 0.9 loses to plain gossip; 0.5 was better than 0.9).
OUTER_POINTS = ((1.0, 0.3, False), (1.0, 0.6, False), (1.0, 0.6, True), (2.0, 0.3, False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--validate", action="store_true")
    parser.add_argument("--grid", choices=["h1"])
    parser.add_argument("--tokens", type=int, default=320_000)
    parser.add_argument("--batch_size", type=int, default=4, help="blocks per worker per step")
    parser.add_argument("--output", default=str(ROOT / "outputs" / "gossip_sweep.jsonl"))
    parser.add_argument("--plot", help="write the sweep's figure to this PNG")
    args = parser.parse_args()
    torch.set_num_threads(2)
    cache = prepare_data(ROOT / "outputs" / "gossip_sweep", 64)
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
        for stage in ("inner lr", "baselines", "outer"):
            best = {w: lr for (t, w), lr in best_inner_lrs(done).items() if t == "1peer"}
            runs = {"inner lr": h1_grid, "baselines": lambda: h1_baselines(best),
                    "outer": lambda: h1_outer(best)}[stage]()
            todo = [r for r in runs if r.key not in done]
            print(f"{stage}: {len(runs)} runs, {len(runs) - len(todo)} already done", flush=True)
            for run in tqdm(todo, desc=stage):
                start = time.perf_counter()
                result = simulate(run, data, args.tokens, args.batch_size)
                result["seconds"] = time.perf_counter() - start
                done[run.key] = result
                with output.open("a") as out:
                    out.write(json.dumps(result) + "\n")
        print(summary(done))
    if args.plot:
        plot(done, args.plot)


def best_inner_lrs(done: dict) -> dict[tuple[str, int], float]:
    best: dict[tuple[str, int], tuple[float, float]] = {}
    for r in done.values():
        run = r["run"]
        if run["rule"] == "gossip" and r["finite"]:
            key = (run["topology"], run["workers"])
            if key not in best or r["final_loss"] < best[key][0]:
                best[key] = (r["final_loss"], run["inner_lr"])
    return {key: lr for key, (_, lr) in sorted(best.items())}


def summary(done: dict) -> str:
    rows = []
    for (topology, workers), lr in best_inner_lrs(done).items():
        cell = {}
        for r in done.values():
            run = r["run"]
            if (run["topology"], run["workers"]) != (topology, workers) or not r["finite"]:
                continue
            if run["rule"] == "gossip" and run["inner_lr"] != lr:
                continue
            name = run["rule"] + (" (inner lr x (1 - m))" if run["compensated"] else "")
            if name not in cell or r["final_loss"] < cell[name]["final_loss"]:
                cell[name] = r
        gossip = cell["gossip"]["final_loss"]
        for name, r in sorted(cell.items()):
            run = r["run"]
            rows.append([topology, workers, name, run["inner_lr"], run["outer_lr"],
                         run["momentum"], f"{r['final_loss']:.3f}",
                         f"{r['final_loss'] - gossip:+.3f}"])
    return table(["topology", "workers", "rule (best of its grid)", "inner lr", "outer lr",
                  "momentum", "final val loss", "vs gossip AdamW"], rows)


def plot(done: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_inner_lrs(done)
    figure, axes = plt.subplots(len({w for _, w in best}), 4, figsize=(16, 11), squeeze=False)
    topologies = ["1peer", "2peer", "ring", "exponential"]
    workers = sorted({w for _, w in best})
    for (topology, n), lr in best.items():
        ax = axes[workers.index(n)][topologies.index(topology)]
        gossip = min((r["final_loss"] for r in done.values() if r["run"]["rule"] == "gossip"
                      and (r["run"]["topology"], r["run"]["workers"]) == (topology, n)
                      and r["finite"]), default=float("nan"))
        ax.axhline(gossip, color="black", linestyle=":", label="gossip AdamW (tuned)")
        for rule, compensated, style in (("ours", False, "o-"), ("ours", True, "o--"),
                                         ("paper", False, "s-"), ("paper", True, "s--")):
            for outer_lr, color in ((0.5, "tab:blue"), (1.0, "tab:orange"), (2.0, "tab:green")):
                points = sorted((r["run"]["momentum"], r["final_loss"]) for r in done.values()
                                if r["run"]["rule"] == rule and r["run"]["outer_lr"] == outer_lr
                                and r["run"]["compensated"] == compensated and r["finite"]
                                and (r["run"]["topology"], r["run"]["workers"]) == (topology, n))
                if points:
                    ax.plot(*zip(*points), style, color=color, markersize=3, alpha=0.8,
                            label=f"{rule}{' comp.' if compensated else ''} lr {outer_lr}")
        ax.set(title=f"{topology}, {n} workers", xlabel="momentum", ylabel="final val loss")
        ax.set_ylim(top=gossip + 0.6) if math.isfinite(gossip) else None
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
