"""Adapter: deepinv's ``DPS`` and the ``PosteriorDiffusion`` family as flash-plugin `Solver`\\ s, and
deepinv ``Physics`` <-> flash-plugin ``Operator`` both ways.

deepinv (deepinv.github.io, 0.5.0; DPS after Chung et al., ICLR 2023) solves the reverse SDE on a
time grid ``solver.timesteps`` (``linspace(1, t_end, num_steps)`` for ``DPS``) and documents the
two arguments a start at step k needs: ``PosteriorDiffusion.forward(y, physics, x_init=...,
timesteps=...)`` uses ``x_init`` as the state at ``timesteps[0]`` and makes one solver step per
consecutive pair. The adapter's levels are deepinv's own grid points: with ``M`` grid points,
``N = M − 1`` steps, level ``k`` is ``grid[N − k]`` and a solve from level k passes
``x_init = z_k, timesteps = grid[N − k:]`` (exactly k denoiser calls; the final denoising of
``denoise_output`` makes no call where the grid ends at σ = 0). ``ᾱ_k = scale_t(grid[N − k])²``
(the VP state ``s(t)(x0 + σ(t) n)`` is our ``sqrt(ᾱ) x0 + sqrt(1 − ᾱ) n``); the integer
``schedule.timesteps`` are the train timesteps an `EpsDenoiser` queries (the nearest ᾱ), or
``round(1000 · t)`` labels for another denoiser. k = 0 is handled without a call (a one-point grid
fails in deepinv).

`vp_times` maps a flash-plugin discrete schedule exactly onto deepinv's VP time (the root of
``β_min t + (β_max − β_min) t²/2 = −log ᾱ``), and `EpsDenoiser` presents an ε-prediction model
(`LatentDiffusion.eps`, `GaussianOracle`) as the ``D(x, σ)`` deepinv expects, so a grid built with
`vp_times` makes deepinv's DDPM steps the transitions between the project's levels.

Per sample: deepinv's DPS fidelity is per sample already, but its noise comes from one stream
(the solver's ``rng``, or torch's global RNG): the adapter calls deepinv once per sample, seeding
``forward(seed=...)`` and the global RNG (inside ``torch.random.fork_rng``) from that sample's
generator. Denoiser calls are counted with a forward hook on the denoiser module, removed after
the call. deepinv needs torch 2.14.1 + torchvision 0.29.1: ``pip install "flash-plugin[deepinv]"``
in its own environment. Nothing here imports deepinv until an adapter is used.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from flash_plugin.adapters.common import start_of
from flash_plugin.adapters.compvis import quiet, sample_seeds, seeded_global_rng
from flash_plugin.errors import FlashInputError
from flash_plugin.markers import hookimpl
from flash_plugin.types import NoiseSchedule, Solution, StartPoint
from flash_plugin.utils.random import GeneratorLike, check_generators, randn_per_sample


def _is_deepinv(obj: Any, package: str) -> bool:
    return any(c.__module__.startswith(package) for c in type(obj).__mro__)


def vp_times(alphas_cumprod: torch.Tensor, beta_min: float = 0.1, beta_max: float = 20.0) -> torch.Tensor:
    """deepinv VP times with ``exp(−B(t)) = ᾱ``, ``B(t) = β_min t + (β_max − β_min) t² / 2`` (closed form)."""
    acp = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    target = -torch.log(acp)
    a, b = (beta_max - beta_min) / 2, beta_min
    t = (-b + torch.sqrt(b * b + 4 * a * target)) / (2 * a)
    if torch.any(t > 1 + 1e-9):
        raise FlashInputError(f"ᾱ down to {acp.min().item():.3g} is beyond deepinv's VP range (t ≤ 1 needs ᾱ ≥ {math.exp(-(b + a)):.3g})")
    return t


class EpsDenoiser(torch.nn.Module):
    """An ε-prediction model as a deepinv denoiser ``D(x, σ)`` on the VE form ``x = x0 + σ n``:
    ``ᾱ = 1/(1 + σ²)``, train timestep = the one whose ᾱ is nearest, ``x̂0 = x − σ ε(√ᾱ x, t)``."""

    def __init__(self, model: Any):
        super().__init__()
        self.inner = model
        self.register_buffer("acp", torch.as_tensor(model.alphas_cumprod, dtype=torch.float64).detach().cpu(), persistent=False)

    def forward(self, x: torch.Tensor, sigma: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1)
        sigma = sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma
        acp = 1.0 / (1.0 + sigma**2)
        t = (self.acp.to(x.device)[None, :] - acp[:, None]).abs().argmin(dim=1)
        view = (-1,) + (1,) * (x.ndim - 1)
        z = acp.sqrt().to(x.dtype).view(view) * x
        eps = self.inner.eps(z, t)
        return x - sigma.to(x.dtype).view(view) * eps


class PhysicsOperator:
    """A deepinv ``Physics`` as a flash-plugin `Operator` (``adjoint`` for a ``LinearPhysics``).

    ``forward = physics.A``; ``noise_std`` = the Gaussian noise model's σ (0 without one);
    ``measure`` adds ``σ · N(0, I)`` drawn from the caller's generator (deepinv's own noise uses
    its ``rng``)."""

    def __init__(self, physics: Any):
        self.physics = physics
        sigma = getattr(getattr(physics, "noise_model", None), "sigma", 0.0)
        sigma = torch.as_tensor(sigma if sigma is not None else 0.0)
        if sigma.numel() != 1:
            raise FlashInputError("per-sample noise levels of a deepinv physics are not supported: noise_std must be one number")
        self.noise_std = float(sigma)
        if hasattr(physics, "A_adjoint") and _is_deepinv(physics, "deepinv.physics") and \
                any(c.__name__ == "LinearPhysics" for c in type(physics).__mro__):
            self.adjoint = lambda y: physics.A_adjoint(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.physics.A(x)

    def measure(self, x: torch.Tensor, generator: GeneratorLike = None) -> torch.Tensor:
        y = self.forward(x)
        if self.noise_std == 0:
            return y
        return y + self.noise_std * randn_per_sample(y.shape, generator, device=y.device, dtype=y.dtype)


def operator_to_physics(operator: Any, *, decode: Any = None) -> Any:
    """A flash-plugin operator as a deepinv physics (``LinearPhysics`` when it has an ``adjoint``
    and no ``decode`` is composed in front; ``decode`` maps a latent to the operator's images)."""
    import deepinv as dinv

    if isinstance(operator, PhysicsOperator) and decode is None:
        return operator.physics
    noise = dinv.physics.GaussianNoise(sigma=float(getattr(operator, "noise_std", 0.0)))
    if decode is not None:
        return dinv.physics.Physics(A=lambda z, **kw: operator.forward(decode(z)), noise_model=noise)
    if callable(getattr(operator, "adjoint", None)):
        return dinv.physics.LinearPhysics(A=lambda x, **kw: operator.forward(x), A_adjoint=lambda y, **kw: operator.adjoint(y),
                                          noise_model=noise)
    return dinv.physics.Physics(A=lambda x, **kw: operator.forward(x), noise_model=noise)


class DeepinvAdapter:
    """Flash-able wrapper of a deepinv ``PosteriorDiffusion`` (``DPS`` included), per the module doc.

    Args:
        posterior: the deepinv object (never modified; a counting hook lives only during a call).
        latent_shape: the state shape ``(C, H, W)``; default: the ``inner.latent_shape`` of an
            `EpsDenoiser`.
        decode: latent -> image for latent-space use (the physics then acts on ``decode(z)``);
            default: identity (pixel space).
        model: the latent model for `flash()` (``latent_id``); default: the `EpsDenoiser`'s.
        progress: let deepinv's output through.
    """

    name = "deepinv"

    def __init__(self, posterior: Any, *, latent_shape: tuple[int, ...] | None = None, decode: Any = None,
                 model: Any = None, progress: bool = False):
        if not (_is_deepinv(posterior, "deepinv.sampling") and callable(getattr(posterior, "forward", None))
                and hasattr(posterior, "solver") and hasattr(posterior, "sde")):
            raise FlashInputError(f"DeepinvAdapter needs a deepinv PosteriorDiffusion (e.g. deepinv.sampling.DPS), got {type(posterior).__name__}")
        self.posterior = posterior
        den = getattr(posterior.sde, "denoiser", None) or getattr(posterior, "denoiser", None)
        self.denoiser = den
        inner = getattr(den, "inner", None)
        self._model = model if model is not None else inner
        shape = latent_shape if latent_shape is not None else getattr(inner, "latent_shape", None)
        if shape is None:
            raise FlashInputError("pass latent_shape=(C, H, W): the denoiser does not tell its state shape")
        self.latent_shape = tuple(int(s) for s in shape)
        self.decode_fn = decode
        self.progress = bool(progress)
        grid = torch.as_tensor(posterior.solver.timesteps, dtype=torch.float64).detach().cpu()
        if grid.ndim != 1 or len(grid) < 2 or torch.any(grid[1:] >= grid[:-1]):
            raise FlashInputError("the deepinv solver's timesteps must be a decreasing grid of at least two points")
        self.grid = grid
        scale = torch.as_tensor(posterior.sde.scale_t(grid.to(posterior.sde.dtype if hasattr(posterior.sde, "dtype") else torch.float64)),
                                dtype=torch.float64).detach().cpu().reshape(-1)
        acp = (scale**2).clamp(max=1.0).flip(0)  # level k = grid[N - k]
        acp[0] = 1.0 if abs(acp[0].item() - 1.0) < 1e-9 else acp[0]
        if abs(acp[0].item() - 1.0) > 1e-9:
            raise FlashInputError(f"the deepinv grid must end at a clean level (ᾱ = 1 at its last point), got ᾱ = {acp[0].item()}")
        train_acp = getattr(den, "acp", None) if isinstance(den, EpsDenoiser) else None
        if train_acp is not None:  # the train timestep EpsDenoiser queries at each level (nearest ᾱ)
            ts = (train_acp[None, :] - acp[:, None]).abs().argmin(dim=1)
        else:  # a deepinv denoiser has no train timesteps: labels of deepinv's time
            ts = torch.round(grid.flip(0) * 1000).long()
        ts[0] = -1
        self._schedule = NoiseSchedule(acp, ts)

    @property
    def schedule(self) -> NoiseSchedule:
        return self._schedule

    @property
    def model(self) -> Any:
        return self._model

    def __repr__(self) -> str:
        return f"DeepinvAdapter({type(self.posterior).__name__}, N={self.schedule.num_steps})"

    def _physics(self, operator: Any) -> Any:
        if _is_deepinv(operator, "deepinv.physics"):
            return operator
        if not callable(getattr(operator, "forward", None)):
            raise FlashInputError(f"the operator must have forward(x) or be a deepinv Physics; got {type(operator).__name__}")
        return operator_to_physics(operator, decode=self.decode_fn)

    def solve(self, y: torch.Tensor, operator: Any, *, start: StartPoint | None = None, generator: GeneratorLike = None,
              trajectory: bool = False) -> Solution:
        """Per-sample deepinv calls from each sample's level (``trajectory`` stores the latents at
        levels ``k..0`` from deepinv's ``get_trajectory``)."""
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                if start is not None:
                    start = StartPoint(step=start.step.clone(), latent=start.latent.clone())
                return self.solve(y.clone(), operator, start=start, generator=generator, trajectory=trajectory)
        if not isinstance(y, torch.Tensor) or not y.dtype.is_floating_point or y.ndim < 2 or not torch.all(torch.isfinite(y)):
            raise FlashInputError("y must be a batched, finite floating-point tensor")
        batch, n, shape = y.shape[0], self.schedule.num_steps, self.latent_shape
        check_generators(generator, batch)
        steps, latents = start_of(start, generator, self.schedule, batch, shape, y.device, y.dtype)
        seeds = sample_seeds(generator, batch)
        from flash_plugin.utils.batch import select_operator

        calls = [0]
        hook = self.denoiser.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1)) \
            if isinstance(self.denoiser, torch.nn.Module) else None
        if hook is None:
            raise FlashInputError("the deepinv denoiser must be a torch.nn.Module (its calls are counted with a forward hook)")
        outs, nfe, trajs = [], [], []
        try:
            for i in range(batch):
                k = int(steps[i])
                op_i = select_operator(operator, torch.tensor([i]), batch) if hasattr(type(operator), "select") else operator
                x = latents[i : i + 1].detach().clone()
                if k == 0:
                    outs.append(x), nfe.append(0), trajs.append(x.clone())
                    continue
                calls[0] = 0
                seed = seeds[i]
                solver_seed = seed if getattr(self.posterior.solver, "rng", None) is not None else None
                grid = self.grid[n - k:].to(getattr(self.posterior, "dtype", torch.float64))
                with seeded_global_rng(seed, y.device), torch.enable_grad(), quiet(not self.progress):
                    out = self.posterior.forward(y[i : i + 1].detach().clone(), self._physics(op_i), x_init=x.to(torch.float64),
                                                 seed=solver_seed, timesteps=grid, get_trajectory=trajectory)
                if trajectory:
                    out, traj = out
                    trajs.append(traj.reshape(-1, *shape).detach().to(y.dtype))
                outs.append(out.detach().to(y.dtype))
                nfe.append(calls[0])
        finally:
            hook.remove()
        z = torch.cat(outs)
        with torch.no_grad():
            x = z if self.decode_fn is None else self.decode_fn(z)
        extras: dict[str, Any] = {"trajectory": trajs} if trajectory else {}
        return Solution(x=x.detach(), latent=z, nfe=torch.tensor(nfe, dtype=torch.long), start_step=steps.clone(), extras=extras)


@hookimpl
def flash_adapt_solver(obj: Any) -> Any | None:
    """A deepinv ``PosteriorDiffusion`` (``DPS``, ...) whose denoiser tells its state shape -> `DeepinvAdapter`."""
    if obj is None or isinstance(obj, type) or not _is_deepinv(obj, "deepinv.sampling"):
        return None
    if not any(c.__name__ == "PosteriorDiffusion" for c in type(obj).__mro__):
        return None
    try:
        return DeepinvAdapter(obj)
    except FlashInputError:
        return None


@hookimpl
def flash_adapt_operator(obj: Any) -> Any | None:
    """A deepinv ``Physics`` -> `PhysicsOperator`; anything else -> ``None``."""
    if obj is None or isinstance(obj, type) or not _is_deepinv(obj, "deepinv.physics") or not callable(getattr(obj, "A", None)):
        return None
    return PhysicsOperator(obj)
