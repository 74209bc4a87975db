"""Tune one hyperparameter of a solver for Flash on the bundled model.

    python -m flash_plugin.bench.tune --solver latent-dps --n-images 16 --values 0.5 1 2 4 7
    python -m flash_plugin.bench.tune --solver resample --tasks random-inpainting --values 50 200 800

For each task, runs Flash(solver) (not the full-length baseline: too slow to tune on a CPU) on the
first ``--n-images`` Fashion-MNIST *training* images (never the test split the benchmark uses),
degraded at severities spread over the task's evaluation range with per-image seeds, for every
value of the grid, and prints the mean PSNR and SSIM. ``--param`` is the argument swept: a solver
argument (default: ``zeta`` for the DPS family, ``gamma_rs`` for ReSample) or a Flash setting
(``noise_correction`` c, ``variance_scale`` v); every other setting is the table's
(`flash_plugin.solvers.hparams`) and is recorded per task as ``at``. The results go to
``OUT/tune_SOLVER.json`` (the default parameter) or ``OUT/tune_SOLVER_PARAM.json``, merged with
what that file holds: a later run may add tasks or extend a task's grid (a value swept again is
replaced); a task swept before at other settings is swept anew (its old values are dropped).
The best-PSNR value per task is what `flash_plugin.solvers.hparams.TUNED_HPARAMS` holds.

``--method baseline`` sweeps the solver run from noise instead (all ``N`` steps, slow): a fairness
check that the table's values, tuned for Flash, do not handicap the baseline Flash is compared
with. It writes ``tune_SOLVER[_PARAM]_baseline.json``, which does not define the table.

    python -m flash_plugin.bench.tune --solver latent-dps --tasks gblur-varying --param variance_scale --values 1 2 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch


def read_record(path: Path, solver: str, param: str, method: str = "flash") -> dict:
    """The sweep record at ``path`` (an empty one if missing); refuses one that sweeps another parameter."""
    record = json.loads(path.read_text()) if path.exists() else {"solver": solver, "param": param, "method": method, "runs": [],
                                                                   "results": {}, "at": {}}
    if record.get("param", "zeta") != param or record.get("solver", solver) != solver or record.get("method", "flash") != method:
        raise SystemExit(f"{path} sweeps {record.get('param')!r} of {record.get('method', 'flash')} {record.get('solver')!r}, "
                         f"not {param!r} of {method} {solver!r}: use another --out")
    record.setdefault("runs", [record.pop("args")] if "args" in record else [])
    record.setdefault("at", {})
    record["solver"], record["param"], record["method"] = solver, param, method
    return record


def default_param(solver: str) -> str:
    """The argument swept when ``--param`` is not given: ``gamma_rs`` for ReSample, else ``zeta``."""
    return "gamma_rs" if solver == "resample" else "zeta"


def record_path(out_dir: str | Path, solver: str, param: str, method: str = "flash") -> Path:
    """``tune_SOLVER.json`` for the solver's default parameter, ``tune_SOLVER_PARAM.json`` otherwise;
    ``..._baseline.json`` for a sweep of the solver from noise."""
    stem = f"tune_{solver}" if param == default_param(solver) else f"tune_{solver}_{param}"
    return Path(out_dir) / (stem + ("_baseline" if method == "baseline" else "") + ".json")


def settings_at(solver: str, task: str, param: str) -> dict:
    """The table's settings of ``solver`` on ``task`` other than ``param`` (what a sweep holds fixed)."""
    from flash_plugin.solvers.hparams import get_hparams

    return {k: v for k, v in asdict(get_hparams(solver, task)).items() if k != param}


def main(argv=None) -> int:
    from flash_plugin.bench.reconstruct import run_task
    from flash_plugin.data.fashion_mnist import load_fashion_mnist
    from flash_plugin.flash import FlashConfig
    from flash_plugin.solvers.hparams import FLASH_PARAMS, get_hparams
    from flash_plugin.models import load_default_model
    from flash_plugin.operators import get_preset

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--solver", default="latent-dps")
    p.add_argument("--tasks", nargs="+", default=["gblur-varying", "gblur-fixed", "random-inpainting", "nonlinear-blur"])
    p.add_argument("--param", default=None, help="solver argument or Flash setting (noise_correction, variance_scale) "
                   "to sweep (default: zeta; gamma_rs for resample)")
    p.add_argument("--values", "--zetas", dest="values", nargs="+", type=float, default=[0.5, 1.0, 2.0, 4.0, 7.0])
    p.add_argument("--method", choices=["flash", "baseline"], default="flash",
                   help="sweep Flash(solver) (what the table is tuned for) or the solver from noise (a fairness check)")
    p.add_argument("--n-images", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="runs/tune")
    args = p.parse_args(argv)
    param = args.param or default_param(args.solver)
    if args.method == "baseline" and param in FLASH_PARAMS:
        raise SystemExit(f"--param {param} is a Flash setting: the baseline does not use it")
    if args.threads:
        torch.set_num_threads(args.threads)
    images, _ = load_fashion_mnist("train", limit=args.n_images)
    bundle = load_default_model()
    out = record_path(args.out, args.solver, param, args.method)
    this_run = {**vars(args), "param": param}
    read_record(out, args.solver, param, args.method)  # refuse a record of another parameter before spending any time
    t0 = time.perf_counter()
    for task in args.tasks:
        lo, hi = get_preset(task).severity_range
        sev = torch.linspace(lo, hi, args.n_images)
        measured = {}
        hp = get_hparams(args.solver, task)
        for value in args.values:
            if param in FLASH_PARAMS:
                overrides, config = {}, FlashConfig(**{**hp.flash_kwargs(), param: value})
            else:  # run_task builds the table's FlashConfig itself
                overrides, config = {param: value}, None
            run = run_task(task, bundle, images, sev, solver_name=args.solver, methods=(args.method,), seed=args.seed,
                           solver_overrides=overrides, flash_config=config)
            recs = run.by_method(args.method)
            res = measured[str(value)] = {"psnr": sum(r.psnr for r in recs) / len(recs),
                                          "ssim": sum(r.ssim for r in recs) / len(recs),
                                          "mean_nfe": sum(r.nfe for r in recs) / len(recs)}
            print(f"{task:<18} {param}={value:<6} PSNR {res['psnr']:6.2f}  SSIM {res['ssim']:.3f}"
                  f"  NFE {res['mean_nfe']:.1f}  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        # read-merge-write after every task: a long sweep keeps what it measured, and two sweeps of
        # the same solver running side by side do not overwrite each other's tasks
        record = read_record(out, args.solver, param, args.method)
        if this_run not in record["runs"]:
            record["runs"].append(this_run)
        at = settings_at(args.solver, task, param)
        if task in record["results"] and record["at"].get(task) != at:
            print(f"{task}: the values swept before were measured at {record['at'].get(task)}, not {at}: dropped", file=sys.stderr)
            del record["results"][task]
        record["at"][task] = at
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
