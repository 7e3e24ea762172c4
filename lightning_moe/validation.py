"""Argument checks shared by every public class: each names the field, the value and the fix."""

from __future__ import annotations

import math


def check_positive_int(owner: str, name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}: `{name}` must be a positive integer, got {value!r}. Set `{name}` to 1 or more.")


def check_non_negative(owner: str, name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{owner}: `{name}` must be a finite number >= 0, got {value!r}. Use 0.0 to turn it off.")


def check_fraction(owner: str, name: str, value: object) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1):
        raise ValueError(f"{owner}: `{name}` must lie strictly between 0 and 1, got {value!r}. Try 0.05.")
