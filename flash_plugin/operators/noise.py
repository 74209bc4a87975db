"""Additive white Gaussian noise (denoising): ``y = x + σ_y n``, ``n ~ N(0, I)``.

``A`` is the identity, so ``A* = I``. ``σ_y`` is on the ``[-1, 1]`` scale: the paper's 0.05 on
``[0, 1]`` images is ``σ_y = 0.1`` here; ``σ_y = 0`` is allowed. The noise is drawn in `measure`
from the caller's generator (see `flash_plugin.operators.base`).
"""

from __future__ import annotations

import torch

from flash_plugin.operators.base import BaseLinearOperator

__all__ = ["GaussianNoise"]


class GaussianNoise(BaseLinearOperator):
    """Denoising: the identity forward map, Gaussian noise of std ``noise_std`` added by `measure`.

    Args:
        noise_std: ``σ_y`` on the ``[-1, 1]`` scale.
        batch_size: ``B`` the inputs must have, or ``None`` (default) for any batch: the operator
            has no per-sample parameters, so nothing could be broadcast wrongly.
    """

    operator_family = "gaussian-noise"
    output_range = (-1.0, 1.0)

    def __init__(self, noise_std: float = 0.1, *, batch_size: int | None = None) -> None:
        super().__init__(batch_size, noise_std)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y.clone()
