"""The model card says how the model was trained: GASLoC's settings, workers, rounds, bytes.

Trainer writes the card in ``create_model_card`` (also the card ``push_to_hub``
uploads); the callback wraps that method so that every card it writes ends
with the same facts as ``all_results.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

TAGS = ["gasloc", "decentralized-training"]


def card_section(summary: dict[str, Any]) -> str:
    """A Markdown section from ``GASLoCCallback.summary()``: the run's settings (the outer ones
    with why) and what its rounds did."""
    metrics = {k.removeprefix("gasloc/"): v for k, v in summary.items() if k.startswith("gasloc/")}
    steps = f"{metrics.get('inner_steps_total', 0)}"
    if metrics.get("inner_steps_unfinished"):
        steps += f" ({metrics['inner_steps_unfinished']} of them after the last round)"
    if "gasloc_inner_steps_per_worker" in summary:  # every worker's own, by rank
        steps = ", ".join(map(str, summary["gasloc_inner_steps_per_worker"]))
    per_worker = summary["gasloc_config"].get("worker_size", 1)  # its processes each send
    rows = [("workers", summary["gasloc_workers"]),
            ("processes", summary.get("gasloc_world_size", summary["gasloc_workers"])),
            *summary["gasloc_config"].items(),
            ("outer settings", summary["gasloc_outer_defaults"]),
            ("rounds", metrics.get("rounds", 0)),
            ("bytes sent per worker", f"{metrics.get('bytes_sent_total', 0) * per_worker:,}"),
            *([("H_i per worker", ", ".join(map(str, summary["gasloc_local_steps_per_worker"])))]
              if "gasloc_local_steps_per_worker" in summary else []),
            ("inner steps per worker", steps),
            ("non-finite recoveries", metrics.get("recoveries", 0)),
            ("lost peers", metrics.get("lost_peers", 0))]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return ("\n\n## Decentralized training (GASLoC)\n\n"
            "This model was pretrained with GASLoC (Cagnasso, Belilovsky, Oyallon, arXiv "
            "2606.11081) through `hf_gasloc`: each worker took local AdamW steps and, every round, "
            "exchanged its model with one or two peers instead of joining an All-Reduce; the "
            "weights here are the workers' average.\n\n| | |\n|---|---|\n" + table + "\n")


def record_in_model_card(trainer, section: Callable[[], str]) -> None:
    """Make ``trainer.create_model_card`` (and so ``push_to_hub``) tag the card and append
    ``section()`` to it."""
    original = trainer.create_model_card

    def create_model_card(*args: Any, **kwargs: Any) -> None:
        tags = kwargs.get("tags") or []
        kwargs["tags"] = [tags] if isinstance(tags, str) else list(tags)
        kwargs["tags"] += [t for t in TAGS if t not in kwargs["tags"]]
        original(*args, **kwargs)
        card = Path(trainer.args.output_dir) / "README.md"
        if trainer.is_world_process_zero() and card.exists():
            card.write_text(card.read_text() + section())

    trainer.create_model_card = create_model_card
