"""examples/run_clm.py end to end: launched with accelerate on 2 gloo ranks."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import TrainerCallback

from hf_gasloc.integrations.ddp import disable_gradient_sync
from hf_gasloc.round.outer_defaults import choose_outer
from hf_gasloc.integrations.trainer import _calling_trainer

from examples import run_clm

from .distributed import run_ranks

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "run_clm.py"
SMALL = ["--max_steps", "8", "--max_train_samples", "256", "--max_eval_samples", "32",
         "--block_size", "64", "--per_device_train_batch_size", "4", "--logging_steps", "4",
         "--warmup_steps", "1",
         "--config_overrides", "hidden_size=32,intermediate_size=64,num_hidden_layers=2,"
         "num_attention_heads=2,num_key_value_heads=1,head_dim=16"]


def launch(output_dir, *flags, processes=2, log=None):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "examples/configs/cpu_4proc.yaml"), "--num_processes", str(processes),
               "--main_process_port", "0", str(SCRIPT), "--output_dir", str(output_dir),
               *SMALL, *flags]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    if log is not None:
        log.append(done.stdout + done.stderr)
    return json.loads((Path(output_dir) / "all_results.json").read_text())


def test_default_run_lowers_the_loss_and_writes_results(tmp_path):
    results = launch(tmp_path, "--gasloc_topology", "1peer", "--gasloc_local_steps", "4",
                     "--max_steps", "24", "--eval_on_start")
    assert results["world_size"] == 2
    assert results["gasloc/rounds"] == 6 and results["gasloc_topology"] == "1peer"
    used = results["gasloc_config"]  # every setting the run used, the outer ones filled from H
    chosen = choose_outer(None, None, None, 4, rounds=6)
    assert (used["local_steps"], used["outer_optimizer"], used["outer_lr"],
            used["outer_momentum"]) == (4, chosen.optimizer, chosen.lr, chosen.momentum)
    assert results["gasloc_outer_defaults"] == chosen.why and "default for H = 4, 6 rounds" in chosen.why
    assert results["eval_loss"] < results["start_eval_loss"] - 0.3
    assert results["perplexity"] == pytest.approx(math.exp(results["eval_loss"]))
    assert 0 <= results["eval_accuracy"] <= 1
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.hidden_size == 32


class DiLoCoCallback(TrainerCallback):
    """DiLoCo written out plainly: every H optimizer steps, All-Reduce the pseudo-gradient
    and take a Nesterov step on the anchor."""

    def __init__(self, local_steps, lr, momentum):
        self.local_steps, self.lr, self.momentum, self.steps = local_steps, lr, momentum, 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        trainer, _ = _calling_trainer()
        disable_gradient_sync(trainer.model_wrapped)
        args.average_tokens_across_devices = False
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.anchors = [p.detach().clone() for p in self.params]
        self.buffers = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def on_optimizer_step(self, args, state, control, **kwargs):
        self.steps += 1
        if self.steps % self.local_steps:
            return
        for param, anchor, buffer in zip(self.params, self.anchors, self.buffers):
            delta = anchor - param
            dist.all_reduce(delta)
            delta /= dist.get_world_size()
            buffer.mul_(self.momentum).add_(delta)
            anchor.sub_(self.lr * (delta + self.momentum * buffer))
            param.copy_(anchor)


def _reference(rank, world_size, output_dir, flags, kind):
    arguments = run_clm.parse_arguments(["--output_dir", output_dir, *SMALL, *flags])
    if kind == "diloco":
        outer, _ = arguments.gasloc.with_outer_defaults()  # what the GASLoC run uses for this H
        run_clm.run(arguments, [DiLoCoCallback(outer.local_steps, outer.outer_lr,
                                               outer.outer_momentum)])
        return None
    # Plain DDP, built here without the script's run(): the same model and data, a bare Trainer.
    from transformers import AutoTokenizer, Trainer, default_data_collator, set_seed
    model_args, data_args, training_args = arguments[:3]
    set_seed(training_args.seed)
    tokenizer = AutoTokenizer.from_pretrained(SCRIPT.parent / "data" / "tokenizer")
    model = run_clm.load_model(model_args, len(tokenizer))
    train, validation = run_clm.load_blocks(data_args, training_args, tokenizer, model)
    trainer = Trainer(model=model, args=training_args, train_dataset=train,
                      eval_dataset=validation, data_collator=default_data_collator)
    trainer.train()
    trainer.save_model()
    trainer.accelerator.wait_for_everyone()
    return None


def _assert_same_model(left, right, atol):
    a, b = load_file(Path(left) / "model.safetensors"), load_file(Path(right) / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=0), name


def test_complete_matches_a_diloco_reference_run(tmp_path):
    flags = ["--gasloc_topology", "complete", "--gasloc_local_steps", "4"]
    launch(tmp_path / "gasloc", *flags)
    run_ranks(_reference, 2, str(tmp_path / "diloco"), flags, "diloco", init=False)
    _assert_same_model(tmp_path / "gasloc", tmp_path / "diloco", atol=1e-6)


def test_topology_none_is_plain_ddp(tmp_path):
    results = launch(tmp_path / "none", "--gasloc_topology", "none")
    assert results["world_size"] == 2 and "gasloc/rounds" not in results
    run_ranks(_reference, 2, str(tmp_path / "ddp"), ["--gasloc_topology", "none"], "ddp",
              init=False)
    _assert_same_model(tmp_path / "none", tmp_path / "ddp", atol=1e-6)


@pytest.mark.parametrize("damage,found", [
    ("gasloc/manifest.json", "checkpoint-8 is incomplete"),
    ("gasloc/rank1.pt", "checkpoint-8/gasloc/rank1.pt is not the file that was saved"),
])
def test_a_restarted_run_resumes_from_its_newest_checkpoint_that_verifies_bit_for_bit(
        tmp_path, damage, found):
    flags = ["--gasloc_topology", "1peer", "--gasloc_local_steps", "3",
             "--save_strategy", "steps", "--save_steps", "4"]
    launch(tmp_path, *flags)
    uninterrupted = load_file(tmp_path / "model.safetensors")
    damaged = tmp_path / "checkpoint-8" / damage  # died while saving, or a disk error since
    damaged.write_bytes(damaged.read_bytes()[: len(damaged.read_bytes()) // 2])
    if damage.endswith("json"):
        damaged.unlink()
    log = []
    launch(tmp_path, *flags, log=log)  # the same command: it finds checkpoint-4 by itself
    assert found in log[0], log[0][-3000:]
    assert f"resuming from {tmp_path / 'checkpoint-4'}, the newest complete checkpoint" in log[0]
    resumed = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)


def test_the_embedded_defaults_yield_to_flags_and_environment(monkeypatch):
    def settings(*flags):
        arguments = run_clm.parse_arguments(list(flags))
        return arguments.gasloc.local_steps, arguments.training.max_steps, arguments.embedded

    assert settings() == (10, 150, True)
    assert settings("--gasloc_local_steps", "5", "--max_steps", "20") == (5, 20, True)
    monkeypatch.setenv("ACCELERATE_GASLOC_LOCAL_STEPS", "7")
    assert settings() == (7, 150, True)
    own_data = str(SCRIPT.parent / "data" / "pydocs_train.parquet")
    assert settings("--train_file", own_data, "--do_train")[::2] == (7, False)


@pytest.mark.parametrize("flags,message", [
    (["--gasloc_topology", "star"], "unknown topology 'star'"),
    (["--gasloc_local_steps", "0"], "local_steps must be >= 1"),
    (["--train_file", "missing.parquet"], "data file 'missing.parquet' does not exist"),
])
def test_bad_flags_fail_before_training(tmp_path, flags, message):
    output_dir = tmp_path / "out"
    done = subprocess.run([sys.executable, str(SCRIPT), "--output_dir", str(output_dir), *flags],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "WORLD_SIZE": "1"})
    assert done.returncode == 2
    assert message in done.stderr
    assert not output_dir.exists()


def _alone(tmp_path, launcher, *flags):
    """The command as users write it: no accelerate config, no launcher flags."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["HF_HOME"] = str(tmp_path / "hf_home")  # no accelerate default config there
    done = subprocess.run([*launcher, str(SCRIPT), "--output_dir", str(tmp_path / "out"), *SMALL,
                           *flags], capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return done, json.loads((tmp_path / "out" / "all_results.json").read_text())


def test_accelerate_launch_without_a_config_starts_local_workers_and_records_them(tmp_path):
    done, results = _alone(tmp_path, [sys.executable, "-m", "accelerate.commands.launch"],
                           "--gasloc_topology", "2peer", "--gasloc_local_steps", "4")
    first = (done.stdout + done.stderr).strip().splitlines()
    assert any(line.startswith("run_clm.py: no launcher started several processes") and
               "starting 4 local GASLoC workers" in line for line in first[:3]), first[:3]
    assert results["world_size"] == 4 and results["gasloc/rounds"] >= 1
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Decentralized training (GASLoC)" in card and "| workers | 4 |" in card
    assert "| topology | 2peer |" in card and f"| rounds | {results['gasloc/rounds']} |" in card
    assert "gasloc" in card.split("---")[1]  # the card's tags


def test_python_alone_starts_local_workers_and_zero_keeps_one_process(tmp_path):
    _, results = _alone(tmp_path / "two", [sys.executable], "--gasloc_topology", "1peer",
                        "--local_workers", "2")
    assert results["world_size"] == 2
    done, results = _alone(tmp_path / "one", [sys.executable], "--local_workers", "0")
    assert results["world_size"] == 1 and "gasloc/rounds" not in results
    assert "--local_workers 0: this single process trains alone" in done.stderr
