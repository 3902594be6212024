"""A worker twice as slow, under the Trainer: GASLoC with per-worker H_i against DiLoCo.

    python benchmarks/heterogeneous_trainer.py                    # resumable
    python benchmarks/heterogeneous_trainer.py --plot docs/results/heterogeneous_trainer.png

2 gloo ranks started here (one CPU thread each), each a ``transformers.Trainer``
with ``GASLoCCallback`` on the tiny LLaMA of the README's default run and the
embedded sample (``--data``); rank 1 is made twice as slow: a forward pre-hook
sleeps, on every real inner step, the median time of an inner step measured
on that rank before training. AdamW lr 3e-3 with a constant schedule after 10
warm-up steps (so that runs of different lengths compare at any time), 8
blocks of 64 tokens per worker per step, evaluation of the consensus at every
round boundary.

- ``DiLoCo``: ``topology complete``, ``local_steps 10`` on both: every round the
  fast worker waits for the slow one's 10 steps;
- ``GASLoC 10,5``: ``topology 1peer`` (on 2 workers the same pair each round),
  ``local_steps "10,5"``: the slow worker takes 5 steps in the round's 10;
- ``GASLoC auto:10``: ``local_steps auto:10``: the workers' measured step times
  decide.

DiLoCo runs 20 rounds; GASLoC runs 30, so that it can reach DiLoCo's final loss.
The table gives each run's training time (evaluation excluded), its losses, and
the time GASLoC needs to reach DiLoCo's final loss, as a fraction of DiLoCo's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from common import command, machine, spawn, table
from training import DATA_HELP, ROOT, TINY_LLAMA, new_model, prepare_data

H, SLOW_RANK, WORKERS, BATCH = 10, 1, 2, 8


@dataclass(frozen=True)
class Method:
    name: str
    topology: str
    local_steps: str
    rounds: int


METHODS = (Method("DiLoCo", "complete", str(H), 20),
           Method("GASLoC 10,5", "1peer", f"{H},{H // 2}", 30),
           Method("GASLoC auto:10", "1peer", f"auto:{H}", 30))


def _inner_step_seconds(model: torch.nn.Module, blocks: torch.Tensor) -> float:
    """The median time of a forward and backward pass on one batch, measured here."""
    times = []
    for _ in range(8):
        began = time.perf_counter()
        model(input_ids=blocks[:BATCH], labels=blocks[:BATCH]).loss.backward()
        times.append(time.perf_counter() - began)
    model.zero_grad(set_to_none=True)
    return statistics.median(times[3:])


def _train(rank: int, world_size: int, method: Method, cache: str, output_dir: str) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_gasloc import GASLoCCallback

    torch.set_num_threads(1)
    data = torch.load(cache, weights_only=True)
    model = new_model(TINY_LLAMA, torch.device("cpu"))
    if rank == SLOW_RANK:  # twice as slow: sleep one measured step on every real forward
        delay = _inner_step_seconds(model, data["train"])
        model.register_forward_pre_hook(lambda m, _: time.sleep(delay) if m.training else None)

    class Clock(TrainerCallback):
        """Training seconds (evaluation excluded) and the consensus loss at each evaluation."""

        def __init__(self):
            self.began, self.evaluating, self.points = 0.0, 0.0, []

        def on_train_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            self.evaluating += metrics["eval_runtime"]
            self.points.append((state.global_step, time.perf_counter() - self.began
                                - self.evaluating, metrics["eval_loss"]))

    arguments = TrainingArguments(
        output_dir=output_dir, use_cpu=True, max_steps=method.rounds * H, learning_rate=3e-3,
        weight_decay=0.1, lr_scheduler_type="constant_with_warmup", warmup_steps=10,
        per_device_train_batch_size=BATCH, per_device_eval_batch_size=16,
        eval_strategy="steps", eval_steps=H, logging_steps=H, save_strategy="no",
        report_to="none", disable_tqdm=True, seed=0, dataloader_drop_last=True)
    assert arguments.world_size == world_size == WORKERS, "the Trainer must see both ranks"
    train = [{"input_ids": b, "labels": b} for b in data["train"]]
    validation = [{"input_ids": b, "labels": b} for b in data["validation"][:128]]
    clock = Clock()
    trainer = Trainer(model=model, args=arguments, train_dataset=train, eval_dataset=validation,
                      callbacks=[clock])
    callback = GASLoCCallback(topology=method.topology, local_steps=method.local_steps)
    callback.bind(trainer)
    trainer.train()
    summary = callback.summary()
    return {"points": clock.points,
            "local_steps": summary["gasloc_local_steps_per_worker"],
            "inner_steps": summary["gasloc_inner_steps_per_worker"],
            "outer": summary["gasloc_outer_defaults"]}


def time_to(points: list, target: float) -> float | None:
    """Training seconds at the first evaluation at or below ``target`` (``None``: never)."""
    return next((seconds for _, seconds, loss in points if loss <= target), None)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, result in results.items():
        _, seconds, losses = zip(*result["points"])
        axis.plot(seconds, losses, marker=".", label=name)
    target = results["DiLoCo"]["points"][-1][2]
    axis.axhline(target, color="grey", linestyle=":", label="DiLoCo's final loss")
    axis.set(xlabel="training seconds (evaluation excluded)", ylabel="consensus eval loss",
             title="2 workers, one twice as slow, under the Trainer")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="embedded", help=DATA_HELP)
    parser.add_argument("--output", default=str(ROOT / "outputs" / "heterogeneous_trainer.jsonl"))
    parser.add_argument("--plot", help="write the loss-against-time figure to this PNG")
    args = parser.parse_args()
    cache = prepare_data(ROOT / "outputs" / "heterogeneous_trainer", 64, args.data)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if output.exists():
        done = {r["method"]["name"]: r for r in map(json.loads, output.read_text().splitlines())}
    print(f"Command: `{command()}`\nMachine: {machine()}\n", flush=True)
    for method in METHODS:
        if method.name in done:
            continue
        folder = ROOT / "outputs" / "heterogeneous_trainer" / method.name.replace(" ", "_")
        result = {"method": asdict(method),
                  **spawn(_train, WORKERS, method, cache, str(folder), init=False)[0]}
        done[method.name] = result
        with output.open("a") as out:
            out.write(json.dumps(result) + "\n")
        print(f"{method.name}: {result['points'][-1]}", flush=True)
    diloco = done["DiLoCo"]["points"]
    target, diloco_seconds = diloco[-1][2], diloco[-1][1]
    rows = []
    for name, result in done.items():
        points = result["points"]
        reached = time_to(points, target)
        rows.append([name, result["method"]["rounds"], result["local_steps"],
                     result["inner_steps"], f"{points[-1][1]:.0f}", f"{points[-1][2]:.3f}",
                     "never" if reached is None else f"{reached:.0f}",
                     "" if reached is None else f"{reached / diloco_seconds:.2f}"])
    print(table(["method", "rounds", "H_i per worker", "inner steps per worker",
                 "training s", "final loss", "s to DiLoCo's final loss", "vs DiLoCo's time"],
                rows))
    print(f"\nouter settings: {done['DiLoCo']['outer']}")
    if args.plot:
        plot(done, args.plot)


if __name__ == "__main__":
    main()
