"""``flash-plugin demo``: Flash(Latent-DPS) vs Latent-DPS on the bundled model, four tasks.

Degrades bundled Fashion-MNIST test images with the four task presets at several severities,
reconstructs with Latent-DPS (1000 DDPM steps from noise), Flash(Latent-DPS) and AE-only, prints a
table (PSNR, SSIM, mean NFE, wall time, speed-up) and writes to ``--out``:
``reconstructions.png`` (rows: clean / measurement / Latent-DPS / Flash, annotated with the
severity, σ̂² and start step), ``severity_scatter.png`` (σ̂² vs severity per encoder) and
``results.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

TASKS = ("gblur-varying", "gblur-fixed", "random-inpainting", "nonlinear-blur")
QUICK_TASKS = ("gblur-varying", "random-inpainting")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run Flash(Latent-DPS) vs Latent-DPS on the bundled model", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="flash-demo", help="output directory (default: ./flash-demo)")
    p.add_argument("--quick", action="store_true",
                   help="about a minute: 1 image each of gblur-varying and random-inpainting, scatter on 16 images")
    p.add_argument("--images-per-task", type=int, default=None, help="default 4 (1 with --quick)")
    p.add_argument("--tasks", nargs="+", default=None, choices=TASKS, help="default: all four (two with --quick)")
    p.add_argument("--solver", default="latent-dps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--progress", action="store_true", help="show a progress bar per solve")
    p.add_argument("--num-steps", type=int, default=None,
                   help="override the solver's number of steps N (default: its paper setting, 1000 for Latent-DPS); for smoke tests")
    p.set_defaults(func=run)


def severities_for(preset, n: int):
    import torch

    lo, hi = preset.severity_range
    if n == 1:
        return torch.tensor([hi if lo == hi else (lo + hi) / 2])
    return torch.linspace(lo, hi, n)


def run(args: argparse.Namespace) -> int:
    import torch

    from flash_plugin.bench.figures import reconstruction_figure, severity_scatter
    from flash_plugin.bench.reconstruct import ENCODER_FOR_TASK, run_task
    from flash_plugin.models import load_default_model, load_test_images
    from flash_plugin.operators import get_preset

    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.images_per_task or (1 if args.quick else 4)
    tasks = args.tasks or (QUICK_TASKS if args.quick else TASKS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    model_set = load_default_model(device=args.device)
    images, _ = load_test_images()
    images = images.to(args.device)
    runs = []
    for j, task in enumerate(tasks):
        preset = get_preset(task)
        clean = images[j * n : (j + 1) * n]
        print(f"[demo] {task}: {n} image(s), Latent-DPS from noise vs Flash ...", file=sys.stderr, flush=True)
        runs.append(run_task(task, model_set, clean, severities_for(preset, n).to(args.device), solver_name=args.solver,
                             seed=args.seed, progress=args.progress,
                             solver_overrides=None if args.num_steps is None else {"num_steps": args.num_steps}))

    rows = []
    header = f"{'task':<18} {'method':<10} {'PSNR':>6} {'SSIM':>6} {'NFE':>7} {'wall s':>7} {'speed-up':>8}"
    print(header)
    print("-" * len(header))
    for r in runs:
        base_wall = r.wall_s.get("baseline")
        for method in ("baseline", "flash", "ae"):
            recs = r.by_method(method)
            if not recs:
                continue
            row = {
                "task": r.task, "method": method,
                "psnr": sum(x.psnr for x in recs) / len(recs), "ssim": sum(x.ssim for x in recs) / len(recs),
                "mean_nfe": sum(x.nfe for x in recs) / len(recs), "wall_s": r.wall_s[method],
                # wall-time speed-up of Flash over the baseline (AE-only makes no diffusion step: none)
                "speedup": base_wall / r.wall_s[method] if base_wall and method == "flash" else (1.0 if method == "baseline" else None),
                "per_image": [{"severity": x.severity, "psnr": x.psnr, "ssim": x.ssim, "nfe": x.nfe, "start_step": x.start_step,
                               "sigma2": x.sigma2} for x in recs],
            }
            rows.append(row)
            name = {"baseline": args.solver, "flash": "flash", "ae": "AE-only"}[method]
            speedup = "-" if row["speedup"] is None else f"{row['speedup']:.1f}x"
            print(f"{r.task:<18} {name:<10} {row['psnr']:6.2f} {row['ssim']:6.3f} {row['mean_nfe']:7.1f} {row['wall_s']:7.1f} {speedup:>8}")
    reconstruction_figure(runs, out / "reconstructions.png")
    fams = sorted({ENCODER_FOR_TASK[t] for t in tasks})
    scatter_images = images[: (16 if args.quick else 64)]
    severity_scatter(model_set, fams, scatter_images, out / "severity_scatter.png", seed=args.seed)
    (out / "results.json").write_text(json.dumps({"rows": rows, "images_per_task": n, "seed": args.seed,
                                                  "total_wall_s": time.perf_counter() - t_all}, indent=2))
    print(f"\nwrote {out / 'reconstructions.png'}, {out / 'severity_scatter.png'}, {out / 'results.json'} "
          f"({time.perf_counter() - t_all:.0f} s)")
    return 0
