"""Structural interfaces (`typing.Protocol`): third-party objects need not inherit from them.

Capabilities beyond the minimum are separate protocols, checked with ``isinstance`` (all are
``runtime_checkable``), never with ad-hoc ``hasattr`` calls in generic code.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Protocol, runtime_checkable

import torch

from flash_plugin.types import NoiseSchedule, SeverityEstimate, Solution, StartPoint
from flash_plugin.utils.random import GeneratorLike


@runtime_checkable
class Operator(Protocol):
    """A degradation ``y = A(x) + n`` acting on images ``(B, C, H, W)`` in ``[-1, 1]``.

    ``forward`` is the noiseless, differentiable ``A(x)``; ``measure`` adds the noise drawn from
    ``generator``; ``noise_std`` is ``σ_y`` on the ``[-1, 1]`` scale.
    """

    noise_std: float

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    def measure(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor: ...


@runtime_checkable
class LinearOperator(Operator, Protocol):
    """An operator with a true adjoint ``<A u, v> = <u, A* v>`` (checked numerically in the tests)."""

    def adjoint(self, y: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Solver(Protocol):
    """A diffusion solver for inverse problems that can start from any step ``k = 0..N``.

    ``solve(y, operator, start=None)`` is a full solve from noise; with a `StartPoint` every sample
    starts at its own ``start.step[i]`` from ``start.latent[i]`` and makes exactly that many steps.

    ``generator`` is a `GeneratorLike`: ``None`` (torch's global RNG), one ``torch.Generator`` for
    the batch, or a list with one generator per sample (what `flash()` and the conformance checks
    pass; only that form makes a batch equal its samples solved alone). Draw noise with
    `flash_plugin.randn_per_sample`, which accepts all three. A solver that ignores ``y`` on
    purpose (an unconditional sampler) declares ``ignores_measurement = True``.
    """

    @property
    def schedule(self) -> NoiseSchedule: ...

    def solve(
        self,
        y: torch.Tensor,
        operator: Any,
        *,
        start: StartPoint | None = None,
        generator: GeneratorLike = None,
    ) -> Solution: ...


@runtime_checkable
class MixedStartSolver(Solver, Protocol):
    """Capability: one batch may hold different start steps (samples join when the loop reaches
    their step; the denoiser runs on active samples only). Without it, `FlashSolver` groups
    samples by start step."""

    supports_mixed_starts: Literal[True]


@runtime_checkable
class LatentModelSolver(Solver, Protocol):
    """Capability: the solver exposes its latent model (``encode`` / ``decode`` / ``latent_id``)."""

    @property
    def model(self) -> Any: ...


@runtime_checkable
class StepCallbackSolver(Solver, Protocol):
    """Capability: ``solve`` accepts ``callback(k, latent)``, called after the step from level ``k``
    with the latent at level ``k − 1``. Resuming from that latent at step ``k − 1``, with the
    generators in the state they had at that point, must reproduce the rest of the run."""

    def solve(
        self,
        y: torch.Tensor,
        operator: Any,
        *,
        start: StartPoint | None = None,
        generator: GeneratorLike = None,
        callback: Callable[[int, torch.Tensor], None] | None = None,
    ) -> Solution: ...


@runtime_checkable
class SeverityEstimator(Protocol):
    """Maps a measurement ``y`` to ``(ẑ, σ̂²)``; ``metadata`` names the latent space (``latent_id``)
    and operator family it was trained for, so that a mismatch can be refused: ``operator_family``
    (e.g. ``"gaussian-blur"``) or ``operator``, a registered operator or preset name whose family
    is looked up (e.g. ``"gblur-varying"``)."""

    metadata: dict[str, Any]

    def estimate(self, y: torch.Tensor) -> SeverityEstimate: ...
