"""The solver checks of the call contract: schedule, call counts and timesteps, start at 0, range
validation, determinism, batch = samples alone, autograd hygiene, inputs and model untouched,
flash() at k = N. The harness is in `harness`, the statistical checks in `statistics`, the doors in
`doors` (their names stay importable from here).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch

from flash_plugin.flash import FlashConfig, FlashSolver, flash
from flash_plugin.protocols import LatentModelSolver, MixedStartSolver
from flash_plugin.types import NoiseSchedule, SeverityEstimate, StartPoint
from flash_plugin.utils.random import randn_per_sample

from .oracles import MaskOperator
from .harness import (
    SOLVER_CHECKS as CHECKS,  # noqa: F401 - the solver checks, by their older name
    NotApplicable,
    Subject,
    check_solution,
    close,
    compare_alone,
    diagnose_calls,
    fmt,
    max_diff,
    seeded,
    seeded_list,
    solver_check,
    start_latents,
)


@solver_check
def check_schedule_is_valid(solver_or_factory: Any) -> None:
    """``schedule`` is a `NoiseSchedule` over ``k = 0..N``: ``N >= 1``, ``a_0 = 1``, ``b_0 = 0``,
    ``ᾱ`` non-increasing in ``k`` with ``ᾱ_N < 1``, timesteps ``>= 0`` for ``k >= 1``, and the same
    schedule on every access."""
    s = Subject(solver_or_factory, "check_schedule_is_valid")
    solver = s.setup().solver
    sched = solver.schedule
    if not isinstance(sched, NoiseSchedule):
        s.fail(observed=f"solver.schedule is a {type(sched).__name__}", expected="a flash_plugin.types.NoiseSchedule",
               cause="build it with NoiseSchedule.from_train_alphas(model.alphas_cumprod, timesteps)")
    n = sched.num_steps
    acp, ts = sched.alphas_cumprod, sched.timesteps
    if n < 1:
        s.fail(observed=f"N = {n} steps", expected="N >= 1", cause="an empty schedule (only the clean level k = 0)")
    try:
        NoiseSchedule(acp.clone(), ts.clone())
    except ValueError as exc:
        s.fail(observed=f"the schedule's tensors no longer validate: {exc}", expected="a valid NoiseSchedule",
               cause="the schedule's tensors were changed in place after construction")
    a0, b0 = float(sched.a[0]), float(sched.b[0])
    if a0 != 1.0 or b0 != 0.0:
        s.fail(observed=f"a_0 = {a0}, b_0 = {b0}", expected="a_0 = 1, b_0 = 0 (k = 0 is the clean level)",
               cause="the schedule is indexed by train timestep instead of by remaining steps k")
    up = (acp[1:] > acp[:-1]).nonzero().flatten()
    if len(up):
        k = int(up[0]) + 1
        s.fail(observed=f"ᾱ_{k} = {acp[k].item():.6g} > ᾱ_{k - 1} = {acp[k - 1].item():.6g}",
               expected="ᾱ_k non-increasing in k (more steps left = more noise)",
               cause="timesteps given in ascending instead of descending order")
    if acp[n] >= 1.0:
        s.fail(observed=f"ᾱ_N = {acp[n].item()}", expected="ᾱ_N < 1", cause="a full solve would start at the clean level")
    if torch.any(ts[1:] < 0):
        s.fail(observed=f"timesteps[1:] = {fmt(ts[1:].tolist())}", expected="non-negative denoiser timesteps for k >= 1",
               cause="timesteps[k] must be the denoiser's timestep of the step taken from level k")
    again = solver.schedule
    if not (isinstance(again, NoiseSchedule) and torch.equal(again.alphas_cumprod, acp) and torch.equal(again.timesteps, ts)):
        s.fail(observed="solver.schedule differs between two accesses", expected="the same schedule",
               cause="the schedule is rebuilt with different values on access (e.g. from mutable state)")


@solver_check
def check_schedule_matches_model(solver_or_factory: Any) -> None:
    """``ᾱ_k`` is the model's ``ᾱ`` at ``timesteps[k]`` for ``k = 1..N`` (spy oracle; factory only):
    the declared noise level of step ``k`` is the one the denoiser is queried at."""
    s = Subject(solver_or_factory, "check_schedule_matches_model")
    oracle = s.need_spy()
    sched = s.setup().solver.schedule
    train = oracle.alphas_cumprod.cpu()
    ts = sched.timesteps
    for k in range(1, sched.num_steps + 1):
        t = int(ts[k])
        if not 0 <= t < len(train):
            s.fail(observed=f"timesteps[{k}] = {t}", expected=f"a train timestep in 0..{len(train) - 1}",
                   cause="the timesteps are not the model's", detail="spy oracle make_oracle() (1000 train steps)")
        declared = float(sched.alphas_cumprod[k])
        if not math.isclose(declared, float(train[t]), rel_tol=1e-9, abs_tol=1e-12):
            nearest = int((train - declared).abs().argmin())
            s.fail(
                observed=f"ᾱ_{k} = {declared:.8g}, but the model's ᾱ at timesteps[{k}] = {t} is {float(train[t]):.8g} "
                f"(the declared value is the model's ᾱ at timestep {nearest})",
                expected="schedule.alphas_cumprod[k] == model.alphas_cumprod[schedule.timesteps[k]]",
                cause="the schedule's levels are shifted against its timesteps (an off-by-one between ᾱ and t); build it with "
                "NoiseSchedule.from_train_alphas(model.alphas_cumprod, timesteps)",
                detail="spy oracle make_oracle() (1000 train steps)",
            )


@solver_check
def check_full_solve(solver_or_factory: Any) -> None:
    """``solve(y, operator)`` (``start=None``) returns a `Solution` with finite ``x``/``latent`` of
    the batch size, ``nfe == N`` and ``start_step == N`` per sample (and, on the spy oracle,
    exactly ``B·N`` denoiser evaluations and ``x`` shaped like the oracle's image)."""
    s = Subject(solver_or_factory, "check_full_solve")
    problem = s.need_problem()
    st = s.setup()
    n = st.solver.schedule.num_steps
    y, op = problem.take([0, 1, 2])
    detail = "3 samples, start=None, generator=torch.Generator().manual_seed(0)"
    sol = st.solver.solve(y, op, generator=seeded(0))
    check_solution(s, sol, batch=3, nfe=[n] * 3, start=[n] * 3, what="a full solve of 3 samples", detail=detail)
    if st.oracle is not None:
        evals = st.oracle.evaluations()
        if len(evals) != 3 * n:
            per = len(evals) / 3
            hint = ("one extra call per sample (off-by-one in the loop bounds)" if per == n + 1 else
                    "one step missing per sample (off-by-one in the loop bounds)" if per == n - 1 else
                    "the denoiser is not run exactly once per step on every sample")
            s.fail(observed=f"{len(evals)} denoiser evaluations (samples x calls) for 3 samples",
                   expected=f"3 x N = {3 * n}", cause=hint, detail=detail)
        want = (3, *st.oracle.image_shape)
        if tuple(sol.x.shape) != want:
            s.fail(observed=f"Solution.x has shape {tuple(sol.x.shape)}", expected=f"{want} (the decoded image)",
                   cause="x must be model.decode(final latent)", detail=detail)


@solver_check
def check_start_makes_k_calls(solver_or_factory: Any) -> None:
    """From a `StartPoint` at step ``k`` the solver evaluates the denoiser exactly ``k`` times per
    sample, at ``schedule.timesteps[k], ..., schedule.timesteps[1]`` in that order, and reports
    ``nfe == start_step == k`` (spy oracle; factory only)."""
    s = Subject(solver_or_factory, "check_start_makes_k_calls")
    oracle = s.need_spy()
    problem = s.need_problem()
    solver = s.setup().solver
    sched = solver.schedule
    n = sched.num_steps
    ts = sched.timesteps.tolist()
    mid = max(1, n // 2)  # first: the most informative diagnosis
    for k in [mid] + sorted({1, min(2, n), n} - {mid}):
        y, op = problem.take([0])
        z = start_latents(s, [k], seed=100 + k, like=y)
        detail = f"one sample, StartPoint(step=[{k}], latent at level {k}) with N = {n}, spy oracle make_oracle()"
        oracle.reset_calls()
        sol = solver.solve(y, op, start=StartPoint(torch.tensor([k]), z), generator=seeded(k))
        seen, want = oracle.evaluations(), ts[1 : k + 1][::-1]
        if seen != want:
            s.fail(observed=f"{len(seen)} denoiser evaluations at timesteps {fmt(seen)}",
                   expected=f"exactly {k} at timesteps {fmt(want)} "
                   + ("(schedule.timesteps[1])" if k == 1 else f"(schedule.timesteps[{k}], ..., schedule.timesteps[1])"),
                   cause=diagnose_calls(seen, want, ts, k), detail=detail)
        check_solution(s, sol, batch=1, nfe=[k], start=[k], what=f"a solve from step {k}", detail=detail)
    k = max(1, n // 2)
    y, op = problem.take([0, 1])
    detail = f"two samples, StartPoint(step=[{k}, {k}]) with N = {n}, spy oracle make_oracle()"
    oracle.reset_calls()
    sol = solver.solve(y, op, start=StartPoint(torch.tensor([k, k]), start_latents(s, [k, k], 7, y)), generator=seeded_list([1, 2]))
    evals = oracle.evaluations()
    if Counter(evals) != Counter(ts[1 : k + 1] * 2):
        s.fail(observed=f"{len(evals)} evaluations for 2 samples at timesteps {fmt(evals)}",
               expected=f"each of the {k} timesteps once per sample ({2 * k} evaluations)",
               cause="the denoiser runs more or less than once per sample and step", detail=detail)
    check_solution(s, sol, batch=2, nfe=[k, k], start=[k, k], what=f"a solve of 2 samples from step {k}", detail=detail)


@solver_check
def check_start_at_zero_decodes_latent(solver_or_factory: Any) -> None:
    """A start at ``k = 0`` makes no denoiser call, reports ``nfe == 0`` and returns the start
    latent and its decoding (spy oracle: identity decoder; a solver object exposing ``model.decode``:
    that decoder)."""
    s = Subject(solver_or_factory, "check_start_at_zero_decodes_latent")
    problem = s.need_problem()
    st = s.setup()
    y, op = problem.take([0, 1])
    z = start_latents(s, [0, 0], seed=5, like=y)
    detail = "two samples, StartPoint(step=[0, 0], latent z)"
    if st.oracle is not None:
        st.oracle.reset_calls()
    sol = st.solver.solve(y, op, start=StartPoint(torch.zeros(2, dtype=torch.long), z.clone()), generator=seeded_list([1, 2]))
    if st.oracle is not None and st.oracle.calls:
        s.fail(observed=f"{len(st.oracle.evaluations())} denoiser evaluations at timesteps {fmt(st.oracle.evaluations())}",
               expected="no denoiser call (k = 0: nothing to denoise)",
               cause="the loop runs once before checking the step count, or a final step/data-consistency pass calls the model",
               detail=detail)
    check_solution(s, sol, batch=2, nfe=[0, 0], start=[0, 0], what="a solve from step 0", detail=detail)
    if not close(sol.latent, z):
        s.fail(observed=f"Solution.latent differs from the start latent (max |diff| = {max_diff(sol.latent, z)})",
               expected="the start latent unchanged", cause="the start latent is rescaled, noised or updated although no step is left",
               detail=detail)
    decode = None
    if st.oracle is not None:
        decode = st.oracle.decode
    elif isinstance(st.solver, LatentModelSolver) and callable(getattr(st.solver.model, "decode", None)):
        decode = st.solver.model.decode
    if decode is not None:
        with torch.no_grad():
            want = decode(z)
        if not close(sol.x, want):
            s.fail(observed=f"Solution.x differs from model.decode(start latent) (max |diff| = {max_diff(sol.x, want)})",
                   expected="x = model.decode(z) for k = 0", cause="x is not the decoding of the returned latent", detail=detail)


@solver_check
def check_out_of_range_start_raises(solver_or_factory: Any) -> None:
    """A start step outside ``0..N`` (``N + 1``, ``-1``, or one bad sample in a batch) raises a
    ``ValueError`` (e.g. `flash_plugin.errors.StartStepError`) before any work."""
    s = Subject(solver_or_factory, "check_out_of_range_start_raises")
    problem = s.need_problem()
    solver = s.setup().solver
    n = solver.schedule.num_steps
    for steps, desc in (([n + 1], "N + 1"), ([-1], "-1"), ([1, n + 1], "[1, N + 1] (the second sample out of range)")):
        y, op = problem.take(range(len(steps)))
        z = torch.zeros((len(steps), *s.latent_shape()), dtype=y.dtype, device=y.device)
        detail = f"StartPoint(step={steps}) with N = {n}"
        try:
            sol = solver.solve(y, op, start=StartPoint(torch.tensor(steps), z), generator=seeded(0))
        except ValueError:
            continue
        except Exception as exc:  # noqa: BLE001 - reported as the observation
            s.fail(observed=f"start step {desc} raised {type(exc).__name__}: {exc}",
                   expected="a ValueError subclass such as flash_plugin.errors.StartStepError",
                   cause="the start steps are not validated up front, so the bad step fails somewhere inside; call "
                   "schedule.check_steps(start.step) first", detail=detail)
        else:
            s.fail(observed=f"start step {desc} returned a Solution (nfe={getattr(sol, 'nfe', '?')!s})",
                   expected="a ValueError subclass such as flash_plugin.errors.StartStepError",
                   cause="the start steps are not validated (negative indices wrap around, large ones are clipped); call "
                   "schedule.check_steps(start.step)", detail=detail)


@solver_check
def check_deterministic_given_seed(solver_or_factory: Any) -> None:
    """The same generator seed gives bit-identical ``x`` and ``latent`` (full solve and a solve from
    an intermediate step, twice on the same solver)."""
    s = Subject(solver_or_factory, "check_deterministic_given_seed")
    problem = s.need_problem()
    solver = s.setup().solver
    n = solver.schedule.num_steps
    y, op = problem.take([0, 1])
    k = max(1, n // 2)
    z = start_latents(s, [k, k], seed=9, like=y)
    runs = (("a full solve", None), (f"a solve from step {k}", StartPoint(torch.tensor([k, k]), z)))
    for what, start in runs:
        detail = f"2 samples, {what}, generator=torch.Generator().manual_seed(0), solved twice"
        a = solver.solve(y, op, start=start, generator=seeded(0))
        b = solver.solve(y, op, start=start, generator=seeded(0))
        for field in ("x", "latent"):
            if not torch.equal(getattr(a, field), getattr(b, field)):
                s.fail(observed=f"{what} twice with the same seed: Solution.{field} max |diff| = "
                       f"{max_diff(getattr(a, field), getattr(b, field))}",
                       expected="bit-identical results",
                       cause="random numbers drawn from torch's global RNG instead of the given generator, or state kept "
                       "between solves (caches, counters, in-place changes of the solver or the model)", detail=detail)


@solver_check
def check_seed_changes_output(solver_or_factory: Any) -> None:
    """Full solves with different generator seeds give different results (the generator is used)."""
    s = Subject(solver_or_factory, "check_seed_changes_output")
    problem = s.need_problem()
    solver = s.setup().solver
    y, op = problem.take([0, 1])
    a = solver.solve(y, op, generator=seeded(0))
    b = solver.solve(y, op, generator=seeded(1))
    if torch.equal(a.x, b.x):
        s.fail(observed="identical x for generator seeds 0 and 1", expected="different samples from different seeds",
               cause="the generator is ignored: a fixed internal seed, or the initial noise is not drawn from it",
               detail="2 samples, full solves with torch.Generator().manual_seed(0) and manual_seed(1)")


@solver_check
def check_batch_matches_samples_alone(solver_or_factory: Any) -> None:
    """A batch solved with one generator per sample equals its samples solved one by one with the
    same generators (full solve)."""
    s = Subject(solver_or_factory, "check_batch_matches_samples_alone")
    problem = s.need_problem()
    solver = s.setup().solver
    idx, seeds = [0, 1, 2], [10, 11, 12]
    y, op = problem.take(idx)
    detail = "3 samples, start=None, generator=[torch.Generator().manual_seed(s) for s in (10, 11, 12)], then each alone"
    sol = solver.solve(y, op, generator=seeded_list(seeds))
    compare_alone(s, sol, idx, problem, None, None, seeds, detail)


@solver_check
def check_mixed_start_batch_matches_samples_alone(solver_or_factory: Any) -> None:
    """For a `MixedStartSolver`: a batch with different start steps (``N``, ``0``, ``N//3``, ``1``)
    equals its samples solved alone (per-sample generators), reports ``nfe == start_step == k_i``
    and (spy oracle) runs the denoiser on active samples only (total evaluations = sum of starts)."""
    s = Subject(solver_or_factory, "check_mixed_start_batch_matches_samples_alone")
    solver = s.setup().solver
    if not (isinstance(solver, MixedStartSolver) and getattr(solver, "supports_mixed_starts", False) is True):
        raise NotApplicable(
            f"{s.check}: {s.setup().label} does not declare supports_mixed_starts = True (the MixedStartSolver "
            "capability); flash() solves it one group of equal start steps at a time, so it never gets mixed starts"
        )
    problem = s.need_problem()
    n = solver.schedule.num_steps
    starts, idx, seeds = [n, 0, max(1, n // 3), 1], [0, 1, 2, 3], [20, 21, 22, 23]
    y, op = problem.take(idx)
    z = start_latents(s, starts, seed=33, like=y)
    detail = f"4 samples, StartPoint(step={starts}) with N = {n}, generator=[manual_seed(s) for s in {seeds}], then each alone"
    oracle = s.setup().oracle
    if oracle is not None:
        oracle.reset_calls()
    sol = solver.solve(y, op, start=StartPoint(torch.tensor(starts), z.clone()), generator=seeded_list(seeds))
    if oracle is not None:
        ts = solver.schedule.timesteps.tolist()
        want = Counter(t for k0 in starts for t in ts[1 : k0 + 1])
        got = Counter(oracle.evaluations())
        if got != want:
            total, need = sum(got.values()), sum(starts)
            extra, missing = sorted((got - want).elements()), sorted((want - got).elements())
            if total > need:
                cause = ("the denoiser runs on inactive samples too (samples must join when the loop reaches their start "
                         "step), or makes calls beyond one per step")
            elif total < need:
                cause = "samples skip steps: a sample must be evaluated at every level from its own start down to 1"
            else:
                cause = ("the right number of evaluations at the wrong timesteps: a sample joining at step k_i must be "
                         "evaluated at timesteps[k_i], ..., timesteps[1] (its own levels, not the batch's)")
            s.fail(observed=f"{total} denoiser evaluations in total; timesteps evaluated too often: {fmt(extra)}, "
                   f"too rarely: {fmt(missing)}",
                   expected=f"{need} = the sum of the starts, sample i evaluated at timesteps[k_i], ..., timesteps[1]",
                   cause=cause, detail=detail)
    check_solution(s, sol, batch=4, nfe=starts, start=starts, what="a mixed-start solve", detail=detail)
    compare_alone(s, sol, idx, problem, starts, z, seeds, detail)


@solver_check
def check_no_autograd_graph(solver_or_factory: Any) -> None:
    """``Solution.x`` and ``latent`` carry no autograd graph (``requires_grad`` False, no
    ``grad_fn``) and ``solve`` leaves torch's grad mode as it found it."""
    s = Subject(solver_or_factory, "check_no_autograd_graph")
    problem = s.need_problem()
    solver = s.setup().solver
    n = solver.schedule.num_steps
    y, op = problem.take([0, 1])
    k = max(1, n // 2)
    before = torch.is_grad_enabled()
    try:
        for what, start in (("a full solve", None), (f"a solve from step {k}", StartPoint(torch.tensor([k, k]), start_latents(s, [k, k], 4, y)))):
            sol = solver.solve(y, op, start=start, generator=seeded(0))
            for field in ("x", "latent"):
                t = getattr(sol, field)
                if t.requires_grad or t.grad_fn is not None:
                    s.fail(observed=f"{what}: Solution.{field} requires_grad={t.requires_grad}, grad_fn={t.grad_fn}",
                           expected="detached tensors", cause="the result keeps the autograd graph of the guidance steps "
                           "(memory grows with every solve); return .detach()ed tensors", detail=f"2 samples, {what}")
            if torch.is_grad_enabled() != before:
                s.fail(observed=f"grad mode {'enabled' if torch.is_grad_enabled() else 'disabled'} after {what}",
                       expected=f"grad mode {'enabled' if before else 'disabled'}, as before the call",
                       cause="torch.set_grad_enabled(...) called without restoring it; use `with torch.no_grad():` / "
                       "`with torch.enable_grad():` blocks", detail=f"2 samples, {what}")
    finally:
        torch.set_grad_enabled(before)


@solver_check
def check_works_under_no_grad(solver_or_factory: Any) -> None:
    """A solve called inside ``torch.no_grad()`` works and gives the same result as outside
    (guidance must enable gradients itself)."""
    s = Subject(solver_or_factory, "check_works_under_no_grad")
    problem = s.need_problem()
    solver = s.setup().solver
    y, op = problem.take([0, 1])
    detail = "2 samples, full solve with torch.Generator().manual_seed(3), once normally and once under torch.no_grad()"
    ref = solver.solve(y, op, generator=seeded(3))
    try:
        with torch.no_grad():
            out = solver.solve(y, op, generator=seeded(3))
    except Exception as exc:  # noqa: BLE001 - reported as the observation
        s.fail(observed=f"under torch.no_grad() solve raised {type(exc).__name__}: {exc}",
               expected="the same result as with gradients enabled",
               cause="the guidance gradient is computed without `with torch.enable_grad():` (callers often run "
               "inference under torch.no_grad())", detail=detail)
    for field in ("x", "latent"):
        if not close(getattr(out, field), getattr(ref, field)):
            s.fail(observed=f"under torch.no_grad() Solution.{field} differs (max |diff| = "
                   f"{max_diff(getattr(out, field), getattr(ref, field))})",
                   expected="the same result as with gradients enabled",
                   cause="the guidance is silently skipped when gradients are disabled; wrap it in `with torch.enable_grad():`",
                   detail=detail)


def _model_state(model: torch.nn.Module) -> dict[str, Any]:
    """A comparable snapshot: small tensors cloned, large ones fingerprinted; grad flags; modes."""

    def print_(t: torch.Tensor) -> Any:
        t = t.detach()
        if t.numel() <= 100_000:
            return t.cpu().clone()
        d = t.double()
        return (tuple(t.shape), float(d.sum()), float(d.abs().sum()), float((d * d).sum()))

    state: dict[str, Any] = {}
    for name, p in model.named_parameters():
        state[f"parameter {name}"] = print_(p)
        state[f"parameter {name}.requires_grad"] = p.requires_grad
        state[f"parameter {name}.grad"] = None if p.grad is None else "set"
    for name, b in model.named_buffers():
        state[f"buffer {name}"] = print_(b)
    for name, m in model.named_modules():
        state[f"module {name or '<root>'}.training"] = m.training
    return state


def _state_diff(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    changed = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key, "<missing>"), after.get(key, "<missing>")
        same = (torch.equal(a, b) if a.shape == b.shape else False) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) else a == b
        if not same:
            changed.append(key if isinstance(a, torch.Tensor) else f"{key}: {a} -> {b}")
    return changed


@solver_check
def check_model_unchanged(solver_or_factory: Any) -> None:
    """Solving changes none of the model's parameters, buffers, ``requires_grad`` flags or
    train/eval modes, and leaves no ``.grad`` on its parameters (spy oracle, whose ``gain``
    parameter requires grad like an unfrozen diffusers model; or a solver's ``torch.nn.Module``
    model)."""
    s = Subject(solver_or_factory, "check_model_unchanged")
    st = s.setup()
    if st.oracle is not None:
        model = st.oracle
    elif isinstance(st.solver, LatentModelSolver) and isinstance(st.solver.model, torch.nn.Module):
        model = st.solver.model
    else:
        raise NotApplicable(f"{s.check}: {st.label} exposes no torch.nn.Module model to inspect; pass a factory make(model) -> Solver")
    problem = s.need_problem()
    n = st.solver.schedule.num_steps
    y, op = problem.take([0, 1])
    k = max(1, n // 2)
    before = _model_state(model)
    st.solver.solve(y, op, generator=seeded(0))
    st.solver.solve(y, op, start=StartPoint(torch.tensor([k, k]), start_latents(s, [k, k], 6, y)), generator=seeded(1))
    changed = _state_diff(before, _model_state(model))
    if changed:
        grads = [c for c in changed if c.endswith("grad: None -> set")]
        cause = ("loss.backward() reaches the model's parameters (they accumulate .grad on every solve); take the guidance "
                 "gradient with torch.autograd.grad(loss, z) instead") if grads else (
                 "the solver writes into the model (in-place updates, requires_grad_() or train()/eval() during solve)")
        s.fail(observed=f"after a full solve and a solve from step {k}, changed: {', '.join(changed[:6])}"
               + (f" (+{len(changed) - 6} more)" if len(changed) > 6 else ""),
               expected="the model untouched", cause=cause, detail="2 samples, a full solve then a solve from step N // 2")


@solver_check
def check_inputs_not_modified(solver_or_factory: Any) -> None:
    """``solve`` modifies neither ``y``, nor the operator's mask (`MaskOperator`), nor the
    `StartPoint`'s ``latent`` and ``step`` in place: their values and their version counters
    (``_version``, which counts in-place writes) are unchanged. ``y`` is scaled beyond ``[-1, 1]``
    so that an in-place clamp or normalisation would change it."""
    s = Subject(solver_or_factory, "check_inputs_not_modified")
    problem = s.need_problem()
    solver = s.setup().solver
    n = solver.schedule.num_steps
    y, op = problem.take([0, 1])
    y = 2.0 * y + 0.25 * y.abs().max().clamp_min(0.5)  # some |y| > 1: a clamp or rescale would show
    k = max(1, n // 2)
    start = StartPoint(torch.tensor([k, k]), start_latents(s, [k, k], 8, y))
    watched = {"y": y, "StartPoint.latent": start.latent, "StartPoint.step": start.step}
    if isinstance(op, MaskOperator):
        watched["operator.mask"] = op.mask
    before = {name: (t.clone(), t._version) for name, t in watched.items()}
    solver.solve(y, op, generator=seeded(0))
    solver.solve(y, op, start=start, generator=seeded(1))
    for name, t in watched.items():
        value, version = before[name]
        if t._version != version or not torch.equal(t, value):
            s.fail(observed=f"{name} was modified in place by solve() (version counter {version} -> {t._version}"
                   + ("" if torch.equal(t, value) else f", max |change| = {max_diff(t, value):.3g}") + ")",
                   expected="inputs left untouched",
                   cause="an in-place operation (clamp_, div_, requires_grad_ on a leaf that is then updated, z[...] = ...) "
                   "on the caller's tensor; clone() it first", detail=f"2 samples, a full solve then a solve from step {k}")


class _StubEstimator:
    """Severity estimator stand-in: ``ẑ = 0`` and ``σ̂² = 0.5``; metadata ``{}``."""

    def __init__(self, latent_shape: tuple[int, ...]):
        self.latent_shape = latent_shape
        self.metadata: dict[str, Any] = {}

    def estimate(self, y: torch.Tensor) -> SeverityEstimate:
        b = y.shape[0]
        latent = torch.zeros((b, *self.latent_shape), device=y.device, dtype=y.dtype)
        return SeverityEstimate(latent=latent, variance=torch.full((b,), 0.5, dtype=torch.float64, device=y.device))


def _force_full_cause(s: Subject, y: torch.Tensor, op: Any, make_gen: Any) -> str:
    """Why flash() at k = N differs from the unwrapped solver: the generator is not used, the start
    at N is transformed, or the initial noise is drawn another way than flash() draws it."""
    solver = s.setup().solver
    if not torch.equal(solver.solve(y, op, generator=make_gen()).latent, solver.solve(y, op, generator=make_gen()).latent):
        return ("the solver does not draw its random numbers from the given generator (torch's global RNG?), so no two "
                "runs agree")
    oracle = s.setup().oracle
    if oracle is not None:
        n = solver.schedule.num_steps
        g = make_gen()
        noise = randn_per_sample((y.shape[0], *s.latent_shape()), g, device=y.device, dtype=y.dtype)
        with oracle.recording_inputs():
            solver.solve(y, op, start=StartPoint(torch.full((y.shape[0],), n), noise.clone()), generator=g)
        if not oracle.inputs or not close(oracle.inputs[0], noise):
            return ("a StartPoint at k = N is transformed (re-noised or rescaled) or ignored: the first denoiser input is not "
                    "the given latent; at k = N the solver must start from it exactly as from its own noise")
    return ("flash() draws the start noise with flash_plugin.randn_per_sample((B, *latent_shape), generator) and passes "
            "StartPoint(N, noise): a full solve must draw its initial latent the same way (first use of the generator)")


@solver_check
def check_flash_force_full_is_identity(solver_or_factory: Any) -> None:
    """``flash(solver, estimator, FlashConfig(force_step=N))`` returns bit for bit what the
    unwrapped solver returns for the same seed (one generator and per-sample generators)."""
    s = Subject(solver_or_factory, "check_flash_force_full_is_identity")
    solver = s.setup().solver
    if isinstance(solver, FlashSolver):
        raise NotApplicable(f"{s.check}: {s.setup().label} is already a FlashSolver (flash() refuses to wrap it twice)")
    problem = s.need_problem()
    n = solver.schedule.num_steps
    y, op = problem.take([0, 1, 2])
    flashed = flash(solver, _StubEstimator(s.latent_shape()), FlashConfig(force_step=n))
    for desc, make_gen in (("torch.Generator().manual_seed(7)", lambda: seeded(7)),
                           ("per-sample generators seeded [7, 8, 9]", lambda: seeded_list([7, 8, 9]))):
        detail = f"3 samples, {desc}, flash(solver, <stub estimator>, FlashConfig(force_step=N = {n})) vs solver.solve"
        a = flashed(y, op, generator=make_gen())
        b = solver.solve(y, op, generator=make_gen())
        for field in ("x", "latent", "nfe"):
            if not torch.equal(getattr(a, field), getattr(b, field)):
                s.fail(observed=f"Solution.{field} of the flashed solver differs from the unwrapped one"
                       + (f" (max |diff| = {max_diff(getattr(a, field), getattr(b, field))})" if field != "nfe"
                          else f" ({a.nfe.tolist()} vs {b.nfe.tolist()})"),
                       expected="bit-identical results at k = N",
                       cause=_force_full_cause(s, y, op, make_gen), detail=detail)


_DOOR_NAMES = ("CheckFailure", "CheckResult", "Problem", "SolverCase", "check_solver", "format_results",
               "parametrize_with_checks")


def __getattr__(name: str) -> Any:
    # The doors lived in this module before the harness / checks / doors split.
    if name in _DOOR_NAMES:
        from . import doors

        return getattr(doors, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
