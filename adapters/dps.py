"""Adapter: the original DPS code (DPS2022/diffusion-posterior-sampling) as a `Solver`, unchanged.

Paper: H. Chung, J. Kim, M. T. Mccann, M. L. Klasky, J. C. Ye, "Diffusion Posterior Sampling for
General Noisy Inverse Problems", ICLR 2023; code github.com/DPS2022/diffusion-posterior-sampling,
``guided_diffusion/gaussian_diffusion.py`` (``create_sampler`` -> ``DDPM``/``DDIM``, a
``SpacedDiffusion``; ``p_sample_loop``) and ``guided_diffusion/condition_methods.py`` (``'ps'``).
Pixel space: the "latent" of this solver is the image.

Start at step k on the respaced process: the loop runs ``idx = num_timesteps − 1, ..., 0``; the
adapter calls ``p_sample_loop`` of a shallow copy of the sampler whose ``num_timesteps`` is ``k``
(every array stays the full process's), so a solve from level k runs exactly the k last steps of
the full run (``x_start`` = the start latent). ``k = 0`` is handled without calling the upstream.
The upstream refuses batches (``if t != 0`` on a batch tensor) and takes one norm over the batch:
the adapter calls it once per sample, with torch's global RNG seeded from that sample's generator
inside ``torch.random.fork_rng`` (it draws the DDPM noise and an unused ``q_sample`` of the
measurement from it). ``x_start`` gets ``requires_grad_()`` upstream: it receives a detached clone.
The operator is wrapped so that ``forward`` accepts the ``noisy_measurement=`` keyword the ``'ps'``
step passes; the noiser is a function named ``gaussian`` (the step reads only its ``__name__``).

What can be flashed:

* the repository's own ``sample_fn = partial(sampler.p_sample_loop, model=model,
  measurement_cond_fn=cond_method.conditioning)`` (as in its ``sample_condition.py``): the model and
  the conditioning method's class and settings (``scale``, noiser) are taken from it, the operator
  is the one given to ``solve``;
* or ``DPSAdapter(sampler, model, scale=...)`` explicitly; ``model`` is the repository's UNet (any
  ``model(x, t)``) or a flash-plugin pixel model (``eps``, ``alphas_cumprod``, ``latent_shape``),
  bridged by `DPSModel`.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Callable

import torch

from flash_plugin.adapters.compvis import (
    check_no_conflict,
    import_upstream,
    quiet,
    sample_seeds,
    seeded_global_rng,
    upstream_root,
)
from flash_plugin.adapters.common import ForwardShim, gaussian, start_of
from flash_plugin.errors import FlashInputError
from flash_plugin.markers import hookimpl
from flash_plugin.types import NoiseSchedule, Solution, StartPoint
from flash_plugin.utils.random import GeneratorLike, check_generators

PACKAGES = ("guided_diffusion", "util")


class DPSModel(torch.nn.Module):
    """A flash-plugin pixel-space model (``eps(x, t)``) as the ``model(x, t)`` the DPS loop calls
    (ε output only: use a sampler with ``model_var_type`` ``fixed_small`` or ``fixed_large``)."""

    def __init__(self, model: Any):
        super().__init__()
        self.inner = model
        self.latent_shape = tuple(model.latent_shape)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.inner.eps(x, t.long())


class _Counting:
    def __init__(self, model: Callable):
        self.model, self.calls = model, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.model(*args, **kwargs)


class DPSAdapter:
    """Flash-able wrapper of the DPS repository's ``p_sample_loop`` (pixel space).

    Args:
        sampler: a DPS ``SpacedDiffusion`` (``DDPM``/``DDIM`` from ``create_sampler``), or the
            repository's ``partial(sampler.p_sample_loop, model=..., measurement_cond_fn=...)``.
        model: the denoiser (needed with a bare sampler): a ``model(x, t)`` or a flash-plugin model.
        scale: the ``'ps'`` step size (default: the conditioning method's own, 1.0; the
            repository's configs use 0.3–1.0); ignored when taken from a ``sample_fn``.
        shape: image shape ``(C, H, W)`` when the model does not tell it.
        conditioning: ``make(operator) -> measurement_cond_fn`` overriding the repository's ``'ps'``.
        progress: let the upstream's tqdm bar through.
    """

    name = "dps-upstream"
    upstream_packages = PACKAGES

    def __init__(self, sampler: Any, model: Any = None, *, scale: float | None = None, shape: tuple[int, ...] | None = None,
                 conditioning: Callable[[Any], Callable] | None = None, progress: bool = False):
        cond_method = None
        if isinstance(sampler, functools.partial):
            bound = sampler.func
            model = sampler.keywords.get("model", model)
            cond_fn = sampler.keywords.get("measurement_cond_fn")
            cond_method = getattr(cond_fn, "__self__", None)
            sampler = getattr(bound, "__self__", None)
        if sampler is None or not callable(getattr(sampler, "p_sample_loop", None)):
            raise FlashInputError("DPSAdapter needs a DPS sampler (create_sampler(...)) or the repository's sample_fn partial")
        if model is None:
            raise FlashInputError("DPSAdapter needs the denoiser: pass model=... (the sampler does not hold it)")
        if hasattr(model, "eps") and not isinstance(model, DPSModel):
            model = DPSModel(model)
        self.sampler, self.denoiser = sampler, model
        self.upstream_root = upstream_root(type(sampler))
        self.progress = bool(progress)
        if scale is not None and not (float(scale) >= 0 and float(scale) < float("inf")):
            raise FlashInputError(f"scale must be a finite number >= 0, got {scale}")
        self._cond_method, self._scale, self._conditioning = cond_method, scale, conditioning
        shape = shape if shape is not None else getattr(model, "latent_shape", None)
        if shape is None:
            raise FlashInputError("pass shape=(C, H, W): the model does not tell its image shape")
        self.latent_shape = tuple(int(s) for s in shape)
        acp = torch.as_tensor(sampler.alphas_cumprod, dtype=torch.float64)
        tmap = torch.as_tensor(list(getattr(sampler, "timestep_map", range(len(acp)))), dtype=torch.int64)
        self._schedule = NoiseSchedule(torch.cat([torch.ones(1, dtype=torch.float64), acp]), torch.cat([torch.tensor([-1]), tmap]))

    @property
    def schedule(self) -> NoiseSchedule:
        return self._schedule

    @property
    def model(self) -> Any:
        return self.denoiser.inner if isinstance(self.denoiser, DPSModel) else self.denoiser

    def __repr__(self) -> str:
        return f"DPSAdapter(upstream={type(self.sampler).__module__}.{type(self.sampler).__name__}, N={self.schedule.num_steps})"

    def measurement_cond_fn(self, operator: Any) -> Callable:
        """The ``'ps'`` step for ``operator`` (the sample_fn's method class and settings if given)."""
        shim = ForwardShim(operator)
        if self._conditioning is not None:
            return self._conditioning(shim)
        if self._cond_method is not None:
            m = copy.copy(self._cond_method)
            m.operator = shim
            return m.conditioning
        if self.upstream_root is None:
            raise FlashInputError("cannot locate the DPS checkout of the sampler: pass conditioning=...")
        methods = import_upstream(self.upstream_root, "guided_diffusion.condition_methods", PACKAGES)
        kwargs = {} if self._scale is None else {"scale": float(self._scale)}
        return methods.get_conditioning_method("ps", shim, gaussian, **kwargs).conditioning

    def solve(self, y: torch.Tensor, operator: Any, *, start: StartPoint | None = None, generator: GeneratorLike = None,
              trajectory: bool = False, rng_state: list[torch.Tensor] | None = None) -> Solution:
        """Per-sample upstream calls; ``trajectory``/``rng_state`` as in `CompVisAdapter.solve`."""
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                if start is not None:
                    start = StartPoint(step=start.step.clone(), latent=start.latent.clone())
                return self.solve(y.clone(), operator, start=start, generator=generator, trajectory=trajectory, rng_state=rng_state)
        if not isinstance(y, torch.Tensor) or not y.dtype.is_floating_point or y.ndim < 2 or not torch.all(torch.isfinite(y)):
            raise FlashInputError("y must be a batched, finite floating-point tensor")
        if not callable(getattr(operator, "forward", None)):
            raise FlashInputError(f"the operator must have forward(x); got {type(operator).__name__}")
        if self.upstream_root is not None:
            check_no_conflict(self.upstream_root, [type(self.sampler).__module__.split(".", 1)[0]])
        batch, shape = y.shape[0], self.latent_shape
        check_generators(generator, batch)
        steps, latents = start_of(start, generator, self.schedule, batch, shape, y.device, y.dtype)
        if rng_state is not None and len(rng_state) != batch:
            raise FlashInputError(f"rng_state needs one state per sample ({batch}), got {len(rng_state)}")
        seeds = sample_seeds(generator, batch)
        from flash_plugin.utils.batch import select_operator

        outs, nfe, trajs, states = [], [], [], []
        for i in range(batch):
            k = int(steps[i])
            op_i = select_operator(operator, torch.tensor([i]), batch) if hasattr(type(operator), "select") else operator
            x = latents[i : i + 1].detach().clone().to(y.dtype)
            if k == 0:
                outs.append(x), nfe.append(0), trajs.append(x.clone()), states.append([torch.get_rng_state()])
                continue
            counting = _Counting(self.denoiser)
            truncated = copy.copy(self.sampler)
            truncated.num_timesteps = k  # the loop bound; every array stays the full process's
            cond = self.measurement_cond_fn(op_i)
            lat, rng = [x.clone()], []

            def recording(**kw):
                out = cond(**kw)
                if trajectory:  # the loop's state after each step is what the DPS step returns
                    lat.append(out[0].detach().clone())
                    rng.append(torch.get_rng_state())
                return out

            with seeded_global_rng(seeds[i], y.device, None if rng_state is None else rng_state[i]), torch.enable_grad(), \
                    quiet(not self.progress):
                rng.append(torch.get_rng_state())
                z = truncated.p_sample_loop(model=counting, x_start=x, measurement=y[i : i + 1].detach().clone(),
                                            measurement_cond_fn=recording, record=False, save_root=None)
            outs.append(z.detach())
            nfe.append(counting.calls)
            if trajectory:
                trajs.append(torch.cat(lat))
                states.append(rng[: len(lat)])  # rng[j]: the global RNG as the step from lat[j] began
        z = torch.cat(outs)
        extras: dict[str, Any] = {}
        if trajectory:
            extras["trajectory"], extras["rng_states"] = trajs, states
        return Solution(x=z.clone(), latent=z, nfe=torch.tensor(nfe, dtype=torch.long), start_step=steps.clone(), extras=extras)


def _dps_sampler(obj: Any) -> Any | None:
    cls = type(obj)
    names = [c.__name__ for c in cls.__mro__]
    if "SpacedDiffusion" not in names or not any(c.__module__.endswith("gaussian_diffusion") for c in cls.__mro__):
        return None
    need = ("p_sample_loop", "p_sample", "q_sample", "p_mean_variance")
    return obj if all(callable(getattr(obj, m, None)) for m in need) and hasattr(obj, "timestep_map") else None


def is_dps_sample_fn(obj: Any) -> bool:
    """Structural test: ``partial(<DPS SpacedDiffusion>.p_sample_loop, model=..., ...)``."""
    if not isinstance(obj, functools.partial) or getattr(obj.func, "__name__", "") != "p_sample_loop":
        return False
    owner = getattr(obj.func, "__self__", None)
    return owner is not None and _dps_sampler(owner) is not None and "model" in obj.keywords


@hookimpl
def flash_adapt_solver(obj: Any) -> Any | None:
    """The DPS repository's ``sample_fn`` partial -> `DPSAdapter`; else ``None`` (a bare sampler
    does not hold its model: construct `DPSAdapter(sampler, model)` yourself)."""
    if is_dps_sample_fn(obj):
        return DPSAdapter(obj)
    return None
