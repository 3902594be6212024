"""The README's main command, GASLoC against DiLoCo and DDP, for candidate outer settings.

    python benchmarks/default_run.py                 # every candidate; resumable
    python benchmarks/default_run.py --candidates defaults "0.7 0.9"

Each candidate (outer lr, momentum) runs ``examples/run_clm.py`` on its embedded
default (4 local workers, the tiny LLaMA, 150 steps) with ``--gasloc_topology
2peer`` and with ``complete`` (DiLoCo), plus DDP once (``none``); ``defaults``
sets no outer flag (the library's rule picks them). The table gives each final
eval loss and GASLoC's gap to DiLoCo. Results: one JSON per run in
``--output_dir``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import command, machine, table
from training import ROOT

CANDIDATES = ["defaults", "0.7 0.9", "0.4 0.5", "0.7 0.5", "1.0 0.5", "0.5 0.7"]
DEFAULTS = "defaults"


def run(output: Path, topology: str, outer: str | None) -> dict:
    name = f"{topology}" + ("" if outer is None else "-" + outer.replace(" ", "-"))
    result = output / f"{name}.json"
    if result.exists():
        return json.loads(result.read_text())
    flags = ["--gasloc_topology", topology, "--output_dir", str(output / name),
             "--auto_resume", "false", "--save_strategy", "no"]
    if outer not in (None, DEFAULTS):
        lr, momentum = outer.split()
        flags += ["--gasloc_outer_lr", lr, "--gasloc_outer_momentum", momentum]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "run_clm.py"), *flags],
                          capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    results = json.loads((output / name / "all_results.json").read_text())
    summary = {"name": name, "topology": topology, "outer": outer,
               "outer_used": results.get("gasloc_outer_defaults"),
               "eval_loss": results["eval_loss"], "seconds": time.perf_counter() - start,
               "command": "python examples/run_clm.py " + " ".join(flags)}
    result.write_text(json.dumps(summary, indent=1))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", nargs="+", default=CANDIDATES,
                        help="'outer_lr momentum' pairs for the Nesterov outer optimizer, or "
                             "'defaults' (no outer flag)")
    parser.add_argument("--output_dir", default=str(ROOT / "outputs" / "default_run"))
    args = parser.parse_args()
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    ddp = run(output, "none", None)
    rows = [["DDP (none)", "-", f"{ddp['eval_loss']:.3f}", "", f"{ddp['seconds']:.0f}"]]
    for outer in args.candidates:
        diloco, gasloc = run(output, "complete", outer), run(output, "2peer", outer)
        print(f"{outer}: DiLoCo {diloco['eval_loss']:.3f}, GASLoC {gasloc['eval_loss']:.3f}",
              flush=True)
        label = outer if outer != DEFAULTS else f"defaults: {gasloc['outer_used']}"
        rows.append(["DiLoCo (complete)", label, f"{diloco['eval_loss']:.3f}", "",
                     f"{diloco['seconds']:.0f}"])
        gap = gasloc["eval_loss"] / diloco["eval_loss"] - 1
        rows.append(["GASLoC 2peer", label, f"{gasloc['eval_loss']:.3f}", f"{gap:+.1%}",
                     f"{gasloc['seconds']:.0f}"])
    print(f"\nCommand: `{command()}`\nMachine: {machine()}\n")
    print(table(["method", "outer lr, momentum", "final eval loss", "vs DiLoCo", "wall s"], rows))


if __name__ == "__main__":
    main()
