"""The fast tier stays in one process: a unit test that starts a process fails, naming why."""

import multiprocessing.process
import subprocess

import pytest


def _refuse(*_args, **_kwargs):
    raise AssertionError("tests/unit runs in one process: a test that starts processes belongs "
                         "in tests/ (marked slow there).")


@pytest.fixture(autouse=True)
def in_process_only(monkeypatch):
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", _refuse)
