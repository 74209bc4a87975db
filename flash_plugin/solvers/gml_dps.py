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

Hyperparameters per task: `flash_plugin.solvers.hparams` (the paper's and ours).

Costs in ``Solution.extras``: ``count_decoder_calls`` and ``count_encoder_calls``, one each per
step and sample (forward + backward).
"""

from __future__ import annotations

from typing import Any

import torch

from flash_plugin.solvers.base import StepContext
from flash_plugin.solvers.guidance import add_count, check_weight, per_sample_norm
from flash_plugin.solvers.latent_dps import LatentDPS


class GMLDPS(LatentDPS):
    """GML-DPS (Rout et al. 2023): Latent-DPS + γ‖ẑ0 − E(D(ẑ0))‖₂ per sample.

    Subclasses change only what the encoder sees (`reencoded`; PSLD glues in the measurement).

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

    def reencoded(self, ctx: StepContext, x: torch.Tensor, ax: torch.Tensor) -> torch.Tensor:
        """The image whose encoding ``ẑ0`` should equal: the decoded estimate ``x = D(ẑ0)`` itself."""
        return x

    def guidance_loss(self, ctx: StepContext, x0: torch.Tensor) -> torch.Tensor:
        x = self.model.decode(x0)
        ax = ctx.operator.forward(x)
        z_ae = self.model.encode(self.reencoded(ctx, x, ax))
        add_count(ctx.state, ctx.index, "count_decoder_calls")
        add_count(ctx.state, ctx.index, "count_encoder_calls")
        return self.zeta * per_sample_norm(ctx.y - ax) + self.gamma * per_sample_norm(x0 - z_ae)
