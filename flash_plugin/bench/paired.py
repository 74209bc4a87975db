"""The paired benchmark: a solver from noise, Flash(solver) and AE-only on the same test images.

`run_paired` degrades ``n_images`` test images (Fashion-MNIST's test split, or the 64 bundled
images where the data is absent), each at a severity drawn from the task preset's evaluation range
with a per-image seed, reconstructs them with each method, and returns (and, given ``out``, writes
as ``bench_<task>_<solver>.json``) per method the mean PSNR, SSIM and NFE and FD-FMNIST (the
Fréchet distance in the features of our Fashion-MNIST classifier, not Inception FID), the paired
differences with their standard errors, and the per-image results. Every method sees the same
measurements, so the differences are paired. ``flash-plugin bench`` and `flash_plugin.bench.suite`
are thin callers of this module.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace

from flash_plugin.errors import FlashInputError

METHODS = ("baseline", "flash", "ae")
BUNDLED_SOURCE = "the 64 bundled test images (Fashion-MNIST data not found)"


def result_path(out: str | Path, task: str, solver: str) -> Path:
    """Where `run_paired` writes the result of ``solver`` on ``task`` in directory ``out``."""
    return Path(out) / f"bench_{task}_{solver}.json"


def benchmark_images(data: str | Path | None = None):
    """``(images, source)``: Fashion-MNIST's test split from ``data`` (``None``: the usual places),
    or the 64 bundled test images when no data is found and ``data`` is ``None``."""
    from flash_plugin.data.fashion_mnist import FashionMNISTNotFound, load_fashion_mnist
    from flash_plugin.models import load_test_images

    try:
        images, _ = load_fashion_mnist("test", data)
        return images, "Fashion-MNIST test split"
    except FashionMNISTNotFound:
        if data is not None:  # a directory the caller named is never swapped for other data
            raise FlashInputError(f"{data}: holds no Fashion-MNIST IDX files") from None
    images, _ = load_test_images()
    return images, BUNDLED_SOURCE


def allowed_solver_args(solver: str, task: str) -> set[str] | None:
    """The solver arguments the hyperparameter table has for a reference solver on ``task``;
    ``None`` for a solver a plugin registers (its factory decides what it takes)."""
    from flash_plugin.solvers.hparams import SOLVERS, get_hparams

    return set(get_hparams(solver, task).solver_kwargs()) if solver in SOLVERS else None


def summarize(records_by_method: dict, clean, features=None) -> dict:
    """Mean PSNR / SSIM / NFE per method (and FD-FMNIST with ``features``) and the paired
    differences flash − baseline, flash − ae and baseline − ae with their standard errors."""
    import torch

    from flash_plugin.metrics import frechet_distance, paired_difference

    out: dict = {"methods": {}, "paired": {}}
    for m, recs in records_by_method.items():
        out["methods"][m] = {
            "psnr": sum(r.psnr for r in recs) / len(recs),
            "ssim": sum(r.ssim for r in recs) / len(recs),
            "mean_nfe": sum(r.nfe for r in recs) / len(recs),
            "n": len(recs),
        }
        if features is not None and all(r.x is not None for r in recs):
            out["methods"][m]["fd_fmnist"] = frechet_distance(features(torch.stack([r.x for r in recs])), features(clean))
    for a, b in (("flash", "baseline"), ("flash", "ae"), ("baseline", "ae")):
        if a in records_by_method and b in records_by_method:
            for metric in ("psnr", "ssim"):
                mean, se, n = paired_difference([getattr(r, metric) for r in records_by_method[a]],
                                                [getattr(r, metric) for r in records_by_method[b]])
                out["paired"][f"{a}-{b}:{metric}"] = {"mean": mean, "se": se, "n": n}
    return out


def read_bench_json(path: str | Path) -> dict:
    """A result `run_paired` wrote, or a `FlashInputError` naming ``path``."""
    try:
        old = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FlashInputError(f"{path}: not a bench JSON ({exc})") from None
    if not isinstance(old, dict):
        raise FlashInputError(f"{path}: not a bench JSON (a {type(old).__name__}, not an object)")
    return old


def solver_kwargs_of(settings: Mapping) -> dict:
    """The solver's own arguments in a record's settings (without Flash's ``c``, ``v`` and start policy)."""
    from flash_plugin.solvers.hparams import FLASH_PARAMS

    return {k: v for k, v in settings.items() if k not in (*FLASH_PARAMS, "start_policy") and v is not None}


def reusable_baseline(path: str | Path, expect: dict, solver_kwargs: dict) -> dict:
    """The earlier result at ``path`` if its baseline is what this run would compute (the same
    fields ``expect`` lists and solver arguments), else a `FlashInputError` saying what differs."""
    old = read_bench_json(path)
    if "baseline" not in old.get("per_image", {}) or "ae" not in old["per_image"]:
        raise FlashInputError(f"{path} has no per-image baseline and AE-only results to reuse")
    old_kwargs = solver_kwargs_of(old.get("hparams", {}))
    diff = {k: (old.get(k), v) for k, v in expect.items() if old.get(k) != v}
    if old_kwargs != solver_kwargs:
        diff["solver arguments"] = (old_kwargs, solver_kwargs)
    if diff:
        raise FlashInputError(f"cannot reuse the baseline of {path}: it differs in {diff} (earlier, now)")
    return old


def _check(task: str, solver: str, n_images: int, offset: int, batch_size: int, methods: Sequence[str],
           solver_args: Mapping[str, float], reuse_baseline) -> None:
    if n_images < 2:
        raise FlashInputError(f"n_images must be at least 2 (paired standard errors and the Fréchet distance), got {n_images}")
    if offset < 0 or batch_size < 1:
        raise FlashInputError(f"offset must be >= 0 and batch_size >= 1, got {offset} and {batch_size}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or len(set(methods)) != len(methods):
        raise FlashInputError(f"methods must be distinct names out of {list(METHODS)}, got {list(methods)}")
    if reuse_baseline is not None and not {"ae", "baseline"} <= set(methods):
        raise FlashInputError("reusing a baseline needs the methods baseline and ae (AE-only checks the measurements)")
    allowed = allowed_solver_args(solver, task)
    bad = sorted(set(solver_args) - allowed) if allowed is not None else []
    if bad:
        raise FlashInputError(f"solver arguments {bad}: {solver} on {task} takes {sorted(allowed)}")


def _save_part(folder: Path, start: int, records: dict, wall: dict) -> None:
    """One finished batch: its records as JSON metadata, its reconstructions as tensors."""
    import torch
    from safetensors.torch import save_file

    meta = {m: [{k: v for k, v in vars(r).items() if k != "x"} for r in recs] for m, recs in records.items()}
    tensors = {m: torch.stack([r.x for r in recs]).contiguous() for m, recs in records.items()}
    tmp = folder / f"batch_{start:06d}.safetensors.tmp"
    save_file(tensors, tmp, metadata={"records": json.dumps(meta), "wall": json.dumps(wall)})
    tmp.replace(folder / f"batch_{start:06d}.safetensors")


def _load_parts(folder: Path) -> dict[int, tuple[dict, dict]]:
    """The batches a stopped run finished, by first index."""
    from safetensors import safe_open

    from flash_plugin.bench.reconstruct import Record

    done = {}
    for f in sorted(folder.glob("batch_*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            meta = fh.metadata()
            recs = {m: [Record(**r, x=x) for r, x in zip(rs, fh.get_tensor(m))] for m, rs in json.loads(meta["records"]).items()}
        done[int(f.stem.split("_")[1])] = (recs, json.loads(meta["wall"]))
    return done


def _parts_folder(out: str | Path, config: dict) -> Path:
    """``out/.parts/<task>_<solver>/``, holding finished batches of a run with this ``config``.
    Batches of a run with another configuration are deleted, never mixed in: like the result
    file, a new run into the same place replaces the old one."""
    folder = Path(out) / ".parts" / f"{config['task']}_{config['solver']}"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / "config.json"
    if not stamp.is_file() or json.loads(stamp.read_text()) != json.loads(json.dumps(config)):
        for f in folder.glob("batch_*.safetensors"):
            f.unlink()
        stamp.write_text(json.dumps(config, indent=1))
    return folder


def _run_batches(task, solver, model_set, images, severities, methods, *, batch_size, seed, overrides, progress, log,
                 shard=None, parts: Path | None = None, goal: str = "fidelity", start_policy: str = "snr"):
    """Per-image records and wall time per method, ``batch_size`` images per solve (the batch's
    first index is part of its seed). Batches are dealt out over the processes of ``shard`` and
    exchanged after each round; with ``parts``, finished batches are stored there and a stopped
    run resumes from them."""
    from flash_plugin.bench.distributed import Shard
    from flash_plugin.bench.reconstruct import run_task

    shard = shard or Shard()
    n = len(images)
    starts = list(range(0, n, batch_size))
    done = _load_parts(parts) if parts is not None else {}
    todo = [i for i in starts if i not in done]
    t0 = time.perf_counter()
    if log is not None and done:
        log(f"{len(done)} of {len(starts)} batches done already")
    for i in shard.rounds(todo):
        mine = None
        if i is not None:
            sl = slice(i, i + batch_size)
            r = run_task(task, model_set, images[sl], severities[sl], solver_name=solver, methods=tuple(methods),
                         seed=seed * 1_000_003 + i, progress=progress, solver_overrides=overrides, goal=goal,
                         start_policy=start_policy)
            for rec in r.records:
                rec.x = rec.x.cpu()
            mine = (i, {m: r.by_method(m) for m in methods}, dict(r.wall_s))
        for got in shard.gather(mine):
            if got is None:
                continue
            start, recs, wall = got
            done[start] = (recs, wall)
            if parts is not None and shard.is_main:
                _save_part(parts, start, recs, wall)
        if log is not None:
            finished = sum(min(batch_size, n - s) for s in done)
            log(f"{finished}/{n} images ({time.perf_counter() - t0:.0f} s)")
    by_method: dict = {m: [] for m in methods}
    runs_wall: dict = {m: 0.0 for m in methods}
    for start in starts:
        recs, wall = done[start]
        for m in methods:
            by_method[m].extend(recs[m])
            runs_wall[m] += wall[m]
    return by_method, runs_wall


def _take_baseline(by_method: dict, runs_wall: dict, reused: dict, path) -> None:
    """Add the baseline of the earlier result ``reused`` once AE-only shows the measurements agree."""
    # The same measurements give the same AE-only result (up to float noise): else the batches or seeds differed.
    worst = max(abs(a.psnr - b["psnr"]) for a, b in zip(by_method["ae"], reused["per_image"]["ae"]))
    if worst > 0.01:
        raise FlashInputError(f"cannot reuse the baseline of {path}: AE-only differs by up to {worst:.3f} dB "
                              "per image, so the measurements differ (another batch size?)")
    by_method["baseline"] = [SimpleNamespace(x=None, **r) for r in reused["per_image"]["baseline"]]
    runs_wall["baseline"] = reused["methods"]["baseline"]["wall_s"]


def _summary(by_method: dict, runs_wall: dict, images, methods, reused: dict | None, reuse_baseline, device) -> dict:
    """Means, paired differences and FD-FMNIST per method, with wall times and where a reused
    baseline came from; the speed-up only when both methods ran here."""
    from flash_plugin.models.classifier import ClassifierFeatures

    summary = summarize(by_method, images.cpu(), ClassifierFeatures())
    for m in methods:
        summary["methods"][m]["wall_s"] = runs_wall[m]
    if reused is not None:
        summary["methods"]["baseline"]["fd_fmnist"] = reused["methods"]["baseline"]["fd_fmnist"]
        summary["baseline_from"] = {"file": str(reuse_baseline), "device": reused.get("device"),
                                    "note": "baseline per-image results, FD and wall time copied from this run"}
    if "baseline" in runs_wall and "flash" in runs_wall and (reused is None or reused.get("device") == str(device)):
        summary["speedup_wall"] = runs_wall["baseline"] / runs_wall["flash"]
    return summary


def run_paired(
    task: str = "gblur-varying",
    solver: str = "latent-dps",
    *,
    n_images: int = 100,
    offset: int = 0,
    batch_size: int = 50,
    num_steps: int | None = None,
    solver_args: Mapping[str, float] | None = None,
    reuse_baseline: str | Path | None = None,
    methods: Sequence[str] = METHODS,
    data: str | Path | None = None,
    seed: int = 0,
    device: str = "cpu",
    out: str | Path | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    resume: bool = True,
    goal: str = "fidelity",
    start_policy: str = "snr",
) -> dict:
    """Benchmark ``solver`` on ``task``; returns the result and writes it to ``out`` if given.

    Images ``offset .. offset + n_images`` are solved ``batch_size`` at a time (the batch start is
    part of the solvers' seeds). ``solver_args`` override numeric entries of the tuned table (for a
    plugin's solver: keyword arguments of its factory); ``num_steps`` overrides ``N``.
    ``reuse_baseline`` takes the baseline's per-image results from an earlier result file instead of
    running it again; it is refused unless the settings agree and AE-only reproduces it, the proof
    that the measurements are the same. ``log`` receives one line per finished batch.

    Under ``torchrun --nproc_per_node=P`` the batches are shared out over the ``P`` processes
    (`flash_plugin.bench.distributed`; ``device="cuda"`` gives each its own GPU), and every process
    returns the same merged result, equal image for image to a one-process run; the first writes
    it. With ``out`` and ``resume``, finished batches are kept in ``out/.parts/`` and a stopped
    run continues from them. ``goal="perceptual"`` runs Flash with the perceptual settings
    (`flash_plugin.solvers.hparams.get_hparams`) and ``start_policy="calibrated"`` with the
    stored σ̂² → k map (`flash_plugin.bench.reconstruct.build_solver`); the baseline depends on neither.
    """
    import torch

    from flash_plugin.bench.distributed import Shard
    from flash_plugin.bench.reconstruct import build_solver
    from flash_plugin.models import load_default_model
    from flash_plugin.registry import get_operator

    methods = list(methods)
    overrides = dict(solver_args or {})
    _check(task, solver, n_images, offset, batch_size, methods, overrides, reuse_baseline)
    if num_steps is not None:
        overrides["num_steps"] = num_steps
    images, source = benchmark_images(data)
    if offset + n_images > len(images):
        raise FlashInputError(f"offset {offset} + n_images {n_images} go past the {len(images)} images of {source}")
    shard = Shard.from_env(device)
    device = shard.device
    images = images[offset : offset + n_images].to(device)
    n = len(images)
    g = torch.Generator().manual_seed(seed)
    severities = get_operator(task).sample_severity(n, g).to(torch.float32).to(device)
    model_set = load_default_model(device=device)
    settings = build_solver(solver, model_set.latent_diffusion, task, overrides=overrides, goal=goal, start_policy=start_policy)[2]
    to_run = list(methods)
    reused = None
    if reuse_baseline is not None:
        kwargs = solver_kwargs_of(settings)
        reused = reusable_baseline(reuse_baseline, {"task": task, "solver": solver, "n_images": n, "offset": offset, "seed": seed,
                                                    "num_steps": num_steps, "severities": severities.cpu().tolist()}, kwargs)
        to_run.remove("baseline")
    parts = None
    if out is not None and resume:
        parts = _parts_folder(out, {"task": task, "solver": solver, "n_images": n, "offset": offset, "seed": seed,
                                    "batch_size": batch_size, "num_steps": num_steps, "solver_args": settings,
                                    "methods": to_run, "source": source, "goal": goal,
                                    "start_policy": start_policy, "severities": severities.cpu().tolist()})
    by_method, runs_wall = _run_batches(task, solver, model_set, images, severities, to_run, batch_size=batch_size, seed=seed,
                                        overrides=overrides, progress=progress, log=log if shard.is_main else None,
                                        shard=shard, parts=parts, goal=goal, start_policy=start_policy)
    if reused is not None:
        _take_baseline(by_method, runs_wall, reused, reuse_baseline)
        by_method = {m: by_method[m] for m in methods}
    summary = _summary(by_method, runs_wall, images, methods, reused, reuse_baseline, device)
    summary.update({
        "task": task, "solver": solver, "n_images": n, "offset": offset, "seed": seed, "source": source,
        "device": str(device), "processes": shard.world, "goal": goal,
        "start_policy": start_policy, "batch_size": batch_size, "hparams": settings,
        "num_steps": num_steps, "start_steps": [r.start_step for r in by_method.get("flash", [])],
        "sigma2": [r.sigma2 for r in by_method.get("flash", [])], "severities": severities.cpu().tolist(),
        "per_image": {m: [{"psnr": r.psnr, "ssim": r.ssim, "nfe": r.nfe} for r in recs] for m, recs in by_method.items()},
    })
    if out is not None and shard.is_main:
        path = result_path(out, task, solver)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2))
    shard.barrier()
    return summary
