"""Checks of the values users pass as options: one wording for every error.

Each check names the option, the value and what was expected, and returns the value in its
canonical type: numpy integers pass as ints (as HF's generate takes them), while bools, floats
and strings never pass for an int (`True` is an int to Python, never a size to a user).
"""

from __future__ import annotations

import numbers


def is_int(value) -> bool:
    """An integer that is not a bool: Python ints and numpy integers."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def int_option(name: str, value, low: int = 1, high: int | None = None) -> int:
    """`value` as an int in [low, high] (high None: no upper bound), else a ValueError."""
    if not is_int(value) or value < low or (high is not None and value > high):
        expected = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
        raise ValueError(f"{name} = {value!r} must be {expected}")
    return int(value)


def number_option(name: str, value, low: float, high: float = float("inf"), low_open: bool = False) -> float:
    """`value` as a float in [low, high] (or (low, high] with low_open), else a ValueError."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not real or value != value or value > high or value < low or (low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{name} = {value!r} must be a number in {bounds}")
    return float(value)


def bool_option(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} = {value!r} must be True or False")
    return value


def int_list_option(name: str, value) -> list[int]:
    """A non-empty list or tuple of ints (layer indices, widths), as a list of ints."""
    if not isinstance(value, (list, tuple)) or not value or not all(map(is_int, value)):
        raise ValueError(f"{name} = {value!r} must be a non-empty list of ints")
    return [int(v) for v in value]
