"""``GASLoCCallback``: GASLoC for any Hugging Face ``Trainer`` script, in one line.

    GASLoCCallback(topology="2peer", local_steps=30).bind(trainer)

What it does, on every rank:

- at ``on_train_begin``: stops DDP's gradient All-Reduce and buffer broadcast for
  every step, turns off Trainer's per-step token-count ``all_gather``
  (``average_tokens_across_devices``), hooks the engine on the inner optimizer
  (so gradient accumulation and skipped AMP steps count right), and on resume
  restores this rank's own state;
- evaluation and checkpoints see the **consensus model** (the average of all
  workers), swapped in after the step that evaluates or saves and swapped out
  before the next step; each checkpoint also holds every rank's own state
  (``gasloc/rank<r>.pt``), so a resumed run ends bit for bit where an
  uninterrupted one does;
- GASLoC metrics join the Trainer's logs, so ``report_to`` shows them;
- when training ends, every rank holds the consensus model, so a following
  ``trainer.evaluate()`` / ``trainer.save_model()`` uses it.

Callback events receive neither the Trainer nor its DDP wrapper, so the callback
is bound to its Trainer: ``bind(trainer)`` adds it and learns the checkpoint
that ``trainer.train(resume_from_checkpoint=...)`` resumes from. A callback
added with ``trainer.add_callback`` alone finds its Trainer on the call stack
instead, with a warning.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import DefaultFlowCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.training_args import ParallelMode

from ..config import GASLoCConfig
from ..engine import GASLoC
from ..errors import PeerLostError
from ..fabric.comm import bound_group_timeout, set_group_timeout
from ..identity import check_ranks_agree
from ..resume import resume, save
from ..schedule.adaptive import Auto
from ..schedule.local_steps import nominal_steps
from ..state.checkpoint import complete_checkpoints
from .ddp import disable_gradient_sync
from .model_card import card_section, record_in_model_card
from .plugin import GASLoCPlugin

logger = logging.getLogger(__name__)


class GASLoCCallback(TrainerCallback):
    """Run GASLoC inside ``transformers.Trainer``.

    Takes a ``GASLoCPlugin`` / ``GASLoCConfig`` or the same settings as keyword
    arguments; settings are validated here, before any training.
    """

    def __init__(self, plugin: GASLoCConfig | None = None, **settings: Any):
        if plugin is not None and settings:
            raise ValueError("give GASLoCCallback either a plugin or keyword settings, not both.")
        self.plugin = plugin if plugin is not None else GASLoCPlugin(**settings)
        self.trainer: Trainer | None = None
        self._resume_from: str | bool | None = None
        self.engine: GASLoC | None = None
        self._model: torch.nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._own_parameters: list[list[torch.Tensor]] | None = None
        self._replaced_timeout = None
        self._wrapped_step = self._wrapped_training_step = None  # lockstep: the originals
        self._save_pending = False  # lockstep: a checkpoint moved to the round's end
        self._workers: list[dict] = []  # each worker's H_i and inner steps, at the end

    # ------------------------------------------------------------------ bind
    def bind(self, trainer: Trainer) -> "GASLoCCallback":
        """Run GASLoC in ``trainer``: adds this callback to it and learns the checkpoint that
        ``trainer.train(resume_from_checkpoint=...)`` resumes from. Returns the callback."""
        if self.trainer is not None and self.trainer is not trainer:
            raise ValueError("this GASLoCCallback is already bound to another Trainer; make one "
                             "callback per Trainer.")
        if self.trainer is None:
            self.trainer = trainer
            if self not in trainer.callback_handler.callbacks:
                trainer.add_callback(self)
            train = trainer.train

            @functools.wraps(train)
            def train_and_remember(resume_from_checkpoint=None, *args, **kwargs):
                self._resume_from = resume_from_checkpoint
                return train(resume_from_checkpoint, *args, **kwargs)

            trainer.train = train_and_remember
            record_in_model_card(trainer, self._card_section)
            self._check_trainer(trainer)
        return self

    def _check_trainer(self, trainer: Trainer) -> None:
        """What can be checked once the Trainer exists: the settings against its world size
        and model, and its checkpoint rotation; before any training or evaluation."""
        args = trainer.args
        if not self.plugin.enabled:
            return
        if args.world_size > 1:
            self.plugin.check_world(args.world_size)
        self.plugin.check_model(trainer.model)
        if args.save_strategy != "no" and (args.save_total_limit or 2) < 2:
            raise ValueError(
                f"save_total_limit={args.save_total_limit}: Trainer deletes the previous "
                "checkpoint before GASLoC has written every rank's state into the new one, so a "
                "worker lost while saving would leave no complete checkpoint. Use "
                "save_total_limit 2 or more (or none).")

    def _card_section(self) -> str:
        return "" if self.engine is None else card_section(self.summary())

    def _bound_trainer(self) -> Trainer:
        if self.trainer is None:
            trainer, resume_from = _calling_trainer()
            logger.warning(
                "GASLoCCallback was added without bind(): it found its Trainer on the call stack. "
                "Write GASLoCCallback(...).bind(trainer) instead of trainer.add_callback(...), so "
                "that an explicit resume_from_checkpoint is always found.")
            self.bind(trainer)
            self._resume_from = resume_from
        return self.trainer

    def _checkpoint_to_resume(self, args, state) -> str:
        """The folder ``trainer.train`` resumes from (this rank's GASLoC state is in it)."""
        if isinstance(self._resume_from, str):
            return self._resume_from
        if self._resume_from is True:
            return get_last_checkpoint(args.output_dir)
        return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    # ---------------------------------------------------------------- start
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._unwrap_idle_steps()  # a previous train() that raised left them wrapped
        self._save_pending = False
        if self.engine is not None:
            self.engine.detach()
            self.engine = None
        if not self.plugin.enabled or not self._distributed(args):
            return
        trainer = self._bound_trainer()
        wrapped = trainer.model_wrapped
        if not isinstance(wrapped, DistributedDataParallel) and wrapped is not model:
            raise RuntimeError(
                f"GASLoC cannot turn off gradient synchronisation in {type(wrapped).__name__}; "
                "it supports models wrapped in DistributedDataParallel (the Trainer's default)."
            )
        self._stop_step_collectives(trainer)
        self._run_before_reporters(trainer)
        self._model, self._optimizer = model, optimizer
        lockstep = lockstep_steps(self.plugin)
        self.engine = GASLoC(model, optimizer, self.plugin, total_steps=state.max_steps,
                             round_steps=lockstep)
        groups = self.engine.groups
        disable_gradient_sync(wrapped, None if groups is None else groups.inside)
        check_ranks_agree(trainer_arguments_to_agree_on(args, state), groups or self.engine.comm,
                          "Trainer arguments")
        if lockstep is not None:
            self._idle_when_done(trainer, optimizer)
        # Trainer's own collectives (logging gathers, evaluation, saving) get the same deadline.
        self._replaced_timeout = bound_group_timeout(None, self.engine.config.peer_timeout)
        if state.global_step > 0:
            checkpoint = self._checkpoint_to_resume(args, state)
            how = resume(checkpoint, self.engine, model, optimizer, state.global_step)
            logger.info("GASLoC: rank %d resumed from %s with %s", self.engine.rank, checkpoint, how)

    def _idle_when_done(self, trainer: Trainer, optimizer) -> None:
        """Unequal ``H_i``: every rank takes the same Trainer steps (so logging, evaluation
        and the end meet on every rank, at any step; checkpoints, at the round's end), and a
        round lasts ``H`` of them, ``H`` the largest ``H_i``. A worker whose ``H_i`` steps of
        the round are done skips the forward, backward and optimizer step of the rest of the
        round (the Trainer still fetches their batches, which it leaves unused), and reports
        its last loss for them. A step's time, for ``auto:H``, is its forward and backward
        alone: the waits of the Trainer's own collectives are not this worker's speed."""
        engine, last = self.engine, {"compute": 0.0}
        self._wrapped_training_step, self._wrapped_step = trainer.training_step, optimizer.step

        @functools.wraps(self._wrapped_training_step)
        def training_step(*args, **kwargs):
            if engine.step_is_idle():
                return last.get("loss", torch.zeros((), device=trainer.args.device))
            began = time.perf_counter()
            last["loss"] = self._wrapped_training_step(*args, **kwargs)
            last["compute"] += time.perf_counter() - began
            return last["loss"]

        @functools.wraps(self._wrapped_step)  # keeps the LR scheduler's mark on the step
        def step(*args, **kwargs):
            if engine.step_is_idle():
                return engine.idle_step()
            engine.observe_step_seconds(last["compute"])
            last["compute"] = 0.0
            return self._wrapped_step(*args, **kwargs)

        trainer.training_step, optimizer.step = training_step, step

    def _unwrap_idle_steps(self) -> None:
        """The Trainer's ``training_step`` and the optimizer's ``step`` as they were."""
        if self._wrapped_step is not None:
            self.trainer.training_step = self._wrapped_training_step
            self._optimizer.step = self._wrapped_step
            self._wrapped_step = self._wrapped_training_step = None

    def _distributed(self, args) -> bool:
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        running = args.world_size if args.parallel_mode == ParallelMode.DISTRIBUTED else 1
        if launched > 1 and running == 1:
            raise RuntimeError(
                f"{launched} processes were launched but the Trainer is not distributed "
                f"(parallel_mode={args.parallel_mode.value}): every process would train alone on "
                "the same data. On a machine without GPUs pass use_cpu=True (--use_cpu) to "
                "TrainingArguments so that the processes join one gloo group."
            )
        if running == 1:
            logger.warning("GASLoC needs at least 2 workers; this single-process run trains normally.")
        return running > 1

    def _stop_step_collectives(self, trainer: Trainer) -> None:
        """Turn off Trainer's per-step collectives; warn about those we cannot."""
        args = trainer.args
        if args.average_tokens_across_devices:
            # An all_gather of token counts every step would pace every worker to the
            # slowest link. GASLoC workers minimise their own loss: count local tokens.
            args.average_tokens_across_devices = False
        if args.include_num_input_tokens_seen not in (False, "no"):
            logger.warning(
                "GASLoC: include_num_input_tokens_seen runs an all_gather every step, which makes "
                "every worker wait for the slowest; turn it off for decentralized training."
            )
        iterable = isinstance(trainer.train_dataset, torch.utils.data.IterableDataset)
        if iterable and getattr(trainer.accelerator, "dispatch_batches", None) is not False:
            logger.warning(
                "GASLoC: with an iterable dataset accelerate lets rank 0 read and broadcast every "
                "batch (a collective per step); pass accelerator_config={'dispatch_batches': False} "
                "so that each worker reads its own shard."
            )

    def _run_before_reporters(self, trainer: Trainer) -> None:
        """Run right after DefaultFlowCallback, so loggers (report_to) see GASLoC metrics.

        The list is replaced, not edited: the event now running iterates the old one.
        """
        others = [cb for cb in trainer.callback_handler.callbacks if cb is not self]
        first = 1 if others and isinstance(others[0], DefaultFlowCallback) else 0
        trainer.callback_handler.callbacks = others[:first] + [self] + others[first:]

    # -------------------------------------------- consensus for eval and save
    def on_step_end(self, args, state, control, **kwargs):
        if self.engine is None:
            return
        self._save_at_round_end(state, control)
        if control.should_log or control.should_evaluate or control.should_save:
            engine, when = self.engine, f"the check before step {state.global_step}'s collectives"
            engine.lost.call_roll(engine.comm, when)
            if engine.groups is not None:  # the processes of a worker stop together, or none
                engine.groups.agree_on_peers({}, engine.lost, when)
        if self.engine.lost_peers:
            self._stop_for_lost_peers(args)
        if control.should_save:  # a checkpoint never holds a non-finite value
            self.engine.health.recover_before_save(self.engine.round, self.engine.inner_step)
        if control.should_evaluate or control.should_save:
            self._swap_in_consensus()

    def _save_at_round_end(self, state, control) -> None:
        """Lockstep: a checkpoint asked for inside a round waits for the round's last step.
        Inside a round a worker's exchange may wait for a peer that posts at its own later
        step, so saving it there would wait forever; every rank counts the same steps, so
        every rank moves the save alike."""
        position = self.engine.position
        if not position.lockstep:
            return
        if control.should_save and position.ticks_in_round != 0:
            control.should_save, self._save_pending = False, True
            if self.engine.speaks:
                logger.info("GASLoC: the checkpoint of step %d is taken at the end of the "
                            "round, at step %d.", state.global_step, state.global_step
                            + position.round_steps - position.ticks_in_round)
        elif self._save_pending and position.ticks_in_round == 0:
            control.should_save, self._save_pending = True, False

    def _stop_for_lost_peers(self, args) -> None:
        """Trainer's logging, evaluation and saving need every rank: stop, for a restart."""
        lost = self.engine.lost
        checkpoints = complete_checkpoints(args.output_dir)
        raise PeerLostError(
            f"GASLoC {lost.describe(self.engine.rank)}: "
            + ", ".join(f"{lost.describe(r)} (in {lost.when[r]})" for r in lost.lost)
            + " is lost: it stopped answering within peer_timeout="
            f"{self.engine.config.peer_timeout:g} s, its connection broke, or its messages did "
            "not fit (the warning above says which). The Trainer's logging, evaluation and "
            "checkpoints need every rank, so this run stops here. Restart it with the workers "
            "that are alive (torchrun --nnodes MIN:MAX --max-restarts N, docs/guide/reliability.md): "
            "run_clm.py resumes from the newest complete checkpoint"
            + (f", {checkpoints[-1]}." if checkpoints else " (there is none yet).")
        )

    def on_epoch_end(self, args, state, control, **kwargs):
        self.on_step_end(args, state, control)

    def on_step_begin(self, args, state, control, **kwargs):
        self._restore_own_parameters()

    def on_save(self, args, state, control, **kwargs):
        if self.engine is None:
            return
        self._restore_own_parameters()
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        save(folder, self.engine, self._model, self._optimizer, state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.engine is None:
            return
        if self.engine.lost.call_roll(self.engine.comm, "the check before the final consensus"):
            self._stop_for_lost_peers(args)
        self._restore_own_parameters()
        self.engine.install_consensus()
        self.engine.detach()
        self._unwrap_idle_steps()
        self._workers = self.engine.comm.all_gather_json(
            {"local_steps": self.engine.round_length,  # with auto:H, the last round's
             "inner_steps": self.engine.inner_step})
        if self._replaced_timeout is not None:
            set_group_timeout(None, self._replaced_timeout)

    def _swap_in_consensus(self) -> None:
        if self._own_parameters is None:
            self._own_parameters = self.engine.consensus.swap_in()

    def _restore_own_parameters(self) -> None:
        if self._own_parameters is not None:
            self.engine.consensus.restore(self._own_parameters)
            self._own_parameters = None

    # -------------------------------------------------------------- metrics
    def summary(self) -> dict[str, Any]:
        """What the run used and did, for ``all_results.json``: every setting (the outer ones
        filled from ``H`` when unset, and why), then the totals of ``engine.metrics()``."""
        engine = self.engine
        summary = {"gasloc_config": engine.config.to_dict(),
                   "gasloc_outer_defaults": engine.outer_choice.why,
                   "gasloc_workers": engine.world_size,
                   "gasloc_world_size": engine.world_size * engine.config.worker_size,
                   **engine.metrics()}
        if self._workers:  # at the end of training: every worker's own H_i and inner steps
            summary["gasloc_local_steps_per_worker"] = [w["local_steps"] for w in self._workers]
            summary["gasloc_inner_steps_per_worker"] = [w["inner_steps"] for w in self._workers]
        return summary

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.engine is None or logs is None or any(k.startswith("eval_") for k in logs):
            return
        metrics = self.engine.metrics()
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)


def lockstep_steps(config: GASLoCConfig) -> int | None:
    """The Trainer steps of a round when the workers' ``H_i`` may differ (a per-rank list of
    unequal values, or ``auto:H`` on a sparse graph): the largest ``H_i``; else ``None``."""
    setting = config.local_steps
    if isinstance(setting, list) and len(set(setting)) > 1 or (
            isinstance(setting, Auto) and config.topology != "complete"):
        return nominal_steps(setting)
    return None


TRAINER_ARGUMENTS = ("num_train_epochs", "per_device_train_batch_size",
                     "gradient_accumulation_steps", "seed", "data_seed", "logging_strategy",
                     "logging_steps", "logging_first_step", "eval_strategy", "eval_steps",
                     "eval_on_start", "save_strategy", "save_steps", "save_total_limit")


def trainer_arguments_to_agree_on(args, state) -> dict[str, Any]:
    """The Trainer arguments every rank must share: when each rank logs, evaluates and saves
    (its collectives), how far it trains, and its seeds."""
    values = {name: str(getattr(args, name, None)) for name in TRAINER_ARGUMENTS}
    values["max_steps"] = state.max_steps
    return values


def _calling_trainer() -> tuple[Trainer, str | None]:
    """The Trainer whose event is running, and the checkpoint it resumes from, if any (the
    fallback of a callback that was not bound)."""
    trainer, resume_from = None, None
    frame = inspect.currentframe()
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            trainer = trainer or candidate
            path = frame.f_locals.get("resume_from_checkpoint")
            resume_from = resume_from or (path if isinstance(path, str) else None)
        frame = frame.f_back
    del frame
    if trainer is None:
        raise RuntimeError("GASLoCCallback must be called by a transformers.Trainer.")
    return trainer, resume_from
