"""The demo: Flash(solver) against the solver from noise on the bundled model, four tasks.

`flash_stage` runs Flash(solver) and AE-only on ``n`` bundled test images per task at severities
spread over each preset's range (seconds on a CPU); `baseline_stage` runs the solver from pure
noise on a subset of those images next to Flash (minutes); `write_outputs` draws the figures and
writes ``results.json``. ``flash-plugin demo`` calls the stages in turn and prints a table after
each, so the fast result is on screen before the slow one starts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

TASKS = ("gblur-varying", "gblur-fixed", "random-inpainting", "nonlinear-blur")
QUICK_TASKS = ("gblur-varying", "random-inpainting")
BUNDLED_IMAGES = 64


def severities_for(preset, n: int) -> torch.Tensor:
    """``n`` severities evenly spread over the preset's range (one: the middle, or the fixed value)."""
    import torch

    lo, hi = preset.severity_range
    if n == 1:
        return torch.tensor([hi if lo == hi else (lo + hi) / 2])
    return torch.linspace(lo, hi, n)


def baseline_subset(n: int, k: int) -> list[int]:
    """``k`` of ``n`` images spread evenly over the severities: the centre of each of ``k`` equal
    strata (``k = 1`` of 4: image 2, the middle severity; ``k = n``: all)."""
    return [int((j + 0.5) * n / k) for j in range(k)]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _per_image(recs) -> list[dict]:
    return [{"image": x.image, "severity": x.severity, "psnr": x.psnr, "ssim": x.ssim, "nfe": x.nfe,
             "start_step": x.start_step, "sigma2": x.sigma2} for x in recs]


def _row(stage: str, run, method: str, **extra) -> dict:
    recs = run.by_method(method)
    return {"stage": stage, "task": run.task, "method": method, "images": [x.image for x in recs],
            "psnr": _mean(x.psnr for x in recs), "ssim": _mean(x.ssim for x in recs),
            "mean_nfe": _mean(x.nfe for x in recs), "wall_s": run.wall_s[method], **extra,
            "per_image": _per_image(recs)}


def flash_stage(model_set, images: torch.Tensor, tasks: Sequence[str], n: int, *, solver: str = "latent-dps", seed: int = 0,
                overrides: dict | None = None, log: Callable[[str], None] | None = None) -> tuple[list, list[dict]]:
    """Flash(solver) and AE-only on images ``j·n .. (j+1)·n`` for the ``j``-th task: the runs and
    their ``results.json`` rows (one per task and method)."""
    from flash_plugin.bench.reconstruct import run_task
    from flash_plugin.registry import get_operator

    runs = []
    for j, task in enumerate(tasks):
        t0 = time.perf_counter()
        clean = images[j * n : (j + 1) * n]
        runs.append(run_task(task, model_set, clean, severities_for(get_operator(task), n).to(images.device),
                             solver_name=solver, methods=("flash", "ae"), seed=seed, solver_overrides=overrides))
        if log is not None:
            log(f"Flash on {task}: {n} image(s) in {time.perf_counter() - t0:.1f} s")
    return runs, [_row("flash", r, m) for r in runs for m in ("flash", "ae")]


def baseline_stage(model_set, images: torch.Tensor, tasks: Sequence[str], n: int, subset: Sequence[int], *,
                   solver: str = "latent-dps", seed: int = 0, overrides: dict | None = None, progress: bool = False,
                   log: Callable[[str], None] | None = None, label: str | None = None) -> tuple[list, list[dict]]:
    """The solver from noise and Flash on the images ``subset`` (indices within each task's ``n``),
    with the same measurements and seeds as `flash_stage`; the runs and their rows (with the
    wall-time speed-up of Flash). ``label`` names the solver in the log lines."""
    import torch

    from flash_plugin.bench.reconstruct import run_task
    from flash_plugin.registry import get_operator

    runs, rows = [], []
    idx = torch.tensor(list(subset))
    for j, task in enumerate(tasks):
        if not subset:
            break
        t0 = time.perf_counter()
        clean = images[j * n : (j + 1) * n][idx.to(images.device)]
        sev = severities_for(get_operator(task), n).to(images.device)[idx.to(images.device)]
        r = run_task(task, model_set, clean, sev, solver_name=solver, methods=("baseline", "flash"),
                     seed=seed, solver_overrides=overrides, progress=progress, image_index=list(subset))
        runs.append(r)
        speedup = r.wall_s["baseline"] / r.wall_s["flash"] if r.wall_s["flash"] > 0 else None
        rows += [_row("baseline", r, m, speedup=(1.0 if m == "baseline" else speedup)) for m in ("baseline", "flash")]
        if log is not None:
            log(f"{label or solver} from noise on {task}: {len(subset)} image(s) in {time.perf_counter() - t0:.1f} s")
    return runs, rows


def write_outputs(out: str | Path, model_set, images: torch.Tensor, flash_runs: list, base_runs: list, *, tasks: Sequence[str],
                  scatter_images: int = BUNDLED_IMAGES, baseline_name: str = "Latent-DPS", seed: int = 0,
                  record: dict | None = None, started: float | None = None) -> list[Path]:
    """``reconstructions.png`` (the stage-1 runs with the baseline added where it ran),
    ``severity_scatter.png`` (σ̂² vs severity of each encoder the tasks use, on the first
    ``scatter_images`` images) and ``results.json`` (``record``, with ``total_wall_s`` since
    ``started``, a `time.perf_counter` value, if given); returns their paths."""
    from flash_plugin.bench.figures import reconstruction_figure, severity_scatter
    from flash_plugin.bench.reconstruct import ENCODER_FOR_TASK
    from flash_plugin.utils.checkpoint import atomic_write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for fr, br in zip(flash_runs, base_runs):
        fr.records.extend(br.by_method("baseline"))
    paths = [out / "reconstructions.png", out / "severity_scatter.png", out / "results.json"]
    reconstruction_figure(flash_runs, paths[0], baseline_name=baseline_name)
    severity_scatter(model_set, sorted({ENCODER_FOR_TASK[t] for t in tasks}), images[:scatter_images], paths[1], seed=seed)
    record = dict(record or {})
    if started is not None:
        record["total_wall_s"] = time.perf_counter() - started
    atomic_write_json(paths[2], record)
    return paths
