"""Quality against compute: Flash, fixed start steps and compute budgets on the same images.

For one (task, solver) pair, every *setting* reconstructs the same measurements (per-image seeds
from the images' absolute indices, so batching never changes a draw):

- ``fixed:k``: every image starts at step ``k`` (``FlashConfig(force_step=k)``, the tuned
  start-latent rule), ``k = N`` being the solver from noise;
- ``flash:c=…,v=…``: Flash's σ̂² → k rule with noise correction ``c`` and variance scale ``v``;
- ``budget:b``: Flash with a mean of ``b`` steps per image over the whole set
  (`flash_plugin.schedule.allocate_steps`);
- ``policy:calibrated``: Flash with the σ̂² → k map stored for the pair
  (`flash_plugin.solvers.hparams.get_start_policy`);
- ``ae``: the decoded encoder estimate (0 NFE).

Each setting records per-image PSNR, SSIM, NFE and start step, its mean, its wall time, and the
FD-FMNIST of its reconstructions against the clean images. `compare_at_equal_nfe` sets a point
against the fixed-start curve interpolated (linearly in log NFE, per image) at the point's mean
NFE: a paired PSNR/SSIM difference with its standard error, and an FD difference with a paired
bootstrap standard error over images. The run is resumable: the JSON is rewritten after each
setting, and settings already in it are skipped. Reconstructions are cached as 8-bit images next
to it (``<name>.images.safetensors``, not committed) so that FD comparisons can be recomputed;
``--keep-uncached`` adds settings to a record whose cache is gone without running the old ones again.

    python -m flash_plugin.bench.curves --task gblur-varying --solver latent-dps --n-images 64 \\
        --fixed 10 25 50 100 200 --c 0 0.5 1 1.2 --budgets 25 50 100 --out results/fashion-mnist-32/curves
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flash_plugin.errors import FlashInputError

KINDS = ("fixed", "flash", "budget", "policy", "ae")


def setting_label(kind: str, **params: float) -> str:
    """``fixed:25``, ``budget:50``, ``flash:c=1,v=2``, ``policy:calibrated``, ``ae``."""
    if kind == "ae":
        return "ae"
    if kind == "policy":
        return "policy:calibrated"
    if kind in ("fixed", "budget"):
        (v,) = params.values()
        return f"{kind}:{v:g}"
    return "flash:" + ",".join(f"{k}={v:g}" for k, v in params.items())


def beyond_range(task: str, level: float) -> dict:
    """The ``severity_override`` of `run_curves` for a robustness run: every image at one severity
    ``level``, which may lie beyond the range the encoder was trained on. Blur tasks: ``level``
    times the largest blur of the preset (its std, or its camera-shake path length);
    inpainting: ``level`` is the fraction of missing pixels (the preset covers 0.7–0.8)."""
    from flash_plugin.operators.gaussian_blur import DEFAULT_STD_RANGE
    from flash_plugin.operators.nonlinear_blur import DEFAULT_LENGTH_RANGE

    if not (level > 0 and level < float("inf")):
        raise FlashInputError(f"a severity level must be a finite positive number, got {level}")
    if task in ("gblur-varying", "gblur-fixed"):
        hi = DEFAULT_STD_RANGE[1] * level
        return {"t": 1.0, "level": level, "family_kwargs": {"std_range": [hi, hi]}}
    if task == "nonlinear-blur":
        hi = DEFAULT_LENGTH_RANGE[1] * level
        return {"t": 1.0, "level": level, "family_kwargs": {"length_range": [hi, hi]}}
    if task == "random-inpainting":
        if level > 1:
            raise FlashInputError(f"the missing fraction must lie in (0, 1], got {level}")
        return {"t": 1.0, "level": level, "family_kwargs": {"max_missing": level}}
    raise FlashInputError(f"no robustness levels defined for task {task!r}")


def _interp_weights(nfe_grid: np.ndarray, target: float) -> tuple[int, int, float]:
    """Indices ``(i, j)`` of the grid points around ``target`` and the weight of ``j``,
    linear in ``log(nfe)``; ``target`` must lie within the grid."""
    order = np.argsort(nfe_grid)
    g = nfe_grid[order]
    if not g[0] <= target <= g[-1]:
        raise ValueError(f"mean NFE {target:.1f} lies outside the fixed-start grid [{g[0]:.0f}, {g[-1]:.0f}]")
    j = int(np.searchsorted(g, target))
    if g[j] == target:
        return int(order[j]), int(order[j]), 0.0
    i = j - 1
    w = (math.log(target) - math.log(g[i])) / (math.log(g[j]) - math.log(g[i]))
    return int(order[i]), int(order[j]), float(w)


def compare_at_equal_nfe(result: dict, label: str, features: dict[str, np.ndarray] | None = None, *,
                         n_boot: int = 200, seed: int = 0) -> dict:
    """``label`` minus the fixed-start curve at ``label``'s mean NFE.

    PSNR and SSIM: per image, the two fixed settings around the mean NFE are interpolated
    linearly in log NFE; the paired mean difference and its standard error follow. FD-FMNIST
    (when ``features`` holds each setting's classifier features and ``"clean"``): the
    difference of the Fréchet distances, with a standard error from a paired bootstrap over
    images (the same resampled images for every setting).
    """
    settings = result["settings"]
    fixed = sorted((s for s in settings.values() if s["kind"] == "fixed"), key=lambda s: s["mean_nfe"])
    if len(fixed) < 2:
        raise ValueError("the comparison needs at least two fixed-start settings")
    nfe = np.array([s["mean_nfe"] for s in fixed], dtype=float)
    point = settings[label]
    i, j, w = _interp_weights(nfe, point["mean_nfe"])
    out: dict[str, Any] = {"label": label, "mean_nfe": point["mean_nfe"], "between": [fixed[i]["label"], fixed[j]["label"]],
                           "weight": w}
    for metric in ("psnr", "ssim"):
        a = np.asarray(point["per_image"][metric])
        ref = (1 - w) * np.asarray(fixed[i]["per_image"][metric]) + w * np.asarray(fixed[j]["per_image"][metric])
        d = a - ref
        out[metric] = {"point": float(a.mean()), "fixed_curve": float(ref.mean()), "diff": float(d.mean()),
                       "se": float(d.std(ddof=1) / math.sqrt(len(d)))}
    if features is not None and all(k in features for k in (label, fixed[i]["label"], fixed[j]["label"], "clean")):
        p, ref, se = _fd_difference(features[label], [(1 - w, features[fixed[i]["label"]]), (w, features[fixed[j]["label"]])],
                                    features["clean"], n_boot, seed)
        out["fd_fmnist"] = {"point": p, "fixed_curve": ref, "diff": p - ref, "se": se, "n_boot": n_boot}
    return out


def _fd_difference(fa: np.ndarray, refs: list[tuple[float, np.ndarray]], clean: np.ndarray, n_boot: int,
                   seed: int) -> tuple[float, float, float]:
    """``(FD(a), Σ w·FD(ref), se)`` against ``clean``; ``se`` of the difference from a paired
    bootstrap over images (the same resampled images for every feature set)."""
    from flash_plugin.metrics import frechet_distance

    def both(idx: np.ndarray) -> tuple[float, float]:
        return (frechet_distance(fa[idx], clean[idx]),
                sum(w * frechet_distance(f[idx], clean[idx]) for w, f in refs if w))

    point, ref = both(np.arange(len(fa)))
    rng = np.random.default_rng(seed)
    boots = [np.subtract(*both(rng.integers(0, len(fa), len(fa)))) for _ in range(n_boot)]
    return point, ref, float(np.std(boots, ddof=1))


def compare_settings(result: dict, label: str, ref: str, features: dict[str, np.ndarray] | None = None, *,
                     n_boot: int = 200, seed: int = 0) -> dict:
    """``label`` minus ``ref`` on the same images: paired PSNR/SSIM differences with standard
    errors, and the FD-FMNIST difference with a paired bootstrap standard error."""
    a, b = result["settings"][label], result["settings"][ref]
    out: dict[str, Any] = {"label": label, "ref": ref, "mean_nfe": a["mean_nfe"], "ref_mean_nfe": b["mean_nfe"]}
    for metric in ("psnr", "ssim"):
        d = np.asarray(a["per_image"][metric]) - np.asarray(b["per_image"][metric])
        out[metric] = {"diff": float(d.mean()), "se": float(d.std(ddof=1) / math.sqrt(len(d)))}
    if features is not None and all(k in features for k in (label, ref, "clean")):
        p, r, se = _fd_difference(features[label], [(1.0, features[ref])], features["clean"], n_boot, seed)
        out["fd_fmnist"] = {"diff": p - r, "se": se, "n_boot": n_boot}
    return out


def _images_path(json_path: Path) -> Path:
    return json_path.with_suffix(".images.safetensors")


def _load_images(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path) if path.is_file() else {}


def _save_images(path: Path, images: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in images.items()}, tmp)
    tmp.replace(path)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _from_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32) / 127.5 - 1


def _curve_images(split: str, data, offset: int, n_images: int):
    """``(images, source)``: the split's images ``offset .. offset + n_images`` (the test split as
    the paired benchmark loads it, bundled images included)."""
    from flash_plugin.bench.paired import benchmark_images
    from flash_plugin.data.fashion_mnist import load_fashion_mnist

    if split == "test":
        images, source = benchmark_images(data)
    else:
        images, _ = load_fashion_mnist(split, data)
        source = f"Fashion-MNIST {split} split"
    if offset + n_images > len(images):
        raise FlashInputError(f"offset {offset} + n_images {n_images} go past the {len(images)} images of {source}")
    return images[offset: offset + n_images], source


def _plan(tuned, fixed, flash_settings, budgets, include_tuned: bool, include_ae: bool, policy=None) -> list[tuple]:
    """``(label, kind, params, FlashConfig | None)`` of every setting, the fixed, budget and
    policy ones with the tuned start-latent rule."""
    from flash_plugin.flash import FlashConfig

    c0, v0 = tuned.noise_correction, tuned.variance_scale
    plan: list[tuple] = [("ae", "ae", {}, None)] if include_ae else []
    for k in fixed:
        plan.append((setting_label("fixed", k=k), "fixed", {"k": k, "c": c0, "v": v0},
                     FlashConfig(force_step=k, noise_correction=c0, variance_scale=v0)))
    pairs = list(flash_settings) + ([(c0, v0)] if include_tuned else [])
    for c, v in dict.fromkeys(pairs):
        plan.append((setting_label("flash", c=c, v=v), "flash", {"c": c, "v": v, "tuned": (c, v) == (c0, v0)},
                     FlashConfig(noise_correction=c, variance_scale=v)))
    for b in budgets:
        plan.append((setting_label("budget", b=b), "budget", {"budget": b, "c": c0, "v": v0},
                     FlashConfig(budget=b, noise_correction=c0, variance_scale=v0)))
    if policy is not None:
        plan.append((setting_label("policy"), "policy", {**policy.to_dict(), "c": c0, "v": v0},
                     FlashConfig(start_policy=policy, noise_correction=c0, variance_scale=v0)))
    return plan


def _run_setting(kind: str, config, problem: dict, batch_size: int, progress: bool) -> tuple[list, float]:
    """The records of one setting over every image, and its wall time."""
    from flash_plugin.bench.reconstruct import run_task

    t0 = time.perf_counter()
    recs = []
    n = len(problem["clean"])
    method = "ae" if kind == "ae" else "flash"
    step = n if kind == "budget" else batch_size  # a budget is a mean over the whole set: one call sees every σ̂²
    for i in range(0, n, step):
        j = min(i + step, n)
        run = run_task(problem["task"], problem["model_set"], problem["clean"][i:j], problem["severities"][i:j],
                       solver_name=problem["solver"], methods=(method,), seed=problem["seed"], flash_config=config,
                       progress=progress, image_index=problem["index"][i:j], preset=problem["preset"],
                       solve_seed=problem["solve_seed"])
        recs.extend(run.by_method(method))
    return recs, time.perf_counter() - t0


def _analyse(result: dict, problem: dict, cached: dict, n_steps: int, n_boot: int) -> None:
    """σ̂² per image, FD-FMNIST per setting, and the comparisons at equal NFE and with the solver
    from noise (``fixed:N``, where the run has it)."""
    from flash_plugin.bench.reconstruct import ENCODER_FOR_TASK, degrade
    from flash_plugin.metrics import frechet_distance
    from flash_plugin.models.classifier import ClassifierFeatures

    task, seed, clean = problem["task"], problem["seed"], problem["clean"]
    if task in ENCODER_FOR_TASK:  # the raw σ̂², the same for every setting: one encoder pass
        _, y = degrade(problem["preset"], clean, problem["severities"], seed, problem["index"])
        with torch.no_grad():
            result["sigma2"] = problem["model_set"].severity_encoder(ENCODER_FOR_TASK[task]).estimate(y).variance.cpu().tolist()
    feats = ClassifierFeatures()
    features = {"clean": feats(clean.cpu()).numpy()}
    features.update({k: feats(_from_uint8(v)).numpy() for k, v in cached.items() if k in result["settings"]})
    settings = result["settings"]
    for label, s in settings.items():
        if label in features:  # else a kept setting without images: its recorded FD stands
            s["fd_fmnist"] = frechet_distance(features[label], features["clean"])
    old_compare, old_vs_noise = result.get("compare", {}), result.get("vs_noise", {})
    result["compare"] = {}
    if sum(s["kind"] == "fixed" for s in settings.values()) >= 2:
        for label, s in settings.items():
            if s["kind"] in ("flash", "budget", "policy"):
                try:
                    c = compare_at_equal_nfe(result, label, features, seed=seed, n_boot=n_boot)
                except ValueError as exc:
                    c = {"label": label, "mean_nfe": s["mean_nfe"], "error": str(exc)}
                result["compare"][label] = _keep_fd(c, old_compare.get(label), ("between", "weight"))
    full = setting_label("fixed", k=n_steps)
    result["vs_noise"] = {label: _keep_fd(compare_settings(result, label, full, features, seed=seed, n_boot=n_boot),
                                          old_vs_noise.get(label), ("ref",))
                          for label in settings if full in settings and label != full}


def _keep_fd(new: dict, old: dict | None, same: tuple[str, ...]) -> dict:
    """``new``, with the FD comparison of ``old`` where ``new`` lacks one (images not cached) and
    ``old`` compared against the same settings (the fields ``same``)."""
    if "fd_fmnist" not in new and old and "fd_fmnist" in old and all(old.get(k) == new.get(k) for k in same):
        new["fd_fmnist"] = old["fd_fmnist"]
    return new


def run_curves(
    task: str,
    solver: str,
    *,
    n_images: int = 64,
    offset: int = 0,
    split: str = "test",
    seed: int = 0,
    solve_seed: int | None = None,
    fixed: tuple[int, ...] = (10, 25, 50, 100, 200),
    flash_settings: tuple[tuple[float, float], ...] = (),
    budgets: tuple[float, ...] = (),
    include_tuned: bool = True,
    include_ae: bool = True,
    calibrated: bool = False,
    keep_uncached: bool = False,
    severity_override: dict | None = None,
    batch_size: int = 64,
    data: str | None = None,
    device: str = "cpu",
    out: str | Path = "flash-curves",
    name: str | None = None,
    progress: bool = False,
    n_boot: int = 200,
    log=print,
) -> dict:
    """Run every setting not yet in ``out/<name>.json`` and return the whole result.

    ``flash_settings`` are ``(c, v)`` pairs; the tuned pair of the solver's table is added when
    ``include_tuned``; ``calibrated`` adds the start policy stored for the pair.
    A setting already in the JSON but not in the image cache (a committed record in a fresh
    checkout) is run again, unless ``keep_uncached``: then it is kept as recorded, and FD
    comparisons that would need its images keep their recorded values or are left out.
    ``severity_override`` replaces the preset's severities and operator arguments (robustness
    runs): ``{"t": float, "family_kwargs": {...}}``. ``solve_seed`` (default ``seed``) changes the
    solvers' noise alone: a replicate on the same measurements.
    """
    from flash_plugin.bench.reconstruct import build_solver
    from flash_plugin.models import load_default_model
    from flash_plugin.registry import get_operator
    from flash_plugin.utils.checkpoint import atomic_write_json

    images, source = _curve_images(split, data, offset, n_images)
    preset = get_operator(task)
    if severity_override:
        preset = preset.replace(family_kwargs={**preset.family_kwargs, **severity_override.get("family_kwargs", {})},
                                severity_range=(severity_override["t"], severity_override["t"]))
    severities = preset.sample_severity(n_images, torch.Generator().manual_seed(seed)).to(torch.float32).to(device)
    model_set = load_default_model(device=device)
    built, tuned_config, hparams = build_solver(solver, model_set.latent_diffusion, task)
    n_steps = built.schedule.num_steps
    for k in fixed:
        if not 1 <= k <= n_steps:
            raise FlashInputError(f"fixed start step {k} must lie in 1..{n_steps} (the solver's N)")
    problem = {"task": task, "solver": solver, "model_set": model_set, "clean": images.to(device), "severities": severities,
               "index": list(range(offset, offset + n_images)), "preset": preset, "seed": seed, "solve_seed": solve_seed}

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name or f'curves_{task}_{solver}'}.json"
    meta = {"task": task, "solver": solver, "split": split, "n_images": n_images, "offset": offset, "seed": seed, "source": source,
            "num_steps": n_steps, "hparams": hparams, "severities": severities.cpu().tolist(),
            "severity_override": severity_override or None}
    if solve_seed is not None and solve_seed != seed:
        meta["solve_seed"] = solve_seed
    result: dict = {"meta": meta, "settings": {}}
    if path.is_file():
        old = json.loads(path.read_text())
        old["meta"].setdefault("split", "test")
        if old.get("meta") != json.loads(json.dumps(meta)):
            raise FlashInputError(f"{path} holds a run of other images, seeds or settings; give another --out or --name")
        result = old
    cached = _load_images(_images_path(path))

    policy = None
    if calibrated:
        from flash_plugin.solvers.hparams import get_start_policy

        policy = get_start_policy(solver, task)
    for label, kind, params, config in _plan(tuned_config, fixed, flash_settings, budgets, include_tuned, include_ae, policy):
        if label in result["settings"] and (label in cached or keep_uncached):
            continue
        recs, wall = _run_setting(kind, config, problem, batch_size, progress)
        cached[label] = _to_uint8(torch.stack([r.x for r in recs]))
        per = {m: [getattr(r, m) for r in recs] for m in ("psnr", "ssim", "nfe", "start_step")}
        s = result["settings"][label] = {"label": label, "kind": kind, "params": params, "psnr": float(np.mean(per["psnr"])),
                                         "ssim": float(np.mean(per["ssim"])), "mean_nfe": float(np.mean(per["nfe"])),
                                         "wall_s": wall, "per_image": per}
        _save_images(_images_path(path), cached)
        atomic_write_json(path, result)
        log(f"[curves] {task} {solver} {label:<22} PSNR {s['psnr']:6.2f}  SSIM {s['ssim']:.3f}  NFE {s['mean_nfe']:7.1f}  {wall:6.0f} s")
    _analyse(result, problem, cached, n_steps, n_boot)
    atomic_write_json(path, result)
    return result


def _floats(values: list[str], what: str) -> tuple[float, ...]:
    out = []
    for v in values:
        try:
            out.append(float(v))
        except ValueError:
            raise FlashInputError(f"{what}: {v!r} is not a number") from None
    return tuple(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flash_plugin.bench.curves", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="gblur-varying")
    p.add_argument("--solver", default="latent-dps")
    p.add_argument("--n-images", type=int, default=64)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--split", default="test", choices=["train", "test"], help="Fashion-MNIST split (default test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--solve-seed", type=int, default=None, help="seed of the solvers' noise alone (a replicate; default --seed)")
    p.add_argument("--fixed", nargs="*", type=int, default=[10, 25, 50, 100, 200], help="fixed start steps")
    p.add_argument("--c", nargs="*", default=[], help="noise corrections c of extra Flash settings (tuned v)")
    p.add_argument("--v", nargs="*", default=[], help="variance scales v of extra Flash settings (tuned c)")
    p.add_argument("--cv", nargs="*", default=[], metavar="C,V", help="extra Flash settings as c,v pairs, e.g. 1,8")
    p.add_argument("--budgets", nargs="*", default=[], help="mean steps per image of budget settings")
    p.add_argument("--calibrated", action="store_true", help="add Flash with the start policy stored for the pair")
    p.add_argument("--keep-uncached", action="store_true",
                   help="keep settings recorded in the JSON whose images are not cached instead of running them again "
                        "(FD comparisons that need their images keep their recorded values or are left out)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--data", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--beyond", type=float, default=None, metavar="LEVEL",
                   help="robustness: every image at one severity LEVEL (blur: times the preset's largest blur; "
                        "inpainting: the missing fraction), see beyond_range")
    p.add_argument("--out", default="flash-curves")
    p.add_argument("--name", default=None, help="output name (default curves_<task>_<solver>)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from flash_plugin.bench.reconstruct import build_solver
    from flash_plugin.models import load_default_model

    _, tuned, _ = build_solver(args.solver, load_default_model().latent_diffusion, args.task)
    settings = [(c, tuned.variance_scale) for c in _floats(args.c, "--c")]
    settings += [(tuned.noise_correction, v) for v in _floats(args.v, "--v")]
    for item in args.cv:
        c, _, v = item.partition(",")
        settings.append(_floats([c, v], f"--cv {item}"))
    result = run_curves(args.task, args.solver, n_images=args.n_images, offset=args.offset, split=args.split, seed=args.seed, solve_seed=args.solve_seed,
                        fixed=tuple(args.fixed), flash_settings=tuple(settings), budgets=_floats(args.budgets, "--budgets"), calibrated=args.calibrated,
                        keep_uncached=args.keep_uncached, batch_size=args.batch_size, data=args.data, device=args.device, out=args.out,
                        name=args.name or (None if args.beyond is None else f"robust_{args.task}_{args.solver}_{args.beyond:g}"),
                        severity_override=None if args.beyond is None else beyond_range(args.task, args.beyond))
    print(json.dumps({k: {m: v[m] for m in ("psnr", "ssim", "mean_nfe", "fd_fmnist")} for k, v in result["settings"].items()}, indent=1))
    for label, c in result["compare"].items():
        if "error" in c:
            print(f"{label}: {c['error']}")
            continue
        fd = c.get("fd_fmnist", {})
        print(f"{label:<22} NFE {c['mean_nfe']:6.1f}  PSNR vs fixed {c['psnr']['diff']:+.3f} ± {c['psnr']['se']:.3f}  "
              f"SSIM {c['ssim']['diff']:+.4f} ± {c['ssim']['se']:.4f}  FD {fd.get('diff', float('nan')):+.2f} ± {fd.get('se', float('nan')):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
