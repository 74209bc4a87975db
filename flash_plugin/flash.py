"""`flash()`: make any solver sample-adaptive (Fabian et al., "Adapt and Diffuse", ICML 2024).

    solver = flash(existing_solver, estimator=enc)
    solution = solver(y, operator, generator=torch.Generator().manual_seed(0))

The estimator maps ``y`` to ``(ẑ, σ̂²)``; each sample starts at the step ``k*`` whose SNR matches
``1/σ̂²``, from a noised ``ẑ`` (`flash_plugin.schedule`), and the wrapped solver runs the remaining
``k*`` steps; ``k* = N`` starts from pure noise, exactly like the unwrapped solver. Before any work a
call refuses what would silently give a wrong result (docs/architecture.md, "The Flash core"): an
estimator of another operator family, a ``y`` far outside the operator's ``output_range``, and a
``y`` that is not real floating point. ``y`` is cast to the model's declared dtype, if any, and
``x`` is returned in ``y``'s dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from flash_plugin.errors import (
    AlreadyFlashedError,
    FlashInputError,
    LatentSpaceMismatchError,
    NotAdaptableError,
    OperatorFamilyMismatchError,
    UnknownPluginNameError,
)
from flash_plugin.protocols import LatentModelSolver, MixedStartSolver, SeverityEstimator, Solver
from flash_plugin.schedule import StartPolicy, allocate_steps, select_start_step, start_latent
from flash_plugin.types import NoiseSchedule, SeverityEstimate, Solution, StartPoint
from flash_plugin.utils.batch import select_operator
from flash_plugin.utils.random import GeneratorLike, check_generators, randn_per_sample, subset_generators
from flash_plugin.utils.validation import check_finite_batch


@dataclass(frozen=True)
class FlashConfig:
    """Options of the Flash wrapper.

    Attributes:
        noise_correction: the paper's ``c`` in ``sqrt(1 − cσ̂²) ẑ + sqrt(cσ̂²) ε``; ``0`` starts from
            ``ẑ`` itself.
        variance_scale: ``v``, multiplies ``σ̂²`` before it sets the start step and the start noise
            (a calibration factor for the estimator; ``1`` = the raw ``σ̂²``).
        start_mode: ``"noise_correction"`` (the paper) or ``"snr_matched"`` (``a_k ẑ + b_k ε``).
        min_step, max_step: clamps on ``k*`` (``max_step=None`` means ``N``).
        force_step: ignore ``σ̂²`` and start every sample at this step (``N`` = the unwrapped solver).
        budget: the mean number of steps per sample in each call; start steps are allocated by
            ``σ̂²`` to meet it exactly (`flash_plugin.schedule.allocate_steps`). ``None``: the SNR rule.
        start_policy: a calibrated ``σ̂² → k`` map (`flash_plugin.schedule.StartPolicy`) in place of
            the SNR rule, e.g. the one stored with the bundled model for a solver and task
            (`flash_plugin.solvers.hparams.get_start_policy`). ``None``: the SNR rule.
        check_latent_space: refuse an estimator trained for another latent space than the solver's.
        check_operator_family: refuse an estimator trained for another operator family than the
            operator's ``operator_family``.
        check_measurement_range: refuse a ``y`` far outside the operator's ``output_range``.
    """

    noise_correction: float = 1.0
    variance_scale: float = 1.0
    start_mode: Literal["noise_correction", "snr_matched"] = "noise_correction"
    min_step: int = 0
    max_step: int | None = None
    force_step: int | None = None
    budget: float | None = None
    start_policy: StartPolicy | None = None
    check_latent_space: bool = True
    check_operator_family: bool = True
    check_measurement_range: bool = True

    def __post_init__(self) -> None:
        if not (self.noise_correction >= 0 and self.noise_correction < float("inf")):
            raise FlashInputError(f"noise_correction must be a finite number >= 0, got {self.noise_correction}")
        if not (self.variance_scale > 0 and self.variance_scale < float("inf")):
            raise FlashInputError(f"variance_scale must be a finite positive number, got {self.variance_scale}")
        if self.budget is not None and not (self.budget >= 0 and self.budget < float("inf")):
            raise FlashInputError(f"budget must be a finite number of steps per sample >= 0, got {self.budget}")
        if self.budget is not None and self.force_step is not None:
            raise FlashInputError("budget and force_step exclude each other: give one of them")
        if self.start_policy is not None and not isinstance(self.start_policy, StartPolicy):
            raise FlashInputError(f"start_policy must be a flash_plugin.schedule.StartPolicy, got {type(self.start_policy).__name__}")
        if self.start_policy is not None and (self.budget is not None or self.force_step is not None):
            raise FlashInputError("start_policy excludes budget and force_step: give one of them")
        if self.start_mode not in ("noise_correction", "snr_matched"):
            raise FlashInputError(f"start_mode must be 'noise_correction' or 'snr_matched', got {self.start_mode!r}")


class FlashSolver:
    """A `Solver` that picks each sample's start step from a severity estimate (composition: the
    wrapped solver is used as is and never modified)."""

    supports_mixed_starts: Literal[True] = True

    def __init__(self, solver: Solver, estimator: SeverityEstimator | None, config: FlashConfig = FlashConfig()):
        self.solver = solver
        self.estimator = estimator
        self.config = config
        n = solver.schedule.num_steps
        if config.force_step is not None and not 0 <= config.force_step <= n:
            raise FlashInputError(f"force_step must lie in 0..{n}, got {config.force_step}")
        if config.start_policy is not None and config.start_policy.max_step > n:
            raise FlashInputError(f"the start policy goes up to step {config.start_policy.max_step}, but the solver has N = {n} steps "
                                  "(it was calibrated for another schedule)")
        self._resolved: dict[str | None, SeverityEstimator] = {}  # estimators found in the registry, by family
        if estimator is not None:
            self._check_latent_space(estimator)
        self._dtype = _model_dtype(solver)

    def _check_latent_space(self, estimator: Any) -> None:
        if self.config.check_latent_space and isinstance(self.solver, LatentModelSolver):
            want = getattr(self.solver.model, "latent_id", None)
            have = (getattr(estimator, "metadata", None) or {}).get("latent_id")
            if want is not None and have is not None and want != have:
                raise LatentSpaceMismatchError(
                    f"the severity estimator was trained for latent space {have!r} but the solver's model has {want!r}: "
                    "its ẑ would be meaningless for this model. Train an encoder for this autoencoder "
                    "(flash-plugin train-severity) or pass FlashConfig(check_latent_space=False) if you know better."
                )

    def estimator_for(self, operator: Any, device: torch.device | None = None) -> SeverityEstimator:
        """The estimator for measurements of ``operator``: the one given to `flash`, else the
        registered one whose operator family is the operator's and whose latent space is the
        solver model's (looked up once per family; `NotAdaptableError` listing what is installed
        when none fits)."""
        if self.estimator is not None:
            return self.estimator
        family = getattr(operator, "operator_family", None)
        if family not in self._resolved:
            self._resolved[family] = _resolve_estimator(self.solver, family, device)
        return self._resolved[family]

    @property
    def schedule(self) -> NoiseSchedule:
        return self.solver.schedule

    @property
    def model(self) -> Any:
        return getattr(self.solver, "model", None)

    def __repr__(self) -> str:
        shown = "<from the registry>" if self.estimator is None else type(self.estimator).__name__
        return f"FlashSolver({self.solver!r}, estimator={shown}, config={self.config})"

    def estimate(self, y: torch.Tensor, operator: Any = None) -> SeverityEstimate:
        with torch.no_grad():
            est = self.estimator_for(operator, y.device).estimate(y)
        b = y.shape[0]
        if est.latent.shape[0] != b or est.variance.shape != (b,):
            raise FlashInputError(
                f"the severity estimate does not match the batch: y has {b} samples, ẑ {est.latent.shape[0]}, "
                f"σ̂² shape {tuple(est.variance.shape)} (expected ({b},))"
            )
        return est

    def start_point(self, y: torch.Tensor, generator: GeneratorLike = None, operator: Any = None) -> tuple[StartPoint, SeverityEstimate]:
        """Estimate ``(ẑ, σ̂²)`` and build the per-sample start (consumes one normal draw per sample).

        The estimate returned is the estimator's own (``σ̂²`` before ``variance_scale``); ``operator``
        selects the estimator when none was given to `flash`."""
        est = self.estimate(y, operator)
        sched, cfg = self.schedule, self.config
        variance = est.variance * cfg.variance_scale  # exact for v = 1
        if cfg.force_step is not None:  # σ̂² is still validated, by start_latent below
            step = torch.full((y.shape[0],), cfg.force_step, dtype=torch.long, device=y.device)
        elif cfg.budget is not None:
            hopeless = (cfg.noise_correction * variance >= 1.0) if cfg.start_mode == "noise_correction" else None
            step = allocate_steps(sched, variance, cfg.budget, min_step=cfg.min_step, max_step=cfg.max_step,
                                  fixed=hopeless).to(y.device)
        elif cfg.start_policy is not None:
            step = cfg.start_policy(est.variance).clamp(cfg.min_step, sched.num_steps if cfg.max_step is None else cfg.max_step).to(y.device)
        else:
            step = select_start_step(sched, variance, min_step=cfg.min_step, max_step=cfg.max_step).to(y.device)
        eps = randn_per_sample(est.latent.shape, generator, device=y.device, dtype=y.dtype)
        z, step = start_latent(est.latent.to(y.dtype), variance, step, sched, mode=cfg.start_mode,
                               noise_correction=cfg.noise_correction, noise=eps)
        # k = N is a full solve from pure noise: start from the noise itself, as the unwrapped solver does.
        full = (step == sched.num_steps).view(-1, *[1] * (z.ndim - 1))
        z = torch.where(full, eps, z)
        return StartPoint(step, z), est

    def solve(self, y: torch.Tensor, operator: Any, *, start: StartPoint | None = None, generator: GeneratorLike = None) -> Solution:
        """With ``start`` given, a plain pass-through to the wrapped solver; otherwise adaptive."""
        if start is not None:
            return self.solver.solve(y, operator, start=start, generator=generator)
        return self(y, operator, generator=generator)

    def __call__(self, y: torch.Tensor, operator: Any, *, generator: GeneratorLike = None) -> Solution:
        y_dtype = self._check_call(y, operator)
        check_generators(generator, y.shape[0])
        if self._dtype is not None and y.dtype != self._dtype:
            y = y.to(self._dtype)
        start, est = self.start_point(y, generator, operator)
        if isinstance(self.solver, MixedStartSolver) or torch.unique(start.step).numel() == 1:
            sol = self.solver.solve(y, operator, start=start, generator=generator)
        else:
            sol = self._solve_grouped(y, operator, start, generator)
        return Solution(x=sol.x.to(y_dtype), latent=sol.latent, nfe=sol.nfe, start_step=start.step,
                        severity=est.variance.detach(), extras=sol.extras)

    def _check_call(self, y: Any, operator: Any) -> torch.dtype:
        """Validate ``y`` and the estimator against the operator before any work; returns ``y.dtype``."""
        if not isinstance(y, torch.Tensor) or y.ndim < 2:
            raise FlashInputError(f"y must be a batched tensor (B, ...), got {type(y).__name__} {tuple(getattr(y, 'shape', ()))}")
        check_finite_batch("y", y)
        cfg = self.config
        if cfg.check_operator_family and self.estimator is not None:
            want = getattr(operator, "operator_family", None)
            have = estimator_family(self.estimator)
            if isinstance(want, str) and have is not None and want != have:
                raise OperatorFamilyMismatchError(
                    f"the severity estimator was trained for operator family {have!r} but the operator "
                    f"({type(operator).__name__}) is of family {want!r}: its σ̂² and ẑ would be wrong for this measurement "
                    "(a few dB per image). Use an estimator trained for this family (flash-plugin train-severity) "
                    "or pass FlashConfig(check_operator_family=False) if you know better."
                )
        out_range = getattr(operator, "output_range", None)
        if cfg.check_measurement_range and out_range is not None:
            lo, hi = (float(v) for v in out_range)
            noise_std = float(getattr(operator, "noise_std", 0.0) or 0.0)
            margin = 2.0 + 10.0 * noise_std  # wide: the operator may understate the noise; [0, 255] is far beyond
            y_lo, y_hi = float(y.amin()), float(y.amax())
            if y_lo < lo - margin or y_hi > hi + margin:
                raise FlashInputError(
                    f"y has values in [{y_lo:.4g}, {y_hi:.4g}], but {type(operator).__name__} maps images in [-1, 1] into "
                    f"[{lo:g}, {hi:g}] (plus noise of std {noise_std:g}): y looks like a measurement of images on another "
                    "scale; convert images in [0, 255] with x / 127.5 - 1 (in [0, 1]: 2 * x - 1) before measuring, "
                    "or pass FlashConfig(check_measurement_range=False) if you know better."
                )
        return y.dtype

    def _solve_grouped(self, y, operator, start: StartPoint, generator) -> Solution:
        """Fallback for solvers without mixed starts: one call per group of equal start step."""
        b = y.shape[0]
        parts: list[tuple[torch.Tensor, Solution]] = []
        for k in torch.unique(start.step).tolist():
            idx = (start.step == k).nonzero().flatten()
            sub = StartPoint(start.step[idx], start.latent[idx])
            parts.append((idx, self.solver.solve(y[idx], select_operator(operator, idx, b), start=sub, generator=subset_generators(generator, idx))))
        first = parts[0][1]
        x = first.x.new_empty((b, *first.x.shape[1:]))
        latent = first.latent.new_empty((b, *first.latent.shape[1:]))
        nfe = torch.empty(b, dtype=torch.long, device=first.nfe.device)
        for idx, sol in parts:
            x[idx], latent[idx], nfe[idx] = sol.x, sol.latent, sol.nfe
        return Solution(x=x, latent=latent, nfe=nfe, start_step=start.step)


def estimator_family(estimator: Any) -> str | None:
    """The operator family a severity estimator was trained for, from its ``metadata``.

    ``metadata["operator_family"]`` when present; otherwise ``metadata["operator"]`` resolved
    through the operator registry (a preset or operator class name, e.g. ``"gblur-varying"`` ->
    ``"gaussian-blur"``). ``None`` when neither names a known family (then nothing is checked).
    """
    meta = getattr(estimator, "metadata", None) or {}
    family = meta.get("operator_family")
    if isinstance(family, str):
        return family
    name = meta.get("operator")
    if not isinstance(name, str):
        return None
    from flash_plugin.operators import OPERATOR_CLASSES, PRESETS

    factory = PRESETS.get(name) or OPERATOR_CLASSES.get(name)  # built-ins without building the plugin manager
    if factory is None:
        from flash_plugin.registry import get_operator

        try:
            factory = get_operator(name)
        except UnknownPluginNameError:
            return None
    family = getattr(factory, "operator_family", None)
    return family if isinstance(family, str) else None


def _resolve_estimator(solver: Any, family: str | None, device: torch.device | None) -> SeverityEstimator:
    """The first registered severity estimator (by name) trained for ``family`` and for the latent
    space of ``solver``'s model. A factory's ``operator_family`` / ``latent_id`` attributes are
    read without calling it; one that does not declare them is called and its metadata read."""
    from flash_plugin.registry import registry

    model = getattr(solver, "model", None) if isinstance(solver, LatentModelSolver) else None
    latent_id = getattr(model, "latent_id", None)
    regs = registry("severity_estimators")
    installed = []
    for name, reg in sorted(regs.items()):
        have_family = reg.family
        have_latent = getattr(reg.factory, "latent_id", None)
        installed.append(f"{name} (family {have_family or '?'}, latent space {have_latent or '?'})")
        if family is None or (have_family is not None and have_family != family):
            continue
        if latent_id is not None and have_latent is not None and have_latent != latent_id:
            continue
        estimator = reg.factory()
        if have_family is None and estimator_family(estimator) != family:
            continue
        if latent_id is not None and (getattr(estimator, "metadata", None) or {}).get("latent_id") not in (None, latent_id):
            continue
        if device is not None and isinstance(estimator, torch.nn.Module):
            estimator = estimator.to(device)
        return estimator
    what = f"operator family {family!r}" if family is not None else "an operator that declares no operator_family"
    raise NotAdaptableError(
        f"flash() was given no severity estimator, and none of the installed ones fits {what} and latent space "
        f"{latent_id!r}. Installed: {', '.join(installed) or 'none'}. Pass estimator=..., or train one for this model and "
        "operator with `flash-plugin train-severity --model DIR --operator PRESET` and register it "
        "(flash_register_severity_estimators)."
    )


def _model_dtype(solver: Any) -> torch.dtype | None:
    """The dtype the solver's model declares (``model.dtype``, e.g. `LatentDiffusion.dtype`), or
    ``None``: then ``y`` is passed on as given, exactly as to the unwrapped solver."""
    model = getattr(solver, "model", None) if isinstance(solver, LatentModelSolver) else None
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def flash(solver: Any, estimator: Any = None, config: FlashConfig = FlashConfig()) -> FlashSolver:
    """Wrap ``solver`` so that every sample starts at its own estimated severity.

    ``solver`` may satisfy `Solver` already or be adaptable by a plugin (``flash_adapt_solver``);
    ``estimator`` likewise (``flash_adapt_severity_estimator``). Without an ``estimator``, each call
    uses the registered one trained for the operator's ``operator_family`` and the latent space of
    the solver's model (`FlashSolver.estimator_for`). Flashing a `FlashSolver` is an error.
    """
    if isinstance(solver, FlashSolver):
        raise AlreadyFlashedError("this solver is already flashed (a FlashSolver); flash the original solver instead of wrapping twice")
    if not isinstance(solver, Solver):
        from flash_plugin.registry import adapt_solver

        solver = adapt_solver(solver)
    if estimator is not None and not isinstance(estimator, SeverityEstimator):
        from flash_plugin.registry import adapt_severity_estimator

        estimator = adapt_severity_estimator(estimator)
    return FlashSolver(solver, estimator, config)
