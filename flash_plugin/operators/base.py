"""Common machinery of the degradation operators: validation, noise, per-sample parameters.

Every operator acts on images ``x`` of shape ``(B, C, H, W)`` in ``[-1, 1]`` and models

.. math::  y = A_\\theta(x) + \\sigma_y\\, n, \\qquad n \\sim \\mathcal N(0, I),

where ``θ`` are *per-sample* parameters (a blur std, a mask, a kernel, one row per sample) and
``σ_y`` (`noise_std`) is stated on the ``[-1, 1]`` scale (the paper's 0.05 on ``[0, 1]`` is 0.1
here). `BaseOperator.forward` is the noiseless, differentiable ``A(x)``; `BaseOperator.measure`
adds the noise.

Image range. `BaseOperator.measure` is where clean images enter, so it refuses a batch that is
plainly on another scale (`check_image_range`): values beyond ±1.5, or a batch with no negative
value that exceeds 1.05 (``[0, 255]`` images). A batch in ``[0, 1]`` cannot be told from a bright
``[-1, 1]`` one with certainty, so it gets an `ImageRangeWarning` instead. `forward` checks no range:
solvers call it on decoded estimates, which may overshoot.

Randomness. Everything random (masks, kernels, noise) is drawn from the caller's generator
(``None``, one, or one per sample) by `flash_plugin.utils.random.rand` / ``randn``, so a batch equals
its samples built one by one with the same per-sample generators (docs/architecture.md, "Conventions").
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from typing import ClassVar

import torch

from flash_plugin.errors import FlashInputError
from flash_plugin.utils.random import GeneratorLike, rand, randn
from flash_plugin.utils.validation import check_nonnegative

__all__ = [
    "BaseOperator",
    "BaseLinearOperator",
    "GeneratorLike",
    "ImageRangeWarning",
    "adjointness_error",
    "check_image_range",
    "check_severity",
    "rand",
    "randn",
]

IMAGE_RANGE_HINT = "convert images in [0, 255] with x / 127.5 - 1 and images in [0, 1] with 2 * x - 1"


class ImageRangeWarning(UserWarning):
    """An image batch lies in ``[0, 1]``: possibly images on the wrong scale (see `check_image_range`)."""


# ----------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------
def check_severity(t, batch_size: int | None = None, name: str = "t") -> torch.Tensor:
    """Return the severity as a float64 vector ``[B]`` in ``[0, 1]``, or raise `FlashInputError`.

    A Python number or a 0-d tensor is one sample (``B = 1``); nothing is broadcast.
    """
    tt = torch.as_tensor(t)
    if not (tt.is_floating_point() or tt.dtype in (torch.int64, torch.int32, torch.bool)):
        raise FlashInputError(f"{name} (severity) must be real, got dtype {tt.dtype}")
    tt = tt.to(torch.float64)
    if tt.ndim == 0:
        tt = tt.reshape(1)
    if tt.ndim != 1:
        raise FlashInputError(f"{name} (severity) must be a vector [B], got shape {tuple(tt.shape)}")
    if batch_size is not None and tt.shape[0] != batch_size:
        raise FlashInputError(f"{name} (severity) has {tt.shape[0]} entries for a batch of {batch_size}")
    if not bool(torch.isfinite(tt).all()):
        raise FlashInputError(f"{name} (severity) contains NaN or Inf")
    if tt.numel() and (bool((tt < 0).any()) or bool((tt > 1).any())):
        raise FlashInputError(f"{name} (severity) must lie in [0, 1], got values in [{tt.min().item():.4g}, {tt.max().item():.4g}]")
    return tt


def check_image_range(x: torch.Tensor, name: str = "x") -> None:
    """Refuse an image batch that is plainly not on the ``[-1, 1]`` scale every operator and the
    bundled model use.

    Raises `FlashInputError` (naming the conversions) when a value lies beyond ±1.5, or when the
    batch has no negative value and exceeds 1.05 (``[0, 255]`` images). Warns with
    `ImageRangeWarning` when the batch has no negative value and reaches above 0.5: images in
    ``[0, 1]`` measured as if in ``[-1, 1]`` cost several dB without an error anywhere, but a bright
    ``[-1, 1]`` batch looks the same, so this one is not refused.
    """
    if x.numel() == 0:
        return
    lo, hi = float(x.amin()), float(x.amax())
    if hi > 1.5 or lo < -1.5 or (lo >= 0.0 and hi > 1.05):
        raise FlashInputError(
            f"{name} must be images in [-1, 1], got values in [{lo:.4g}, {hi:.4g}]: {IMAGE_RANGE_HINT} "
            "(measure(..., check_range=False) skips this check for data that is not images)"
        )
    if lo >= 0.0 and hi > 0.5:
        warnings.warn(
            f"{name} has no negative value (range [{lo:.4g}, {hi:.4g}]): images in [-1, 1] are expected; "
            "if these are images in [0, 1], convert them with 2 * x - 1 before measuring",
            ImageRangeWarning,
            stacklevel=3,
        )


def _check_noise_std(noise_std) -> float:
    return check_nonnegative("noise_std", noise_std)


def _check_range(pair, name: str, low: float = 0.0) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in pair)
    except (TypeError, ValueError):
        raise FlashInputError(f"{name} must be a pair (low, high), got {pair!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < low or hi < lo:
        raise FlashInputError(f"{name} must satisfy {low} <= low <= high < inf, got ({lo}, {hi})")
    return lo, hi


# ----------------------------------------------------------------------------------------------
# Base classes
# ----------------------------------------------------------------------------------------------
class BaseOperator:
    """A degradation ``y = A(x) + σ_y n`` with per-sample parameters (see the module docstring).

    Subclasses implement `_apply` (the noiseless map on validated input) and list the names of
    their per-sample tensor attributes (leading dimension ``B``) in ``_per_sample``; `select`,
    `to` and `__repr__` then work without further code.

    Attributes:
        noise_std: ``σ_y`` on the ``[-1, 1]`` scale (``0`` allowed).
        severity: float64 ``[B]`` in ``[0, 1]`` when the operator was built from a severity,
            else ``None``.
        channels: the channel count the operator requires, or ``None`` (any).
        operator_family: the family name severity estimators are matched against (their metadata
            name it; ``flash()`` refuses a mismatch), e.g. ``"gaussian-blur"``; ``None``: unknown,
            never checked.
        output_range: the range of the noiseless ``A(x)`` for ``x`` in ``[-1, 1]``, or ``None``
            when unknown; ``flash()`` uses it to refuse measurements on another scale.
    """

    _per_sample: ClassVar[tuple[str, ...]] = ()
    channels: int | None = None
    operator_family: ClassVar[str | None] = None
    output_range: ClassVar[tuple[float, float] | None] = None

    def __init__(self, batch_size: int | None, noise_std: float = 0.0, severity=None) -> None:
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise FlashInputError(f"batch_size must be a positive int, got {batch_size!r}")
        self._batch_size = batch_size
        self.noise_std = _check_noise_std(noise_std)
        self.severity = None if severity is None else check_severity(severity, batch_size, name="severity")

    # -- public API --------------------------------------------------------------------------
    @property
    def batch_size(self) -> int | None:
        """``B``: the number of samples this operator's parameters describe (``None``: any)."""
        return self._batch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Noiseless, differentiable ``A(x)`` for ``x`` of shape ``(B, C, H, W)``."""
        self._check_input(x, "x")
        return self._apply(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def measure(self, x: torch.Tensor, generator: GeneratorLike = None, *, check_range: bool = True) -> torch.Tensor:
        """``A(x) + σ_y n`` with ``n ~ N(0, I)`` drawn from ``generator`` (see module docstring).

        The noise is drawn on the generator's device in ``x.dtype`` and then moved to
        ``x.device``, so a CPU generator gives the same ``y`` on every device. ``x`` must be
        images in ``[-1, 1]`` (`check_image_range`); ``check_range=False`` skips that check.
        """
        if check_range:
            self._check_input(x, "x")
            check_image_range(x, "x")
        y = self.forward(x)
        if self.noise_std == 0.0:
            return y
        noise = randn(generator, y.shape[0], y.shape[1:], dtype=y.dtype).to(y.device)
        return y + self.noise_std * noise

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> BaseOperator:
        """A new operator whose per-sample parameters live on ``device`` (and in ``dtype`` if given,
        floating parameters only). The original is unchanged."""
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)

        return self._map_per_sample(move, self._batch_size)

    def select(self, index) -> BaseOperator:
        """The operator restricted to the samples ``index`` (LongTensor, bool mask ``[B]``, list or
        int), in that order, e.g. to run a solver on its active samples only."""
        if self._batch_size is None:
            return copy.copy(self)
        idx = self._check_index(index)
        return self._map_per_sample(lambda t: t[idx.to(t.device)], int(idx.numel()))

    def __repr__(self) -> str:
        if self.severity is None or self.severity.numel() == 0:
            sev = "None"
        else:
            sev = f"[{self.severity.min().item():.3g}, {self.severity.max().item():.3g}]"
        extra = self._repr_extra()
        return (
            f"{type(self).__name__}(B={self._batch_size}, severity={sev}, noise_std={self.noise_std:g}"
            + (f", {extra}" if extra else "")
            + ")"
        )

    # -- hooks for subclasses ----------------------------------------------------------------
    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _repr_extra(self) -> str:
        return ""

    # -- helpers -------------------------------------------------------------------------------
    def _map_per_sample(self, fn, batch_size: int | None) -> BaseOperator:
        new = copy.copy(self)
        for name in self._per_sample:
            setattr(new, name, fn(getattr(self, name)))
        if self.severity is not None:
            new.severity = fn(self.severity)
        new._batch_size = batch_size
        return new

    def _check_index(self, index) -> torch.Tensor:
        idx = torch.as_tensor(index)
        if idx.dtype == torch.bool:
            if idx.shape != (self._batch_size,):
                raise FlashInputError(f"index: a bool mask must have shape ({self._batch_size},), got {tuple(idx.shape)}")
            idx = idx.nonzero().flatten()
        if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise FlashInputError(f"index must be integer or bool, got dtype {idx.dtype}")
        idx = idx.to(torch.int64).reshape(-1)
        if idx.numel() == 0:
            raise FlashInputError("index selects no sample")
        if bool((idx < -self._batch_size).any()) or bool((idx >= self._batch_size).any()):
            raise FlashInputError(f"index out of range for batch size {self._batch_size}: {idx.tolist()}")
        return idx % self._batch_size

    def _check_input(self, x: torch.Tensor, name: str) -> None:
        """Rank 4, floating, finite, matching channel count and batch size (never broadcast)."""
        if not isinstance(x, torch.Tensor):
            raise FlashInputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise FlashInputError(f"{name} must have rank 4 (B, C, H, W), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise FlashInputError(f"{name} must have a floating dtype, got {x.dtype}")
        if self.channels is not None and x.shape[1] != self.channels:
            raise FlashInputError(f"{name} must have {self.channels} channel(s) for {type(self).__name__}, got shape {tuple(x.shape)}")
        if self._batch_size is not None and x.shape[0] != self._batch_size:
            raise FlashInputError(
                f"{name} has batch length {x.shape[0]} but {type(self).__name__} holds parameters for "
                f"B={self._batch_size} samples (use .select(...) for a subset; nothing is broadcast)"
            )
        if not bool(torch.isfinite(x).all()):
            raise FlashInputError(f"{name} contains NaN or Inf")


class BaseLinearOperator(BaseOperator):
    """A linear operator with its true adjoint ``A*``: ``<A u, v> = <u, A* v>``.

    The default `_adjoint` is the exact vector-Jacobian product of the linear forward map:
    for linear ``A``, ``∂<A(x), y>/∂x = Aᵀ y`` at any ``x`` (here ``x = 0``). It is itself
    differentiable in ``y`` (``create_graph`` when ``y`` requires grad) and works under
    ``torch.no_grad``. Subclasses with a cheap explicit formula override it.
    """

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``A* y`` for ``y`` of the shape of ``forward``'s output."""
        self._check_input(y, "y")
        return self._adjoint(y)

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x0 = torch.zeros_like(y, requires_grad=True)
            out = self._apply(x0)
            (grad,) = torch.autograd.grad(out, x0, grad_outputs=y, create_graph=y.requires_grad)
        return grad


def adjointness_error(
    op: BaseLinearOperator,
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> float:
    """Relative adjointness error ``|<A u, v> − <u, A* v>| / (‖A u‖‖v‖ + ‖u‖‖A* v‖)`` for random
    ``u, v`` of ``shape`` (the operator's input shape, outputs assumed of the same shape)."""
    shape = tuple(shape)
    u = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    v = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    au, atv = op.forward(u), op.adjoint(v)
    lhs, rhs = (au * v).sum(), (u * atv).sum()
    scale = au.norm() * v.norm() + u.norm() * atv.norm()
    return float((lhs - rhs).abs() / scale.clamp_min(torch.finfo(dtype).tiny))
