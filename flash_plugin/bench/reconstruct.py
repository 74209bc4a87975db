"""Reconstruction runs shared by the paired benchmark, the demo, tuning and ``flash-plugin reconstruct``.

For one task preset and a set of clean images, `run_task` degrades every image at its own
severity (per-image seeds for masks, kernels and noise), then reconstructs with

- ``baseline``: the solver from pure noise (all ``N`` steps),
- ``flash``: ``flash(solver)`` with the bundled severity encoder,
- ``ae``: "AE-only", the decoded severity-encoder estimate ``D(ẑ)`` (no diffusion, 0 NFE),

and returns one `Record` per (image, method) with PSNR, SSIM, NFE, start step, ``σ̂²`` and the
reconstruction. Wall time is measured per method for the whole batch.

`build_solver` resolves a solver name through the plugin registry, so that a solver a plugin
registers runs wherever the reference solvers do: a reference solver gets the tuned settings of
`flash_plugin.solvers.hparams` for the task, any other is built as ``factory(model, **arguments)``
with the default `FlashConfig`.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from flash_plugin.errors import FlashInputError
from flash_plugin.flash import FlashConfig, flash
from flash_plugin.metrics import psnr, ssim

# The encoder each task uses (the paper reuses the varying-blur encoder for the fixed-blur task).
ENCODER_FOR_TASK = {
    "gblur-varying": "gblur-varying",
    "gblur-fixed": "gblur-varying",
    "random-inpainting": "random-inpainting",
    "nonlinear-blur": "nonlinear-blur",
}


@dataclass
class Record:
    task: str
    method: str
    image: int
    severity: float
    psnr: float
    ssim: float
    nfe: int
    start_step: int
    sigma2: float | None
    x: torch.Tensor = field(repr=False)


@dataclass
class TaskRun:
    task: str
    clean: torch.Tensor
    measurement: torch.Tensor
    severities: torch.Tensor
    records: list[Record]
    wall_s: dict[str, float]
    image_ids: list[int] | None = None  # the images' indices (their seeds); None: 0..B-1

    def by_method(self, method: str) -> list[Record]:
        return [r for r in self.records if r.method == method]


def image_generators(seed: int, n: int, offset: int = 0, index: Sequence[int] | None = None) -> list[torch.Generator]:
    """One generator per image, seeded from ``seed`` and the image's index (``0..n-1`` unless
    ``index`` gives them), so an image gets the same draws in any batch."""
    index = range(n) if index is None else index
    return [torch.Generator().manual_seed(seed * 100_003 + offset + int(i)) for i in index]


def degrade(preset, clean: torch.Tensor, severities: torch.Tensor, seed: int, index: Sequence[int] | None = None):
    """Per-image operator parameters and noise from per-image generators (reproducible per image,
    independent of the batch it is in)."""
    gens = image_generators(seed, len(clean), index=index)
    operator = preset.make(severities, generator=gens)
    return operator, operator.measure(clean, generator=gens)


def _accepts(factory: Any, name: str) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def build_solver(name: str, model: Any, task: str, *, overrides: dict | None = None,
                 progress: bool = False, goal: str = "fidelity", start_policy: str = "snr") -> tuple[Any, FlashConfig, dict]:
    """``(solver, flash_config, settings)`` for the solver registered as ``name``.

    A reference solver (`flash_plugin.solvers.hparams.SOLVERS`) gets the tuned table entry of
    ``task`` with ``overrides`` on top; any other registered factory is called as
    ``factory(model, **overrides)`` (plus ``progress`` if it takes it) and runs with the default
    `FlashConfig`. ``goal`` (``"fidelity"`` or ``"perceptual"``) picks the Flash settings
    (`flash_plugin.solvers.hparams.get_hparams`); ``start_policy="calibrated"`` replaces the SNR
    rule by the σ̂² → k map stored for the pair (`flash_plugin.solvers.hparams.get_start_policy`;
    fitted for the fidelity goal). ``settings`` is what the solver was built with, for the records.
    """
    from flash_plugin.registry import adapt_solver, get_solver
    from flash_plugin.solvers.hparams import (
        GOALS, PERCEPTUAL_VARIANCE_FACTOR, SOLVERS, START_POLICIES, get_hparams, get_start_policy, make_solver,
    )

    if goal not in GOALS:
        raise FlashInputError(f"goal must be one of {', '.join(GOALS)}, got {goal!r}")
    if start_policy not in START_POLICIES:
        raise FlashInputError(f"start_policy must be one of {', '.join(START_POLICIES)}, got {start_policy!r}")
    if start_policy == "calibrated" and goal != "fidelity":
        raise FlashInputError(f"the calibrated start policy was fitted for the fidelity goal (the default); it does not combine with goal {goal!r}")

    overrides = dict(overrides or {})
    factory = get_solver(name)
    if SOLVERS.get(name) is factory:
        hp = get_hparams(name, task, goal=goal)
        solver = make_solver(name, model, task=task, progress=progress, **overrides)
        settings = {**asdict(hp), **{k: v for k, v in overrides.items() if k != "num_steps"}}
        if start_policy == "calibrated":
            policy = get_start_policy(name, task)
            settings["start_policy"] = policy.to_dict()
            return solver, FlashConfig(**hp.flash_kwargs(), start_policy=policy), settings
        return solver, FlashConfig(**hp.flash_kwargs()), settings
    kwargs = dict(overrides)
    if progress and _accepts(factory, "progress"):
        kwargs["progress"] = True
    for key in overrides:
        if not _accepts(factory, key):
            raise FlashInputError(f"solver {name!r} takes no argument {key!r} (its factory is {factory!r})")
    if start_policy == "calibrated":
        raise FlashInputError(f"calibrated start policies exist for the reference solvers only, not for {name!r}")
    solver = adapt_solver(factory(model, **kwargs))
    config = FlashConfig(variance_scale=PERCEPTUAL_VARIANCE_FACTOR) if goal == "perceptual" else FlashConfig()
    return solver, config, {k: v for k, v in overrides.items() if k != "num_steps"}


def run_task(
    task: str,
    model_set,
    clean: torch.Tensor,
    severities: torch.Tensor,
    *,
    solver_name: str = "latent-dps",
    methods: tuple[str, ...] = ("baseline", "flash", "ae"),
    seed: int = 0,
    solver_overrides: dict | None = None,
    flash_config: FlashConfig | None = None,
    progress: bool = False,
    image_index: Sequence[int] | None = None,
    preset: Any = None,
    solve_seed: int | None = None,
    goal: str = "fidelity",
    start_policy: str = "snr",
) -> TaskRun:
    """Degrade ``clean`` with the preset ``task`` and reconstruct it with each of ``methods``.

    ``image_index`` numbers the images for their seeds (default ``0..B-1``): a subset run with
    the images' own indices sees the same measurements and noise as the full run. ``preset``
    replaces the registered preset ``task`` (e.g. severities beyond its range); ``solve_seed``
    (default ``seed``) seeds the solvers' noise alone, for replicates on the same measurements.
    ``goal`` and ``start_policy`` choose Flash's settings (`build_solver`).
    """
    from flash_plugin.registry import get_operator

    preset = get_operator(task) if preset is None else preset
    solve_seed = seed if solve_seed is None else solve_seed
    model = model_set.latent_diffusion
    index = list(range(len(clean))) if image_index is None else [int(i) for i in image_index]
    operator, y = degrade(preset, clean, severities, seed, index)
    solver, tuned_config, _ = build_solver(solver_name, model, task, overrides=solver_overrides, progress=progress, goal=goal,
                                           start_policy=start_policy)
    if task not in ENCODER_FOR_TASK and ("flash" in methods or "ae" in methods):
        raise FlashInputError(f"no bundled severity encoder for task {task!r}; bundled: {', '.join(sorted(set(ENCODER_FOR_TASK.values())))}")
    encoder = model_set.severity_encoder(ENCODER_FOR_TASK[task]) if task in ENCODER_FOR_TASK else None
    if flash_config is None:
        flash_config = tuned_config
    records: list[Record] = []
    wall: dict[str, float] = {}
    est = None

    def add(method, x, nfe, start, sigma2):
        p, s = psnr(x, clean), ssim(x, clean)
        for i in range(len(clean)):
            records.append(Record(task, method, index[i], float(severities[i]), float(p[i]), float(s[i]), int(nfe[i]), int(start[i]),
                                  None if sigma2 is None else float(sigma2[i]), x[i].detach().cpu()))

    for method in methods:
        t0 = time.perf_counter()
        if method == "baseline":
            sol = solver.solve(y, operator, generator=image_generators(solve_seed, len(clean), offset=50_000, index=index))
            wall[method] = time.perf_counter() - t0
            add(method, sol.x, sol.nfe, sol.start_step, None)
        elif method == "flash":
            sol = flash(solver, encoder, flash_config)(y, operator, generator=image_generators(solve_seed, len(clean), offset=50_000, index=index))
            wall[method] = time.perf_counter() - t0
            add(method, sol.x, sol.nfe, sol.start_step, sol.severity)
        elif method == "ae":
            with torch.no_grad():
                est = encoder.estimate(y)
                x = model.decode(est.latent)
            wall[method] = time.perf_counter() - t0
            zeros = torch.zeros(len(clean), dtype=torch.long)
            add(method, x, zeros, zeros, est.variance)
        else:
            raise ValueError(f"unknown method {method!r}; use baseline, flash or ae")
    return TaskRun(task, clean, y, severities, records, wall, index)
