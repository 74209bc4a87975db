"""Gaussian blur with a per-sample standard deviation (the paper's ``gblur`` tasks).

.. math::  A(x)_b = g_{s_b} * x_b, \\qquad
           g_s(k) \\propto \\exp\\left(-\\tfrac{k^2}{2 s^2}\\right),\\ |k| \\le r(s),

applied separably (rows, then columns) and depthwise (each channel alone), with reflection
padding (``ReflectionPad2d``, as the official Flash code). The kernel is truncated at radius
``r(s) = min(ceil(truncate · s), min(H, W) − 1)`` (``truncate = 4`` by default, scipy's
``gaussian_filter`` default; the cap keeps reflection padding valid for small images) and
normalised to sum 1 on its support. In a batch, every sample's kernel is built on its own support
and zero-padded to the largest one, so a batch equals its samples blurred one by one.
``s = 0`` is the identity.

Severity ``t ∈ [0, 1]`` maps linearly to the std: ``s(t) = lo + (hi − lo)·t``, by default
`DEFAULT_STD_RANGE` ``= (0.3, 8.0)`` px (the paper's 0.3–3.0 px are for 256-px images; why ours is
wider, and how degraded the measurements are: docs/operators.md). The fixed-std task is the same
operator with ``t`` fixed (preset ``gblur-fixed``: ``t = 1``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flash_plugin.errors import FlashInputError
from flash_plugin.operators.base import BaseLinearOperator, GeneratorLike, _check_range, check_severity

DEFAULT_STD_RANGE: tuple[float, float] = (0.3, 8.0)
DEFAULT_TRUNCATE: float = 4.0

__all__ = ["DEFAULT_STD_RANGE", "DEFAULT_TRUNCATE", "GaussianBlur", "gaussian_kernels_1d"]


def gaussian_kernels_1d(std: torch.Tensor, truncate: float = DEFAULT_TRUNCATE, max_radius: int | None = None) -> torch.Tensor:
    """Per-sample normalised 1-D Gaussian kernels ``(B, 2R + 1)`` in float64.

    Sample ``b`` has support ``|k| <= r_b = min(ceil(truncate · std_b), max_radius)`` and zeros
    beyond it; ``R = max_b r_b``.
    """
    std = std.to(torch.float64)
    radius = torch.ceil(truncate * std)
    if max_radius is not None:
        radius = radius.clamp(max=max_radius)
    big_r = int(radius.max().item()) if radius.numel() else 0
    k = torch.arange(-big_r, big_r + 1, device=std.device, dtype=torch.float64)
    # std = 0: k / tiny is +-inf off-centre (weight 0) and 0 at the centre (weight 1): a delta.
    z = k[None, :] / std.clamp_min(torch.finfo(torch.float64).tiny)[:, None]
    g = torch.exp(-0.5 * z * z)
    g = torch.where(k.abs()[None, :] <= radius[:, None], g, torch.zeros_like(g))
    return g / g.sum(dim=1, keepdim=True)


class GaussianBlur(BaseLinearOperator):
    """Separable depthwise Gaussian blur with reflection padding and a per-sample std.

    Args:
        std: blur standard deviations in pixels, shape ``[B]``, finite and ``>= 0``.
        noise_std: ``σ_y`` on the ``[-1, 1]`` scale.
        truncate: kernel radius in stds (``r = ceil(truncate · std)``).
        severity: the ``t`` the stds came from (set by `from_severity`), or ``None``.
    """

    _per_sample = ("std",)
    operator_family = "gaussian-blur"
    output_range = (-1.0, 1.0)  # a normalised non-negative kernel: a convex combination of pixels

    def __init__(self, std: torch.Tensor, noise_std: float = 0.0, *, truncate: float = DEFAULT_TRUNCATE, severity=None) -> None:
        std = torch.as_tensor(std)
        if not std.is_floating_point():
            std = std.to(torch.float64)
        if std.ndim != 1 or std.shape[0] < 1:
            raise FlashInputError(f"std must be a vector [B] with B >= 1, got shape {tuple(std.shape)}")
        if not bool(torch.isfinite(std).all()) or bool((std < 0).any()):
            raise FlashInputError(f"std must be finite and >= 0, got {std.tolist()}")
        if not (math.isfinite(truncate) and truncate > 0):
            raise FlashInputError(f"truncate must be finite and > 0, got {truncate}")
        super().__init__(int(std.shape[0]), noise_std, severity)
        self.std = std.to(torch.float64)
        self.truncate = float(truncate)

    @classmethod
    def from_severity(
        cls,
        t,
        generator: GeneratorLike = None,
        *,
        std_range: tuple[float, float] = DEFAULT_STD_RANGE,
        noise_std: float = 0.0,
        truncate: float = DEFAULT_TRUNCATE,
    ) -> GaussianBlur:
        """Blur with ``std = lo + (hi − lo)·t`` per sample (``t`` a vector ``[B]`` in ``[0, 1]``).

        ``generator`` is accepted for a uniform factory signature and unused (nothing is random).
        """
        t = check_severity(t)
        lo, hi = _check_range(std_range, "std_range")
        return cls(lo + (hi - lo) * t, noise_std, truncate=truncate, severity=t)

    def kernels(self, image_size: tuple[int, int] | None = None) -> torch.Tensor:
        """The per-sample 1-D kernels ``(B, 2R + 1)`` (float64) used for images of ``image_size``."""
        max_radius = None if image_size is None else min(image_size) - 1
        return gaussian_kernels_1d(self.std, self.truncate, max_radius)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        kern = gaussian_kernels_1d(self.std.to(x.device), self.truncate, min(h, w) - 1).to(x.dtype)
        r = (kern.shape[1] - 1) // 2
        weight = kern.repeat_interleave(c, dim=0)  # (B*C, K): one kernel per (sample, channel)
        z = x.reshape(1, b * c, h, w)
        z = F.conv2d(F.pad(z, (0, 0, r, r), mode="reflect"), weight[:, None, :, None], groups=b * c)
        z = F.conv2d(F.pad(z, (r, r, 0, 0), mode="reflect"), weight[:, None, None, :], groups=b * c)
        return z.reshape(b, c, h, w)

    def _repr_extra(self) -> str:
        return f"std=[{self.std.min().item():.3g}, {self.std.max().item():.3g}] px, truncate={self.truncate:g}"
