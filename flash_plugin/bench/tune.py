"""Tune the data-consistency step ζ of a solver for Flash on the bundled model.

    python -m flash_plugin.bench.tune --solver latent-dps --n-images 16 --zetas 0.5 1 2 4 7

For each task, runs Flash(solver) (not the 1000-step baseline: too slow to tune on a CPU) on the
first ``--n-images`` Fashion-MNIST *training* images (never the test split the benchmark uses),
degraded at severities spread over the task's evaluation range with per-image seeds, for every ζ
of the grid, and prints/writes the mean PSNR and SSIM. The best-PSNR ζ per task is what
`flash_plugin.solvers.hparams.TUNED_HPARAMS` holds for our model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    from flash_plugin.bench.reconstruct import run_task
    from flash_plugin.data.fashion_mnist import load_fashion_mnist
    from flash_plugin.models import load_default_model
    from flash_plugin.operators import get_preset

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--solver", default="latent-dps")
    p.add_argument("--tasks", nargs="+", default=["gblur-varying", "gblur-fixed", "random-inpainting", "nonlinear-blur"])
    p.add_argument("--zetas", nargs="+", type=float, default=[0.5, 1.0, 2.0, 4.0, 7.0])
    p.add_argument("--n-images", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="runs/tune")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    images, _ = load_fashion_mnist("train", limit=args.n_images)
    bundle = load_default_model()
    results: dict = {}
    t0 = time.perf_counter()
    for task in args.tasks:
        lo, hi = get_preset(task).severity_range
        sev = torch.linspace(lo, hi, args.n_images)
        results[task] = {}
        for zeta in args.zetas:
            run = run_task(task, bundle, images, sev, solver_name=args.solver, methods=("flash",), seed=args.seed,
                           solver_overrides={"zeta": zeta})
            recs = run.by_method("flash")
            results[task][zeta] = {"psnr": sum(r.psnr for r in recs) / len(recs), "ssim": sum(r.ssim for r in recs) / len(recs),
                                   "mean_nfe": sum(r.nfe for r in recs) / len(recs)}
            print(f"{task:<18} ζ={zeta:<5} PSNR {results[task][zeta]['psnr']:6.2f}  SSIM {results[task][zeta]['ssim']:.3f}"
                  f"  NFE {results[task][zeta]['mean_nfe']:.1f}  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        best = max(results[task], key=lambda z: results[task][z]["psnr"])
        print(f"{task}: best ζ = {best}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"tune_{args.solver}.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
