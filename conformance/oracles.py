"""The spy model and the tiny operator of the conformance checks.

`make_oracle` builds the `SpyOracle` a factory ``make(model) -> Solver`` receives: the analytic
`GaussianOracle` on the paper's 1000-step LDM schedule, recording every denoiser call. `MaskOperator`
(``y = m ⊙ x + σ_y n``, per-sample masks) lets guided solvers run on it;
`make_reference_sampler` is the reference factory
(``flash-plugin check flash_plugin.conformance.oracles:make_reference_sampler``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from flash_plugin.errors import FlashInputError
from flash_plugin.models.gaussian_oracle import GaussianOracle
from flash_plugin.utils.random import GeneratorLike, randn_per_sample

__all__ = [
    "ORACLE_LATENT_SHAPE",
    "MaskOperator",
    "SpyOracle",
    "make_oracle",
    "make_oracle_problem",
    "make_reference_sampler",
]

ORACLE_LATENT_SHAPE: tuple[int, ...] = (2, 4, 4)
"""Latent (= image, the oracle's autoencoder is the identity) shape ``(C, H, W)`` of `make_oracle`."""


class SpyOracle(GaussianOracle):
    """A `GaussianOracle` with a parameter ``gain`` (exactly ``1.0``, ``requires_grad`` like an
    unfrozen diffusers model) in ``eps``: ``gain.grad`` reveals a ``loss.backward()`` that reaches
    the model, a checksum of the parameters a solver that changes them. Optionally records inputs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gain = torch.nn.Parameter(torch.ones((), dtype=torch.float64))
        self.record_inputs = False
        self.inputs: list[torch.Tensor] = []

    def eps(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.record_inputs:  # aligned with `calls`: one detached copy of z per call
            self.inputs.append(z.detach().cpu().clone())
        out = super().eps(z, t)
        return out * self.gain.to(device=out.device, dtype=out.dtype)

    def reset_calls(self) -> None:
        super().reset_calls()
        self.inputs.clear()

    @contextlib.contextmanager
    def recording_inputs(self) -> Iterator[list[torch.Tensor]]:
        """Within the block, keep a copy of every denoiser input (in ``inputs``, aligned with ``calls``)."""
        self.reset_calls()
        self.record_inputs = True
        try:
            yield self.inputs
        finally:
            self.record_inputs = False

    def evaluations(self) -> list[int]:
        """Every recorded timestep, call by call, flattened (one entry per sample evaluated)."""
        return [int(v) for call in self.calls for v in call.flatten().tolist()]


def make_oracle(
    latent_shape: Sequence[int] = ORACLE_LATENT_SHAPE,
    *,
    seed: int = 0,
    alphas_cumprod: torch.Tensor | None = None,
    scale: float = 1.0,
    variance: float | None = None,
) -> SpyOracle:
    """A seeded `SpyOracle`: means in ``[-0.5, 0.5]``, variances in ``[0.05, 0.25]`` per latent
    dimension (or ``variance`` in every one), the paper's LDM schedule unless ``alphas_cumprod`` is given."""
    shape = tuple(int(s) for s in latent_shape)
    g = torch.Generator().manual_seed(seed)
    mean = torch.rand(shape, generator=g, dtype=torch.float64) - 0.5
    var = 0.05 + 0.2 * torch.rand(shape, generator=g, dtype=torch.float64)
    if variance is not None:
        var = torch.full(shape, float(variance), dtype=torch.float64)
    return SpyOracle(mean, var, alphas_cumprod, scale=scale, name="conformance-oracle")


class MaskOperator:
    """``A(x) = m ⊙ x`` (per-sample binary mask ``m``), ``y = A(x) + σ_y n``; ``A* = A``.

    Args:
        mask: ``(B, *image_shape)``, bool or 0/1 values (1 = kept entry).
        noise_std: ``σ_y`` on the ``[-1, 1]`` scale.
    """

    def __init__(self, mask: torch.Tensor, noise_std: float = 0.0) -> None:
        mask = torch.as_tensor(mask)
        if mask.ndim < 2 or mask.shape[0] < 1:
            raise FlashInputError(f"mask must be batched (B, *image_shape), got shape {tuple(mask.shape)}")
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            raise FlashInputError("mask must be binary (bool or 0/1 values)")
        if not (float(noise_std) >= 0.0 and float(noise_std) < float("inf")):
            raise FlashInputError(f"noise_std must be finite and >= 0, got {noise_std}")
        self.mask = mask.detach() != 0
        self.noise_std = float(noise_std)

    @classmethod
    def random(
        cls,
        batch_size: int,
        image_shape: Sequence[int],
        *,
        keep: float = 0.6,
        noise_std: float = 0.05,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> MaskOperator:
        """Each entry kept with probability ``keep``, independently per sample."""
        u = torch.rand((batch_size, *image_shape), generator=generator, dtype=torch.float64)
        return cls((u < keep).to(device), noise_std)

    @property
    def batch_size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def severity(self) -> torch.Tensor:
        """The missing fraction per sample (float64 ``[B]``)."""
        return 1.0 - self.mask.flatten(1).to(torch.float64).mean(1)

    def _mask_for(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != tuple(self.mask.shape[1:]) or x.shape[0] != self.batch_size:
            raise FlashInputError(
                f"MaskOperator with masks of shape {tuple(self.mask.shape)} got input of shape {tuple(x.shape)}; "
                "select(index) the operator for a sub-batch"
            )
        return self.mask.to(device=x.device, dtype=x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Noiseless ``m ⊙ x`` (differentiable in ``x``)."""
        return x * self._mask_for(x)

    __call__ = forward

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y * self._mask_for(y)

    def measure(self, x: torch.Tensor, generator: GeneratorLike = None) -> torch.Tensor:
        """``m ⊙ x + σ_y n``, the noise drawn per sample from ``generator``."""
        y = self.forward(x)
        if self.noise_std > 0:
            y = y + self.noise_std * randn_per_sample(x.shape, generator, device=x.device, dtype=x.dtype)
        return y

    def select(self, index: torch.Tensor | Sequence[int]) -> MaskOperator:
        """The operator of the samples in ``index`` (in that order)."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.mask.device)
        return MaskOperator(self.mask[index], self.noise_std)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> MaskOperator:
        return MaskOperator(self.mask.to(device), self.noise_std)

    def __repr__(self) -> str:
        return f"MaskOperator(batch_size={self.batch_size}, shape={tuple(self.mask.shape[1:])}, noise_std={self.noise_std})"


def make_oracle_problem(oracle: GaussianOracle, batch_size: int = 4, *, seed: int = 1234,
                        dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, MaskOperator]:
    """``(y, operator)``: ``batch_size`` oracle samples, decoded, measured through a random mask.

    Leaves the oracle's call records empty."""
    g = torch.Generator().manual_seed(seed)
    x = oracle.decode(oracle.sample(batch_size, g)).to(dtype)
    op = MaskOperator.random(batch_size, tuple(x.shape[1:]), keep=0.6, noise_std=0.05, generator=g)
    y = op.measure(x, g)
    oracle.reset_calls()
    return y, op


def make_reference_sampler(model: Any):
    """The reference factory: the plain sampler with 20 steps over ``model``."""
    from flash_plugin.solvers import Sampler

    return Sampler(model, num_steps=20)
