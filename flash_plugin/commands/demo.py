"""``flash-plugin demo``: Flash(Latent-DPS) vs Latent-DPS on the bundled model, four tasks.

Degrades bundled Fashion-MNIST test images with the four task presets at several severities and
shows the point in two stages:

1. Flash(solver) and AE-only (the decoded severity-encoder estimate) on every image, with a table
   of PSNR, SSIM, mean NFE and wall time (seconds on a CPU);
2. the solver from pure noise (1000 DDPM steps for Latent-DPS) on some of the images, next to
   Flash on the same images (minutes on a CPU; a progress bar on a terminal). By default one
   image per task, the middle severity of four; ``--full`` runs it on every image (the whole
   comparison, about twice as long).

Writes to ``--out``: ``reconstructions.png`` (rows: clean / measurement / solver / Flash / AE-only,
annotated with PSNR, σ̂² and start step), ``severity_scatter.png`` (σ̂² vs severity per encoder)
and ``results.json``. The solver is any registered name (``flash-plugin plugins``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from flash_plugin.commands import _args
from flash_plugin.errors import FlashInputError

TASKS = ("gblur-varying", "gblur-fixed", "random-inpainting", "nonlinear-blur")
QUICK_TASKS = ("gblur-varying", "random-inpainting")
BUNDLED_IMAGES = 64


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run Flash(Latent-DPS) vs Latent-DPS on the bundled model", description=_args.plain(__doc__),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="flash-demo", help="output directory (default: ./flash-demo)")
    p.add_argument("--quick", action="store_true",
                   help="about a minute: 1 image each of gblur-varying and random-inpainting, scatter on 16 images")
    p.add_argument("--full", action="store_true",
                   help="run the solver from noise on every image, not only one per task (about twice as long)")
    p.add_argument("--images-per-task", type=int, default=None, help="images per task (default 4, 1 with --quick)")
    p.add_argument("--baseline-images", type=int, default=None,
                   help="images per task the solver from noise runs on (default 1; all with --full; 0 skips it)")
    p.add_argument("--tasks", nargs="+", default=None, choices=TASKS, help="task presets (default: all four, two with --quick)")
    p.add_argument("--solver", default="latent-dps", help="registered solver name (default latent-dps)")
    p.add_argument("--seed", type=int, default=0, help="seed of the measurements and the solvers (default 0)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N or mps (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    _args.add_progress_option(p)
    p.add_argument("--num-steps", type=int, default=None,
                   help="override the solver's number of steps N (default: its paper setting, 1000 for Latent-DPS); for smoke tests")
    p.set_defaults(func=run)


def severities_for(preset, n: int):
    import torch

    lo, hi = preset.severity_range
    if n == 1:
        return torch.tensor([hi if lo == hi else (lo + hi) / 2])
    return torch.linspace(lo, hi, n)


def baseline_subset(n: int, k: int) -> list[int]:
    """``k`` of ``n`` images spread evenly over the severities: the centre of each of ``k`` equal
    strata (``k = 1`` of 4: image 2, the middle severity; ``k = n``: all)."""
    return [int((j + 0.5) * n / k) for j in range(k)]


def validate(args: argparse.Namespace) -> tuple[int, tuple[str, ...], int]:
    """``(images per task, tasks, baseline images per task)``, or a `FlashInputError` before any work."""
    n = _args.check_int("--images-per-task", args.images_per_task, minimum=1)
    n = n or (1 if args.quick else 4)
    tasks = tuple(args.tasks or (QUICK_TASKS if args.quick else TASKS))
    if len(set(tasks)) != len(tasks):
        raise FlashInputError(f"--tasks names a task twice: {' '.join(tasks)}")
    if n * len(tasks) > BUNDLED_IMAGES:
        raise FlashInputError(f"--images-per-task {n} x {len(tasks)} tasks needs {n * len(tasks)} images; "
                                    f"the bundle has {BUNDLED_IMAGES} (at most {BUNDLED_IMAGES // len(tasks)} per task)")
    k = _args.check_int("--baseline-images", args.baseline_images, minimum=0, maximum=n,
                        hint=f" (it runs on images of the --images-per-task {n})")
    if k is not None and args.full:
        raise FlashInputError("--full runs the solver on every image; give --full or --baseline-images, not both")
    k = n if args.full else (1 if k is None else k)
    _args.check_int("--num-steps", args.num_steps, minimum=1)
    _args.check_threads("--threads", args.threads)
    _args.check_device("--device", args.device)
    _args.check_out_dir("--out", args.out)
    _args.check_solver("--solver", args.solver)
    return n, tasks, k


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def run(args: argparse.Namespace) -> int:
    n, tasks, k = validate(args)
    out = Path(args.out)
    bars = _args.progress_bars(args.progress)
    _args.stage("demo", f"outputs go to {out.resolve()}/")

    import torch

    from flash_plugin.bench.figures import reconstruction_figure, severity_scatter
    from flash_plugin.bench.reconstruct import ENCODER_FOR_TASK, TaskRun, run_task
    from flash_plugin.models import load_default_model, load_test_images
    from flash_plugin.registry import get_operator

    if args.threads:
        torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    model_set = load_default_model(device=args.device)
    images, _ = load_test_images()
    images = images.to(args.device)
    overrides = None if args.num_steps is None else {"num_steps": args.num_steps}
    solver_label = args.solver if args.solver != "latent-dps" else "Latent-DPS"

    # Stage 1: Flash and AE-only on every image (seconds).
    flash_runs: list[TaskRun] = []
    for j, task in enumerate(tasks):
        t0 = time.perf_counter()
        clean = images[j * n : (j + 1) * n]
        flash_runs.append(run_task(task, model_set, clean, severities_for(get_operator(task), n).to(args.device),
                                   solver_name=args.solver, methods=("flash", "ae"), seed=args.seed, solver_overrides=overrides))
        _args.stage("demo", f"Flash on {task}: {n} image(s) in {time.perf_counter() - t0:.1f} s")
    rows = []
    header = f"{'task':<18} {'method':<10} {'PSNR':>6} {'SSIM':>6} {'NFE':>7} {'wall s':>7}"
    print(f"\nFlash({solver_label}) and AE-only on {n} image(s) per task:")
    print(header)
    print("-" * len(header))
    for r in flash_runs:
        for method in ("flash", "ae"):
            recs = r.by_method(method)
            row = {"stage": "flash", "task": r.task, "method": method, "images": [x.image for x in recs],
                   "psnr": _mean(x.psnr for x in recs), "ssim": _mean(x.ssim for x in recs),
                   "mean_nfe": _mean(x.nfe for x in recs), "wall_s": r.wall_s[method],
                   "per_image": [{"image": x.image, "severity": x.severity, "psnr": x.psnr, "ssim": x.ssim, "nfe": x.nfe,
                                  "start_step": x.start_step, "sigma2": x.sigma2} for x in recs]}
            rows.append(row)
            name = "Flash" if method == "flash" else "AE-only"
            print(f"{r.task:<18} {name:<10} {row['psnr']:6.2f} {row['ssim']:6.3f} {row['mean_nfe']:7.1f} {row['wall_s']:7.1f}", flush=True)

    # Stage 2: the solver from noise on a subset, next to Flash on the same images (minutes).
    subset = baseline_subset(n, k) if k else []
    base_runs: list[TaskRun] = []
    if subset:
        from flash_plugin.bench.reconstruct import build_solver

        steps = build_solver(args.solver, model_set.latent_diffusion, tasks[0], overrides=overrides)[0].schedule.num_steps
        print(f"\n{solver_label} from noise ({steps} steps) on {len(subset)} image(s) per task, next to Flash on the same images"
              f"{'' if args.full or k == n else ' (--full: all images)'}:", flush=True)
    for j, task in enumerate(tasks):
        if not subset:
            break
        t0 = time.perf_counter()
        idx = torch.tensor(subset)
        clean = images[j * n : (j + 1) * n][idx.to(images.device)]
        sev = severities_for(get_operator(task), n).to(args.device)[idx.to(args.device)]
        base_runs.append(run_task(task, model_set, clean, sev, solver_name=args.solver, methods=("baseline", "flash"),
                                  seed=args.seed, solver_overrides=overrides, progress=bars, image_index=subset))
        _args.stage("demo", f"{solver_label} from noise on {task}: {len(subset)} image(s) in {time.perf_counter() - t0:.1f} s")
    if base_runs:
        header = (f"{'task':<18} {'image #':<8} {'solver PSNR':>11} {'SSIM':>6} {'NFE':>6} {'wall s':>7} | "
                  f"{'Flash PSNR':>10} {'SSIM':>6} {'NFE':>6} {'wall s':>7} {'speed-up':>8}")
        print(header)
        print("-" * len(header))
    for r in base_runs:
        b, f = r.by_method("baseline"), r.by_method("flash")
        speedup = r.wall_s["baseline"] / r.wall_s["flash"] if r.wall_s["flash"] > 0 else None
        for method, recs in (("baseline", b), ("flash", f)):
            rows.append({"stage": "baseline", "task": r.task, "method": method, "images": [x.image for x in recs],
                         "psnr": _mean(x.psnr for x in recs), "ssim": _mean(x.ssim for x in recs),
                         "mean_nfe": _mean(x.nfe for x in recs), "wall_s": r.wall_s[method],
                         "speedup": (1.0 if method == "baseline" else speedup),
                         "per_image": [{"image": x.image, "severity": x.severity, "psnr": x.psnr, "ssim": x.ssim, "nfe": x.nfe,
                                        "start_step": x.start_step, "sigma2": x.sigma2} for x in recs]})
        ids = ",".join(str(i) for i in subset)
        print(f"{r.task:<18} {ids:<8} {_mean(x.psnr for x in b):11.2f} {_mean(x.ssim for x in b):6.3f} "
              f"{_mean(x.nfe for x in b):6.0f} {r.wall_s['baseline']:7.1f} | {_mean(x.psnr for x in f):10.2f} "
              f"{_mean(x.ssim for x in f):6.3f} {_mean(x.nfe for x in f):6.1f} {r.wall_s['flash']:7.1f} "
              f"{'-' if speedup is None else f'{speedup:.1f}x':>8}", flush=True)

    # Figures: the stage-1 runs with the baseline reconstructions added where they ran.
    for fr, br in zip(flash_runs, base_runs):
        fr.records.extend(br.by_method("baseline"))
    reconstruction_figure(flash_runs, out / "reconstructions.png", baseline_name=solver_label)
    fams = sorted({ENCODER_FOR_TASK[t] for t in tasks})
    scatter_images = images[: (16 if args.quick else BUNDLED_IMAGES)]
    severity_scatter(model_set, fams, scatter_images, out / "severity_scatter.png", seed=args.seed)
    from flash_plugin.utils.checkpoint import atomic_write_json

    atomic_write_json(out / "results.json", {
        "rows": rows, "images_per_task": n, "baseline_images": subset, "tasks": list(tasks), "solver": args.solver,
        "num_steps": args.num_steps, "seed": args.seed, "device": str(args.device), "total_wall_s": time.perf_counter() - t_all,
    })
    print(f"\nwrote {out / 'reconstructions.png'}, {out / 'severity_scatter.png'}, {out / 'results.json'} "
          f"({time.perf_counter() - t_all:.0f} s)")
    return 0
