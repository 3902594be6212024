"""Compute utilization of DDP, DiLoCo and GASLoC with heterogeneous links: a model.

    python -m hf_gasloc.simulate --params 1e9 --workers 16 --bandwidth_gbps 10 --straggler 0.2
    python -m hf_gasloc.simulate --plot docs/results/utilization.png     # the paper's figure

Utilization is the fraction of wall time the workers spend computing, averaged
over workers. Notation: ``M = params * bytes_per_param`` (the message), ``t`` the
inner-step compute time (the same on every worker), ``B_i`` worker ``i``'s link
bandwidth in bytes/s, ``L`` the latency of one message, ``n`` workers, ``H`` the
local steps.

- **DDP**: every step a ring All-Reduce of the gradients, paced by the slowest
  link: ``T_ar = 2 (n-1)/n * M / min_i B_i + 2 (n-1) L``; ``U = t / (t + T_ar)``.
- **DiLoCo**: the same All-Reduce every ``H`` steps: ``U = H t / (H t + T_ar)``.
- **GASLoC k-peer** (k = 1 for ``1peer``, 2 for ``2peer``): in round ``r`` worker
  ``i`` meets its peers ``P_i(r)`` (drawn by ``hf_gasloc.schedule.topology`` from the seed).
  Every worker sends its ``k`` messages one after the other over its own link,
  so a worker's part takes ``k M / B_j``, and an exchange ends when its slowest
  participant is done: ``x_i(r) = max_{j in {i} + P_i(r)} k M / B_j + L``.
  Each worker takes ``H_i(r) = clamp(round(H - (x_i(r) - x_fast) / t), 1, H)``
  steps, ``x_fast = k M / max_j B_j + L`` (``hf_gasloc.schedule.adaptive.adapted_steps``, the rule the engine uses),
  so the round takes ``R(r) = max_i (H_i(r) t + x_i(r))`` and
  ``U = sum_r sum_i H_i(r) t / (n sum_r R(r))`` over ``--rounds`` rounds.
  With ``--fixed`` every ``H_i = H`` instead.
- **Workers of several processes** (``--worker_size S``, a node per worker): every
  step of every method adds the gradient All-Reduce inside the worker, over its
  fast link ``B_in`` (``--inside_gbps``): ``t_S = t + 2 (S-1)/S * M / B_in + 2 (S-1) L``.
  DDP's All-Reduce between workers is hierarchical (one model per worker over the
  slow link). DiLoCo and GASLoC exchange one whole model per process, as
  ``hf_gasloc`` does today: a worker sends ``S M`` per message over its link.

Assumptions: compute and communication do not overlap; links are full duplex;
all workers compute equally fast (stragglers are slow links only); rounds stay in
step because every exchange blocks both ends; the All-Reduce is a
bandwidth-optimal ring; memory traffic and the outer optimizer cost nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from .schedule.adaptive import adapted_steps
from .schedule.topology import build_topology

GBIT = 1e9 / 8  # bytes per second in one Gbit/s


@dataclass(frozen=True)
class Cluster:
    """What the model needs to know; bandwidths in bytes per second."""

    params: float
    step_time: float
    bandwidths: tuple[float, ...]
    latency: float = 0.0
    local_steps: int = 30
    bytes_per_param: float = 2.0
    worker_size: int = 1  # processes per worker
    inside_bandwidth: float = float("inf")  # bytes per second inside a worker

    @property
    def workers(self) -> int:
        return len(self.bandwidths)

    @property
    def message(self) -> float:
        return self.params * self.bytes_per_param

    @property
    def sent(self) -> float:
        """What a worker sends per message of the outer step: a whole model per process."""
        return self.worker_size * self.message

    @property
    def step(self) -> float:
        """An inner step: compute, then the gradient All-Reduce inside the worker."""
        s = self.worker_size
        if s == 1:
            return self.step_time
        return (self.step_time + 2 * (s - 1) / s * self.message / self.inside_bandwidth
                + 2 * (s - 1) * self.latency)


def all_reduce_seconds(cluster: Cluster, size: float) -> float:
    """A ring All-Reduce of ``size`` bytes per worker between the workers."""
    n = cluster.workers
    return 2 * (n - 1) / n * size / min(cluster.bandwidths) + 2 * (n - 1) * cluster.latency


def ddp(cluster: Cluster) -> float:
    return cluster.step_time / (cluster.step + all_reduce_seconds(cluster, cluster.message))


def diloco(cluster: Cluster) -> float:
    compute = cluster.local_steps * cluster.step_time
    return compute / (cluster.local_steps * cluster.step
                      + all_reduce_seconds(cluster, cluster.sent))


def gasloc(cluster: Cluster, topology: str = "1peer", rounds: int = 256, seed: int = 0,
           adaptive: bool = True) -> float:
    """Utilization of GASLoC ``1peer`` / ``2peer`` averaged over ``rounds`` random graphs."""
    k = {"1peer": 1, "2peer": 2}[topology]
    part = [k * cluster.sent / b for b in cluster.bandwidths]
    fastest = min(part) + cluster.latency
    graphs = build_topology(topology, cluster.workers, seed)
    computed, elapsed = 0.0, 0.0
    for r in range(rounds):
        peers = graphs.graph(r).peers
        exchange = [max([part[i]] + [part[j] for j in peers[i]]) + cluster.latency
                    if peers[i] else 0.0 for i in range(cluster.workers)]
        steps = [adapted_steps(cluster.local_steps, x - fastest, cluster.step) if adaptive
                 else cluster.local_steps for x in exchange]
        elapsed += max(h * cluster.step + x for h, x in zip(steps, exchange))
        computed += sum(steps) * cluster.step_time / cluster.workers
    return computed / elapsed


def utilizations(cluster: Cluster) -> dict[str, float]:
    """Every method's utilization (adaptive ``H_i`` needs workers of one process)."""
    found = {"DDP": ddp(cluster), "DiLoCo": diloco(cluster)}
    for topology, name in (("1peer", "1-peer"), ("2peer", "2-peer")):
        found[f"GASLoC {name}, fixed H"] = gasloc(cluster, topology, adaptive=False)
        if cluster.worker_size == 1:
            found[f"GASLoC {name}, adaptive H_i"] = gasloc(cluster, topology)
    return found


def with_stragglers(
    fast_gbps: float, workers: int, straggler: float, stragglers: int = 1
) -> tuple[float, ...]:
    """Bandwidths: ``stragglers`` workers at ``straggler`` times the others' rate."""
    fast = fast_gbps * GBIT
    return tuple([fast] * (workers - stragglers) + [straggler * fast] * stragglers)


def plot(path: str, base: Cluster, straggler: float, low: float = 0.1, high: float = 100.0) -> None:
    """Utilization against the non-stragglers' bandwidth, one straggler at ``straggler``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = 40
    speeds = [low * (high / low) ** (i / (points - 1)) for i in range(points)]
    curves: dict[str, list[float]] = {}
    for speed in speeds:
        cluster = dataclasses.replace(
            base, bandwidths=with_stragglers(speed, base.workers, straggler))
        for name, value in utilizations(cluster).items():
            curves.setdefault(name, []).append(value)
    figure, ax = plt.subplots(figsize=(7, 4.5))
    for name, values in curves.items():
        ax.plot(speeds, values, "--" if "fixed" in name else "-", label=name)
    ax.set(xscale="log", xlabel="bandwidth of the non-straggler workers (Gbit/s)",
           ylabel="compute utilization", ylim=(0, 1.02),
           title=f"{base.params / 1e9:g}B params, {base.workers} workers, H={base.local_steps}, "
                 f"one straggler at {straggler:.0%}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hf_gasloc.simulate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=1e9, help="model parameters (up to 70e9)")
    parser.add_argument("--bytes_per_param", type=float, default=2.0, help="2 for bf16 messages")
    parser.add_argument("--step_time", type=float, default=0.5, help="seconds of compute per inner step")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--bandwidth_gbps", type=float, default=10.0, help="non-straggler links")
    parser.add_argument("--straggler", type=float, default=0.2, help="straggler's share of that bandwidth")
    parser.add_argument("--stragglers", type=int, default=1)
    parser.add_argument("--bandwidths_gbps", help="every worker's bandwidth, e.g. 10,10,10,2 (overrides)")
    parser.add_argument("--latency_ms", type=float, default=1.0)
    parser.add_argument("--local_steps", type=int, default=30)
    parser.add_argument("--worker_size", type=int, default=1,
                        help="processes per worker (a node); the bandwidths are the workers'")
    parser.add_argument("--inside_gbps", type=float, default=400.0,
                        help="bandwidth between the processes of a worker (NVLink, InfiniBand)")
    parser.add_argument("--plot", help="also write the utilization-vs-bandwidth figure to this PNG")
    args = parser.parse_args(argv)
    if args.bandwidths_gbps:
        bandwidths = tuple(float(b) * GBIT for b in args.bandwidths_gbps.split(","))
    else:
        bandwidths = with_stragglers(args.bandwidth_gbps, args.workers, args.straggler, args.stragglers)
    if len(bandwidths) < 2 or min(bandwidths) <= 0 or args.step_time <= 0 or args.local_steps < 1:
        parser.error("need at least 2 workers, positive bandwidths and step time, and local_steps >= 1")
    if args.worker_size < 1 or args.inside_gbps <= 0:
        parser.error("--worker_size must be >= 1 and --inside_gbps > 0")
    cluster = Cluster(args.params, args.step_time, bandwidths, args.latency_ms / 1e3,
                      args.local_steps, args.bytes_per_param, args.worker_size,
                      args.inside_gbps * GBIT)
    print(f"{cluster.workers} workers of {cluster.worker_size} processes, {args.params / 1e9:g}B "
          f"params, step {args.step_time}s, H={args.local_steps}, bandwidths (Gbit/s) "
          f"{[round(b / GBIT, 3) for b in bandwidths]}")
    for name, value in utilizations(cluster).items():
        print(f"  {name:<28} {value:6.1%}")
    if args.plot:
        plot(args.plot, cluster, args.straggler)


if __name__ == "__main__":
    main()
