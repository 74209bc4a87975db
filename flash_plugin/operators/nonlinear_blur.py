"""Non-linear camera-shake blur: random motion kernels applied in linear intensity space.

A weight-free stand-in for the paper's learned bkse blur (that one: `flash_plugin.adapters.kernel_wizard`).

**Kernels.** Camera shake is simulated as a random trajectory of the image plane during the
exposure, after the random-trajectory model of Boracchi & Foi, "Modeling the performance of
image restoration from motion blur", IEEE TIP 21(8), 2012: a point moves at constant speed while
its direction follows a random walk (small Gaussian changes every step, "drift") with rare large
impulsive changes ("shake", a jerk of the hand). Our own simplified variant, per sample ``b``:

.. math::  v_0 = (\\cos\\phi, \\sin\\phi),\\ \\phi \\sim U[0, 2\\pi); \\quad
           v_{k+1} = \\frac{v_k + \\delta\\, g_k + \\beta_k\\, s\\, j_k}{\\lVert\\cdot\\rVert}, \\quad
           p_{k+1} = p_k + v_{k+1} / n,

``g_k, j_k ~ N(0, I_2)``, ``β_k ~ Bernoulli(shake_prob)``, ``k = 0..n−1``: a path of unit length.
The severity scales it to ``ℓ(t) = lo + (hi − lo)·t`` pixels (the random shape does not depend on
``t``, so with one generator seed the blur grows monotonically with ``t``; ``t = 0`` gives a
length-0 path, the identity kernel). The kernel is the time the point spends near each pixel:
the path, centred on its centroid (no global shift), densified to ≤ 0.25 px steps and splatted
bilinearly onto a ``(2R + 1)²`` grid, normalised to sum 1.

**Image formation** (after the usual realistic blur synthesis, e.g. Rim et al., "Realistic
blur synthesis for learning image deblurring", ECCV 2022): with ``u = (x + 1)/2``,

.. math::  y = 2\\, f\\big(\\mathrm{clip}_{[0,1]}(e \\cdot (k_b * f^{-1}(u)))\\big) - 1,

where ``f`` is the camera response, here the sRGB curve (gamma ≈ 1/2.2 with a linear toe, so
gradients stay finite at black), ``*`` a true 2-D convolution with reflection padding, and ``e``
the exposure: with ``e > 1`` highlights saturate (the clip at 1), as bright streaks in real
shaken photos do. ``e = 1`` never clips (the kernel is a normalised non-negative filter), and
then ``t = 0`` is the identity; with ``e > 1`` it brightens by ``e^{1/2.4}`` and clips.
The map is differentiable (the clip has zero gradient where it saturates); it is not linear,
so it has no adjoint.

``length_range`` (default `DEFAULT_LENGTH_RANGE` ``= (0, 18)`` px) and ``exposure`` (default
`DEFAULT_EXPOSURE` ``= 1.2``) are parameters; why these defaults, and how degraded the
measurements are: docs/operators.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flash_plugin.errors import FlashInputError
from flash_plugin.operators.base import BaseOperator, GeneratorLike, _check_range, check_severity, rand, randn

DEFAULT_LENGTH_RANGE: tuple[float, float] = (0.0, 18.0)
DEFAULT_EXPOSURE: float = 1.2

__all__ = [
    "DEFAULT_EXPOSURE",
    "DEFAULT_LENGTH_RANGE",
    "NonlinearBlur",
    "linear_to_srgb",
    "random_trajectories",
    "srgb_to_linear",
    "trajectory_kernels",
]


# ----------------------------------------------------------------------------------------------
# Camera response (sRGB transfer curve, IEC 61966-2-1)
# ----------------------------------------------------------------------------------------------
def srgb_to_linear(u: torch.Tensor) -> torch.Tensor:
    """Inverse camera response ``f⁻¹``: sRGB-encoded ``u`` to linear intensity (any real ``u``;
    linear below the toe, so values slightly outside ``[0, 1]`` stay finite)."""
    power = ((u.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4
    return torch.where(u <= 0.04045, u / 12.92, power)


def linear_to_srgb(v: torch.Tensor) -> torch.Tensor:
    """Camera response ``f``: linear intensity ``v`` to sRGB encoding (gamma ≈ 1/2.2)."""
    # clamp inside the power so its (unused) branch has a finite gradient at v <= 0
    power = 1.055 * v.clamp_min(0.0031308) ** (1.0 / 2.4) - 0.055
    return torch.where(v <= 0.0031308, 12.92 * v, power)


# ----------------------------------------------------------------------------------------------
# Random trajectories and their kernels
# ----------------------------------------------------------------------------------------------
def random_trajectories(
    batch_size: int,
    generator: GeneratorLike = None,
    *,
    n_steps: int = 64,
    drift: float = 0.15,
    shake_prob: float = 0.05,
    shake_scale: float = 1.5,
) -> torch.Tensor:
    """Unit-length random camera paths ``(B, n_steps + 1, 2)`` in float64 (module docstring)."""
    if n_steps < 1:
        raise FlashInputError(f"n_steps must be >= 1, got {n_steps}")
    angle = 2 * math.pi * rand(generator, batch_size, (1,))
    wander = randn(generator, batch_size, (n_steps, 2))
    shakes = rand(generator, batch_size, (n_steps,)) < shake_prob
    jerks = randn(generator, batch_size, (n_steps, 2))
    v = torch.cat([torch.cos(angle), torch.sin(angle)], dim=1)  # (B, 2)
    points = [torch.zeros_like(v)]
    for k in range(n_steps):
        v = v + drift * wander[:, k] + shake_scale * shakes[:, k, None] * jerks[:, k]
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
        points.append(points[-1] + v / n_steps)
    return torch.stack(points, dim=1)


def trajectory_kernels(paths: torch.Tensor, lengths: torch.Tensor, max_spacing: float = 0.25) -> torch.Tensor:
    """Blur kernels ``(B, 2R + 1, 2R + 1)`` (float64, each summing to 1) from unit-length paths
    ``(B, M, 2)`` scaled to ``lengths`` ``[B]`` pixels, centred on the path's centroid."""
    paths = paths.to(torch.float64)
    lengths = lengths.to(device=paths.device, dtype=torch.float64)
    b, m, _ = paths.shape
    pts = paths * lengths[:, None, None]
    # densify each path: `sub` equally spaced points per segment so neighbours are <= max_spacing
    # apart; `sub` depends on the sample's own length only, so a batch equals its samples alone
    dense = []
    for i in range(b):
        sub = max(1, math.ceil(float(lengths[i]) / max(m - 1, 1) / max_spacing))
        frac = torch.arange(sub, device=paths.device, dtype=torch.float64) / sub
        d = (pts[i, :-1, None] + frac[None, :, None] * (pts[i, 1:] - pts[i, :-1])[:, None]).reshape(-1, 2)
        d = torch.cat([d, pts[i, -1:]])
        dense.append(d - d.mean(dim=0, keepdim=True))
    radius = math.ceil(max((float(d.abs().max()) for d in dense), default=0.0)) + 1
    size = 2 * radius + 1
    kern = torch.zeros(b, size * size, device=paths.device, dtype=torch.float64)
    for i, d in enumerate(dense):
        coords = d + radius  # in [1, 2R - 1]: all four bilinear neighbours are inside the grid
        base = coords.floor()
        f = coords - base
        base = base.to(torch.int64)
        for dy in (0, 1):
            for dx in (0, 1):
                wy = f[:, 1] if dy else 1 - f[:, 1]
                wx = f[:, 0] if dx else 1 - f[:, 0]
                kern[i].scatter_add_(0, (base[:, 1] + dy) * size + (base[:, 0] + dx), wy * wx)
    kern = kern / kern.sum(dim=1, keepdim=True)
    return kern.reshape(b, size, size)


# ----------------------------------------------------------------------------------------------
# Operator
# ----------------------------------------------------------------------------------------------
class NonlinearBlur(BaseOperator):
    """Camera-shake motion blur in linear intensity, with camera response and highlight saturation.

    Args:
        kernels: per-sample blur kernels ``(B, K, K)``, ``K`` odd, non-negative, each summing to 1
            (row index = vertical offset). Built by `from_severity`.
        noise_std: ``σ_y`` on the ``[-1, 1]`` scale.
        exposure: ``e >= 1`` multiplying the blurred linear image before the clip at 1.
        severity: the ``t`` the kernels came from, or ``None``.
    """

    _per_sample = ("kernels",)
    operator_family = "motion-blur"
    output_range = (-1.0, 1.0)  # the camera response of a clipped [0, 1] intensity

    def __init__(self, kernels: torch.Tensor, noise_std: float = 0.0, *, exposure: float = DEFAULT_EXPOSURE, severity=None) -> None:
        kernels = torch.as_tensor(kernels)
        if kernels.ndim != 3 or kernels.shape[0] < 1 or kernels.shape[1] != kernels.shape[2] or kernels.shape[1] % 2 == 0:
            raise FlashInputError(f"kernels must have shape (B, K, K) with odd K, got {tuple(kernels.shape)}")
        if not kernels.is_floating_point() or not bool(torch.isfinite(kernels).all()) or bool((kernels < 0).any()):
            raise FlashInputError("kernels must be finite, non-negative floating tensors")
        if not bool(torch.allclose(kernels.sum(dim=(1, 2)).double(), torch.ones((), dtype=torch.float64, device=kernels.device), atol=1e-5)):
            raise FlashInputError("kernels must each sum to 1")
        if not (math.isfinite(exposure) and exposure >= 1.0):
            raise FlashInputError(f"exposure must be finite and >= 1, got {exposure}")
        super().__init__(int(kernels.shape[0]), noise_std, severity)
        self.kernels = kernels.to(torch.float64)
        self.exposure = float(exposure)

    @classmethod
    def from_severity(
        cls,
        t,
        generator: GeneratorLike = None,
        *,
        length_range: tuple[float, float] = DEFAULT_LENGTH_RANGE,
        noise_std: float = 0.0,
        exposure: float = DEFAULT_EXPOSURE,
        n_steps: int = 64,
        drift: float = 0.15,
        shake_prob: float = 0.05,
        shake_scale: float = 1.5,
    ) -> NonlinearBlur:
        """Random camera-shake kernels from ``generator``, path length ``lo + (hi − lo)·t`` px."""
        t = check_severity(t)
        lo, hi = _check_range(length_range, "length_range")
        paths = random_trajectories(
            t.shape[0], generator, n_steps=n_steps, drift=drift, shake_prob=shake_prob, shake_scale=shake_scale
        )
        kernels = trajectory_kernels(paths, lo + (hi - lo) * t)
        return cls(kernels, noise_std, exposure=exposure, severity=t)

    def _kernels_for(self, h: int, w: int) -> torch.Tensor:
        """The kernels, centre-cropped (and renormalised) if reflection padding needs it."""
        kern = self.kernels
        radius = (kern.shape[-1] - 1) // 2
        cap = min(h, w) - 1
        if radius > cap:
            kern = kern[:, radius - cap : radius + cap + 1, radius - cap : radius + cap + 1]
            kern = kern / kern.sum(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(kern.dtype).tiny)
        return kern

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        kern = self._kernels_for(h, w).to(device=x.device, dtype=x.dtype)
        r = (kern.shape[-1] - 1) // 2
        weight = kern.flip(-2, -1).repeat_interleave(c, dim=0)[:, None]  # flip: convolution, not correlation
        lin = srgb_to_linear((x + 1) / 2).reshape(1, b * c, h, w)
        blurred = F.conv2d(F.pad(lin, (r, r, r, r), mode="reflect"), weight, groups=b * c).reshape(b, c, h, w)
        saturated = (self.exposure * blurred).clamp(0.0, 1.0)
        return 2 * linear_to_srgb(saturated) - 1

    def _repr_extra(self) -> str:
        return f"kernel={self.kernels.shape[-1]}x{self.kernels.shape[-1]}, exposure={self.exposure:g}"
