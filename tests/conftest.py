"""Two tiers. ``tests/unit`` runs in one process in seconds (``pytest -m "not slow"``): engines on
threads over an in-process fabric (``fake_fabric.py``), pure functions. Every other test starts
real processes (gloo ranks, ``torchrun``, ``accelerate launch``) and is marked ``slow`` here."""

from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent / "unit"


def pytest_collection_modifyitems(items):
    for item in items:
        if UNIT not in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.slow)
