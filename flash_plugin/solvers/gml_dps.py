"""GML-DPS: Latent-DPS plus a "goodness of the latent" (autoencoder fixed-point) regulariser.

Paper: L. Rout, N. Raoof, G. Daras, C. Caramanis, A. G. Dimakis, S. Shakkottai, "Solving Linear
Inverse Problems Provably via Posterior Sampling with Latent Diffusion Models", NeurIPS 2023
(GML-DPS is the paper's intermediate method; PSLD adds the gluing term, see `psld`). Used as a
baseline by Z. Fabian, B. Tinaz, M. Soltanolkotabi, "Adapt and Diffuse: Sample-adaptive
Reconstruction via Latent Diffusion Models", ICML 2024, whose official re-implementation this
module follows (the PSLD repo has no separate code path: there GML-DPS is PSLD with a zero
"transpose").

Update (DDPM over all train timesteps, ``η = 1``; one UNet call per step)::

    ε = ε_θ(z_k, t_k),                  ẑ0 = (z_k − sqrt(1 − ᾱ_k) ε) / sqrt(ᾱ_k)
    z'_{k−1} = DDIM(η) step of (z_k, ε, ẑ0)
    R_i      = ζ ‖y_i − A(D(ẑ0_i))‖₂ + γ ‖ẑ0_i − E(D(ẑ0_i))‖₂          (per sample, non-squared)
    z_{k−1}  = z'_{k−1} − ∇_{z_k} Σ_i R_i

Gradients flow through the UNet, the decoder and the encoder.

Hyperparameters per task (ζ, γ and the Flash noise correction c; the paper's official FFHQ
configs). The authoritative table, with the values re-tuned for the bundled model, is `flash_plugin.solvers.hparams`:

    gblur-varying       ζ = 3.0    γ = 0.05   c = 1.2
    gblur-fixed         ζ = 2.0    γ = 0.05   c = 1.0
    nonlinear-blur      ζ = 3.0    γ = 0.05   c = 1.2
    random-inpainting   ζ = 10.0   γ = 0.05   c = 1.0

Costs in ``Solution.extras``: ``count_decoder_calls`` and ``count_encoder_calls``, one each per
step and sample (forward + backward).
"""

from __future__ import annotations

from typing import Any

import torch

from flash_plugin.solvers.base import StepContext
from flash_plugin.solvers.latent_dps import LatentDPS, add_count, check_weight, per_sample_norm


class GMLDPS(LatentDPS):
    """GML-DPS (Rout et al. 2023): Latent-DPS + γ‖ẑ0 − E(D(ẑ0))‖₂ per sample.

    Args:
        model: a latent model (``eps``, ``encode``, differentiable ``decode``, ``alphas_cumprod``, ``latent_shape``).
        zeta: step size ``ζ`` of the measurement term.
        gamma: weight ``γ`` of the autoencoder fixed-point term.
        num_steps, eta, progress: as for `LatentDPS` (DDPM over all train timesteps, ``η = 1``).
    """

    name = "gml-dps"

    def __init__(self, model: Any, *, zeta: float = 3.0, gamma: float = 0.05, num_steps: int | None = None,
                 eta: float = 1.0, progress: bool = False):
        super().__init__(model, zeta=zeta, num_steps=num_steps, eta=eta, progress=progress)
        self.gamma = check_weight("gamma", gamma)

    def _weights_repr(self) -> str:
        return f"zeta={self.zeta}, gamma={self.gamma}"

    def guidance_loss(self, ctx: StepContext, x0: torch.Tensor) -> torch.Tensor:
        x = self.model.decode(x0)
        z_ae = self.model.encode(x)
        add_count(ctx.state, ctx.index, "count_decoder_calls")
        add_count(ctx.state, ctx.index, "count_encoder_calls")
        return self.zeta * per_sample_norm(ctx.y - ctx.operator.forward(x)) + self.gamma * per_sample_norm(x0 - z_ae)
