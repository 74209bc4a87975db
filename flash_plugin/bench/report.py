"""Markdown tables and figures of the stored curves, policy and robustness runs.

    python -m flash_plugin.bench.report results/fashion-mnist-32/curves [results/fashion-mnist-32/speedup]

reads every ``curves_*.json`` and ``robust_*.json`` in the folder, draws ``<name>.png`` next to each
curves file and ``robust_<task>_<solver>.png`` per robustness series, and prints the tables that
BENCHMARKS.md quotes: Flash and the budget points against the fixed-start curve at equal mean NFE,
the cross-fitted σ̂² start policies, PSNR beyond the training range and, given a second folder
of paired bench results, the end-to-end speed-ups.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def _pm(d: dict, digits: int = 2) -> str:
    return f"{d['diff']:+.{digits}f} ± {d['se']:.{digits}f}"


def curves_table(results: list[dict]) -> str:
    """One row per Flash or budget point: its numbers and its difference from the fixed-start
    curve at the same mean NFE (paired over images; FD with a bootstrap standard error)."""
    rows = ["| task | solver | setting | mean NFE | PSNR | SSIM | FD-FMNIST | PSNR − fixed | SSIM − fixed | FD − fixed |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        meta = res["meta"]
        for label, c in res.get("compare", {}).items():
            s = res["settings"][label]
            if "error" in c:
                rows.append(f"| {meta['task']} | {meta['solver']} | {label} | {s['mean_nfe']:.1f} | {s['psnr']:.2f} | "
                            f"{s['ssim']:.3f} | {s['fd_fmnist']:.1f} | outside the grid | | |")
                continue
            fd = _pm(c["fd_fmnist"], 1) if "fd_fmnist" in c else "n/a"
            tuned = " (tuned)" if s["params"].get("tuned") else ""
            rows.append(f"| {meta['task']} | {meta['solver']} | {label}{tuned} | {s['mean_nfe']:.1f} | {s['psnr']:.2f} | "
                        f"{s['ssim']:.3f} | {s['fd_fmnist']:.1f} | {_pm(c['psnr'])} | {_pm(c['ssim'], 3)} | {fd} |")
    return "\n".join(rows)


def fixed_table(results: list[dict]) -> str:
    """The fixed-start curves themselves, with AE-only."""
    rows = ["| task | solver | point | mean NFE | PSNR | SSIM | FD-FMNIST | wall s |", "|---|---|---|---|---|---|---|---|"]
    for res in results:
        meta = res["meta"]
        pts = sorted((s for s in res["settings"].values() if s["kind"] in ("fixed", "ae")), key=lambda s: s["mean_nfe"])
        for s in pts:
            rows.append(f"| {meta['task']} | {meta['solver']} | {s['label']} | {s['mean_nfe']:.0f} | {s['psnr']:.2f} | "
                        f"{s['ssim']:.3f} | {s.get('fd_fmnist', float('nan')):.1f} | {s['wall_s']:.0f} |")
    return "\n".join(rows)


def policy_table(results: list[dict]) -> str:
    """Per pair: how the best grid step of an image relates to σ̂², and what a monotone policy
    gains over the fixed-start curve at the tuned rule's compute, cross-fitted (fitted on half
    the images, scored on the other), when it ranks images by σ̂² or by one of two oracles Flash
    does not have: the true severity and the true error of the encoder's estimate."""
    from scipy.stats import spearmanr

    from flash_plugin.bench.policy import (
        adaptivity_report, cross_fitted_at_nfe, current_snr_label, features_of, fixed_table as table_of, tuned_setting,
    )

    names = ("sigma2", "true severity", "true encoder error")
    rows = ["| task | solver | Spearman(σ̂², best k) | in-sample oracle − fixed (NFE) | cross-fitted at the tuned NFE: by σ̂² | "
            "by the true severity | by the true encoder error |", "|---|---|---|---|---|---|---|"]
    for res in results:
        if "sigma2" not in res or sum(s["kind"] == "fixed" for s in res["settings"].values()) < 3:
            continue
        rep = adaptivity_report(res)
        ks, t = table_of(res)
        rho = spearmanr(res["sigma2"], ks[t.argmax(1)]).statistic
        o = rep["oracle"]
        target = tuned_setting(res, current_snr_label(res))["mean_nfe"]
        feats = features_of(res)
        cells = [f"{_pm(cross_fitted_at_nfe(res, feats[n], target))} dB" if n in feats else "n/a" for n in names]
        rows.append(f"| {res['meta']['task']} | {res['meta']['solver']} | {rho:+.2f} | "
                    f"{_pm(o['vs_fixed_in_sample'])} dB ({o['mean_nfe']:.0f}) | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def calibrated_table(results: list[dict], policies: str | Path | None = None) -> str:
    """The stored calibrated policies on held-out images: looked up in each pair's fixed-start
    grid (and run, where the curves have the ``policy:calibrated`` setting), against the fixed
    curve at the same mean NFE and against the SNR rule (paired over images)."""
    from flash_plugin.bench.policy import current_snr_label, score_policy
    from flash_plugin.errors import FlashInputError
    from flash_plugin.solvers.hparams import START_POLICIES_PATH, get_start_policy

    rows = ["| task | solver | steps (σ̂² thresholds) | mean NFE | PSNR | − fixed curve | − SNR rule (its NFE) | run: − fixed curve |",
            "|---|---|---|---|---|---|---|---|"]
    for res in results:
        meta = res["meta"]
        try:
            pol = get_start_policy(meta["solver"], meta["task"], policies or START_POLICIES_PATH)
            r = score_policy(pol, res, current_snr_label(res))
        except FlashInputError:
            continue
        run = res.get("compare", {}).get("policy:calibrated")
        ran = _pm(run["psnr"]) if run and "psnr" in run else "not run"
        th = ", ".join(f"{x:.3g}" for x in pol.thresholds)
        rows.append(f"| {meta['task']} | {meta['solver']} | {list(pol.steps)} ({th}) | {r['mean_nfe']:.1f} | {r['psnr']:.2f} | "
                    f"{_pm(r['vs_fixed'])} | {_pm(r['vs_tuned'])} ({r['tuned_mean_nfe']:.0f}) | {ran} |")
    return "\n".join(rows)


def robustness_rows(results: list[dict]) -> list[dict]:
    rows = []
    for res in results:
        level = res["meta"]["severity_override"]["level"]
        for label, s in res["settings"].items():
            x = np.asarray(s["per_image"]["psnr"])
            method = {"ae": "AE-only"}.get(label, label)
            if s["kind"] == "fixed" and s["params"]["k"] == res["meta"]["num_steps"]:
                method = "solver from noise"
            elif s["kind"] == "flash" and s["params"].get("tuned"):
                method = "Flash (tuned)"
            vs = res.get("vs_noise", {}).get(label)
            rows.append({"task": res["meta"]["task"], "solver": res["meta"]["solver"], "level": level, "method": method,
                         "psnr": float(x.mean()), "se": float(x.std(ddof=1) / np.sqrt(len(x))), "nfe": s["mean_nfe"],
                         "fd": s.get("fd_fmnist"), "vs_noise": None if vs is None else vs["psnr"]})
    return rows


def robustness_table(rows: list[dict]) -> str:
    out = ["| task | solver | level | method | PSNR ± SE | − solver from noise (paired) | mean NFE | FD-FMNIST |",
           "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["task"], r["solver"], r["level"], r["method"])):
        vs = "" if r["vs_noise"] is None else _pm(r["vs_noise"])
        out.append(f"| {r['task']} | {r['solver']} | {r['level']:g} | {r['method']} | {r['psnr']:.2f} ± {r['se']:.2f} | {vs} | "
                   f"{r['nfe']:.0f} | {'n/a' if r['fd'] is None else format(r['fd'], '.1f')} |")
    return "\n".join(out)


def speedup_table(results: list[dict]) -> str:
    """End-to-end wall time of the solver from noise and of Flash(solver), the severity encoder
    included, measured in one process on one device (paired bench results)."""
    rows = ["| task | solver | images | device | solver: NFE, wall s | Flash: mean NFE, wall s | speed-up | Flash − solver PSNR |",
            "|---|---|---|---|---|---|---|---|"]
    for d in results:
        m, p = d["methods"], d["paired"]["flash-baseline:psnr"]
        rows.append(f"| {d['task']} | {d['solver']} | {d['n_images']} | {d['device']} | {m['baseline']['mean_nfe']:.0f}, "
                    f"{m['baseline']['wall_s']:.1f} | {m['flash']['mean_nfe']:.1f}, {m['flash']['wall_s']:.1f} | "
                    f"{m['baseline']['wall_s'] / m['flash']['wall_s']:.1f}× | {p['mean']:+.2f} ± {p['se']:.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    from flash_plugin.bench.curve_figures import plot_curves, plot_robustness

    args = argv or sys.argv[1:] or ["results/fashion-mnist-32/curves"]
    folder = Path(args[0])
    if len(args) > 1:  # a folder of paired bench results: the speed-up table
        bench = [json.loads(p.read_text()) for p in sorted(Path(args[1]).glob("bench_*.json"))]
        print("## End-to-end speed-up\n\n" + speedup_table(bench) + "\n")
    curves = [json.loads(p.read_text()) for p in sorted(folder.glob("curves_*.json"))]
    robust = [json.loads(p.read_text()) for p in sorted(folder.glob("robust_*.json"))]
    for p, res in zip(sorted(folder.glob("curves_*.json")), curves):
        plot_curves(res, p.with_suffix(".png"))
    print("## Fixed-start curves\n\n" + fixed_table(curves))
    print("\n## Flash and budgets against the fixed-start curve\n\n" + curves_table(curves))
    print("\n## Start policies\n\n" + policy_table(curves))
    print("\n## Calibrated start policies on held-out images\n\n" + calibrated_table(curves))
    if robust:
        rows = robustness_rows(robust)
        print("\n## Robustness\n\n" + robustness_table(rows))
        series = defaultdict(list)
        for r in rows:
            series[(r["task"], r["solver"])].append(r)
        for (task, solver), rs in series.items():
            level_name = "missing fraction" if task == "random-inpainting" else "blur, × the largest training blur"
            plot_robustness(rs, folder / f"robust_{task}_{solver}.png", title=f"{task} · {solver}", level_name=level_name,
                            train_max=0.8 if task == "random-inpainting" else 1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
