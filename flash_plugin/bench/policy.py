"""How much a per-image start step can gain, and how much of it σ̂² finds.

From a curves run (`flash_plugin.bench.curves`) with several fixed start steps, every image has a
PSNR at each step of the grid. A *start policy* gives each image one step of the grid; a
*monotone* policy gives a larger σ̂² never fewer steps (what Flash's rule does). For a price ``λ``
per step, `fit_monotone_policy` finds the monotone policy that maximises ``Σ PSNR − λ Σ k`` by
dynamic programming over the images sorted by σ̂², and returns it as σ̂² thresholds.

`adaptivity_report` evaluates such policies *cross-fitted*: fitted on one half of the images and
scored on the other (and the reverse), so that picking the best of noisy draws does not flatter
them, and sets each against the fixed-start curve at the same mean NFE (per image, linear in log
NFE). It also reports the per-image oracle (the best grid step of each image, in-sample: an upper
bound inflated by noise) and the oracle re-scored on an independent draw where one exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Policy:
    """Grid steps by σ̂²: images with ``σ̂² <= thresholds[i]`` (first match) get ``steps[i]``,
    larger ones ``steps[-1]``; ``thresholds`` ascend and ``len(steps) == len(thresholds) + 1``."""

    thresholds: tuple[float, ...]
    steps: tuple[int, ...]

    def __call__(self, sigma2: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(np.asarray(self.thresholds), np.asarray(sigma2), side="left")
        return np.asarray(self.steps)[idx]


def fixed_table(result: dict, metric: str = "psnr") -> tuple[np.ndarray, np.ndarray]:
    """``(steps [K], values [n, K])`` of the fixed-start settings of a curves result."""
    fixed = sorted((s for s in result["settings"].values() if s["kind"] == "fixed"), key=lambda s: s["mean_nfe"])
    ks = np.array([s["params"]["k"] for s in fixed])
    return ks, np.stack([np.asarray(s["per_image"][metric], dtype=float) for s in fixed], axis=1)


def fit_monotone_policy(sigma2: np.ndarray, table: np.ndarray, ks: np.ndarray, price: float) -> Policy:
    """The monotone policy maximising ``Σ table[i, level_i] − price · Σ ks[level_i]``."""
    order = np.argsort(sigma2, kind="stable")
    gain = table[order] - price * ks[None, :]
    n, k = gain.shape
    best = np.empty((n, k))
    arg = np.zeros((n, k), dtype=int)
    best[0] = gain[0]
    for i in range(1, n):
        # the best total up to image i-1 with a level <= l, and which level gave it
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
    s = np.asarray(sigma2)[order]
    thresholds, steps = [], [int(ks[levels[0]])]
    for i in range(1, n):
        if levels[i] != levels[i - 1]:
            thresholds.append(float((s[i - 1] + s[i]) / 2))
            steps.append(int(ks[levels[i]]))
    return Policy(tuple(thresholds), tuple(steps))


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
            steps[~fit] = pol(sigma2[~fit])
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
