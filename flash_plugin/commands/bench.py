"""``flash-plugin bench``: paired comparison of a solver, Flash(solver) and AE-only on the
Fashion-MNIST test split (the model-card numbers).

For ``--n-images`` test images (from ``--offset``), each degraded at a severity drawn from the
task preset's evaluation range with a per-image seed, reports per method the mean PSNR, SSIM and
NFE, the paired differences Flash − baseline and Flash − AE-only with standard errors, and the
Fréchet distance in the features of flash-plugin's own Fashion-MNIST classifier ("FD-FMNIST",
not Inception FID) of each method's reconstructions vs. the clean images. Writes
``bench_<task>_<solver>.json`` to ``--out``. ``--solver-arg zeta=1.0`` runs with a solver argument
other than the table's (recorded under "hparams"; the file name stays the same, so give another
``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from flash_plugin.commands import _args
from flash_plugin.errors import FlashInputError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="paired benchmark: solver vs Flash(solver) vs AE-only", description=_args.plain(__doc__),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="gblur-varying", help="task preset (default gblur-varying)")
    p.add_argument("--solver", default="latent-dps", help="registered solver name (default latent-dps)")
    p.add_argument("--n-images", type=int, default=100, help="number of test images, at least 2 (default 100)")
    p.add_argument("--offset", type=int, default=0, help="index of the first test image (default 0)")
    p.add_argument("--batch-size", type=int, default=50, help="images per solve (default 50; it changes the seeds)")
    p.add_argument("--num-steps", type=int, default=None, help="override the solver's N (default: its paper setting)")
    p.add_argument("--solver-arg", action="append", default=[], metavar="NAME=VALUE",
                   help="override a numeric solver argument of the table, e.g. zeta=1.0 (repeatable; recorded in the JSON); "
                        "for a solver a plugin registers, a keyword argument of its factory")
    p.add_argument("--reuse-baseline", default=None, metavar="JSON",
                   help="take the baseline from this earlier bench JSON instead of running it again (only when the "
                        "solver arguments, images, severities and measurements are the same; checked through AE-only)")
    p.add_argument("--methods", nargs="+", default=["baseline", "flash", "ae"], choices=["baseline", "flash", "ae"],
                   help="methods to run (default: all three)")
    p.add_argument("--data", default=None,
                   help="directory with the Fashion-MNIST IDX files (default: search the usual places; the 64 bundled images if absent)")
    p.add_argument("--seed", type=int, default=0, help="seed of the severities, measurements and solvers (default 0)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N or mps (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="flash-bench", help="output directory (default ./flash-bench)")
    _args.add_progress_option(p)
    p.set_defaults(func=run)


def summarize(records_by_method: dict, clean, features=None) -> dict:
    from flash_plugin.metrics import frechet_distance, paired_difference

    import torch

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


def parse_solver_args(items: list[str], solver: str, task: str) -> dict[str, float]:
    """``["zeta=1.0"]`` -> ``{"zeta": 1.0}``; for a reference solver only the arguments the table has
    for this (solver, task); a plugin's solver takes what its factory takes (checked when built)."""
    from flash_plugin.solvers.hparams import SOLVERS, get_hparams

    out = _args.parse_name_values("--solver-arg", items)
    if solver in SOLVERS:
        allowed = get_hparams(solver, task).solver_kwargs()
        for name in out:
            if name not in allowed:
                item = next(i for i in items if i.partition("=")[0].strip() == name)
                raise FlashInputError(f"--solver-arg {item!r}: expected NAME=VALUE with NAME one of {sorted(allowed)} for {solver} on {task}")
    return out


def reusable_baseline(path: str | Path, expect: dict, solver_kwargs: dict) -> dict:
    """The earlier bench JSON at ``path`` if its baseline is what this run would compute, else a clear error."""
    from flash_plugin.solvers.hparams import FLASH_PARAMS

    try:
        old = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FlashInputError(f"--reuse-baseline {path}: not a bench JSON ({exc})") from None
    if not isinstance(old, dict):
        raise FlashInputError(f"--reuse-baseline {path}: not a bench JSON (a {type(old).__name__}, not an object)")
    if "baseline" not in old.get("per_image", {}) or "ae" not in old["per_image"]:
        raise FlashInputError(f"{path} has no per-image baseline and AE-only results to reuse")
    old_kwargs = {k: v for k, v in old.get("hparams", {}).items() if k not in FLASH_PARAMS and v is not None}
    diff = {k: (old.get(k), v) for k, v in expect.items() if old.get(k) != v}
    if old_kwargs != solver_kwargs:
        diff["solver arguments"] = (old_kwargs, solver_kwargs)
    if diff:
        raise FlashInputError(f"cannot reuse the baseline of {path}: it differs in {diff} (earlier, now)")
    return old


def validate(args: argparse.Namespace) -> dict[str, float]:
    """Check every argument before any image is solved; returns the parsed ``--solver-arg`` values."""
    _args.check_int("--n-images", args.n_images, minimum=2,
                    hint=" (the paired standard errors and the Fréchet distance need two images)")
    _args.check_int("--offset", args.offset, minimum=0)
    _args.check_int("--batch-size", args.batch_size, minimum=1)
    _args.check_int("--num-steps", args.num_steps, minimum=1)
    _args.check_threads("--threads", args.threads)
    _args.check_device("--device", args.device)
    _args.check_data_dir("--data", args.data)
    _args.check_file("--reuse-baseline", args.reuse_baseline)
    _args.check_out_dir("--out", args.out)
    if len(set(args.methods)) != len(args.methods):
        raise FlashInputError(f"--methods names a method twice: {' '.join(args.methods)}")
    if args.reuse_baseline and not {"ae", "baseline"} <= set(args.methods):
        raise FlashInputError("--reuse-baseline needs --methods to include baseline and ae (AE-only checks the measurements)")
    _args.check_preset("--task", args.task)
    _args.check_solver("--solver", args.solver)
    return parse_solver_args(args.solver_arg, args.solver, args.task)


def run(args: argparse.Namespace) -> int:
    overrides = validate(args)

    import torch

    from flash_plugin.bench.reconstruct import build_solver, run_task
    from flash_plugin.data.fashion_mnist import FashionMNISTNotFound, load_fashion_mnist
    from flash_plugin.metrics import ClassifierFeatures
    from flash_plugin.models import load_default_model, load_test_images
    from flash_plugin.registry import get_operator
    from flash_plugin.solvers.hparams import FLASH_PARAMS

    if args.num_steps is not None:
        overrides["num_steps"] = args.num_steps
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        images, _ = load_fashion_mnist("test", args.data)
        source = "Fashion-MNIST test split"
    except FashionMNISTNotFound:
        if args.data is not None:  # checked above; a directory that lost its files since then
            raise FlashInputError(f"--data {args.data}: holds no Fashion-MNIST IDX files") from None
        images, _ = load_test_images()
        source = "the 64 bundled test images (Fashion-MNIST data not found)"
    if args.offset + args.n_images > len(images):
        raise FlashInputError(f"--offset {args.offset} + --n-images {args.n_images} go past the {len(images)} images of {source}")
    images = images[args.offset : args.offset + args.n_images].to(args.device)
    n = len(images)
    preset = get_operator(args.task)
    g = torch.Generator().manual_seed(args.seed)
    severities = preset.sample_severity(n, g).to(torch.float32).to(args.device)
    model_set = load_default_model(device=args.device)
    methods = list(args.methods)
    reused = None
    if args.reuse_baseline:
        _, _, settings = build_solver(args.solver, model_set.latent_diffusion, args.task, overrides=overrides)
        kwargs = {k: v for k, v in settings.items() if k not in FLASH_PARAMS and v is not None}
        reused = reusable_baseline(args.reuse_baseline, {"task": args.task, "solver": args.solver, "n_images": n,
                                                        "offset": args.offset, "seed": args.seed, "num_steps": args.num_steps,
                                                        "severities": severities.cpu().tolist()}, kwargs)
        methods.remove("baseline")
    bars = _args.progress_bars(args.progress)
    by_method: dict = {}
    runs_wall: dict = {}
    t0 = time.perf_counter()
    for i in range(0, n, args.batch_size):
        sl = slice(i, i + args.batch_size)
        r = run_task(args.task, model_set, images[sl], severities[sl], solver_name=args.solver, methods=tuple(methods),
                     seed=args.seed * 1_000_003 + i, progress=bars,
                     solver_overrides=overrides)
        for m in methods:
            by_method.setdefault(m, []).extend(r.by_method(m))
            runs_wall[m] = runs_wall.get(m, 0.0) + r.wall_s[m]
        print(f"[bench] {min(i + args.batch_size, n)}/{n} images ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    if reused is not None:
        # The same measurements give the same AE-only result (up to float noise): else the batches or seeds differed.
        worst = max(abs(a.psnr - b["psnr"]) for a, b in zip(by_method["ae"], reused["per_image"]["ae"]))
        if worst > 0.01:
            raise FlashInputError(f"cannot reuse the baseline of {args.reuse_baseline}: AE-only differs by up to {worst:.3f} dB "
                                  "per image, so the measurements differ (another --batch-size?)")
        by_method["baseline"] = [SimpleNamespace(x=None, **r) for r in reused["per_image"]["baseline"]]
        runs_wall["baseline"] = reused["methods"]["baseline"]["wall_s"]
        by_method = {m: by_method[m] for m in args.methods}
    feats = ClassifierFeatures()
    summary = summarize(by_method, images.cpu(), feats)
    for m in args.methods:
        summary["methods"][m]["wall_s"] = runs_wall[m]
    if reused is not None:
        summary["methods"]["baseline"]["fd_fmnist"] = reused["methods"]["baseline"]["fd_fmnist"]
        summary["baseline_from"] = {"file": str(args.reuse_baseline), "device": reused.get("device"),
                                    "note": "baseline per-image results, FD and wall time copied from this run"}
    if "baseline" in runs_wall and "flash" in runs_wall and (reused is None or reused.get("device") == str(args.device)):
        summary["speedup_wall"] = runs_wall["baseline"] / runs_wall["flash"]  # only when both ran on this device
    flash_recs = by_method.get("flash", [])
    summary.update({
        "task": args.task, "solver": args.solver, "n_images": n, "offset": args.offset, "seed": args.seed, "source": source,
        "device": str(args.device), "batch_size": args.batch_size, "hparams": build_solver(args.solver, model_set.latent_diffusion, args.task, overrides=overrides)[2],
        "num_steps": args.num_steps,
        "start_steps": [r.start_step for r in flash_recs], "sigma2": [r.sigma2 for r in flash_recs],
        "severities": severities.cpu().tolist(),
        "per_image": {m: [{"psnr": r.psnr, "ssim": r.ssim, "nfe": r.nfe} for r in recs] for m, recs in by_method.items()},
    })
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_{args.task}_{args.solver}.json"
    path.write_text(json.dumps(summary, indent=2))
    print(f"{'method':<10} {'PSNR':>7} {'SSIM':>7} {'NFE':>8} {'FD-FMNIST':>10} {'wall s':>8}")
    for m, s in summary["methods"].items():
        print(f"{m:<10} {s['psnr']:7.2f} {s['ssim']:7.3f} {s['mean_nfe']:8.1f} {s.get('fd_fmnist', float('nan')):10.2f} {s['wall_s']:8.1f}")
    for k, v in summary["paired"].items():
        print(f"{k:<22} {v['mean']:+.3f} ± {v['se']:.3f} (n={v['n']})")
    print(f"wrote {path}")
    return 0
