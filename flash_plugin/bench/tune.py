"""Tune one hyperparameter of a solver for Flash on the bundled model.

    python -m flash_plugin.bench.tune --solver latent-dps --n-images 16 --values 0.5 1 2 4 7
    python -m flash_plugin.bench.tune --solver resample --tasks random-inpainting --values 50 200 800

For each task, runs Flash(solver) (not the full-length baseline: too slow to tune on a CPU) on the
first ``--n-images`` Fashion-MNIST *training* images (never the test split the benchmark uses),
degraded at severities spread over the task's evaluation range with per-image seeds, for every
value of the grid, and prints the mean PSNR and SSIM. ``--param`` is the solver argument swept
(default: ``zeta`` for the DPS family, ``gamma_rs`` for ReSample); the solver's other arguments
are the table's (`flash_plugin.solvers.hparams`). The results go to ``OUT/tune_SOLVER.json``,
merged with what that file holds (a later run may add tasks or extend a task's grid; a value
swept again is replaced).
The best-PSNR value per task is what `flash_plugin.solvers.hparams.TUNED_HPARAMS` holds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def read_record(path: Path, param: str) -> dict:
    """The sweep record at ``path`` (an empty one if missing); refuses one that sweeps another parameter."""
    record = json.loads(path.read_text()) if path.exists() else {"param": param, "runs": [], "results": {}}
    if record.get("param", "zeta") != param:
        raise SystemExit(f"{path} sweeps {record.get('param')!r}, not {param!r}: use another --out")
    record.setdefault("runs", [record.pop("args")] if "args" in record else [])
    record["param"] = param
    return record


def main(argv=None) -> int:
    from flash_plugin.bench.reconstruct import run_task
    from flash_plugin.data.fashion_mnist import load_fashion_mnist
    from flash_plugin.models import load_default_model
    from flash_plugin.operators import get_preset

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--solver", default="latent-dps")
    p.add_argument("--tasks", nargs="+", default=["gblur-varying", "gblur-fixed", "random-inpainting", "nonlinear-blur"])
    p.add_argument("--param", default=None, help="solver argument to sweep (default: zeta; gamma_rs for resample)")
    p.add_argument("--values", "--zetas", dest="values", nargs="+", type=float, default=[0.5, 1.0, 2.0, 4.0, 7.0])
    p.add_argument("--n-images", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="runs/tune")
    args = p.parse_args(argv)
    param = args.param or ("gamma_rs" if args.solver == "resample" else "zeta")
    if args.threads:
        torch.set_num_threads(args.threads)
    images, _ = load_fashion_mnist("train", limit=args.n_images)
    bundle = load_default_model()
    out = Path(args.out) / f"tune_{args.solver}.json"
    this_run = {**vars(args), "param": param}
    read_record(out, param)  # refuse a record of another parameter before spending any time
    t0 = time.perf_counter()
    for task in args.tasks:
        lo, hi = get_preset(task).severity_range
        sev = torch.linspace(lo, hi, args.n_images)
        measured = {}
        for value in args.values:
            run = run_task(task, bundle, images, sev, solver_name=args.solver, methods=("flash",), seed=args.seed,
                           solver_overrides={param: value})
            recs = run.by_method("flash")
            res = measured[str(value)] = {"psnr": sum(r.psnr for r in recs) / len(recs),
                                          "ssim": sum(r.ssim for r in recs) / len(recs),
                                          "mean_nfe": sum(r.nfe for r in recs) / len(recs)}
            print(f"{task:<18} {param}={value:<6} PSNR {res['psnr']:6.2f}  SSIM {res['ssim']:.3f}"
                  f"  NFE {res['mean_nfe']:.1f}  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        # read-merge-write after every task: a long sweep keeps what it measured, and two sweeps of
        # the same solver running side by side do not overwrite each other's tasks
        record = read_record(out, param)
        if this_run not in record["runs"]:
            record["runs"].append(this_run)
        values = record["results"].setdefault(task, {})  # values swept before are kept (a run may extend the grid)
        values.update(measured)
        best = max(values, key=lambda v: values[v]["psnr"])
        print(f"{task}: best {param} = {best}")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
