"""Solver checks of what a solve computes from any start step, on the analytic Gaussian oracle.

The oracle's denoiser is the exact MMSE one, so the truth is known in closed form: every
DDPM/DDIM-type chain keeps each level's mean at exactly ``a_k μ``, while variances on a coarse grid
are only bounded from above. Means are tested with pooled χ² statistics whose false-alarm rates are
split over a check's tests (Bonferroni), so a correct solver fails a check with probability at most
`FALSE_ALARM` per seed. Derivations and measured margins: docs/make-your-solver-flashable.md.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch

from flash_plugin.types import StartPoint

from .harness import NotApplicable, Subject, close, max_diff, seeded, seeded_list, solver_check, start_latents
from .oracles import MaskOperator, SpyOracle, make_oracle

FALSE_ALARM = 1e-3
"""False-alarm rate of one statistical check on a correct solver (per seed)."""
SAMPLES = 2000
"""Samples per statistical solve."""
VARIANCE_BOUND = 1.25
"""Largest output / data variance per dimension accepted on the standard and unit oracles."""
NEAR_DETERMINISTIC_VARIANCE = 1e-4
NEAR_DETERMINISTIC_BOUND = 2.0
"""Largest output / data variance on the near-deterministic oracle (a correct chain gives ~0.03)."""
GUIDANCE_TOLERANCE = 0.05
"""Most negative projection of (output mean − prior mean) on (posterior mean − prior mean) accepted."""


# ---- Statistics ------------------------------------------------------------------------------
def chi2_quantile(p: float, dof: int) -> float:
    """Upper quantile of χ²(dof) at tail probability ``p`` (Wilson-Hilferty; exact to ~1 % for dof >= 10)."""
    z = float(torch.special.ndtri(torch.tensor(1.0 - p, dtype=torch.float64)))
    c = 2.0 / (9.0 * dof)
    return dof * (1.0 - c + z * math.sqrt(c)) ** 3


def mean_statistic(samples: torch.Tensor, mean: torch.Tensor) -> tuple[float, int, torch.Tensor]:
    """``(Σ z_d², D, z)`` for ``samples`` ``[M, ...]`` against the per-dimension ``mean``."""
    x = samples.detach().double().cpu().flatten(1)
    m, v = x.mean(0), x.var(0).clamp_min(1e-300)
    z = (m - mean.detach().double().cpu().flatten()) / (v / x.shape[0]).sqrt()
    return float((z * z).sum()), z.numel(), z


def two_sample_statistic(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """``(Σ z_d², D)`` of Welch's per-dimension difference of the means of ``a`` and ``b``."""
    x, y = a.detach().double().cpu().flatten(1), b.detach().double().cpu().flatten(1)
    se = (x.var(0) / x.shape[0] + y.var(0) / y.shape[0]).clamp_min(1e-300).sqrt()
    z = (x.mean(0) - y.mean(0)) / se
    return float((z * z).sum()), z.numel()


def _variance_ratio(samples: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return samples.detach().double().cpu().flatten(1).var(0) / var.detach().double().cpu().flatten()


# ---- Problems on the oracle ------------------------------------------------------------------
ORACLES = {
    "standard": None,  # variances in [0.05, 0.25]
    "unit-variance": 1.0,
    "near-deterministic": NEAR_DETERMINISTIC_VARIANCE,
}


def _oracle(kind: str) -> SpyOracle:
    return make_oracle(variance=ORACLES[kind])


def _uninformative(oracle: SpyOracle, m: int, g: torch.Generator) -> tuple[torch.Tensor, MaskOperator]:
    """A measurement that carries no information (a mask keeping nothing), under which every guided
    solver samples the prior."""
    op = MaskOperator(torch.zeros((m, *oracle.image_shape), dtype=torch.bool), noise_std=0.05)
    return op.measure(torch.zeros((m, *oracle.image_shape)), g), op


def _marginal(oracle: SpyOracle, solver: Any, k: int, m: int, g: torch.Generator) -> torch.Tensor:
    """``m`` draws of the exact level-``k`` marginal ``a_k z0 + b_k ε`` of the oracle's data."""
    z0 = oracle.sample(m, g)
    a, b = solver.schedule.a[k], solver.schedule.b[k]
    return (a * z0 + b * torch.randn(z0.shape, generator=g, dtype=torch.float64)).float()


def _start_steps(n: int) -> list[int]:
    return sorted({1, max(1, n // 4), max(1, n // 2), n})


def _solve_from(s: Subject, kind: str, k: int, seed: int) -> tuple[SpyOracle, torch.Tensor]:
    """Output latents of ``SAMPLES`` uninformative solves started at the exact level-``k`` marginal."""
    oracle = _oracle(kind)
    solver = s.solver_over(oracle)
    g = seeded(seed)
    z = _marginal(oracle, solver, k, SAMPLES, g)
    y, op = _uninformative(oracle, SAMPLES, g)
    sol = solver.solve(y, op, start=StartPoint(torch.full((SAMPLES,), k), z), generator=g)
    return oracle, sol.latent


def _inputs_at(oracle: SpyOracle, t: int, rows: int) -> torch.Tensor | None:
    """The first ``rows`` denoiser inputs at timestep ``t``, in call order: one call for a solver
    that batches its samples, one call per sample for one that solves them one by one."""
    found = [z for call, z in zip(oracle.calls, oracle.inputs) if bool((call == t).all())]
    got = torch.cat(found)[:rows] if found else None
    return got if got is not None and got.shape[0] == rows else None


def _repro(n: int, what: str) -> str:
    return f"{SAMPLES} samples, N = {n}, {what}"


# ---- The checks ------------------------------------------------------------------------------
@solver_check
def check_start_latent_is_first_input(solver_or_factory: Any) -> None:
    """In an equal-start solve at ``0 < k < N`` the first denoiser input of each sample is
    ``start.latent`` itself (spy oracle; factory only)."""
    s = Subject(solver_or_factory, "check_start_latent_is_first_input")
    oracle = s.need_spy()
    problem = s.need_problem()
    solver = s.setup().solver
    n = solver.schedule.num_steps
    if n < 2:
        raise NotApplicable(f"{s.check}: N = {n} has no start step strictly between 0 and N")
    k = max(1, n // 2)
    y, op = problem.take([0, 1, 2])
    z = start_latents(s, [k] * 3, seed=41, like=y)
    detail = f"3 samples, StartPoint(step=[{k}] * 3, latent at level {k}) with N = {n}, spy oracle make_oracle()"
    with oracle.recording_inputs():
        solver.solve(y, op, start=StartPoint(torch.full((3,), k), z.clone()), generator=seeded_list([1, 2, 3]))
    if not oracle.inputs:
        s.fail(observed="no denoiser call", expected=f"{k} denoiser calls, the first one on start.latent",
               cause="the solver does not call the model's eps(z, t)", detail=detail)
    first = _inputs_at(oracle, int(solver.schedule.timesteps[k]), 3)  # batched or one call per sample
    first = oracle.inputs[0] if first is None else first
    if first.shape != z.shape or not close(first, z):
        detail_diff = f"max |diff| = {max_diff(first, z):.3g}" if first.shape == z.shape else "another shape"
        slope = float((first.double() * z.double().cpu()).sum() / (z.double() ** 2).sum()) if first.shape == z.shape else 0.0
        cause = ("the start latent is ignored: the first input does not follow it (fresh noise drawn for k < N?)"
                 if abs(slope) < 0.25 else
                 "the start latent is transformed before the first step (e.g. re-noised as if it were a clean estimate); "
                 "flash() passes the latent *at level k*: use it as the state of that level")
        s.fail(observed=f"the first denoiser input has shape {tuple(first.shape)} and differs from start.latent "
               f"({detail_diff}; regression slope on start.latent {slope:.2f})",
               expected="the first denoiser input of every sample equals start.latent", cause=cause, detail=detail)


@solver_check
def check_output_mean_from_any_start(solver_or_factory: Any) -> None:
    """Started at the exact level-``k`` marginal for ``k ∈ {1, N/4, N/2, N}`` with a measurement
    that carries no information, the output mean per latent dimension is the data mean (pooled χ²
    test, false-alarm rate `FALSE_ALARM`; standard and unit-variance oracles; factory only)."""
    s = Subject(solver_or_factory, "check_output_mean_from_any_start")
    s.need_spy()
    n = s.setup().solver.schedule.num_steps
    kinds, ks = ("standard", "unit-variance"), _start_steps(n)
    alpha = FALSE_ALARM / (len(kinds) * len(ks))
    worst = None
    for i, kind in enumerate(kinds):
        for k in ks:
            oracle, out = _solve_from(s, kind, k, seed=s.seed * 1000 + 10 * i + k)
            stat, dof, z = mean_statistic(out, oracle.mean)
            limit = chi2_quantile(alpha, dof)
            m = out.double().mean(0).flatten()
            gain = float((m * oracle.mean.flatten()).sum() / (oracle.mean.flatten() ** 2).sum())
            if stat > limit and (worst is None or stat / limit > worst[0]):
                worst = (stat / limit, kind, k, stat, dof, limit, float(z.abs().max()), gain)
    if worst is not None:  # the most significant of the failing tests
        _, kind, k, stat, dof, limit, zmax, gain = worst
        s.fail(observed=f"{kind} oracle, start at k = {k}: output mean off the data mean, χ² = {stat:.1f} on {dof} "
               f"dimensions (largest |z| = {zmax:.1f}); output mean ≈ {gain:.3f} × data mean",
               expected=f"χ² ≤ {limit:.1f} (the mean of every DDPM/DDIM-type chain with the exact denoiser is exact; "
               f"false-alarm rate {FALSE_ALARM:g} for the whole check)",
               cause="the start latent is not used as the level-k state (ignored, or re-noised as if it were clean), "
               "ᾱ is looked up at the wrong level, or the x̂0 prediction is clipped/thresholded (which biases the mean "
               "of data with unit variance)",
               detail=_repro(n, f"{kind} oracle, StartPoint at the exact level-{k} marginal, a mask keeping nothing"))


@solver_check
def check_output_variance_bounded(solver_or_factory: Any) -> None:
    """Started at the exact level-``k`` marginal (``k ∈ {1, N/4, N/2, N}``, uninformative
    measurement), output / data variance per dimension is at most `VARIANCE_BOUND` on the standard
    oracle and `NEAR_DETERMINISTIC_BOUND` on a near-deterministic one (data variance 1e-4), where
    noise after the last step, a skipped last update or a wrong level lookup show (factory only)."""
    s = Subject(solver_or_factory, "check_output_variance_bounded")
    s.need_spy()
    n = s.setup().solver.schedule.num_steps
    for i, (kind, bound) in enumerate((("standard", VARIANCE_BOUND), ("near-deterministic", NEAR_DETERMINISTIC_BOUND))):
        for k in _start_steps(n):
            oracle, out = _solve_from(s, kind, k, seed=s.seed * 1000 + 500 + 10 * i + k)
            ratio = _variance_ratio(out, oracle.var)
            if float(ratio.max()) > bound:
                s.fail(observed=f"{kind} oracle, start at k = {k}: output variance up to {float(ratio.max()):.3g} × the data "
                       f"variance (median {float(ratio.median()):.3g})",
                       expected=f"at most {bound} × the data variance per dimension"
                       + (" (a correct chain gives ~0.03 here)" if kind == "near-deterministic" else ""),
                       cause="noise added after the last step, the last update skipped (the output is still at level 1), "
                       "an ancestral variance that is too large, or ᾱ looked up at the wrong level",
                       detail=_repro(n, f"{kind} oracle, StartPoint at the exact level-{k} marginal, a mask keeping nothing"))


@solver_check
def check_intermediate_states_on_forward_process(solver_or_factory: Any) -> None:
    """In a full solve (uninformative measurement), the denoiser inputs at every level with
    ``ᾱ_k ≤ 0.5`` have the forward marginal's mean ``a_k μ`` (pooled χ² tests, false-alarm rate
    `FALSE_ALARM`) and at most `VARIANCE_BOUND` × its variance ``a_k² s² + b_k²`` (factory only)."""
    s = Subject(solver_or_factory, "check_intermediate_states_on_forward_process")
    s.need_spy()
    oracle = _oracle("standard")
    solver = s.solver_over(oracle)
    sched = solver.schedule
    n = sched.num_steps
    levels = [k for k in range(1, n + 1) if float(sched.alphas_cumprod[k]) <= 0.5]
    if not levels:
        raise NotApplicable(f"{s.check}: no level of this schedule has ᾱ ≤ 0.5")
    g = seeded(s.seed * 1000 + 900)
    y, op = _uninformative(oracle, SAMPLES, g)
    with oracle.recording_inputs():
        solver.solve(y, op, generator=g)
    alpha = FALSE_ALARM / len(levels)
    detail = _repro(n, "standard oracle, full solves from noise, a mask keeping nothing")
    for k in levels:
        t = int(sched.timesteps[k])
        z = _inputs_at(oracle, t, SAMPLES)
        if z is None:
            s.fail(observed=f"fewer than {SAMPLES} denoiser inputs at timestep {t} (level {k})",
                   expected="every sample evaluated once per level", cause="the solver skips levels", detail=detail)
        a2 = float(sched.alphas_cumprod[k])
        mean, var = math.sqrt(a2) * oracle.mean, a2 * oracle.var + (1 - a2)
        stat, dof, _ = mean_statistic(z, mean)
        limit = chi2_quantile(alpha, dof)
        ratio = float(_variance_ratio(z, var).max())
        if stat > limit or ratio > VARIANCE_BOUND:
            s.fail(observed=f"the states entering the denoiser at level k = {k} (ᾱ = {a2:.3f}): mean χ² = {stat:.1f} on {dof} "
                   f"dimensions, variance up to {ratio:.3g} × the forward marginal's",
                   expected=f"the forward marginal N(a_k μ, a_k² s² + b_k²): χ² ≤ {limit:.1f} (false-alarm rate "
                   f"{FALSE_ALARM:g} for the whole check) and variance ≤ {VARIANCE_BOUND} ×",
                   cause="the reverse update leaves the forward process: too much noise in the ancestral step (a wrong σ_k), "
                   "ᾱ of the wrong level in the update, or the state rescaled between steps", detail=detail)


def _has_callback(solver: Any) -> bool:
    try:
        return "callback" in inspect.signature(solver.solve).parameters
    except (TypeError, ValueError):
        return False


@solver_check
def check_resume_equals_tail(solver_or_factory: Any) -> None:
    """A solve resumed at level ``j`` from the run's own level-``j`` state equals the rest of the
    run. With a step callback (`StepCallbackSolver`): exactly, given the generator state at that
    point; otherwise in distribution (means and variances of ``SAMPLES`` outputs). Catches
    hyperparameters computed from an iteration counter instead of the absolute step (factory only)."""
    s = Subject(solver_or_factory, "check_resume_equals_tail")
    oracle = s.need_spy()
    problem = s.need_problem()
    solver = s.setup().solver
    n = solver.schedule.num_steps
    if n < 2:
        raise NotApplicable(f"{s.check}: N = {n} has no level strictly between 0 and N to resume from")
    if _has_callback(solver):
        _resume_exact(s, solver, problem, n)
    else:
        _resume_in_distribution(s, solver, oracle, problem, n)


def _resume_exact(s: Subject, solver: Any, problem: Any, n: int) -> None:
    y, op = problem.take([0, 1, 2])
    seeds = [s.seed * 10 + 3, s.seed * 10 + 4, s.seed * 10 + 5]
    gens = seeded_list(seeds)
    states: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    def record(k: int, z: torch.Tensor) -> None:  # called after the step from level k: z is at level k - 1
        states[k - 1] = (z.detach().clone(), [g.get_state() for g in gens])

    full = solver.solve(y, op, generator=gens, callback=record)
    for j in sorted({n - 1, max(1, n // 2), 1}):
        detail = (f"3 samples, a full solve with callback and generators seeded {seeds}, then a solve from "
                  f"StartPoint(step={j}, the latent the callback reported at level {j}) with the generators' states at that point")
        if j not in states:
            s.fail(observed=f"the callback never reported level {j} (levels reported: {sorted(states)[:8]}...)",
                   expected="callback(k, latent) after every step, with the latent at level k - 1",
                   cause="the callback is not called after every reverse step", detail=detail)
        z, gen_states = states[j]
        resumed_gens = [torch.Generator().set_state(st) for st in gen_states]
        tail = solver.solve(y, op, start=StartPoint(torch.full((3,), j), z.clone()), generator=resumed_gens)
        if not (close(tail.latent, full.latent) and close(tail.x, full.x)):
            s.fail(observed=f"resumed at level {j}: Solution.latent differs from the full run's (max |diff| = "
                   f"{max_diff(tail.latent, full.latent):.3g})",
                   expected="the rest of the full run, exactly (same state, same random numbers)",
                   cause="something depends on the iteration count or on the start step instead of the absolute level k "
                   "(a step size, a data-consistency schedule, a counter), or the start latent is not the level-j state",
                   detail=detail)


def _resume_in_distribution(s: Subject, solver: Any, oracle: SpyOracle, problem: Any, n: int) -> None:
    j = max(1, n // 2)
    idx = [0] * SAMPLES
    y, op = problem.take(idx)
    with oracle.recording_inputs():
        full = solver.solve(y, op, generator=seeded(s.seed * 1000 + 31))
    t = int(solver.schedule.timesteps[j])
    states = _inputs_at(oracle, t, SAMPLES)
    detail = _repro(n, f"one oracle measurement repeated, full solves, then solves from their own level-{j} states")
    if states is None:
        s.fail(observed=f"fewer than {SAMPLES} denoiser inputs at timestep {t} (level {j})",
               expected="every sample evaluated once per level", cause="the solver skips levels", detail=detail)
    tail = solver.solve(y, op, start=StartPoint(torch.full((SAMPLES,), j), states.to(y.dtype)),
                        generator=seeded(s.seed * 1000 + 32))
    stat, dof = two_sample_statistic(tail.latent, full.latent)
    limit = chi2_quantile(FALSE_ALARM, dof)
    ratio = tail.latent.double().var(0) / full.latent.double().var(0).clamp_min(1e-300)
    lo, hi = float(ratio.min()), float(ratio.max())
    if stat > limit or hi > VARIANCE_BOUND or lo < 1 / VARIANCE_BOUND:
        s.fail(observed=f"outputs resumed at level {j} vs the full runs: mean χ² = {stat:.1f} on {dof} dimensions, "
               f"variance ratio {lo:.3g}..{hi:.3g}",
               expected=f"the same distribution: χ² ≤ {limit:.1f} (false-alarm rate {FALSE_ALARM:g}) and variance ratios "
               f"within [{1 / VARIANCE_BOUND:.2f}, {VARIANCE_BOUND}]",
               cause="something depends on the iteration count or on the start step instead of the absolute level k "
               "(a step size, a data-consistency schedule, a counter)", detail=detail)


@solver_check
def check_guidance_points_to_posterior(solver_or_factory: Any) -> None:
    """On three inpainting problems of the oracle, the output mean moves from the prior mean
    towards the exact posterior mean: the projection of (output − prior) on (posterior − prior),
    relative to the latter's length, is at least ``-GUIDANCE_TOLERANCE``. Not applicable to a
    solver that declares ``ignores_measurement = True`` (factory only)."""
    s = Subject(solver_or_factory, "check_guidance_points_to_posterior")
    s.need_spy()
    if getattr(s.setup().solver, "ignores_measurement", False) is True:
        raise NotApplicable(f"{s.check}: {s.setup().label} declares ignores_measurement = True (it samples the prior)")
    oracle = _oracle("standard")
    solver = s.solver_over(oracle)
    n = solver.schedule.num_steps
    m = SAMPLES // 4
    g = seeded(s.seed * 1000 + 700)
    for p in range(3):
        x = oracle.sample(1, g).float()
        keep = torch.rand((1, *oracle.image_shape), generator=g) < 0.5
        y = MaskOperator(keep, noise_std=0.05).measure(x, g).expand(m, *oracle.image_shape).contiguous()
        op = MaskOperator(keep.expand(m, *oracle.image_shape), noise_std=0.05)
        out = solver.solve(y, op, generator=g).latent.double()
        mu, s2 = oracle.mean.double(), oracle.var.double()
        post = torch.where(keep[0], mu + s2 / (s2 + 0.05**2) * (y[0].double() - mu), mu)
        d = (post - mu).flatten()
        shift = (out.mean(0) - mu).flatten()
        proj = float(shift @ d / (d @ d))
        if proj < -GUIDANCE_TOLERANCE:
            s.fail(observed=f"problem {p}: the output mean moved away from the posterior mean: projection {proj:.3f} of "
                   "(output mean − prior mean) on (posterior mean − prior mean)",
                   expected=f"a projection ≥ {-GUIDANCE_TOLERANCE} (towards the exact posterior mean)",
                   cause="the guidance step has the wrong sign (z + ζ∇‖y − A(D(ẑ0))‖ instead of z − ζ∇...), or the "
                   "residual is taken as A(x) − y and then added. A solver that ignores y on purpose declares "
                   "`ignores_measurement = True`",
                   detail=_repro(n, f"standard oracle, one 50 % inpainting measurement (σ_y = 0.05) repeated {m} times"))


@solver_check
def check_float64_problem_solves_in_float64(solver_or_factory: Any) -> None:
    """A float64 measurement (and float64 start latents) gives float64, finite ``x`` and
    ``latent``, for a full solve and a solve from ``N/2`` (spy oracle, which computes in any
    dtype; factory only: an opaque model may hold float32 weights)."""
    s = Subject(solver_or_factory, "check_float64_problem_solves_in_float64")
    s.need_spy()
    problem = s.need_problem()
    solver = s.setup().solver
    n = solver.schedule.num_steps
    y, op = problem.take([0, 1])
    y = y.double()
    k = max(1, n // 2)
    for what, start in (("a full solve", None),
                        (f"a solve from step {k}", StartPoint(torch.tensor([k, k]), start_latents(s, [k, k], 12, y)))):
        detail = f"2 samples, float64 y, {what}"
        try:
            sol = solver.solve(y, op, start=start, generator=seeded(0))
        except Exception as exc:  # noqa: BLE001 - reported as the observation
            s.fail(observed=f"{what} of a float64 problem raised {type(exc).__name__}: {exc}",
                   expected="float64 results", cause="a buffer, constant or model call fixed to float32 (e.g. "
                   "torch.full(..., dtype=float32) receiving float64 values); create tensors with the dtype of y", detail=detail)
        for field in ("x", "latent"):
            t = getattr(sol, field)
            if t.dtype != torch.float64 or not torch.all(torch.isfinite(t)):
                s.fail(observed=f"{what}: Solution.{field} is {t.dtype}" + ("" if torch.all(torch.isfinite(t)) else " with NaN/Inf"),
                       expected="finite float64", cause="the solve casts to float32 somewhere (a fixed dtype in the loop or "
                       "the start noise)", detail=detail)

