"""Reconstruction runs shared by ``flash-plugin demo`` and ``flash-plugin bench``.

For one task preset and a set of clean images, `run_task` degrades every image at its own
severity (per-image seeds for masks, kernels and noise), then reconstructs with

- ``baseline``: the solver from pure noise (all ``N`` steps),
- ``flash``: ``flash(solver)`` with the bundled severity encoder,
- ``ae``: "AE-only", the decoded severity-encoder estimate ``D(ẑ)`` (no diffusion, 0 NFE),

and returns one `Record` per (image, method) with PSNR, SSIM, NFE, start step, ``σ̂²`` and the
reconstruction. Wall time is measured per method for the whole batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

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

    def by_method(self, method: str) -> list[Record]:
        return [r for r in self.records if r.method == method]


def image_generators(seed: int, n: int, offset: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed * 100_003 + offset + i) for i in range(n)]


def degrade(preset, clean: torch.Tensor, severities: torch.Tensor, seed: int):
    """Per-image operator parameters and noise from per-image generators (reproducible per image,
    independent of the batch it is in)."""
    gens = image_generators(seed, len(clean))
    operator = preset.make(severities, generator=gens)
    return operator, operator.measure(clean, generator=gens)


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
) -> TaskRun:
    from flash_plugin.operators import get_preset
    from flash_plugin.solvers import make_solver
    from flash_plugin.solvers.hparams import get_hparams

    preset = get_preset(task)
    model = model_set.latent_diffusion
    operator, y = degrade(preset, clean, severities, seed)
    solver = make_solver(solver_name, model, task=task, progress=progress, **(solver_overrides or {}))
    encoder = model_set.severity_encoder(ENCODER_FOR_TASK[task])
    if flash_config is None:
        flash_config = FlashConfig(**get_hparams(solver_name, task).flash_kwargs())
    records: list[Record] = []
    wall: dict[str, float] = {}
    est = None

    def add(method, x, nfe, start, sigma2):
        p, s = psnr(x, clean), ssim(x, clean)
        for i in range(len(clean)):
            records.append(Record(task, method, i, float(severities[i]), float(p[i]), float(s[i]), int(nfe[i]), int(start[i]),
                                  None if sigma2 is None else float(sigma2[i]), x[i].detach().cpu()))

    for method in methods:
        t0 = time.perf_counter()
        if method == "baseline":
            sol = solver.solve(y, operator, generator=image_generators(seed, len(clean), offset=50_000))
            wall[method] = time.perf_counter() - t0
            add(method, sol.x, sol.nfe, sol.start_step, None)
        elif method == "flash":
            sol = flash(solver, encoder, flash_config)(y, operator, generator=image_generators(seed, len(clean), offset=50_000))
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
    return TaskRun(task, clean, y, severities, records, wall)
