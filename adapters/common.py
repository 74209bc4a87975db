"""Plumbing the adapters share: where each sample starts, and the shims of the DPS-style steps.

Not a plugin (no hooks): `flash_plugin.adapters.compvis`, `.resample`, `.dps` and `.deepinv`
import it.
"""

from __future__ import annotations

from typing import Any

import torch

from flash_plugin.errors import FlashInputError
from flash_plugin.types import NoiseSchedule, StartPoint
from flash_plugin.utils.random import GeneratorLike, randn_per_sample


def start_of(start: StartPoint | None, generator: GeneratorLike, schedule: NoiseSchedule, batch: int,
             shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(steps, latents)`` per sample: ``N`` and noise drawn from the caller's generators (as in
    every flash-plugin solver) without a ``start``, else its validated steps (on the CPU) and its
    detached latents."""
    if start is None:
        steps = torch.full((batch,), schedule.num_steps, dtype=torch.long)
        return steps, randn_per_sample((batch, *shape), generator, device=device, dtype=dtype)
    if start.latent.shape[0] != batch or tuple(start.latent.shape[1:]) != tuple(shape):
        raise FlashInputError(f"start.latent must have shape ({batch}, {', '.join(map(str, shape))}), got {tuple(start.latent.shape)}")
    return schedule.check_steps(start.step).cpu(), start.latent.detach()


def gaussian(x: torch.Tensor) -> torch.Tensor:
    """A noiser named ``gaussian``: the DPS ``'ps'`` steps of the DPS and ReSample repositories
    read only the noiser's ``__name__``."""
    return x


class ForwardShim:
    """``forward(x, **kwargs)``: the upstream DPS steps pass keywords (``noisy_measurement``,
    ``mask``) that a flash-plugin operator does not take."""

    def __init__(self, operator: Any):
        self.operator = operator

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.operator.forward(x)
