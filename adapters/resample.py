"""Adapter: the original ReSample code (soominkwon/resample) as a flash-plugin `Solver`, unchanged.

Paper: B. Song, S. M. Kwon, Z. Zhang, X. Hu, Q. Qu, L. Shen, "Solving Inverse Problems with Latent
Diffusion Models via Hard Data Consistency", ICLR 2024; code github.com/soominkwon/resample,
``ldm/models/diffusion/ddim.py`` ``DDIMSampler.resample_sampling`` with the DPS step of
``ldm_inverse/condition_methods.py`` (``'ps'``). Plumbing: `flash_plugin.adapters.compvis`.

The upstream loop derives its data-consistency (DC) phases from the number of positions it runs
(no DC in the first third, pixel-space DC down to a third, latent-space DC below, events where
``index % 10 == 0``, 5 time-travel UNet calls each, one final latent optimisation). Two start
modes, named for what they do:

* ``"keep_full_run_phases"`` (default): the upstream runs its full ``N``-position loop with
  ``timesteps=None`` and the first ``N − k`` positions are made no-ops by guarded overrides of
  ``p_sample_ddim``, ``pixel_optimization``, ``latent_optimization`` and ``stochastic_resample``
  (each falls through to the upstream method once the position counter, advanced by the
  upstream's own ``callback(i)``, reaches ``N − k``) and of the DPS step. The DC events are then
  those of the full run, so a solve from the level-k latent of a full run equals that run's tail.
  Skipped pixel-stage events still call the decoder and encoder once each (counted, discarded).
* ``"upstream_truncation"``: ``x_T`` and ``timesteps = k + 1.5``: the upstream's own semantics,
  phases recomputed from ``k`` (fewer DC events; not the tail of a full run).

NFE is the UNet calls really made: ``k`` plus 5 per DC event (capped near the end of the loop), so
the one-call-per-step contract cannot hold with the original time travel. Defaults are the
repository's: ``S = 500`` (its config; ``S = 1000`` is refused by its ``make_schedule``), ``η = 0``,
the ``'ps'`` DPS step with a Gaussian noiser. The upstream's ``apply_model`` is graph-free
(``ddpm.py`` decorates it with ``torch.no_grad``); the bridge does the same.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from flash_plugin.adapters.common import ForwardShim, gaussian
from flash_plugin.adapters.compvis import CompVisAdapter, check_no_conflict, cpu_safe_class, import_upstream
from flash_plugin.errors import FlashInputError
from flash_plugin.markers import hookimpl

START_MODES = ("keep_full_run_phases", "upstream_truncation")


_GUARDED: dict[type, type] = {}


def guarded_class(cls: type) -> type:
    """A subclass of the (CPU-safe) upstream class whose DC pieces are no-ops while the position
    counter ``_flash_pos`` is below ``_flash_skip`` (built once per class; delegates to the upstream
    methods otherwise; the loop itself is the upstream's)."""
    sub = _GUARDED.get(cls)
    if sub is not None:
        return sub
    base = cpu_safe_class(cls)

    def skipping(self) -> bool:
        return self._flash_pos < self._flash_skip

    def p_sample_ddim(self, x, *args, **kwargs):
        if skipping(self):
            return x, x, x
        return base.p_sample_ddim(self, x, *args, **kwargs)

    def pixel_optimization(self, measurement, x_prime, operator_fn, *args, **kwargs):
        if skipping(self):
            return x_prime
        return base.pixel_optimization(self, measurement, x_prime, operator_fn, *args, **kwargs)

    def latent_optimization(self, measurement, z_init, operator_fn, *args, **kwargs):
        if skipping(self):
            return z_init, torch.zeros(())
        return base.latent_optimization(self, measurement, z_init, operator_fn, *args, **kwargs)

    def stochastic_resample(self, pseudo_x0, x_t, a_t, sigma):
        if skipping(self):  # the state unchanged, as a leaf the next DPS step can differentiate
            return x_t.detach().requires_grad_(True)
        return base.stochastic_resample(self, pseudo_x0, x_t, a_t, sigma)

    sub = type(cls.__name__, (base,), {
        "_flash_pos": 0, "_flash_skip": 0, "p_sample_ddim": p_sample_ddim, "pixel_optimization": pixel_optimization,
        "latent_optimization": latent_optimization, "stochastic_resample": stochastic_resample,
        "__module__": cls.__module__, "__qualname__": cls.__qualname__,
    })
    _GUARDED[cls] = sub
    return sub


class ReSampleAdapter(CompVisAdapter):
    """Flash-able wrapper of the ReSample repository's ``DDIMSampler.resample_sampling``.

    Args:
        sampler: an instance of ReSample's ``DDIMSampler`` (or the class, with ``model``).
        start_mode: ``"keep_full_run_phases"`` (default) or ``"upstream_truncation"`` (module docstring).
        conditioning: ``make(model, operator) -> measurement_cond_fn``; default: the repository's
            own ``'ps'`` method from ``ldm_inverse/condition_methods.py`` of the sampler's checkout.
        num_steps, eta, progress, model: see `CompVisAdapter` (defaults ``S = 500``, ``η = 0``).
    """

    default_num_steps = 500
    apply_model_grad = False
    upstream_packages = ("ldm", "scripts", "ldm_inverse")
    name = "resample-upstream"

    def __init__(self, sampler: Any, model: Any = None, *, start_mode: str = "keep_full_run_phases",
                 conditioning: Callable[[Any, Any], Callable] | None = None, num_steps: int | None = None,
                 eta: float = 0.0, progress: bool = False):
        if start_mode not in START_MODES:
            raise FlashInputError(f"start_mode must be one of {START_MODES}, got {start_mode!r}")
        if num_steps is not None and int(num_steps) >= 1000:
            raise FlashInputError("ReSample's make_schedule builds its DDIM arrays only for S < 1000 (the upstream fails at S = 1000)")
        super().__init__(sampler, model, num_steps=num_steps, eta=eta, progress=progress)
        self.start_mode = start_mode
        # Our own instance of the guarded subclass (the base built a plain CPU-safe one).
        guarded = guarded_class(self.upstream_class)(self.counter)
        guarded.__dict__.update({k: v for k, v in self.sampler.__dict__.items() if k != "model"})
        self.sampler = guarded
        self._conditioning = conditioning

    def _settings_repr(self) -> str:
        return f"start_mode={self.start_mode!r}"

    def measurement_cond_fn(self, operator: Any) -> Callable:
        """The DPS step the upstream calls at every position (the repository's ``'ps'`` by default)."""
        if self._conditioning is not None:
            return self._conditioning(self.counter, operator)
        if self.upstream_root is None:
            raise FlashInputError("cannot locate the ReSample checkout of the sampler: pass conditioning=...")
        check_no_conflict(self.upstream_root, ("ldm_inverse",))
        methods = import_upstream(self.upstream_root, "ldm_inverse.condition_methods", ("ldm_inverse",))
        return methods.get_conditioning_method("ps", self.counter, ForwardShim(operator), noiser=gaussian).conditioning

    def run_upstream(self, y, operator, x_T, k, trajectory, callback):
        n = self.schedule.num_steps
        s = self.sampler
        cond_fn = self.measurement_cond_fn(operator)
        keep = self.start_mode == "keep_full_run_phases"
        s._flash_skip, s._flash_pos = (n - k if keep else 0), 0

        def counting(i):
            s._flash_pos = i + 1
            if callback is not None:
                callback(i)

        def guarded_cond(x_t, **kwargs):
            if s._flash_pos < s._flash_skip:
                return x_t, torch.zeros(())
            return cond_fn(x_t=x_t, **kwargs)

        try:
            z, inter = s.resample_sampling(
                y, guarded_cond, None, (1, *self.latent_shape), operator_fn=operator.forward, x_T=x_T,
                timesteps=None if keep else self.timesteps_arg(k), callback=counting,
                log_every_t=1 if trajectory else 10**9,
            )
        finally:
            s._flash_skip, s._flash_pos = 0, 0
        # Note: the upstream's final latent optimisation updates the tensor of x_inter[-1] in place
        # (it optimises img.detach(), which shares storage), so the level-0 entry is the final latent.
        return z, (inter["x_inter"] if trajectory else None)


def is_resample_sampler(obj: Any) -> bool:
    """Structural test: ReSample's ``DDIMSampler`` (a ``resample_sampling`` loop with time travel)."""
    if obj is None or isinstance(obj, type):
        return False
    cls = type(obj)
    if "DDIMSampler" not in [c.__name__ for c in cls.__mro__]:
        return False
    if not all(callable(getattr(obj, m, None)) for m in ("make_schedule", "resample_sampling", "p_sample_ddim",
                                                          "pixel_optimization", "latent_optimization", "stochastic_resample")):
        return False
    try:
        params = inspect.signature(cls.resample_sampling).parameters
    except (TypeError, ValueError):
        return False
    return all(p in params for p in ("measurement", "measurement_cond_fn", "x_T", "timesteps", "callback"))


@hookimpl
def flash_adapt_solver(obj: Any) -> Any | None:
    """ReSample's ``DDIMSampler`` -> `ReSampleAdapter` (the repo's defaults); else ``None``."""
    if is_resample_sampler(obj):
        return ReSampleAdapter(obj)
    return None
