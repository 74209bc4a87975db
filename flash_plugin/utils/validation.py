"""Argument checks shared by operators, solvers, severity estimators and `flash()`."""

from __future__ import annotations

import math

import torch

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


def check_finite_batch(name: str, x: torch.Tensor) -> None:
    """A `FlashInputError` naming ``name`` unless ``x`` is real floating point, non-empty and finite."""
    if not x.is_floating_point():
        raise FlashInputError(f"{name} must have a real floating dtype (float32, float64, float16, bfloat16), got {x.dtype}")
    if x.shape[0] == 0:
        raise FlashInputError(f"{name} is an empty batch")
    if not bool(torch.isfinite(x).all()):
        raise FlashInputError(f"{name} contains NaN or Inf")
