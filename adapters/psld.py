"""Adapter: the original PSLD code (LituRout/PSLD) as a flash-plugin `Solver`, unchanged.

Paper: L. Rout, N. Raoof, G. Daras, C. Caramanis, A. G. Dimakis, S. Shakkottai, "Solving Linear
Inverse Problems Provably via Posterior Sampling with Latent Diffusion Models", NeurIPS 2023; code
github.com/LituRout/PSLD, ``stable-diffusion/ldm/models/diffusion/psld.py`` ``DDIMSampler``. The
adapter calls its documented ``make_schedule`` and ``ddim_sampling`` (``general_inverse`` branch)
with ``x_T`` and ``timesteps`` to start at step ``k`` (plumbing in `flash_plugin.adapters.compvis`).

Three methods from one upstream code path, as in the paper's repository:

* ``"psld"``: ``ω ‖y − A D(ẑ0)‖ + γ ‖ẑ0 − E(Aᵀy + (I − AᵀA) D(ẑ0))‖``; the upstream's ``transpose``
  is the operator's true ``adjoint`` (a `LinearOperator` is required);
* ``"gml-dps"``: the same loop with a ``transpose`` that returns zeros, so the gluing term becomes
  ``γ ‖ẑ0 − E(D(ẑ0))‖`` (how the PSLD repository runs GML-DPS);
* ``"latent-dps"``: ``"gml-dps"`` with ``γ = 0`` (the encoder still runs; its term has zero weight).

Defaults are the repository's ``scripts/inverse.py`` defaults: ``S = 1000`` DDIM steps (unless the
sampler already has a schedule), ``η = 0``, ``γ = 0.1``, ``ω = 1``, noiseless ``noiser`` (the repo's
``clean``). The norms are the upstream's ``torch.linalg.norm`` over the call's batch; the adapter
calls the upstream once per sample, so each norm is that sample's.

Usage::

    from flash_plugin import flash
    sampler = DDIMSampler(CompVisModel(my_latent_diffusion))       # the PSLD repo's class
    solver = flash(sampler, estimator=enc)                          # or PSLDAdapter(sampler, gamma=0.2)
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from flash_plugin.adapters.compvis import CompVisAdapter
from flash_plugin.errors import FlashInputError, OperatorCapabilityError
from flash_plugin.markers import hookimpl

METHODS = ("psld", "gml-dps", "latent-dps")


def _clean(x: torch.Tensor) -> torch.Tensor:
    """The PSLD repo's noiseless ``noiser``."""
    return x


class _TransposeShim:
    """The operator interface PSLD's guided step reads: ``forward(x, mask=...)`` and ``transpose(y)``.

    ``transpose`` is the true adjoint for PSLD, and zeros for GML-DPS / Latent-DPS."""

    def __init__(self, operator: Any, adjoint: bool):
        self.operator, self.adjoint = operator, adjoint

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.operator.forward(x)

    def transpose(self, y: torch.Tensor) -> torch.Tensor:
        if self.adjoint:
            return self.operator.adjoint(y)
        return y.new_zeros(())


class PSLDAdapter(CompVisAdapter):
    """Flash-able wrapper of the PSLD repository's ``DDIMSampler`` (PSLD, GML-DPS, Latent-DPS).

    Args:
        sampler: an instance of PSLD's ``DDIMSampler`` (its ``model``: a CompVis ``LatentDiffusion``
            or any flash-plugin latent model, bridged by `CompVisModel`), or the class with ``model``.
        method: ``"psld"`` (default), ``"gml-dps"`` or ``"latent-dps"``.
        gamma: weight ``γ`` of the gluing / autoencoder term (the repo's ``--gamma``, 0.1).
        omega: weight ``ω`` of the measurement term (the repo's ``--omega``, 1).
        num_steps, eta, progress, model: see `CompVisAdapter` (defaults ``S = 1000``, ``η = 0``).
    """

    default_num_steps = 1000
    name = "psld-upstream"

    def __init__(self, sampler: Any, model: Any = None, *, method: str = "psld", gamma: float = 0.1, omega: float = 1.0,
                 num_steps: int | None = None, eta: float = 0.0, progress: bool = False):
        if method not in METHODS:
            raise FlashInputError(f"method must be one of {METHODS}, got {method!r}")
        for nm, v in (("gamma", gamma), ("omega", omega)):
            if not (float(v) >= 0 and float(v) < float("inf")):
                raise FlashInputError(f"{nm} must be a finite number >= 0, got {v}")
        super().__init__(sampler, model, num_steps=num_steps, eta=eta, progress=progress)
        self.method = method
        self.gamma = 0.0 if method == "latent-dps" else float(gamma)
        self.omega = float(omega)

    def _settings_repr(self) -> str:
        return f"method={self.method!r}, gamma={self.gamma}, omega={self.omega}"

    def check_operator(self, operator: Any) -> None:
        super().check_operator(operator)
        if self.method == "psld" and not callable(getattr(operator, "adjoint", None)):
            raise OperatorCapabilityError(
                f"PSLD needs the operator's true adjoint (its 'transpose'), but {type(operator).__name__} has no adjoint(y); "
                "use method='gml-dps' or 'latent-dps', which need only forward(x)."
            )

    def run_upstream(self, y, operator, x_T, k, trajectory, callback):
        shim = _TransposeShim(operator, adjoint=self.method == "psld")
        z, inter = self.sampler.ddim_sampling(
            None, (1, *self.latent_shape), x_T=x_T, timesteps=self.timesteps_arg(k),
            log_every_t=1 if trajectory else 10**9, measurements=y, operator=shim, gamma=self.gamma,
            omega=self.omega, general_inverse=True, noiser=_clean, callback=callback,
        )
        return z, (inter["x_inter"] if trajectory else None)


def is_psld_sampler(obj: Any) -> bool:
    """Structural test: PSLD's ``DDIMSampler`` (module ``...psld``, the guided ``ddim_sampling``)."""
    if obj is None or isinstance(obj, type):
        return False
    cls = type(obj)
    names = [c.__name__ for c in cls.__mro__]
    if "DDIMSampler" not in names or not any(c.__module__.split(".")[-1] == "psld" for c in cls.__mro__):
        return False
    if not all(callable(getattr(obj, m, None)) for m in ("make_schedule", "ddim_sampling", "p_sample_ddim")):
        return False
    try:
        params = inspect.signature(cls.ddim_sampling).parameters
    except (TypeError, ValueError):
        return False
    return all(p in params for p in ("x_T", "timesteps", "measurements", "operator", "general_inverse", "omega"))


@hookimpl
def flash_adapt_solver(obj: Any) -> Any | None:
    """PSLD's ``DDIMSampler`` -> `PSLDAdapter` (method ``"psld"``, the repo's defaults); else ``None``."""
    if is_psld_sampler(obj):
        return PSLDAdapter(obj)
    return None
