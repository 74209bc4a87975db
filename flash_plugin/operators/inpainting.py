"""Random pixel inpainting (the paper's ``random_inpaint`` task).

.. math::  A(x)_b = m_b \\odot x_b, \\qquad A^* = A \\ (\\text{a diagonal projection}),

with a binary mask ``m_b`` of shape ``(1, H, W)`` shared by all channels; missing pixels become
``0`` (mid-grey on the ``[-1, 1]`` scale). Severity ``t`` sets the kept fraction
``ρ(t) = 1 − max_missing · t`` (``max_missing = 0.8``: ``t = 1`` leaves 20 % of the pixels, the
paper's range; it evaluates ``t ∈ [0.875, 1]``, i.e. 70–80 % missing).

Two mask laws:

* **random** (default): per sample, a uniform field ``u_b ~ U[0, 1]^{H×W}`` is drawn from the
  caller's generator and the ``round(ρ(t_b)·H·W)`` pixels with the smallest ``u_b`` are kept, so
  the kept fraction is exact and, for one ``u_b``, masks are nested across ``t``.
* **nested** (the paper's quirk, ``nested=True``): one field ``u`` drawn once from
  ``torch.Generator().manual_seed(nested_seed)`` (seed 0 in the paper), identical for every image;
  a pixel is kept iff ``u < ρ(t)``. Masks then depend on ``t`` only.

How degraded the measurements are: docs/operators.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flash_plugin.errors import FlashInputError
from flash_plugin.operators.base import BaseLinearOperator, GeneratorLike, check_severity, rand

DEFAULT_MAX_MISSING: float = 0.8

__all__ = ["DEFAULT_MAX_MISSING", "RandomInpainting"]


def _spatial(image_shape: Sequence[int]) -> tuple[int, int]:
    shape = tuple(int(s) for s in image_shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise FlashInputError(f"image_shape must be (H, W) or (C, H, W) with positive sizes, got {image_shape!r}")
    return shape[-2], shape[-1]


class RandomInpainting(BaseLinearOperator):
    """Pixel masking ``y = m ⊙ x`` with a per-sample binary mask.

    Args:
        mask: ``(B, 1, H, W)`` or ``(B, H, W)``, bool or 0/1 values; 1 = kept pixel.
        noise_std: ``σ_y`` on the ``[-1, 1]`` scale.
        severity: the ``t`` the masks came from (set by `from_severity`), or ``None``.
    """

    _per_sample = ("mask",)
    operator_family = "inpainting"
    output_range = (-1.0, 1.0)

    def __init__(self, mask: torch.Tensor, noise_std: float = 0.0, *, severity=None) -> None:
        mask = torch.as_tensor(mask)
        if mask.ndim == 3:
            mask = mask[:, None]
        if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[0] < 1:
            raise FlashInputError(f"mask must have shape (B, 1, H, W) or (B, H, W), got {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise FlashInputError("mask must be binary (bool or 0/1 values)")
            mask = mask != 0
        super().__init__(int(mask.shape[0]), noise_std, severity)
        self.mask = mask

    @classmethod
    def from_severity(
        cls,
        t,
        generator: GeneratorLike = None,
        *,
        image_shape: Sequence[int],
        noise_std: float = 0.0,
        max_missing: float = DEFAULT_MAX_MISSING,
        nested: bool = False,
        nested_seed: int = 0,
    ) -> RandomInpainting:
        """Masks keeping a fraction ``1 − max_missing·t`` of the pixels of ``image_shape``
        (``(H, W)`` or ``(C, H, W)``), random per sample from ``generator``, or the paper's fixed
        nested mask when ``nested`` (``generator`` then unused)."""
        t = check_severity(t)
        if not 0.0 <= float(max_missing) <= 1.0:
            raise FlashInputError(f"max_missing must lie in [0, 1], got {max_missing}")
        h, w = _spatial(image_shape)
        keep = 1.0 - float(max_missing) * t  # [B]
        if nested:
            u = torch.rand((h, w), generator=torch.Generator().manual_seed(int(nested_seed)), dtype=torch.float64)
            mask = u[None] < keep.cpu()[:, None, None]
        else:
            u = rand(generator, t.shape[0], (h * w,))
            n_keep = torch.round(keep.to(u.device) * (h * w)).to(torch.int64)  # exact kept count
            rank = u.argsort(dim=1).argsort(dim=1)  # rank of each pixel's u within its sample
            mask = (rank < n_keep[:, None]).reshape(-1, h, w)
        return cls(mask, noise_std, severity=t)

    @property
    def kept_fraction(self) -> torch.Tensor:
        """Fraction of kept pixels per sample, float64 ``[B]``."""
        return self.mask.flatten(1).to(torch.float64).mean(dim=1)

    def _check_input(self, x: torch.Tensor, name: str) -> None:
        super()._check_input(x, name)
        if tuple(x.shape[-2:]) != tuple(self.mask.shape[-2:]):
            raise FlashInputError(
                f"{name} has spatial size {tuple(x.shape[-2:])} but the masks are {tuple(self.mask.shape[-2:])}"
            )

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask.to(device=x.device, dtype=x.dtype)

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.mask.to(device=y.device, dtype=y.dtype)

    def _repr_extra(self) -> str:
        kept = self.kept_fraction
        return f"image={tuple(self.mask.shape[-2:])}, kept=[{kept.min().item():.3g}, {kept.max().item():.3g}]"
