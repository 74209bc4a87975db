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

from flash_plugin.bench.demo import BUNDLED_IMAGES, QUICK_TASKS, TASKS, baseline_subset, severities_for  # noqa: F401 - re-exported
from flash_plugin.commands import _args
from flash_plugin.errors import FlashInputError


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


def run(args: argparse.Namespace) -> int:
    n, tasks, k = validate(args)
    out = Path(args.out)
    bars = _args.progress_bars(args.progress)
    _args.stage("demo", f"outputs go to {out.resolve()}/")

    import torch

    from flash_plugin.bench import demo
    from flash_plugin.bench.reconstruct import build_solver
    from flash_plugin.models import load_default_model, load_test_images

    if args.threads:
        torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    model_set = load_default_model(device=args.device)
    images = load_test_images()[0].to(args.device)
    overrides = None if args.num_steps is None else {"num_steps": args.num_steps}
    label = args.solver if args.solver != "latent-dps" else "Latent-DPS"
    log = lambda line: _args.stage("demo", line)  # noqa: E731

    flash_runs, rows = demo.flash_stage(model_set, images, tasks, n, solver=args.solver, seed=args.seed, overrides=overrides, log=log)
    header = f"{'task':<18} {'method':<10} {'PSNR':>6} {'SSIM':>6} {'NFE':>7} {'wall s':>7}"
    print(f"\nFlash({label}) and AE-only on {n} image(s) per task:")
    print(header)
    print("-" * len(header))
    for row in rows:
        name = "Flash" if row["method"] == "flash" else "AE-only"
        print(f"{row['task']:<18} {name:<10} {row['psnr']:6.2f} {row['ssim']:6.3f} {row['mean_nfe']:7.1f} {row['wall_s']:7.1f}", flush=True)

    subset = demo.baseline_subset(n, k) if k else []
    if subset:
        steps = build_solver(args.solver, model_set.latent_diffusion, tasks[0], overrides=overrides)[0].schedule.num_steps
        print(f"\n{label} from noise ({steps} steps) on {len(subset)} image(s) per task, next to Flash on the same images"
              f"{'' if args.full or k == n else ' (--full: all images)'}:", flush=True)
    base_runs, base_rows = demo.baseline_stage(model_set, images, tasks, n, subset, solver=args.solver, seed=args.seed,
                                               overrides=overrides, progress=bars, log=log, label=label)
    if base_runs:
        header = (f"{'task':<18} {'image #':<8} {'solver PSNR':>11} {'SSIM':>6} {'NFE':>6} {'wall s':>7} | "
                  f"{'Flash PSNR':>10} {'SSIM':>6} {'NFE':>6} {'wall s':>7} {'speed-up':>8}")
        print(header)
        print("-" * len(header))
    ids = ",".join(str(i) for i in subset)
    for b, f in zip(base_rows[::2], base_rows[1::2]):
        speedup = f["speedup"]
        print(f"{b['task']:<18} {ids:<8} {b['psnr']:11.2f} {b['ssim']:6.3f} {b['mean_nfe']:6.0f} {b['wall_s']:7.1f} | "
              f"{f['psnr']:10.2f} {f['ssim']:6.3f} {f['mean_nfe']:6.1f} {f['wall_s']:7.1f} "
              f"{'-' if speedup is None else f'{speedup:.1f}x':>8}", flush=True)
    rows += base_rows

    record = {"rows": rows, "images_per_task": n, "baseline_images": subset, "tasks": list(tasks), "solver": args.solver,
              "num_steps": args.num_steps, "seed": args.seed, "device": str(args.device)}
    paths = demo.write_outputs(out, model_set, images, flash_runs, base_runs, tasks=tasks, baseline_name=label, seed=args.seed,
                               scatter_images=16 if args.quick else demo.BUNDLED_IMAGES,
                               record=record, started=t_all)
    print(f"\nwrote {', '.join(str(p) for p in paths)} ({time.perf_counter() - t_all:.0f} s)")
    return 0
