"""How much a per-image start step can gain, how much of it σ̂² finds, and the fitted policy.

From a curves run (`flash_plugin.bench.curves`) with several fixed start steps, every image has a
PSNR at each step of the grid. A *start policy* gives each image one step of the grid; a
*monotone* policy gives a larger σ̂² never fewer steps (what Flash's rule does). For a price ``λ``
per step, `fit_monotone_policy` finds the monotone policy that maximises ``Σ PSNR − λ Σ k`` by
dynamic programming over the images sorted by σ̂², and returns it as a
`flash_plugin.schedule.StartPolicy` (σ̂² thresholds). `fit_start_policy` fits the one stored with
the model: on training images, at the price whose mean step count matches the SNR rule's, so that
it spends the same compute as tuned Flash and only moves steps between images.

`adaptivity_report` evaluates such policies *cross-fitted*: fitted on one half of the images and
scored on the other (and the reverse), so that picking the best of noisy draws does not flatter
them, and sets each against the fixed-start curve at the same mean NFE (per image, linear in log
NFE). It also reports the per-image oracle (the best grid step of each image, in-sample: an upper
bound inflated by noise) and the oracle re-scored on an independent draw where one exists.
`cross_fitted_at_nfe` does the same at one fixed compute for any ranking of the images
(`features_of`: σ̂², and as oracles the true severity and the true error of ``ẑ``), which tells a
poor estimator apart from a model whose best start steps no severity orders.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flash_plugin.errors import FlashInputError
from flash_plugin.schedule import StartPolicy


def policy_steps(policy: StartPolicy, sigma2: np.ndarray) -> np.ndarray:
    """``policy`` applied to a numpy array of σ̂²."""
    return policy(torch.as_tensor(np.asarray(sigma2, dtype=np.float64))).numpy()


def fixed_table(result: dict, metric: str = "psnr") -> tuple[np.ndarray, np.ndarray]:
    """``(steps [K], values [n, K])`` of the fixed-start settings of a curves result."""
    fixed = sorted((s for s in result["settings"].values() if s["kind"] == "fixed"), key=lambda s: s["mean_nfe"])
    ks = np.array([s["params"]["k"] for s in fixed])
    return ks, np.stack([np.asarray(s["per_image"][metric], dtype=float) for s in fixed], axis=1)


def fit_monotone_policy(sigma2: np.ndarray, table: np.ndarray, ks: np.ndarray, price: float) -> StartPolicy:
    """The monotone policy maximising ``Σ table[i, level_i] − price · Σ ks[level_i]``.

    Images with equal σ̂² form one group (a threshold cannot part them); the dynamic programme
    runs over the groups in increasing σ̂², keeping for each level the best total of the groups
    so far whose last level is at most that one."""
    values, group = np.unique(np.asarray(sigma2, dtype=float), return_inverse=True)
    gain = np.zeros((len(values), len(ks)))
    np.add.at(gain, group, table - price * ks[None, :])
    n, k = gain.shape
    best = np.empty((n, k))
    arg = np.zeros((n, k), dtype=int)
    best[0] = gain[0]
    for i in range(1, n):
        # the best total up to group i-1 with a level <= l, and which level gave it
        run_arg = np.zeros(k, dtype=int)
        run = best[i - 1].copy()
        for lvl in range(1, k):
            if run[lvl - 1] >= run[lvl]:
                run[lvl], run_arg[lvl] = run[lvl - 1], run_arg[lvl - 1]
            else:
                run_arg[lvl] = lvl
        best[i] = run + gain[i]
        arg[i] = run_arg
    levels = np.empty(n, dtype=int)
    levels[-1] = int(np.argmax(best[-1]))
    for i in range(n - 1, 0, -1):
        levels[i - 1] = arg[i, levels[i]]
    thresholds, steps = [], [int(ks[levels[0]])]
    for i in range(1, n):
        if levels[i] != levels[i - 1]:
            thresholds.append(float((values[i - 1] + values[i]) / 2))
            steps.append(int(ks[levels[i]]))
    return StartPolicy(tuple(thresholds), tuple(steps))


def _curve_at(ks: np.ndarray, table: np.ndarray, nfe: float) -> np.ndarray:
    """Per image, the fixed-start value at mean NFE ``nfe`` (linear in log NFE)."""
    if nfe <= ks[0]:
        return table[:, 0]
    if nfe >= ks[-1]:
        return table[:, -1]
    j = int(np.searchsorted(ks, nfe))
    w = (math.log(nfe) - math.log(ks[j - 1])) / (math.log(ks[j]) - math.log(ks[j - 1]))
    return (1 - w) * table[:, j - 1] + w * table[:, j]


def _paired(a: np.ndarray, b: np.ndarray) -> dict:
    d = a - b
    return {"diff": float(d.mean()), "se": float(d.std(ddof=1) / math.sqrt(len(d)))}


def adaptivity_report(result: dict, *, prices: tuple[float, ...] | None = None, seed: int = 0,
                      replicate: dict | None = None) -> dict:
    """Cross-fitted monotone σ̂² policies against the fixed-start curve (see the module doc).

    ``replicate``: a second curves result on the same images and grid with other solver seeds;
    the in-sample oracle steps are then scored on it too (the oracle's honest value).
    """
    ks, table = fixed_table(result)
    sigma2 = np.asarray(result["sigma2"], dtype=float)
    n = len(sigma2)
    if prices is None:
        prices = tuple(np.geomspace(1e-4, 1e-1, 13))
    rng = np.random.default_rng(seed)
    half = np.zeros(n, dtype=bool)
    half[rng.permutation(n)[: n // 2]] = True
    points = []
    for price in prices:
        steps = np.empty(n, dtype=int)
        for fit in (half, ~half):
            pol = fit_monotone_policy(sigma2[fit], table[fit], ks, price)
            steps[~fit] = policy_steps(pol, sigma2[~fit])
        level = np.searchsorted(ks, steps)
        got = table[np.arange(n), level]
        mean_nfe = float(steps.mean())
        points.append({"price": float(price), "mean_nfe": mean_nfe, "psnr": float(got.mean()),
                       "vs_fixed": _paired(got, _curve_at(ks, table, mean_nfe)),
                       "distinct_steps": sorted(set(int(s) for s in steps))})
    best = table.argmax(axis=1)
    oracle = {"mean_nfe": float(ks[best].mean()), "psnr_in_sample": float(table.max(axis=1).mean()),
              "vs_fixed_in_sample": _paired(table.max(axis=1), _curve_at(ks, table, float(ks[best].mean())))}
    if replicate is not None:
        ks2, table2 = fixed_table(replicate)
        if not np.array_equal(ks, ks2) or table2.shape != table.shape:
            raise ValueError("the replicate must have the same images and fixed-start grid")
        rescored = table2[np.arange(n), best]
        oracle["psnr_replicate"] = float(rescored.mean())
        oracle["vs_fixed_replicate"] = _paired(rescored, _curve_at(ks, table2, oracle["mean_nfe"]))
    fixed_curve = [{"k": int(k), "psnr": float(table[:, i].mean())} for i, k in enumerate(ks)]
    return {"n_images": n, "fixed": fixed_curve, "cross_fitted": points, "oracle": oracle}


def current_snr_label(result: dict) -> str | None:
    """The label of the run's SNR-rule setting at the table's current ``c`` and ``v`` (the table
    may have changed since the run), or ``None`` if the run lacks it."""
    from flash_plugin.bench.curves import setting_label
    from flash_plugin.solvers.hparams import get_hparams

    hp = get_hparams(result["meta"]["solver"], result["meta"]["task"])
    label = setting_label("flash", c=hp.noise_correction, v=hp.variance_scale)
    return label if label in result["settings"] else None


def tuned_setting(result: dict, label: str | None = None) -> dict:
    """The tuned Flash setting of a curves result (the SNR rule at the table's ``c`` and ``v``
    when the run was made), or the setting ``label``."""
    if label is not None:
        return result["settings"][label]
    for s in result["settings"].values():
        if s["kind"] == "flash" and s["params"].get("tuned"):
            return s
    raise FlashInputError("the curves result has no tuned Flash setting to match the compute of")


def fit_start_policy(result: dict, *, target_nfe: float | None = None, snr_label: str | None = None,
                     prices: np.ndarray | None = None) -> tuple[StartPolicy, dict[str, Any]]:
    """The monotone σ̂² policy of a (training-split) curves result whose mean step count is
    closest to ``target_nfe`` (default: the mean NFE of the tuned SNR rule, or of the setting
    ``snr_label``, on the same images), and what the fit saw: the price, the grid, the in-sample
    mean NFE and PSNR.

    The policy may only use steps of the fixed-start grid; at equal compute it moves steps from
    images that gain little from them to images that gain more. Fitted on training images and
    judged on held-out ones (`score_policy`), it is an honest test of whether σ̂² can allocate.
    """
    ks, table = fixed_table(result)
    if len(ks) < 2:
        raise FlashInputError("fitting a start policy needs a curves result with at least two fixed start steps")
    sigma2 = np.asarray(result["sigma2"], dtype=float)
    target = tuned_setting(result, snr_label)["mean_nfe"] if target_nfe is None else float(target_nfe)
    if not ks[0] <= target <= ks[-1]:
        raise FlashInputError(f"the target mean NFE {target:.1f} lies outside the grid [{ks[0]}, {ks[-1]}]")
    prices = np.geomspace(1e-5, 1.0, 241) if prices is None else np.asarray(prices, dtype=float)
    fits = []
    for price in prices:
        pol = fit_monotone_policy(sigma2, table, ks, float(price))
        fits.append((abs(float(policy_steps(pol, sigma2).mean()) - target), -float(price), pol))
    _, neg_price, pol = min(fits, key=lambda f: f[:2])  # closest to the target; ties: the larger price (fewer steps)
    steps = policy_steps(pol, sigma2)
    got = table[np.arange(len(sigma2)), np.searchsorted(ks, steps)]
    info = {"price_db_per_step": -neg_price, "target_mean_nfe": target, "mean_nfe": float(steps.mean()),
            "psnr": float(got.mean()), "grid": [int(k) for k in ks], "n_images": int(len(sigma2))}
    return pol, info


def score_policy(policy: StartPolicy, result: dict, snr_label: str | None = None) -> dict[str, Any]:
    """A policy's steps looked up in the fixed-start grid of ``result`` (held-out images), against
    the fixed-start curve at the same mean NFE and against the tuned SNR rule (paired over images).
    The lookup equals running Flash with the policy, up to float rounding, because every setting
    of a curves run draws the same per-image noise (tests/test_curves.py checks it)."""
    ks, table = fixed_table(result)
    sigma2 = np.asarray(result["sigma2"], dtype=float)
    steps = policy_steps(policy, sigma2)
    if not set(steps.tolist()) <= set(ks.tolist()):
        raise FlashInputError(f"the policy uses steps {sorted(set(steps.tolist()) - set(ks.tolist()))} that the grid {ks.tolist()} lacks")
    got = table[np.arange(len(sigma2)), np.searchsorted(ks, steps)]
    mean_nfe = float(steps.mean())
    snr = tuned_setting(result, snr_label)
    tuned = np.asarray(snr["per_image"]["psnr"], dtype=float)
    return {"mean_nfe": mean_nfe, "psnr": float(got.mean()), "vs_fixed": _paired(got, _curve_at(ks, table, mean_nfe)),
            "vs_tuned": _paired(got, tuned), "tuned_mean_nfe": float(snr["mean_nfe"]), "tuned_label": snr.get("label"),
            "distinct_steps": sorted(set(int(k) for k in steps))}


def features_of(result: dict) -> dict[str, np.ndarray]:
    """What a monotone policy may rank images by in a curves result: the encoder's ``σ̂²`` (what
    Flash has), and two oracles it does not have: the true severity of the degradation and the
    true error of the encoder's estimate (the MSE of the decoded ``ẑ``, from its PSNR)."""
    out = {"sigma2": np.asarray(result["sigma2"], dtype=float),
           "true severity": np.asarray(result["meta"]["severities"], dtype=float)}
    if "ae" in result["settings"]:
        out["true encoder error"] = 10.0 ** (-np.asarray(result["settings"]["ae"]["per_image"]["psnr"], dtype=float) / 10)
    return out


def cross_fitted_at_nfe(result: dict, feature: np.ndarray, target_nfe: float, *, n_splits: int = 10, seed: int = 0) -> dict[str, Any]:
    """A monotone policy on ``feature`` fitted on a random half of the images at the step count
    ``target_nfe`` (`fit_start_policy`) and scored on the other half against the fixed-start
    curve at the policy's mean NFE, both ways, over ``n_splits`` random splits. Per image, the
    differences are averaged over the splits; the standard error is over images. Nothing is
    chosen on the scored half, so the value is not flattered by selection."""
    ks, table = fixed_table(result)
    feature = np.asarray(feature, dtype=float)
    n = len(feature)
    rng = np.random.default_rng(seed)
    diffs, nfes = np.zeros(n), []
    for _ in range(n_splits):
        half = np.zeros(n, dtype=bool)
        half[rng.permutation(n)[: n // 2]] = True
        steps = np.empty(n, dtype=int)
        for fit in (half, ~half):
            sub = {"settings": {k: _subset(s, fit) for k, s in result["settings"].items() if s["kind"] == "fixed"},
                   "sigma2": feature[fit].tolist()}
            pol, _ = fit_start_policy(sub, target_nfe=target_nfe)
            steps[~fit] = policy_steps(pol, feature[~fit])
        got = table[np.arange(n), np.searchsorted(ks, steps)]
        diffs += (got - _curve_at(ks, table, float(steps.mean()))) / n_splits
        nfes.append(float(steps.mean()))
    return {"diff": float(diffs.mean()), "se": float(diffs.std(ddof=1) / math.sqrt(n)), "mean_nfe": float(np.mean(nfes))}


def _subset(setting: dict, mask: np.ndarray) -> dict:
    per = {m: np.asarray(v)[mask].tolist() for m, v in setting["per_image"].items()}
    return {**setting, "per_image": per}


def write_policies(train_results: list[tuple[str, dict]], out: str | Path, *, model: str = "fashion-mnist-32") -> dict:
    """Fit one policy per training curves result (``(record path, result)`` pairs) and write
    them, with what each fit saw, to ``out``; returns the written document."""
    from flash_plugin.utils.checkpoint import atomic_write_json

    entries = []
    for record, res in train_results:
        meta = res["meta"]
        if meta.get("split") != "train":
            raise FlashInputError(f"{record} is a run on the {meta.get('split')} split: fit start policies on training images")
        label = current_snr_label(res)
        pol, info = fit_start_policy(res, snr_label=label)
        info["matched_setting"] = label or tuned_setting(res)["label"]
        entries.append({"solver": meta["solver"], "task": meta["task"], **pol.to_dict(),
                        "fit": {**info, "record": str(record), "images": f"Fashion-MNIST training images {meta['offset']}.."
                                f"{meta['offset'] + meta['n_images'] - 1}", "seed": meta["seed"], "hparams": meta["hparams"]}})
    doc = {"description": "Calibrated start policies of the bundled model (flash_plugin.schedule.StartPolicy): per (solver, task), "
                          "raw σ̂² thresholds and the start step of each interval, fitted on the per-image PSNR of fixed start steps "
                          "on training images at the mean step count of the tuned SNR rule (flash_plugin.bench.policy.fit_start_policy).",
           "model": model, "command": "python -m flash_plugin.bench.policy fit " + " ".join(str(r) for r, _ in train_results),
           "entries": sorted(entries, key=lambda e: (e["solver"], e["task"]))}
    atomic_write_json(Path(out), doc)
    return doc


def main(argv: list[str] | None = None) -> int:
    from flash_plugin.solvers.hparams import START_POLICIES_PATH, get_start_policy

    p = argparse.ArgumentParser(prog="python -m flash_plugin.bench.policy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="fit start policies on training-split curves runs")
    f.add_argument("train", nargs="+", help="curves JSONs run with --split train")
    f.add_argument("--out", default=str(START_POLICIES_PATH))
    sc = sub.add_parser("score", help="score stored policies on held-out curves runs")
    sc.add_argument("test", nargs="+", help="curves JSONs on held-out images")
    sc.add_argument("--policies", default=str(START_POLICIES_PATH))
    args = p.parse_args(argv)
    if args.cmd == "fit":
        doc = write_policies([(Path(t), json.loads(Path(t).read_text())) for t in args.train], args.out)
        for e in doc["entries"]:
            print(f"{e['solver']:<11} {e['task']:<18} steps {e['steps']} at σ̂² thresholds "
                  f"{[round(t, 4) for t in e['thresholds']]}  (train: mean NFE {e['fit']['mean_nfe']:.1f}, "
                  f"target {e['fit']['target_mean_nfe']:.1f})")
        return 0
    for t in args.test:
        res = json.loads(Path(t).read_text())
        meta = res["meta"]
        r = score_policy(get_start_policy(meta["solver"], meta["task"], args.policies), res, current_snr_label(res))
        print(f"{meta['solver']:<11} {meta['task']:<18} mean NFE {r['mean_nfe']:6.1f}  PSNR {r['psnr']:.2f}  "
              f"vs fixed {r['vs_fixed']['diff']:+.3f} ± {r['vs_fixed']['se']:.3f}  "
              f"vs SNR rule ({r['tuned_mean_nfe']:.1f} NFE) {r['vs_tuned']['diff']:+.3f} ± {r['vs_tuned']['se']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
