"""Shared plumbing for adapters around the CompVis ``DDIMSampler`` forks (PSLD, ReSample).

Both LituRout/PSLD (``stable-diffusion/ldm/models/diffusion/psld.py``) and soominkwon/resample
(``ldm/models/diffusion/ddim.py``) ship a copy of the CompVis latent-diffusion ``DDIMSampler``
(CompVis/latent-diffusion, Rombach et al., CVPR 2022) with a guided loop added. This module lets
flash-plugin run those samplers *unchanged* from any start step ``k`` (the `Solver` protocol);
nothing here contains or reconstructs upstream code, it only calls the samplers' documented
methods. What it provides, and why (measured facts: ``docs`` and the project's reference notes):

* **Start at step k** through the samplers' own arguments: ``x_T`` = the start latent and the float
  ``timesteps = k + 1.5``, which survives the upstream truncation
  ``int(min(t / N, 1) · N) − 1`` for every ``k < N`` (an integer ``k + 1`` loses a step through
  float rounding for some k, e.g. N = 50, k = 28); ``timesteps = None`` at ``k = N``. At ``k = 0``
  the adapter does not call the upstream at all (``0`` or ``0.5`` would run ``N − 1`` steps).
* **CPU**: ``register_buffer`` in both forks moves every tensor to ``cuda``; `cpu_safe_class`
  builds, at run time, a subclass whose only override puts them on the model's device instead.
* **The model bridge** `CompVisModel` presents any flash-plugin latent model (`LatentDiffusion`,
  `GaussianOracle`, anything with ``eps/encode/decode/alphas_cumprod/latent_shape``) with the
  attributes and methods these samplers read from a CompVis ``LatentDiffusion`` (``apply_model``,
  ``alphas_cumprod``, ``betas``, ``differentiable_decode_first_stage``, ...), so the original
  samplers run on diffusers models. A real CompVis model is used as it is.
* **Honest counts**: the adapter hands its own sampler instance a `CallCounter` proxy of the model,
  which counts the ``apply_model`` (denoiser), decoder and encoder calls actually made.
* **Per-sample calls and RNG**: the upstreams take one norm over the whole batch and draw from
  torch's global RNG. The adapter calls the upstream once per sample, inside
  ``torch.random.fork_rng`` with the global RNG seeded from that sample's generator, so a batch
  equals its samples solved alone and the caller's global RNG is left as it was. An opt-in batched
  call would share one norm (and one RNG stream) across samples: results would then depend on the
  batch composition, which is why it is not offered.
* **Grad modes**: the guided steps take ``torch.autograd.grad``; calls run under
  ``torch.enable_grad()`` and outside ``torch.inference_mode`` (inputs are cloned there).
* **No side effects on inputs**: the upstreams call ``requires_grad_()`` on their start latent;
  they get detached clones.
* **Quiet**: upstream prints (``Loss:`` every step) and tqdm bars go to ``os.devnull`` unless
  ``progress=True``.
* **One upstream per process**: PSLD and ReSample both ship a top-level ``ldm`` package (DPS ships
  ``util`` and ``guided_diffusion``). `import_upstream` and the adapters raise
  `UpstreamConflictError` when such a package is already imported from another checkout.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from flash_plugin.adapters.common import start_of
from flash_plugin.errors import FlashError, FlashInputError
from flash_plugin.types import NoiseSchedule, Solution, StartPoint
from flash_plugin.utils.random import GeneratorLike, check_generators

UPSTREAM_PACKAGES: tuple[str, ...] = ("ldm", "util", "guided_diffusion")
"""Top-level package names shipped by more than one upstream (or clashing with common names)."""


class UpstreamConflictError(FlashError, ImportError):
    """A top-level package of an upstream checkout is already imported from another location."""


# ---- importing upstream code -------------------------------------------------------------------
def _module_root(module: Any) -> Path | None:
    """The directory a (possibly namespace) module was imported from."""
    paths = list(getattr(module, "__path__", []) or [])
    if paths:
        return Path(paths[0]).resolve()
    f = getattr(module, "__file__", None)
    return Path(f).resolve().parent if f else None


def _is_under(path: Path | None, root: Path) -> bool:
    return path is not None and (path == root or root in path.parents)


def check_no_conflict(root: str | Path, packages: Sequence[str]) -> None:
    """Raise `UpstreamConflictError` if one of ``packages`` is imported from outside ``root``."""
    root = Path(root).resolve()
    for name in packages:
        mod = sys.modules.get(name)
        if mod is None:
            continue
        where = _module_root(mod)
        if not _is_under(where, root):
            raise UpstreamConflictError(
                f"the top-level package {name!r} is already imported from {where}, but this upstream needs its own "
                f"{name!r} from {root}. PSLD and ReSample both ship a package 'ldm' (DPS ships 'util' and "
                f"'guided_diffusion'): use one upstream per process, or call "
                f"flash_plugin.adapters.compvis.forget_upstream({tuple(packages)!r}) before importing the other one "
                "(objects made from the first one stay usable but must not be mixed)."
            )


def forget_upstream(packages: Sequence[str] = UPSTREAM_PACKAGES) -> None:
    """Drop ``packages`` and their submodules from ``sys.modules`` (to switch upstream checkouts)."""
    for name in list(sys.modules):
        if name.split(".", 1)[0] in packages:
            del sys.modules[name]


def import_upstream(root: str | Path, module: str, packages: Sequence[str] = ("ldm",)) -> Any:
    """Import ``module`` from an upstream checkout at ``root`` (e.g. ``<PSLD>/stable-diffusion``).

    Refuses (`UpstreamConflictError`) when one of the upstream's top-level ``packages`` is already
    imported from elsewhere; ``root`` is on ``sys.path`` only during the import.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise FlashInputError(f"upstream checkout {root} is not a directory")
    check_no_conflict(root, packages)
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module(module)
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(root))


def upstream_root(cls: type) -> Path | None:
    """The checkout root a class was imported from (its file minus the module path)."""
    mod = sys.modules.get(cls.__module__)
    f = getattr(mod, "__file__", None)
    if not f:
        return None
    p = Path(f).resolve().parent
    for _ in range(cls.__module__.count(".")):
        p = p.parent
    return p


# ---- running upstream code ---------------------------------------------------------------------
_CPU_SAFE: dict[type, type] = {}


def cpu_safe_class(cls: type) -> type:
    """A subclass of an upstream sampler class whose ``register_buffer`` keeps tensors on the
    model's device (the upstream moves them to ``cuda`` unconditionally). Built once per class."""
    if getattr(cls, "_flash_cpu_safe", False):
        return cls
    sub = _CPU_SAFE.get(cls)
    if sub is None:
        def register_buffer(self, name, attr):
            if isinstance(attr, torch.Tensor):
                attr = attr.to(torch.device(self.model.device))
            setattr(self, name, attr)

        sub = type(cls.__name__, (cls,), {"register_buffer": register_buffer, "_flash_cpu_safe": True,
                                          "__module__": cls.__module__, "__qualname__": cls.__qualname__})
        _CPU_SAFE[cls] = sub
    return sub


def unwrap_class(cls: type) -> type:
    """The upstream class behind a `cpu_safe_class` subclass (the class itself otherwise)."""
    while getattr(cls, "_flash_cpu_safe", False) and cls.__mro__[1] is not object:
        cls = cls.__mro__[1]
    return cls


@contextlib.contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """Send stdout and stderr (upstream prints, tqdm bars) to ``os.devnull`` while ``enabled``."""
    if not enabled:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def sample_seeds(generator: GeneratorLike, batch: int) -> list[int | None]:
    """One seed per sample for the global RNG: drawn from that sample's generator (a list), or in
    turn from one shared generator; ``None`` (use the global RNG as it is) without a generator."""
    check_generators(generator, batch)
    if generator is None:
        return [None] * batch
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator] * batch
    return [int(torch.randint(0, 2**62, (1,), generator=g, device=g.device).item()) for g in gens]


@contextlib.contextmanager
def seeded_global_rng(seed: int | None, device: torch.device, state: torch.Tensor | None = None) -> Iterator[None]:
    """Run with torch's global RNG seeded with ``seed`` (or set to the CPU ``state``) and restore
    the caller's state afterwards; ``seed=None`` without a state leaves the global RNG alone (the
    caller asked for it)."""
    if seed is None and state is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if state is not None:
            torch.set_rng_state(state)
        else:
            torch.manual_seed(seed)
        yield


# ---- the model side ----------------------------------------------------------------------------
class CompVisModel:
    """A flash-plugin latent model presented with the CompVis ``LatentDiffusion`` interface.

    The CompVis samplers read ``num_timesteps``, ``betas``, ``alphas_cumprod``,
    ``alphas_cumprod_prev`` (float32 tensors on ``device``) and call ``apply_model(x, t, c)``,
    ``differentiable_decode_first_stage``, ``decode_first_stage``, ``encode_first_stage`` and
    ``get_first_stage_encoding``; this bridge maps them onto ``eps``, ``decode`` and ``encode`` of
    ``model`` (whose latents are already normalised, so the "first-stage encoding" is the latent
    itself, as for a VQ model). ``apply_model`` clamps the UNet time to ``T − 1``: at ``S = T`` the
    CompVis timesteps are ``1..T`` while ᾱ is read at ``0..T − 1`` (an upstream quirk a model that
    indexes its own ᾱ would otherwise fail on). ``grad=False`` makes ``apply_model`` graph-free,
    as ReSample's ``ddpm.py`` does with ``@torch.no_grad()``.

    Args:
        model: ``eps(z, t)``, ``encode(x)``, ``decode(z)``, ``alphas_cumprod``, ``latent_shape``.
        grad: whether ``apply_model`` keeps the autograd graph (PSLD: yes; ReSample: no).
    """

    parameterization = "eps"
    cond_stage_key = None

    def __init__(self, model: Any, *, grad: bool = True):
        for need in ("eps", "encode", "decode", "alphas_cumprod", "latent_shape"):
            if not hasattr(model, need):
                raise FlashInputError(f"CompVisModel needs a latent model with eps/encode/decode/alphas_cumprod/latent_shape; "
                                      f"{type(model).__name__} has no {need!r}")
        self.model = model
        self.grad = bool(grad)
        dev = torch.device(getattr(model, "device", "cpu"))
        acp = torch.as_tensor(model.alphas_cumprod, dtype=torch.float64).detach().cpu()
        prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
        self.num_timesteps = len(acp)
        self.alphas_cumprod = acp.to(torch.float32).to(dev)
        self.alphas_cumprod_prev = prev.to(torch.float32).to(dev)
        self.betas = (1 - acp / prev).to(torch.float32).to(dev)
        self.sqrt_alphas_cumprod = acp.sqrt().to(torch.float32).to(dev)
        self.sqrt_one_minus_alphas_cumprod = (1 - acp).sqrt().to(torch.float32).to(dev)
        self.latent_shape = tuple(model.latent_shape)
        self.channels = self.latent_shape[0]
        self.image_size = self.latent_shape[-1]

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).long().clamp(max=self.num_timesteps - 1)
        if self.grad:
            return self.model.eps(x, t)
        with torch.no_grad():
            return self.model.eps(x, t)

    def differentiable_decode_first_stage(self, z: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.model.decode(z)

    def decode_first_stage(self, z: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.model.decode(z)

    def encode_first_stage(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior: Any) -> torch.Tensor:
        if isinstance(encoder_posterior, torch.Tensor):
            return encoder_posterior
        return encoder_posterior.mode()

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        noise = torch.randn_like(x_start) if noise is None else noise
        view = (-1,) + (1,) * (x_start.ndim - 1)
        return self.sqrt_alphas_cumprod[t].view(view) * x_start + self.sqrt_one_minus_alphas_cumprod[t].view(view) * noise

    def __repr__(self) -> str:
        return f"CompVisModel({getattr(self.model, 'name', type(self.model).__name__)})"


_COUNTED = {"apply_model": "unet_calls", "differentiable_decode_first_stage": "decoder_calls",
            "decode_first_stage": "decoder_calls", "encode_first_stage": "encoder_calls"}


class CallCounter:
    """A transparent proxy of a CompVis-like model that counts the calls a sampler makes.

    Every attribute is the wrapped model's; the methods in ``_COUNTED`` are counted first. The
    adapter builds its own sampler around this proxy, so neither the user's sampler nor model is
    changed."""

    def __init__(self, inner: Any):
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "counts", {"unet_calls": 0, "decoder_calls": 0, "encoder_calls": 0})

    def reset(self) -> None:
        for key in self.counts:
            self.counts[key] = 0

    def __getattr__(self, name: str) -> Any:
        value = getattr(object.__getattribute__(self, "_inner"), name)
        key = _COUNTED.get(name)
        if key is None or not callable(value):
            return value
        counts = object.__getattribute__(self, "counts")

        def counted(*args: Any, **kwargs: Any) -> Any:
            counts[key] += 1
            return value(*args, **kwargs)

        return counted

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"the upstream tried to set {name!r} on the model; the adapter does not allow changing it")


# ---- the adapter base --------------------------------------------------------------------------
class CompVisAdapter:
    """Base of the `Solver` adapters around a CompVis ``DDIMSampler`` fork (see the module docstring).

    The adapter never uses the user's sampler object for sampling: it reads its class and its
    ``model`` and builds its own instance of a `cpu_safe_class` of that class around a counting
    proxy of the model (a `CompVisModel` bridge when the model is a flash-plugin latent model).
    Subclasses implement `run_upstream` (one sample, ``k ≥ 1`` steps).

    Args:
        sampler: an instance of the upstream ``DDIMSampler`` (or the class, with ``model``).
        model: overrides ``sampler.model``; a flash-plugin latent model or a CompVis model.
        num_steps: ``S`` of ``make_schedule``; default: the schedule the sampler already has, else
            the subclass's upstream default.
        eta: DDIM ``η`` of ``make_schedule``.
        progress: let upstream prints and progress bars through (silenced by default).
    """

    upstream_packages: tuple[str, ...] = ("ldm",)
    default_num_steps = 1000
    apply_model_grad = True
    name = "compvis"

    def __init__(self, sampler: Any, model: Any = None, *, num_steps: int | None = None, eta: float = 0.0,
                 progress: bool = False):
        cls = sampler if isinstance(sampler, type) else type(sampler)
        self.upstream_class = unwrap_class(cls)
        self.upstream_root = upstream_root(self.upstream_class)  # kept: sys.modules may change later
        user_model = model if model is not None else getattr(sampler, "model", None)
        if user_model is None:
            raise FlashInputError(f"{self.upstream_class.__name__} adapter needs a model: pass a sampler instance or model=...")
        if isinstance(user_model, CallCounter):
            user_model = object.__getattribute__(user_model, "_inner")
        if hasattr(user_model, "apply_model"):  # a CompVis model (or a bridge) as it is
            self.compvis_model = user_model
        else:
            self.compvis_model = CompVisModel(user_model, grad=self.apply_model_grad)
        if num_steps is None:
            old = getattr(sampler, "ddim_timesteps", None) if not isinstance(sampler, type) else None
            num_steps = len(old) if old is not None else self.default_num_steps
        if not 0.0 <= float(eta) <= 1.0:
            raise FlashInputError(f"eta must lie in [0, 1], got {eta}")
        self.num_steps_arg, self.eta, self.progress = int(num_steps), float(eta), bool(progress)
        self.counter = CallCounter(self.compvis_model)
        self.sampler = cpu_safe_class(self.upstream_class)(self.counter)
        with quiet(not self.progress):
            self.sampler.make_schedule(ddim_num_steps=self.num_steps_arg, ddim_eta=self.eta, verbose=False)
        ts = torch.as_tensor(self.sampler.ddim_timesteps.copy(), dtype=torch.int64)
        acp = torch.as_tensor(self.sampler.ddim_alphas, dtype=torch.float64).detach().cpu()
        # Level k <-> CompVis position k - 1 (UNet time ddim_timesteps[k-1], ᾱ = ddim_alphas[k-1]).
        self._schedule = NoiseSchedule(torch.cat([torch.ones(1, dtype=torch.float64), acp]), torch.cat([torch.tensor([-1]), ts]))

    # ---- Solver protocol ----
    @property
    def schedule(self) -> NoiseSchedule:
        return self._schedule

    @property
    def model(self) -> Any:
        """The latent model (``encode``/``decode``/``latent_id`` when it is a flash-plugin model)."""
        cm = self.compvis_model
        return cm.model if isinstance(cm, CompVisModel) else cm

    @property
    def latent_shape(self) -> tuple[int, ...]:
        cm = self.compvis_model
        shape = getattr(cm, "latent_shape", None)
        if shape is None:
            shape = (int(cm.channels), int(cm.image_size), int(cm.image_size))
        return tuple(shape)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        cm = self.compvis_model
        if isinstance(cm, CompVisModel):
            return cm.model.decode(z)
        return cm.decode_first_stage(z)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(upstream={self.upstream_class.__module__}.{self.upstream_class.__name__}, N={self.schedule.num_steps}, eta={self.eta}, {self._settings_repr()})"

    def _settings_repr(self) -> str:
        return ""

    def timesteps_arg(self, k: int) -> float | None:
        """The upstream ``timesteps`` value that runs exactly the ``k`` last positions."""
        n = self.schedule.num_steps
        if not 1 <= k <= n:
            raise FlashInputError(f"k must lie in 1..{n} for an upstream call, got {k}")
        return None if k == n else k + 1.5

    def check_operator(self, operator: Any) -> None:
        if not callable(getattr(operator, "forward", None)):
            raise FlashInputError(f"the operator must have forward(x); got {type(operator).__name__}")

    def run_upstream(self, y: torch.Tensor, operator: Any, x_T: torch.Tensor | None, k: int,
                     trajectory: bool, callback: Any) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """One sample (batch 1) from level ``k ≥ 1``; returns the final latent and, when
        ``trajectory``, the upstream's ``x_inter`` list (its last ``k + 1`` entries are the latents
        at levels ``k, ..., 0``). ``callback`` goes to the upstream's ``callback(i)``."""
        raise NotImplementedError

    def extra_nfe(self) -> int:
        """Denoiser calls beyond one per step in the last upstream call (ReSample's time travel)."""
        return 0

    def solve(self, y: torch.Tensor, operator: Any, *, start: StartPoint | None = None, generator: GeneratorLike = None,
              trajectory: bool = False, rng_state: Sequence[torch.Tensor] | None = None) -> Solution:
        """Solve per sample with the upstream (the `Solver` protocol).

        Two extras serve exact-resume checks: ``trajectory=True`` stores each sample's latents at
        levels ``k_i, ..., 0`` (``extras["trajectory"][i]``, a tensor ``[k_i + 1, ...]``) and the
        global CPU RNG state the upstream had at each of those levels (``extras["rng_states"][i]``);
        ``rng_state`` (one state per sample) replays such a state instead of seeding from the
        generator, so a solve from a recorded level reproduces the tail of the recorded run."""
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                if start is not None:
                    start = StartPoint(step=start.step.clone(), latent=start.latent.clone())
                return self.solve(y.clone() if isinstance(y, torch.Tensor) else y, operator, start=start,
                                  generator=generator, trajectory=trajectory, rng_state=rng_state)
        if not isinstance(y, torch.Tensor) or not y.dtype.is_floating_point or y.ndim < 2:
            raise FlashInputError(f"y must be a batched floating-point tensor, got {type(y).__name__} {tuple(getattr(y, 'shape', ()))}")
        if not torch.all(torch.isfinite(y)):
            raise FlashInputError("y contains NaN or Inf")
        self.check_operator(operator)
        check_no_conflict_for(self.upstream_class, self.upstream_packages, self.upstream_root)
        batch, shape = y.shape[0], self.latent_shape
        device = torch.device(self.compvis_model.device)
        check_generators(generator, batch)
        steps, latents = start_of(start, generator, self.schedule, batch, shape, device, y.dtype)
        seeds = sample_seeds(generator, batch)
        from flash_plugin.utils.batch import select_operator

        if rng_state is not None and len(rng_state) != batch:
            raise FlashInputError(f"rng_state needs one state per sample ({batch}), got {len(rng_state)}")
        outs, nfe, dec, enc, trajs, states = [], [], [], [], [], []
        for i in range(batch):
            k = int(steps[i])
            # per-sample operator; one without select(index) must act alike on every sample
            op_i = select_operator(operator, torch.tensor([i]), batch) if hasattr(type(operator), "select") else operator
            y_i = y[i : i + 1].detach().clone().to(device)
            x_T = latents[i : i + 1].clone().to(device=device, dtype=y.dtype)
            if k == 0:  # nothing to denoise: the upstream would run N - 1 steps here
                outs.append(x_T)
                nfe.append(0), dec.append(0), enc.append(0)
                trajs.append(x_T.clone())
                states.append([torch.get_rng_state()])
                continue
            self.counter.reset()
            rng: list[torch.Tensor] = []
            record = (lambda _i: rng.append(torch.get_rng_state())) if trajectory else None
            with seeded_global_rng(seeds[i], device, None if rng_state is None else rng_state[i]), torch.enable_grad(), \
                    quiet(not self.progress):
                if trajectory:
                    rng.append(torch.get_rng_state())
                z, traj = self.run_upstream(y_i, op_i, x_T, k, trajectory, record)
            outs.append(z.detach())
            nfe.append(self.counter.counts["unet_calls"])
            dec.append(self.counter.counts["decoder_calls"])
            enc.append(self.counter.counts["encoder_calls"])
            if trajectory:
                trajs.append(torch.cat([t.detach() for t in traj[-(k + 1):]]))
                states.append(rng[-(k + 1):])
        z = torch.cat(outs).to(y.device)
        with torch.no_grad():
            x = self.decode(z.to(device)).to(y.device)
        extras: dict[str, Any] = {"count_decoder_calls": torch.tensor(dec), "count_encoder_calls": torch.tensor(enc)}
        if trajectory:
            extras["trajectory"] = trajs
            extras["rng_states"] = states
        return Solution(x=x.detach(), latent=z, nfe=torch.tensor(nfe, dtype=torch.long), start_step=steps.clone(), extras=extras)


def check_no_conflict_for(cls: type, packages: Sequence[str], root: Path | None = None) -> None:
    """Refuse to run an upstream class whose own top-level package was replaced in ``sys.modules``
    by another checkout's (its later imports would load the wrong code)."""
    top = cls.__module__.split(".", 1)[0]
    root = upstream_root(cls) if root is None else root
    if root is None or top not in packages:
        return
    check_no_conflict(root, [top])
