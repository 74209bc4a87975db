"""Pure functions of the Flash core: SNR, start-step selection and the start latent.

Start step (Fabian et al., "Adapt and Diffuse", ICML 2024, poster eq. for i_start): an estimate
``ẑ`` whose error has variance ``σ̂²`` looks like a latent at the step ``k*`` whose
signal-to-noise ratio ``a_k²/b_k²`` is closest to ``1/σ̂²``::

    k* = argmin_k | ᾱ_k / (1 − ᾱ_k) − 1/σ̂² |   over the solver's own k = 0..N

Start latent, the paper's "noise correction" with constant ``c`` (default 1)::

    z = sqrt(1 − c σ̂²) ẑ + sqrt(c σ̂²) ε

or, as an option, the exactly SNR-matched marginal ``a_k ẑ + b_k ε``.

Instead of the SNR rule, a `StartPolicy` maps ``σ̂²`` to steps through thresholds calibrated on
training images for one solver and task (fitted by `flash_plugin.bench.policy.fit_start_policy`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch

from flash_plugin.errors import FlashInputError, SeverityError
from flash_plugin.types import NoiseSchedule
from flash_plugin.utils.random import randn_per_sample


def snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``ᾱ / (1 − ᾱ)`` in float64 (``inf`` where ``ᾱ = 1``)."""
    acp = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    return acp / (1.0 - acp)


def check_variance(variance: torch.Tensor, name: str = "σ̂²") -> torch.Tensor:
    """Validate a per-sample variance vector: 1-D, finite, strictly positive."""
    v = torch.as_tensor(variance)
    if v.ndim != 1:
        raise SeverityError(f"{name} must be a 1-D tensor with one value per sample, got shape {tuple(v.shape)}")
    if not torch.all(torch.isfinite(v)):
        raise SeverityError(f"{name} contains NaN or Inf: {v.tolist()}")
    if torch.any(v <= 0):
        raise SeverityError(f"{name} must be > 0, got {v.tolist()}")
    return v


@dataclass(frozen=True)
class StartPolicy:
    """A calibrated, monotone map from the estimator's raw ``σ̂²`` to the start step.

    ``σ̂² <= thresholds[i]`` (first match) starts at ``steps[i]``, a larger one at ``steps[-1]``;
    a larger ``σ̂²`` never gets fewer steps. It replaces the SNR rule where that rule ranks or
    spaces the images badly: the thresholds are fitted on the per-image PSNR of fixed start steps
    on training images (`flash_plugin.bench.policy.fit_start_policy`), so they encode what the
    solver gains from more steps rather than what the schedule's SNR says. ``σ̂²`` is taken before
    `FlashConfig.variance_scale`, which then only scales the start noise.
    """

    thresholds: tuple[float, ...]
    steps: tuple[int, ...]

    def __post_init__(self) -> None:
        th, st = tuple(float(t) for t in self.thresholds), tuple(self.steps)
        if len(st) != len(th) + 1:
            raise FlashInputError(f"a start policy needs one step more than thresholds, got {len(th)} thresholds and {len(st)} steps")
        if not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in st):
            raise FlashInputError(f"start policy steps must be integers >= 0, got {list(st)}")
        if any(b < a for a, b in zip(st, st[1:])):
            raise FlashInputError(f"start policy steps must not decrease with σ̂², got {list(st)}")
        if not all(t == t and abs(t) < float("inf") for t in th) or any(b <= a for a, b in zip(th, th[1:])):
            raise FlashInputError(f"start policy thresholds must be finite and strictly increasing, got {list(th)}")
        object.__setattr__(self, "thresholds", th)

    def __call__(self, variance: torch.Tensor) -> torch.Tensor:
        """The start step of each sample (LongTensor ``[B]``, on the variance's device)."""
        v = check_variance(variance).to(torch.float64)
        th = torch.tensor(self.thresholds, dtype=torch.float64, device=v.device)
        idx = torch.searchsorted(th, v.contiguous(), side="left")
        return torch.tensor(self.steps, dtype=torch.long, device=v.device)[idx]

    @property
    def max_step(self) -> int:
        return self.steps[-1]

    def to_dict(self) -> dict[str, Any]:
        return {"thresholds": list(self.thresholds), "steps": list(self.steps)}

    @classmethod
    def from_dict(cls, data: Any) -> "StartPolicy":
        """From ``{"thresholds": [...], "steps": [...]}`` (extra keys are ignored)."""
        if not isinstance(data, dict) or not {"thresholds", "steps"} <= set(data):
            raise FlashInputError(f"a start policy is a mapping with 'thresholds' and 'steps', got {data!r:.200}")
        return cls(tuple(data["thresholds"]), tuple(data["steps"]))


def select_start_step(
    schedule: NoiseSchedule,
    variance: torch.Tensor,
    *,
    min_step: int = 0,
    max_step: int | None = None,
) -> torch.Tensor:
    """``k*`` per sample (LongTensor ``[B]``, on the variance's device), clamped to ``[min_step, max_step]``.

    Ties go to the smaller ``k``. ``k = 0`` has infinite SNR and is chosen only when no finite
    SNR is closer, which cannot happen for finite ``σ̂²``; use ``min_step`` to forbid it anyway.
    """
    v = check_variance(variance)
    n = schedule.num_steps
    max_step = n if max_step is None else max_step
    if not 0 <= min_step <= max_step <= n:
        raise FlashInputError(f"need 0 <= min_step <= max_step <= N={n}, got min_step={min_step}, max_step={max_step}")
    s = schedule.snr().to(v.device)  # [N+1], s[0] = inf
    target = 1.0 / v.to(torch.float64)
    dist = (s[None, :] - target[:, None]).abs()  # inf at k = 0
    k = torch.argmin(dist, dim=1)  # argmin returns the first (smallest k) minimum
    return k.clamp(min_step, max_step)


def allocate_steps(
    schedule: NoiseSchedule,
    variance: torch.Tensor,
    budget: float,
    *,
    min_step: int = 0,
    max_step: int | None = None,
    fixed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Start steps with mean exactly ``round(budget · B) / B``, never fewer for a larger ``σ̂²``.

    The steps are ``k*(α σ̂²)`` with the one factor ``α`` whose sum is closest to the total from
    above; single steps are then taken from the smallest ``σ̂²`` until it is exact. Samples marked in
    ``fixed`` (estimates without signal) start at ``N`` and count against the budget.
    """
    v = check_variance(variance).to(torch.float64)
    n = schedule.num_steps
    max_step = n if max_step is None else max_step
    b = v.shape[0]
    if not (budget >= 0 and budget < float("inf")):
        raise FlashInputError(f"the budget must be a finite number of steps per sample >= 0, got {budget}")
    fixed = torch.zeros(b, dtype=torch.bool) if fixed is None else fixed.to(torch.bool).cpu()
    free = (~fixed).nonzero().flatten()
    total = round(budget * b) - n * int(fixed.sum())
    if not min_step * len(free) <= total <= max_step * len(free):
        raise FlashInputError(
            f"a budget of {budget} steps per sample is out of reach for {b} samples: it must lie between "
            f"min_step = {min_step} and max_step = {max_step} (N = {n})"
            + (f", with {int(fixed.sum())} sample(s) held at N" if bool(fixed.any()) else "")
        )
    steps = torch.full((b,), n, dtype=torch.long)
    if len(free):
        vf = v.cpu()[free]
        lo, hi = -60.0, 60.0  # log α: the search covers every step from 1 to N
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            if int(select_start_step(schedule, vf * torch.exp(torch.tensor(mid)), min_step=min_step, max_step=max_step).sum()) < total:
                lo = mid
            else:
                hi = mid
        k = select_start_step(schedule, vf * torch.exp(torch.tensor(hi)), min_step=min_step, max_step=max_step)
        order = torch.argsort(vf, stable=True)
        ks = k[order]
        for _ in range(int(ks.sum()) - total):  # the lowest σ̂² above min_step gives a step: order is kept
            ks[int((ks > min_step).nonzero()[0])] -= 1
        k[order] = ks
        steps[free] = k
    return steps.to(variance.device)


def start_latent(
    latent: torch.Tensor,
    variance: torch.Tensor,
    step: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    mode: Literal["noise_correction", "snr_matched"] = "noise_correction",
    noise_correction: float = 1.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Start latent per sample and the start steps, moved to ``N`` where the estimate has no signal.

    ``mode="noise_correction"``: ``sqrt(1 − cσ̂²) ẑ + sqrt(cσ̂²) ε``; samples with ``cσ̂² ≥ 1`` start
    from pure noise at ``k = N`` with a `UserWarning` (instead of a NaN). ``mode="snr_matched"``:
    ``a_k ẑ + b_k ε``, the exact marginal. ``step == 0`` keeps ``ẑ``. ``ε`` is ``noise`` when given,
    else one draw per sample from ``generator``.
    """
    v = check_variance(variance).to(torch.float64)
    if latent.shape[0] != v.shape[0] or step.shape[0] != v.shape[0]:
        raise FlashInputError(f"batch sizes differ: latent {latent.shape[0]}, variance {v.shape[0]}, step {step.shape[0]}")
    if not (noise_correction >= 0 and noise_correction < float("inf")):  # also refuses NaN
        raise FlashInputError(f"noise_correction c must be a finite number >= 0, got {noise_correction}")
    eps = randn_per_sample(latent.shape, generator, device=latent.device, dtype=latent.dtype) if noise is None else noise
    step = step.clone()
    view = (-1,) + (1,) * (latent.ndim - 1)
    if mode == "noise_correction":
        cv = noise_correction * v
        hopeless = cv >= 1.0
        if torch.any(hopeless):
            idx = hopeless.nonzero().flatten().tolist()
            warnings.warn(
                f"c·σ̂² >= 1 for samples {idx} (c={noise_correction}, σ̂²={v[hopeless].tolist()}): "
                f"the estimate carries no signal; these samples start from pure noise at k = N = {schedule.num_steps}.",
                UserWarning,
                stacklevel=2,
            )
            step[hopeless.to(step.device)] = schedule.num_steps
        cv = cv.clamp(max=1.0)
        signal = (1.0 - cv).sqrt().to(latent.dtype).to(latent.device).view(view)
        noise = cv.sqrt().to(latent.dtype).to(latent.device).view(view)
    elif mode == "snr_matched":
        k = step.cpu()
        signal = schedule.a[k].to(latent.dtype).to(latent.device).view(view)
        noise = schedule.b[k].to(latent.dtype).to(latent.device).view(view)
    else:
        raise FlashInputError(f"unknown start mode {mode!r}; use 'noise_correction' or 'snr_matched'")
    z = signal * latent + noise * eps
    zero = (step == 0).to(latent.device).view(view)
    return torch.where(zero, latent, z), step
