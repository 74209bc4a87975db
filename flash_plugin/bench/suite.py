"""Every (solver, task) pair of the hyperparameter table, benchmarked the same way, one table.

    python -m flash_plugin.bench.suite --out DIR [--n-images 100] [--device cuda] [--solvers ...] [--tasks ...]

For each pair in `flash_plugin.solvers.hparams.TUNED_HPARAMS` (PSLD has no nonlinear-blur entry)
it runs the paired benchmark (`flash_plugin.bench.paired`: solver from noise vs Flash(solver) vs
AE-only, the same test images, severities and seeds for every pair), writes its
``bench_<task>_<solver>.json`` to ``--out``, and finally ``suite.md`` and ``suite.json``: one row per pair with the mean PSNR /
SSIM / NFE of each method, the paired difference Flash − solver with its standard error, and
FD-FMNIST. A pair whose JSON already exists in ``--out`` with the same settings is not run again
(resumable: also a result from another device, which its row names). Wall times are only comparable
between rows of the same device. Under ``torchrun --nproc_per_node=P -m flash_plugin.bench.suite``
every pair's batches are shared out over the processes (`flash_plugin.bench.paired`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

from flash_plugin.bench.distributed import is_main_process
from flash_plugin.errors import FlashInputError


def pairs(solvers=None, tasks=None) -> list[tuple[str, str]]:
    """The (solver, task) pairs of the tuned table, in table order, filtered by the given names."""
    from flash_plugin.solvers.hparams import TASKS, TUNED_HPARAMS

    known_solvers = sorted({s for s, _ in TUNED_HPARAMS})
    for name, given, known in (("solver", solvers, known_solvers), ("task", tasks, TASKS)):
        bad = sorted(set(given or ()) - set(known))
        if bad:
            raise FlashInputError(f"unknown {name} {bad}; the hyperparameter table has {list(known)}")
    return [(s, t) for (s, t) in TUNED_HPARAMS if (not solvers or s in solvers) and (not tasks or t in tasks)]


def row(d: dict) -> dict:
    m, p = d["methods"], d["paired"]
    return {
        "solver": d["solver"], "task": d["task"], "n": d["n_images"], "device": d["device"],
        **{f"{k}_{q}": m[k][q] for k in ("baseline", "flash", "ae") for q in ("psnr", "ssim", "mean_nfe", "fd_fmnist", "wall_s")},
        "baseline_device": (d.get("baseline_from") or {}).get("device", d["device"]),
        **{f"d_{q}": p[f"flash-baseline:{q}"]["mean"] for q in ("psnr", "ssim")},
        **{f"d_{q}_se": p[f"flash-baseline:{q}"]["se"] for q in ("psnr", "ssim")},
        "k_star_min_median_max": [min(d["start_steps"]), sorted(d["start_steps"])[len(d["start_steps"]) // 2], max(d["start_steps"])],
    }


def wall(r: dict) -> str:
    """Wall times of the row, with the device(s) they were measured on."""
    if r.get("baseline_device", r["device"]) == r["device"]:
        return f"{r['baseline_wall_s']:.0f} / {r['flash_wall_s']:.0f} ({r['device']})"
    return f"{r['baseline_wall_s']:.0f} ({r['baseline_device']}) / {r['flash_wall_s']:.0f} ({r['device']})"


def markdown(rows: list[dict]) -> str:
    head = ("| task | solver | solver PSNR / SSIM (NFE) | Flash PSNR / SSIM (mean NFE) | Flash − solver: dB, SSIM | AE-only PSNR / SSIM "
            "| FD-FMNIST solver / Flash / AE | k* min / med / max | wall s solver / Flash (device) |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['solver']} | {r['baseline_psnr']:.2f} / {r['baseline_ssim']:.3f} ({r['baseline_mean_nfe']:.0f}) "
            f"| {r['flash_psnr']:.2f} / {r['flash_ssim']:.3f} ({r['flash_mean_nfe']:.1f}) "
            f"| {r['d_psnr']:+.2f} ± {r['d_psnr_se']:.2f}, {r['d_ssim']:+.3f} ± {r['d_ssim_se']:.3f} "
            f"| {r['ae_psnr']:.2f} / {r['ae_ssim']:.3f} "
            f"| {r['baseline_fd_fmnist']:.1f} / {r['flash_fd_fmnist']:.1f} / {r['ae_fd_fmnist']:.1f} "
            f"| {' / '.join(str(k) for k in r['k_star_min_median_max'])} "
            f"| {wall(r)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from flash_plugin.bench import paired

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--solvers", nargs="+", default=None)
    p.add_argument("--tasks", nargs="+", default=None)
    p.add_argument("--n-images", type=int, default=100)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--data", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--report-only", action="store_true", help="run nothing: tabulate the results already in --out")
    a = p.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    out = Path(a.out)
    main_process = is_main_process()
    todo = pairs(a.solvers, a.tasks)
    rows: list[dict] = []
    failed: list[tuple[str, str, str]] = []
    missing: list[tuple[str, str]] = []
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    for i, (solver, task) in enumerate(todo):
        path = paired.result_path(out, task, solver)
        done = json.loads(path.read_text()) if path.exists() else None
        # A result for the same images and seeds is kept whatever device it ran on (the table names the device).
        same = done is not None and all(done.get(k) == v for k, v in (("n_images", a.n_images), ("offset", a.offset), ("seed", a.seed)))
        if not same and a.report_only:
            missing.append((solver, task))
            continue
        if not same:
            print(f"[suite] {i + 1}/{len(todo)} {solver} on {task} ({time.perf_counter() - t0:.0f} s so far)", file=sys.stderr, flush=True)
            try:
                paired.run_paired(task, solver, n_images=a.n_images, offset=a.offset, batch_size=a.batch_size, data=a.data,
                                  seed=a.seed, device=a.device, out=out, log=lambda line: print(f"[bench] {line}", file=sys.stderr, flush=True))
            except Exception:  # one broken pair must not cost the others; it is reported in the table
                traceback.print_exc()
                failed.append((solver, task, traceback.format_exc(limit=1).strip().splitlines()[-1]))
                continue
            done = json.loads(path.read_text())
        rows.append(row(done))
        if main_process:
            (out / "suite.json").write_text(json.dumps(rows, indent=2))
            (out / "suite.md").write_text(markdown(rows))
    if not main_process:  # under torchrun the first process reports
        return 1 if failed else 0
    print(markdown(rows))
    for solver, task in missing:
        print(f"not run: {solver} on {task} (no result for these images and seeds in {out})")
    for solver, task, err in failed:
        print(f"FAILED: {solver} on {task}: {err}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
