"""Frozen result and schedule types shared by every part of flash-plugin.

Conventions (docs/architecture.md, "Conventions"): images are ``(B, C, H, W)`` in ``[-1, 1]``; a step index
``k`` counts the reverse steps that remain, ``k = N`` is a full solve from noise and ``k = 0``
decodes the start latent without any denoiser call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from flash_plugin.errors import FlashInputError, StartStepError


@dataclass(frozen=True)
class NoiseSchedule:
    """Marginal coefficients of a solver over its own steps ``k = 0..N``.

    Attributes:
        alphas_cumprod: float64 ``[N + 1]``; ``alphas_cumprod[k]`` is ``ᾱ`` of the noise level a
            solve that starts at step ``k`` begins at. ``alphas_cumprod[0] == 1`` (clean).
        timesteps: int64 ``[N + 1]``; ``timesteps[k]`` is the denoiser's timestep for the step
            taken from level ``k`` (``k >= 1``); ``timesteps[0] = -1`` (no step is taken there).
    """

    alphas_cumprod: torch.Tensor
    timesteps: torch.Tensor

    def __post_init__(self) -> None:
        acp = torch.as_tensor(self.alphas_cumprod, dtype=torch.float64).detach().cpu()
        ts = torch.as_tensor(self.timesteps, dtype=torch.int64).detach().cpu()
        if acp.ndim != 1 or ts.shape != acp.shape or len(acp) < 1:
            raise FlashInputError(f"alphas_cumprod and timesteps must be 1-D of equal length N+1, got {tuple(acp.shape)} and {tuple(ts.shape)}")
        if abs(acp[0].item() - 1.0) > 1e-12:
            raise FlashInputError(f"alphas_cumprod[0] must be 1 (k = 0 is the clean level), got {acp[0].item()}")
        if not torch.all(torch.isfinite(acp)) or torch.any(acp <= 0) or torch.any(acp > 1):
            raise FlashInputError("alphas_cumprod must lie in (0, 1]")
        if torch.any(acp[1:] > acp[:-1]):
            raise FlashInputError("alphas_cumprod must not increase with k (more steps left = more noise)")
        object.__setattr__(self, "alphas_cumprod", acp)
        object.__setattr__(self, "timesteps", ts)

    @classmethod
    def from_train_alphas(cls, train_alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> NoiseSchedule:
        """Build from a scheduler's ``alphas_cumprod`` (indexed by train timestep) and the
        descending timesteps a solver visits, e.g. ``scheduler.timesteps`` after ``set_timesteps``."""
        acp_train = torch.as_tensor(train_alphas_cumprod, dtype=torch.float64).cpu()
        ts = torch.as_tensor(timesteps, dtype=torch.int64).cpu()
        if ts.ndim != 1 or len(ts) == 0 or torch.any(ts[1:] >= ts[:-1]):
            raise FlashInputError("timesteps must be a non-empty strictly descending 1-D sequence")
        asc = ts.flip(0)  # k = 1..N
        acp = torch.cat([torch.ones(1, dtype=torch.float64), acp_train[asc]])
        return cls(acp, torch.cat([torch.tensor([-1]), asc]))

    @property
    def num_steps(self) -> int:
        """``N``: the number of reverse steps of a full solve."""
        return len(self.alphas_cumprod) - 1

    @property
    def a(self) -> torch.Tensor:
        return self.alphas_cumprod.sqrt()

    @property
    def b(self) -> torch.Tensor:
        return (1.0 - self.alphas_cumprod).sqrt()

    def snr(self) -> torch.Tensor:
        """``a_k² / b_k²`` for ``k = 0..N`` (``inf`` at ``k = 0``)."""
        return self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    def check_steps(self, steps: torch.Tensor) -> torch.Tensor:
        steps = torch.as_tensor(steps)
        if steps.dtype.is_floating_point or steps.dtype == torch.bool:
            raise StartStepError(f"start steps must be integers, got dtype {steps.dtype}")
        if steps.numel() and (steps.min() < 0 or steps.max() > self.num_steps):
            raise StartStepError(
                f"start steps must lie in 0..{self.num_steps} (this solver's N), got min {steps.min().item()} max {steps.max().item()}"
            )
        return steps.long()


@dataclass(frozen=True)
class StartPoint:
    """Where a solve begins: per-sample step ``k`` (LongTensor ``[B]``) and the latent at that level."""

    step: torch.Tensor
    latent: torch.Tensor

    def __post_init__(self) -> None:
        step = torch.as_tensor(self.step)
        if step.ndim == 0:
            step = step.expand(self.latent.shape[0])
        if step.ndim != 1 or step.shape[0] != self.latent.shape[0]:
            raise FlashInputError(f"StartPoint.step must have one entry per sample ({self.latent.shape[0]}), got shape {tuple(step.shape)}")
        if step.dtype.is_floating_point:
            raise StartStepError(f"StartPoint.step must be an integer tensor, got {step.dtype}")
        if not torch.all(torch.isfinite(self.latent)):
            raise FlashInputError("StartPoint.latent contains NaN or Inf")
        object.__setattr__(self, "step", step.long().to(self.latent.device))


@dataclass(frozen=True)
class SeverityEstimate:
    """Output of a `SeverityEstimator`: predicted clean latent ``ẑ`` ``(B, ...)`` and error variance ``σ̂²`` ``[B]``."""

    latent: torch.Tensor
    variance: torch.Tensor


@dataclass(frozen=True)
class Solution:
    """Result of a solve.

    Attributes:
        x: reconstruction ``(B, C, H, W)`` in ``[-1, 1]`` (not clipped).
        latent: final latent (``x`` itself for pixel-space solvers).
        nfe: LongTensor ``[B]``, denoiser evaluations per sample.
        start_step: LongTensor ``[B]``, the step each sample started at.
        severity: ``σ̂²`` per sample when a severity estimator chose the start, else ``None``.
        extras: counts of other costly calls (``decoder_calls``, ``encoder_calls``, ...).
    """

    x: torch.Tensor
    latent: torch.Tensor
    nfe: torch.Tensor
    start_step: torch.Tensor
    severity: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
