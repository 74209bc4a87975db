"""Latent-DPS: diffusion posterior sampling in the latent space of a latent diffusion model.

Papers:
    H. Chung, J. Kim, M. T. Mccann, M. L. Klasky, J. C. Ye, "Diffusion Posterior Sampling for
    General Noisy Inverse Problems", ICLR 2023 (DPS, in pixel space); used in latent space as the
    "Latent-DPS" baseline of L. Rout et al., "Solving Linear Inverse Problems Provably via
    Posterior Sampling with Latent Diffusion Models", NeurIPS 2023, and of Z. Fabian, B. Tinaz,
    M. Soltanolkotabi, "Adapt and Diffuse: Sample-adaptive Reconstruction via Latent Diffusion
    Models", ICML 2024 (Flash-Diffusion), whose official re-implementation this module follows.

Update (DDPM over all 1000 train timesteps, ``η = 1``, as in the official Flash code; one UNet
call per step, gradients through the UNet and the decoder)::

    ε = ε_θ(z_k, t_k),                   ẑ0 = (z_k − sqrt(1 − ᾱ_k) ε) / sqrt(ᾱ_k)
    z'_{k−1} = DDIM(η) step of (z_k, ε, ẑ0)              (`ReverseDiffusionSolver.update`)
    z_{k−1}  = z'_{k−1} − ζ ∇_{z_k} Σ_i ‖y_i − A(D(ẑ0_i))‖₂

The norm is the plain (non-squared) L2 norm *of each sample* (flash-algorithm.md §6.2); the
gradient of the sum over the batch is the per-sample gradient, so samples never interact. On the
squared loss this is DPS's step ``ζ / ‖r‖``. No noise is added to the prediction (the PSLD repo's
"noiser" quirk is dropped).

Hyperparameters per task: `flash_plugin.solvers.hparams` (the paper's and ours).

Costs reported in ``Solution.extras``: ``count_decoder_calls`` (one decoder forward + backward per
step and sample; the final decode of the result is not counted), ``count_encoder_calls`` (0).
"""

from __future__ import annotations

from typing import Any

import torch

from flash_plugin.solvers.base import StepContext
from flash_plugin.solvers.guidance import (  # noqa: F401 (pad_counts: re-exported, it lived here)
    CountingSolver,
    add_count,
    check_weight,
    pad_counts,
    per_sample_norm,
)


class LatentDPS(CountingSolver):
    """Latent-DPS (Chung et al. 2023 in LDM latent space): z ← z' − ζ ∇ Σ_i ‖y_i − A(D(ẑ0_i))‖₂.

    Args:
        model: a `LatentDiffusion`, `GaussianOracle` or anything with ``eps``, ``encode``,
            ``decode`` (differentiable), ``alphas_cumprod`` and ``latent_shape``.
        zeta: the step size ``ζ`` of the measurement term (default: the paper's gblur-varying value).
        num_steps: ``N``; all train timesteps by default (DDPM-1000 for the paper's LDM).
        eta: DDIM stochasticity, ``1`` (DDPM ancestral) by default as in the official Flash code.
        progress: show a tqdm progress bar.
    """

    name = "latent-dps"

    def __init__(self, model: Any, *, zeta: float = 1.0, num_steps: int | None = None, eta: float = 1.0, progress: bool = False):
        super().__init__(model, num_steps=num_steps, eta=eta, progress=progress)
        self.zeta = check_weight("zeta", zeta)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(N={self.schedule.num_steps}, eta={self.eta}, {self._weights_repr()})"

    def _weights_repr(self) -> str:
        return f"zeta={self.zeta}"

    def guidance_loss(self, ctx: StepContext, x0: torch.Tensor) -> torch.Tensor:
        """Per-sample ``R_i(ẑ0)`` (``[B]``) whose gradient w.r.t. ``z_k`` is subtracted."""
        x = self.model.decode(x0)
        add_count(ctx.state, ctx.index, "count_decoder_calls")
        return self.zeta * per_sample_norm(ctx.y - ctx.operator.forward(x))

    def step(self, ctx: StepContext) -> torch.Tensor:
        z = ctx.z.detach().requires_grad_(True)
        with torch.enable_grad():
            eps, x0 = self.predict(ctx, z)
            loss = self.guidance_loss(ctx, x0)
            (grad,) = torch.autograd.grad(loss.sum(), z, allow_unused=True)
        with torch.no_grad():
            out = self.update(ctx, ctx.z, eps.detach(), x0.detach())
            return out if grad is None else out - grad
