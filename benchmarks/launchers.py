"""Real launcher runs for fault tests and benchmarks: torchrun agents and workers, cleaned up.

``torchrun`` starts each worker in a session of its own, so killing the agent's
process group does not reach the workers: every process is ended by its id.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--max_train_samples", "512", "--max_eval_samples", "32", "--block_size", "64",
        "--per_device_train_batch_size", "4", "--config_overrides",
        "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,"
        "num_key_value_heads=1,head_dim=16"]


class Launched:
    """A set of launcher processes (agents), their logs, and every process they started."""

    def __init__(self) -> None:
        self.agents: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self._seen: set[int] = set()

    def start(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(log, "w") as out:
            agent = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        self.agents.append(agent)
        self.logs.append(log)
        return agent

    def start_elastic_nodes(self, script: list[str], logs: Path, name: str, nodes: int = 4,
                            min_nodes: int = 3) -> list[subprocess.Popen]:
        """``nodes`` torchrun agents of one worker each on one c10d rendezvous, as separate
        machines would run them: the job goes on with ``min_nodes`` after losing one (up to 3
        restarts). Node 0 hosts the rendezvous store; logs are ``logs/node<i>.log``."""
        port = str(29400 + os.getpid() % 500)
        env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # see docs/guide/reliability.md
        agents = []
        for node in range(nodes):
            agents.append(self.start(torchrun(
                "--nnodes", f"{min_nodes}:{nodes}", "--nproc_per_node", "1",
                "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
                "--rdzv_id", f"{name}-{port}", "--max-restarts", "3",
                "--rdzv_conf", f"is_host={node == 0},last_call_timeout=2,join_timeout=300",
                *script), logs / f"node{node}.log", env))
            if node == 0:
                time.sleep(2)  # the store must be up before the others join
        return agents

    def kill_node(self, agent: subprocess.Popen) -> None:
        """A lost machine: its workers and its agent, at once."""
        for pid in [*self.workers(agent).values(), agent.pid]:
            os.kill(pid, signal.SIGKILL)

    def workers(self, agent: subprocess.Popen) -> dict[int, int]:
        """``{rank: pid}`` of the agent's live workers (read from their environment)."""
        found = {}
        for pid in _children(agent.pid):
            self._seen.add(pid)
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            values = dict(item.split(b"=", 1) for item in environ if b"=" in item)
            if b"RANK" in values:
                found[int(values[b"RANK"])] = pid
        return found

    def text(self) -> str:
        return "\n".join(log.read_text(errors="replace") for log in self.logs if log.exists())

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> float:
        """Poll until ``condition()``; returns the seconds it took. Fails at once when every
        agent has exited and the condition still does not hold."""
        start = time.monotonic()
        while not condition():
            ended = all(agent.poll() is not None for agent in self.agents)
            if ended and not condition():
                raise AssertionError(f"{what} did not happen: every launcher exited:\n"
                                     + self.text()[-3000:])
            if time.monotonic() - start > timeout:
                raise AssertionError(f"{what} did not happen within {timeout:g} s:\n"
                                     + self.text()[-3000:])
            for agent in self.agents:
                self.workers(agent)  # remember every pid, for the cleanup
            time.sleep(0.2)
        return time.monotonic() - start

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        for agent in self.agents:
            agent.wait(max(1.0, deadline - time.monotonic()))
        return [agent.returncode for agent in self.agents]

    def close(self) -> None:
        """Kill every agent and every worker ever seen (SIGKILL also ends stopped processes)."""
        for agent in self.agents:
            self.workers(agent)
        for pid in [a.pid for a in self.agents] + sorted(self._seen):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for agent in self.agents:
            agent.wait()
        for pid in self._seen:  # not our children: wait until the kernel has reaped them
            for _ in range(100):
                if is_gone(pid):
                    break
                time.sleep(0.05)

    def __enter__(self) -> "Launched":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def torchrun(*flags: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--monitor-interval", "0.5", *flags]


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def is_stopped(pid: int) -> bool:
    return _state(pid) == "T"


def is_gone(pid: int) -> bool:
    """Exited (possibly not yet reaped by its parent)."""
    return _state(pid) in ("", "Z")
