"""Measure the conformance suite: run time per check, false-alarm and detection rates.

    python -m flash_plugin.conformance.calibrate --seeds 200 --mutants tests/conformance_mutants.py

* run time of every solver check on the reference sampler and on Latent-DPS (20 steps);
* false-alarm rate of the statistical checks: the fraction of seeds on which a correct solver
  (the reference sampler, Latent-DPS) fails a check, with its binomial 95 % upper bound;
* detection rate: the fraction of seeds on which each mutant of a ``MUTANTS`` table (a module
  mapping broken solver classes to ``(check, phrases)``) fails its intended check.

Prints a Markdown table and, with ``--json PATH``, writes the numbers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from .doors import SOLVER_CHECKS, SolverCase, check_solver

STATISTICAL = (
    "check_output_mean_from_any_start",
    "check_output_variance_bounded",
    "check_intermediate_states_on_forward_process",
    "check_resume_equals_tail",
    "check_guidance_points_to_posterior",
)


class _WithoutCallback:
    """A solver seen without its step callback, so that the resume check compares distributions."""

    def __init__(self, inner: Any):
        self.inner, self.model = inner, inner.model

    @property
    def schedule(self) -> Any:
        return self.inner.schedule

    def solve(self, y, operator, *, start=None, generator=None):
        return self.inner.solve(y, operator, start=start, generator=generator)


def _reference_factories() -> dict[str, Any]:
    from flash_plugin.solvers import LatentDPS, Sampler

    return {
        "Sampler(N=20)": lambda m: Sampler(m, num_steps=20),
        "LatentDPS(N=20, zeta=0.5)": lambda m: LatentDPS(m, num_steps=20, zeta=0.5),
        "LatentDPS without callback": lambda m: _WithoutCallback(LatentDPS(m, num_steps=20, zeta=0.5)),
    }


def _upper95(k: int, n: int) -> float:
    """One-sided 95 % upper bound of a binomial rate (exact for k = 0: 1 − 0.05^(1/n); else Wilson)."""
    if n == 0:
        return float("nan")
    if k == 0:
        return 1.0 - 0.05 ** (1.0 / n)
    p, z = k / n, 1.645
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return min(1.0, (centre + half) / (1 + z * z / n))


def timings(factories: dict[str, Any]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for label, make in factories.items():
        out[label] = {}
        for name in SOLVER_CHECKS:
            t0 = time.perf_counter()
            check_solver(make, checks=[name])
            out[label][name] = time.perf_counter() - t0
    return out


def false_alarms(factories: dict[str, Any], seeds: int) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for label, make in factories.items():
        counts = {name: 0 for name in STATISTICAL}
        for seed in range(seeds):
            for r in check_solver(SolverCase(make, seed=seed), checks=STATISTICAL):
                counts[r.name] += r.status == "failed"
        out[label] = counts
    return out


def detections(mutants: dict[type, tuple[str, list[str]]], seeds: int) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for cls, (check, phrases) in mutants.items():
        hits = named = 0
        for seed in range(seeds):
            (r,) = check_solver(SolverCase(lambda m, cls=cls: cls(m, num_steps=20), seed=seed), checks=[check])
            hits += r.status == "failed"
            named += r.status == "failed" and all(p in r.message for p in phrases)
        out[cls.__name__] = {"check": check, "detected": hits, "cause_named": named, "seeds": seeds}
    return out


def mean_test_tails(seeds: int) -> dict[str, Any]:
    """Empirical tail fractions of the pooled χ² mean statistic on the reference sampler (every
    start step and oracle of `check_output_mean_from_any_start`, one statistic per seed and test)
    against the nominal ones: the calibration of the test itself, with many more events than the
    check's own 1e-3."""
    from flash_plugin.solvers import Sampler

    from .harness import Subject
    from .statistics import _solve_from, _start_steps, chi2_quantile, mean_statistic

    s = Subject(lambda m: Sampler(m, num_steps=20), "calibration")
    levels = (0.05, 0.01, 0.001)
    exceed = {a: 0 for a in levels}
    total = 0
    for seed in range(seeds):
        for kind in ("standard", "unit-variance"):
            for k in _start_steps(20):
                oracle, out = _solve_from(s, kind, k, seed=10_000 + seed * 100 + k + (50 if kind == "standard" else 0))
                stat, dof, _ = mean_statistic(out, oracle.mean)
                total += 1
                for a in levels:
                    exceed[a] += stat > chi2_quantile(a, dof)
    return {"tests": total, "nominal": list(levels), "observed": [exceed[a] / total for a in levels]}


def _load_mutants(path: str) -> dict[type, tuple[str, list[str]]]:
    spec = importlib.util.spec_from_file_location("conformance_mutants", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.MUTANTS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flash_plugin.conformance.calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=200, help="seeds per correct solver for the false-alarm rates")
    parser.add_argument("--mutant-seeds", type=int, default=20, help="seeds per mutant for the detection rates")
    parser.add_argument("--mutants", default=None, help="path of a module with a MUTANTS table (e.g. tests/conformance_mutants.py)")
    parser.add_argument("--tail-seeds", type=int, default=0,
                        help="seeds for the empirical tail fractions of the χ² mean test (8 tests per seed; 0 = skip)")
    parser.add_argument("--only-tails", action="store_true", help="measure only the tail fractions")
    parser.add_argument("--json", default=None, help="write the numbers to this JSON file")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.mutant_seeds < 1:
        parser.error("--seeds and --mutant-seeds must be >= 1")
    import torch

    torch.set_num_threads(1)
    factories = _reference_factories()
    report: dict[str, Any] = {}
    if args.tail_seeds:
        report["mean_test_tails"] = tails = mean_test_tails(args.tail_seeds)
        print(f"χ² mean test on the reference sampler, {tails['tests']} tests: tail fraction at nominal "
              + ", ".join(f"{a:g}: {o:.4f}" for a, o in zip(tails["nominal"], tails["observed"])) + "\n")
        if args.only_tails:
            if args.json:
                Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
            return 0
    report["timings_s"] = timings(factories)
    print("| check | " + " | ".join(f"{k} (s)" for k in factories) + " |\n|---|" + "---|" * len(factories))
    for name in SOLVER_CHECKS:
        print(f"| {name} | " + " | ".join(f"{report['timings_s'][k][name]:.2f}" for k in factories) + " |")
    print("| **whole suite** | " + " | ".join(f"{sum(report['timings_s'][k].values()):.1f}" for k in factories) + " |\n")

    report["false_alarms"] = false_alarms(factories, args.seeds)
    print("| check | " + " | ".join(f"{k}: failures / {args.seeds} seeds (95 % upper bound)" for k in factories)
          + " |\n|---|" + "---|" * len(factories))
    for name in STATISTICAL:
        cells = [f"{report['false_alarms'][k][name]} ({_upper95(report['false_alarms'][k][name], args.seeds):.4f})" for k in factories]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.mutants:
        report["detections"] = detections(_load_mutants(args.mutants), args.mutant_seeds)
        print(f"\n| mutant | caught by | detected / {args.mutant_seeds} seeds | cause named |\n|---|---|---|---|")
        for mutant, d in report["detections"].items():
            print(f"| {mutant} | {d['check']} | {d['detected']} | {d['cause_named']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
