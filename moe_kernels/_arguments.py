"""Checks of the arguments a user gives the layer, its router and balancer, and the training CLI,
made where they are given: each error names the argument and what it must be, before anything is
built, run or written."""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection


def check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_number(name: str, value: object, minimum: float = 0.0, *, strict: bool = False) -> None:
    """A finite real number >= minimum (> minimum when ``strict``): NaN and infinities never
    pass, so a bias or a loss cannot turn into NaN steps later."""
    ok = (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > minimum if strict else value >= minimum)
    )
    if not ok:
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def check_choice(name: str, value: object, choices: Collection[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
