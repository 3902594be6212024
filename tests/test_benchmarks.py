"""Benchmark tools run for real on the local corpus: comparisons (resumed without redoing runs),
the H = 1 sweep's simulator against the engine, the GPU check's CPU dry run."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def compare(output_dir, *flags):
    command = [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--output_dir",
               str(output_dir), "--workers", "2", "--tokens", "4096", "--batch_size", "2",
               "--eval_every", "4", "--eval_blocks", "8", *flags]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_compare_runs_a_grid_and_resumes_without_redoing_runs(tmp_path):
    first = compare(tmp_path, "--grid", "h1_gentle")
    assert "4 runs in h1_gentle; 0 already done" in first
    runs = sorted((tmp_path / "runs").glob("*.json"))
    assert len(runs) == 4
    result = json.loads(runs[0].read_text())
    assert result["steps"] == 4096 // (2 * 2 * 64) and result["curve"][-1][0] == result["steps"]
    assert result["bytes_sent_per_worker"] > 0 and result["final_loss"] < 9
    stamps = [p.stat().st_mtime_ns for p in runs]
    second = compare(tmp_path, "--grid", "h1_gentle")
    assert "4 runs in h1_gentle; 4 already done" in second
    assert [p.stat().st_mtime_ns for p in runs] == stamps
    assert "| GASLoC | 1peer | 2 | 1 | nesterov | 1.0 | 0.5 |" in (tmp_path / "summary.md").read_text()
    plots = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plot_compare.py"),
                            "--runs", str(tmp_path / "runs"), "--output_dir", str(tmp_path),
                            "--workers", "2"], capture_output=True, text=True, cwd=ROOT)
    assert plots.returncode == 0, plots.stderr[-2000:]
    assert (tmp_path / "compare_curves.png").exists() and "### H = 1" in plots.stdout


def test_the_gpu_check_starts_and_reports_on_the_cpu(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry_run"],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          env={**__import__("os").environ, "OUT": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    report = (tmp_path / "gpu_check.md").read_text()
    assert "GPU check on CPU (dry run)" in report and "FAIL" not in report, report
    assert report.count("| exactness, gloo") == 6 and "tokens/s per GPU" in report
    assert "NCCL needs one GPU per rank" in report


def test_the_gossip_sweep_simulator_matches_the_engine():
    """The H = 1 sweep runs n workers in one process; each rule must give the engine's loss."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gossip_sweep.py"),
                           "--validate", "--tokens", "20000"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT / "benchmarks")
    assert done.returncode == 0, done.stderr[-3000:]
    pairs = re.findall(r"^(\S+): simulator ([\d.]+), engine ([\d.]+)$", done.stdout, re.M)
    assert {key.split("-")[0] for key, _, _ in pairs} == {"ours", "paper", "gossip"}
    for key, simulated, engine in pairs:
        assert abs(float(simulated) - float(engine)) < 1e-4, key
