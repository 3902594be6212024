"""Reading setting values that may arrive as strings (flags, environment variables)."""

from __future__ import annotations

import math
from typing import Any


def number(name: str, value: Any) -> float:
    """A finite number (``inf`` and ``nan`` are refused: no setting means them)."""
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}.") from None
    if not math.isfinite(result):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    return result


def positive_float(name: str, value: Any, at_least: float | None = None,
                   at_most: float | None = None) -> float:
    """A finite number ``> 0`` (and within the bounds given)."""
    result = number(name, value)
    if not result > 0:
        raise ValueError(f"{name} must be > 0, got {result:g}.")
    if at_least is not None and result < at_least:
        raise ValueError(f"{name} must be at least {at_least:g}, got {result:g}.")
    if at_most is not None and result > at_most:
        raise ValueError(f"{name} must be at most {at_most:g}, got {result:g}.")
    return result


def integer(name: str, value: Any, minimum: int | None = None) -> int:
    try:
        result = int(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be an integer, got {value!r}.") from None
    if result != float(value) or (minimum is not None and result < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{name} must be an integer{bound}, got {value!r}.")
    return result


def choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    text = str(value).strip().lower()
    if text not in choices:
        raise ValueError(f"unknown {name} {value!r} (--gasloc_{name}): choose one of "
                         f"{', '.join(choices)}.")
    return text


def boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}.")
