"""The reverse-diffusion loop shared by every reference solver.

One loop serves all solvers and all start steps (docs/architecture.md, "The Flash core"): with per-sample start
steps ``k_i`` the loop runs ``k = max_i k_i, ..., 1``; sample ``i`` is *active* from the moment
``k`` reaches ``k_i`` (its start latent is used as given), and the denoiser runs on active
samples only. Each sample therefore makes exactly ``k_i`` denoiser calls, at the timesteps
``schedule.timesteps[k_i], ..., schedule.timesteps[1]`` in that order, and the result for a
sample does not depend on the other samples in the batch (given per-sample generators).

A solver subclasses `ReverseDiffusionSolver` and overrides `step`, which maps the active
latents at level ``k`` to level ``k − 1``. The unconditional DDIM/DDPM update lives in
`ReverseDiffusionSolver.update` (``η = 1`` over all train timesteps is DDPM ancestral sampling):

    ẑ0 = (z − b_k ε) / a_k,
    z' = a_{k−1} ẑ0 + sqrt(b_{k−1}² − σ_k²) ε + σ_k ξ,
    σ_k = η · sqrt(b_{k−1}² / b_k²) · sqrt(1 − ᾱ_k / ᾱ_{k−1})            (Song et al., DDIM, eq. 16)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from flash_plugin.errors import FlashInputError
from flash_plugin.types import NoiseSchedule, Solution, StartPoint
from flash_plugin.utils.batch import select_operator  # re-exported: its home is flash_plugin.utils.batch
from flash_plugin.utils.random import GeneratorLike, check_generators, randn_per_sample, subset_generators


EXTRA_NFE = "_extra_nfe"
"""Key of the per-sample counter (in the solve's ``state``) of denoiser calls a step makes beyond its own."""


def train_timesteps(num_train: int, num_steps: int) -> torch.Tensor:
    """Descending train timesteps a solver of ``num_steps`` visits.

    ``num_steps == num_train``: every timestep ``T−1..0`` (DDPM). Otherwise the CompVis "uniform"
    DDIM discretisation ``range(0, T, T // S) + 1`` (for T = 1000, S = 500: 999, 997, ..., 1), the
    grid the paper's ReSample runs on.
    """
    if not 1 <= num_steps <= num_train:
        raise FlashInputError(f"num_steps must lie in 1..{num_train}, got {num_steps}")
    if num_steps == num_train:
        return torch.arange(num_train - 1, -1, -1)
    stride = num_train // num_steps
    ts = torch.arange(0, num_train, stride)[:num_steps] + 1
    return ts.clamp(max=num_train - 1).flip(0)


@dataclass
class StepContext:
    """What `ReverseDiffusionSolver.step` gets for the active samples at level ``k``."""

    k: int
    timestep: torch.Tensor  # LongTensor [B_active], the train timestep of level k
    acp: float  # ᾱ at level k
    acp_prev: float  # ᾱ at level k-1 (1.0 at k = 1)
    z: torch.Tensor
    y: torch.Tensor
    operator: Any
    generator: GeneratorLike
    index: torch.Tensor  # positions of the active samples in the batch
    state: dict  # per-solve scratch space (e.g. per-sample counters), indexed by batch position


class ReverseDiffusionSolver:
    """Base of all reference solvers: schedule over ``k = 0..N``, mixed starts, NFE bookkeeping.

    Args:
        model: a `LatentDiffusion`, `GaussianOracle` or anything with ``eps(z, t)``,
            ``decode(z)``, ``encode(x)``, ``alphas_cumprod`` and ``latent_shape``.
        num_steps: ``N``; all train timesteps by default (DDPM).
        eta: DDIM stochasticity (``1`` = DDPM ancestral variance, ``0`` = deterministic DDIM).
        progress: show a tqdm progress bar over the reverse steps.
    """

    supports_mixed_starts: Literal[True] = True
    name = "sampler"

    def __init__(self, model: Any, *, num_steps: int | None = None, eta: float = 1.0, progress: bool = False):
        self.model = model
        acp = torch.as_tensor(model.alphas_cumprod, dtype=torch.float64).cpu()
        n = len(acp) if num_steps is None else int(num_steps)
        self._schedule = NoiseSchedule.from_train_alphas(acp, train_timesteps(len(acp), n))
        if not 0.0 <= eta <= 1.0:
            raise FlashInputError(f"eta must lie in [0, 1], got {eta}")
        self.eta = float(eta)
        self.progress = progress

    @property
    def schedule(self) -> NoiseSchedule:
        return self._schedule

    def __repr__(self) -> str:
        return f"{type(self).__name__}(N={self.schedule.num_steps}, eta={self.eta}, model={getattr(self.model, 'name', type(self.model).__name__)})"

    # ---- pieces subclasses use ---------------------------------------------------------------
    def predict(self, ctx: StepContext, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ε, ẑ0)`` at level ``ctx.k`` (differentiable w.r.t. ``z`` when grad is enabled)."""
        eps = self.model.eps(z, ctx.timestep)
        a, b = ctx.acp**0.5, (1.0 - ctx.acp) ** 0.5
        return eps, (z - b * eps) / a

    def update(self, ctx: StepContext, z: torch.Tensor, eps: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Unconditional DDIM(η) step from level ``k`` to ``k − 1``."""
        acp, prev = ctx.acp, ctx.acp_prev
        sigma = 0.0
        if self.eta > 0 and prev < 1.0:
            sigma = self.eta * ((1 - prev) / (1 - acp)) ** 0.5 * (1 - acp / prev) ** 0.5
        out = prev**0.5 * x0 + max(1 - prev - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            out = out + sigma * randn_per_sample(z.shape, ctx.generator, device=z.device, dtype=z.dtype)
        return out

    def step(self, ctx: StepContext) -> torch.Tensor:
        """Level ``k`` -> ``k − 1`` for the active samples; the plain sampler ignores ``y``."""
        with torch.no_grad():
            eps, x0 = self.predict(ctx, ctx.z)
            return self.update(ctx, ctx.z, eps, x0)

    def finish(self, z: torch.Tensor, y: torch.Tensor, operator: Any, state: dict) -> torch.Tensor:
        """Hook after the loop (ReSample's final data-consistency step); identity by default."""
        return z

    def check_inputs(self, y: torch.Tensor, operator: Any) -> None:
        if not isinstance(y, torch.Tensor) or not y.dtype.is_floating_point:
            raise FlashInputError(f"y must be a floating-point tensor, got {type(y).__name__} {getattr(y, 'dtype', '')}")
        if y.ndim < 2:
            raise FlashInputError(f"y must be batched (B, ...), got shape {tuple(y.shape)}")
        if not torch.all(torch.isfinite(y)):
            raise FlashInputError("y contains NaN or Inf")

    # ---- the loop ----------------------------------------------------------------------------
    def solve(
        self,
        y: torch.Tensor,
        operator: Any,
        *,
        start: StartPoint | None = None,
        generator: GeneratorLike = None,
        callback: Callable[[int, torch.Tensor], None] | None = None,
    ) -> Solution:
        if torch.is_inference_mode_enabled():
            # Guidance takes gradients, which inference mode forbids for good (its tensors cannot
            # be saved for backward): solve outside it, on ordinary copies of the inputs.
            with torch.inference_mode(False):
                if start is not None:
                    start = StartPoint(step=start.step.clone(), latent=start.latent.clone())
                try:
                    return self.solve(y.clone() if isinstance(y, torch.Tensor) else y, operator, start=start,
                                      generator=generator, callback=callback)
                except RuntimeError as err:
                    if "Inference tensors" not in str(err):
                        raise
                    raise FlashInputError(
                        f"{type(self).__name__} needs gradients, but the operator or the model holds tensors made "
                        "under torch.inference_mode(); create them outside it (torch.no_grad() is fine)"
                    ) from err
        self.check_inputs(y, operator)
        out_dtype = y.dtype
        model_dtype = getattr(self.model, "dtype", None)
        if isinstance(model_dtype, torch.dtype) and model_dtype != y.dtype:
            y = y.to(model_dtype)  # a model that declares its dtype computes in it; results return in y's dtype
        batch = y.shape[0]
        check_generators(generator, batch)
        device = y.device
        n = self.schedule.num_steps
        if start is None:
            z = randn_per_sample((batch, *self.model.latent_shape), generator, device=device, dtype=y.dtype)
            steps = torch.full((batch,), n, dtype=torch.long, device=device)
        else:
            if start.latent.shape[0] != batch:
                raise FlashInputError(f"start.latent has {start.latent.shape[0]} samples, y has {batch}")
            if tuple(start.latent.shape[1:]) != tuple(self.model.latent_shape):
                raise FlashInputError(f"start.latent must have shape (B, {', '.join(map(str, self.model.latent_shape))}), got {tuple(start.latent.shape)}")
            steps = self.schedule.check_steps(start.step).to(device)
            z = start.latent.detach().to(device=device, dtype=y.dtype).clone()
        nfe = torch.zeros(batch, dtype=torch.long, device=device)
        state: dict = {}
        ks = range(int(steps.max().item()) if batch else 0, 0, -1)
        if self.progress:
            from tqdm.auto import tqdm

            ks = tqdm(ks, desc=type(self).__name__, leave=False)
        acp, ts = self.schedule.alphas_cumprod, self.schedule.timesteps
        for k in ks:
            index = (steps >= k).nonzero().flatten()
            ctx = StepContext(
                k=k,
                timestep=torch.full((len(index),), int(ts[k]), dtype=torch.long, device=device),
                acp=float(acp[k]),
                acp_prev=float(acp[k - 1]),
                z=z[index],
                y=y[index],
                operator=select_operator(operator, index, batch),
                generator=subset_generators(generator, index),
                index=index,
                state=state,
            )
            z[index] = self.step(ctx).detach().to(z.dtype)
            nfe[index] += 1
            if callback is not None:
                callback(k, z)
        z = self.finish(z, y, operator, state).detach()
        extra = state.get(EXTRA_NFE)
        if extra is not None:  # denoiser calls beyond one per step (ReSample's time travel)
            nfe[: len(extra)] += extra.to(nfe.device)
        with torch.no_grad():
            x = self.model.decode(z)
        return Solution(x=x.detach().to(out_dtype), latent=z.to(out_dtype), nfe=nfe, start_step=steps.clone(), extras={k: v for k, v in state.items() if k.startswith("count_")})


class Sampler(ReverseDiffusionSolver):
    """Plain unconditional DDPM/DDIM sampler (ignores the measurement): for sampling and SDEdit-like use."""

    name = "sampler"
    ignores_measurement = True  # declared for the conformance suite's guidance check
