"""PSLD: Posterior Sampling with Latent Diffusion ("gluing" through the operator's adjoint).

Paper: L. Rout, N. Raoof, G. Daras, C. Caramanis, A. G. Dimakis, S. Shakkottai, "Solving Linear
Inverse Problems Provably via Posterior Sampling with Latent Diffusion Models", NeurIPS 2023
(code: LituRout/PSLD). Used as a baseline by Z. Fabian, B. Tinaz, M. Soltanolkotabi, "Adapt and
Diffuse: Sample-adaptive Reconstruction via Latent Diffusion Models", ICML 2024, whose official
re-implementation this module follows (DDPM-1000, ``η = 1``, noiseless prediction, per-sample
norms; the original PSLD code uses DDIM with ``η = 0``, adds fresh measurement noise to the
prediction and takes one batch-wide norm).

Update (one UNet call per step; gradients through the UNet, the decoder and the encoder)::

    ε = ε_θ(z_k, t_k),                  ẑ0 = (z_k − sqrt(1 − ᾱ_k) ε) / sqrt(ᾱ_k)
    z'_{k−1} = DDIM(η) step of (z_k, ε, ẑ0),        x̂ = D(ẑ0)
    R_i      = ζ ‖y_i − A x̂_i‖₂ + γ ‖ẑ0_i − E(A*y_i + (I − A*A) x̂_i)‖₂     (per sample, non-squared)
    z_{k−1}  = z'_{k−1} − ∇_{z_k} Σ_i R_i

This is GML-DPS with the glued image in the encoder, hence a `GMLDPS` subclass. ``A*`` must be
the true adjoint (`flash_plugin.protocols.LinearOperator`); for an inpainting mask ``A* = A``. An
operator without ``adjoint`` is refused with `OperatorCapabilityError` at the start of `solve`,
before any UNet call (the paper's nonlinear deblurring has no PSLD entry).

Hyperparameters per task: `flash_plugin.solvers.hparams` (the paper's and ours).

Costs in ``Solution.extras``: ``count_decoder_calls`` and ``count_encoder_calls``, one each per
step and sample (forward + backward).
"""

from __future__ import annotations

from typing import Any

import torch

from flash_plugin.errors import OperatorCapabilityError
from flash_plugin.protocols import LinearOperator
from flash_plugin.solvers.base import StepContext
from flash_plugin.solvers.gml_dps import GMLDPS

_LINEAR_OPERATOR_MEMBERS = ("forward", "measure", "noise_std", "adjoint")


class PSLD(GMLDPS):
    """PSLD (Rout et al. 2023): Latent-DPS + γ‖ẑ0 − E(A*y + (I − A*A)D(ẑ0))‖₂; needs an adjoint.

    Args:
        model: a latent model (``eps``, ``encode``, differentiable ``decode``, ``alphas_cumprod``, ``latent_shape``).
        zeta: step size ``ζ`` of the measurement term.
        gamma: weight ``γ`` of the gluing term.
        num_steps, eta, progress: as for `LatentDPS` (DDPM over all train timesteps, ``η = 1``).
    """

    name = "psld"

    def __init__(self, model: Any, *, zeta: float = 2.0, gamma: float = 0.2, num_steps: int | None = None,
                 eta: float = 1.0, progress: bool = False):
        super().__init__(model, zeta=zeta, gamma=gamma, num_steps=num_steps, eta=eta, progress=progress)

    def check_inputs(self, y: torch.Tensor, operator: Any) -> None:
        super().check_inputs(y, operator)
        if not isinstance(operator, LinearOperator):
            missing = [m for m in _LINEAR_OPERATOR_MEMBERS if not hasattr(operator, m)]
            raise OperatorCapabilityError(
                f"PSLD needs a linear operator with a true adjoint (flash_plugin.protocols.LinearOperator: "
                f"{', '.join(_LINEAR_OPERATOR_MEMBERS)}), but {type(operator).__name__} lacks {', '.join(missing)}. "
                "The gluing term E(A*y + (I − A*A) D(ẑ0)) cannot be formed without A*. Give the operator an "
                "adjoint(y) method, or use Latent-DPS, GML-DPS or ReSample, which need only forward(x)."
            )

    def reencoded(self, ctx: StepContext, x: torch.Tensor, ax: torch.Tensor) -> torch.Tensor:
        """The glued image ``A*y + (I − A*A) x``: the measured part from ``y``, the rest from ``x``."""
        op = ctx.operator
        return op.adjoint(ctx.y) + x - op.adjoint(ax)
