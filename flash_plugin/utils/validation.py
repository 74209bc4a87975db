"""Argument checks shared by operators and solvers."""

from __future__ import annotations

import math

from flash_plugin.errors import FlashInputError


def check_nonnegative(name: str, value) -> float:
    """``value`` as a float that is finite and ``>= 0``, else a `FlashInputError` naming ``name``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise FlashInputError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise FlashInputError(f"{name} must be finite and >= 0, got {value!r}")
    return v
