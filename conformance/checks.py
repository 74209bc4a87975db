"""The conformance checks of a `Solver`, and the three doors over them.

In the style of scikit-learn's ``check_estimator`` (DESIGN.md, section 11):

* `check_solver(solver_or_factory)` runs every check and returns one `CheckResult` per check
  (no pytest needed);
* `parametrize_with_checks([...])` is a ``pytest.mark.parametrize`` decorator giving one test
  per solver x check (ids ``"<Solver>-<check name>"``, selectable with ``-k``);
* ``flash-plugin check module:factory`` (`flash_plugin.commands.check`) on the command line.

What a check gets. Either a *factory* ``make(model) -> Solver`` (a function, a lambda or a solver
class taking the model first): the check builds a fresh seeded `SpyOracle` (the analytic
Gaussian model that records every denoiser call) and a fresh solver over it for every check, so
the spy checks can count and time the denoiser calls. Or a *solver object*: its model is opaque,
only the black-box checks run and the others report "not applicable" with the reason. The
black-box checks need a measurement: it is built from ``solver.model.latent_shape`` /
``image_shape`` when the solver exposes its model (`LatentModelSolver`), else pass one with
``problem=Problem(y, operator)`` (or a `SolverCase`). Checks never set attributes on the object
they are given; they call ``solve`` (and ``flash()`` on it).

Each check is a plain function ``check_<property>(solver_or_factory)`` listed in `CHECKS`. It
returns ``None`` when the property holds, raises `CheckFailure` (an ``AssertionError``) whose
message says what was observed, what was expected, the likely cause and how to reproduce, and
raises `NotApplicable` (a ``unittest.SkipTest``, so pytest reports a skip with the reason) when it
does not apply. Expected failures are data: ``{check_name: reason}``.

Cost. Every check solves a handful of times (up to ~10 solves of 1-4 samples), so give factories a
small ``num_steps`` (10-20): on the oracle a step costs well under a millisecond, but a solver
left at its default of 500-1000 steps makes a full run take tens of seconds.
"""

from __future__ import annotations

import math
import traceback
import unittest
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, NoReturn

import torch

from flash_plugin.errors import FlashInputError
from flash_plugin.flash import FlashConfig, FlashSolver, flash
from flash_plugin.protocols import LatentModelSolver, MixedStartSolver, Solver
from flash_plugin.types import NoiseSchedule, SeverityEstimate, Solution, StartPoint

from .oracles import MaskOperator, SpyOracle, make_oracle, make_oracle_problem

__all__ = [
    "CHECKS",
    "CheckFailure",
    "CheckResult",
    "NotApplicable",
    "Problem",
    "SolverCase",
    "check_solver",
    "format_results",
    "parametrize_with_checks",
]

Status = Literal["passed", "failed", "xfail", "not applicable"]

# Tolerance for "the same result" computed in two different ways (batch vs alone, grad vs no_grad).
# The reference loop is bit-exact; guided solvers may reorder float reductions.
RTOL, ATOL = 1e-4, 1e-5


# ----------------------------------------------------------------------------------------------
# Data types
# ----------------------------------------------------------------------------------------------
class NotApplicable(unittest.SkipTest):
    """A check does not apply to the given solver (the message says why); pytest reports a skip."""


class CheckFailure(AssertionError):
    """A check found a violated property (the message: observed, expected, likely cause, reproduce)."""


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one check.

    Attributes:
        name: the check's name, e.g. ``"check_full_solve"``.
        status: ``"passed"``, ``"failed"``, ``"xfail"`` (failed, listed in expected failures) or
            ``"not applicable"``.
        message: why it failed / did not apply / was expected to fail; a note when a check listed
            as an expected failure passed; else empty.
    """

    name: str
    status: Status
    message: str = ""

    @property
    def ok(self) -> bool:
        """Everything but ``"failed"``."""
        return self.status != "failed"


@dataclass(frozen=True)
class Problem:
    """A measurement for the black-box checks of a solver object whose model is opaque.

    Attributes:
        y: measurements ``(B, ...)`` the solver accepts (``B >= 1``; checks take sub-batches and
            cycle through the samples when they need more than ``B``).
        operator: the operator of ``y``; its ``select(index)`` is used for sub-batches when it has
            one, else it is shared by all samples.
        latent_shape: the solver's latent shape (without batch); found by one full solve if ``None``.
    """

    y: torch.Tensor
    operator: Any
    latent_shape: tuple[int, ...] | None = None

    def take(self, index: Sequence[int]) -> tuple[torch.Tensor, Any]:
        """``(y, operator)`` of the samples ``index`` (modulo ``B``)."""
        b = self.y.shape[0]
        idx = torch.as_tensor(list(index), dtype=torch.long) % b
        op = self.operator
        if op is not None and getattr(type(op), "select", None) is not None:
            op = op.select(idx)
        return self.y[idx.to(self.y.device)], op


@dataclass(frozen=True)
class SolverCase:
    """A solver or factory with what the checks need to know about it.

    Attributes:
        solver: a `Solver` object, or a factory ``make(model) -> Solver``.
        name: the name in test ids and reports (default: the solver's class name).
        problem: a measurement for the black-box checks (see `Problem`).
        expected_failures: ``{check_name: reason}``.
    """

    solver: Any
    name: str | None = None
    problem: Problem | None = None
    expected_failures: Mapping[str, str] | None = None


# ----------------------------------------------------------------------------------------------
# What a check works on
# ----------------------------------------------------------------------------------------------
def _is_factory(target: Any) -> bool:
    if isinstance(target, type):  # a solver class is a factory make(model) -> Solver
        return True
    if isinstance(target, Solver):
        return False
    if callable(target):
        return True
    raise TypeError(
        f"expected a Solver (an object with `schedule` and `solve(y, operator, *, start=None, generator=None)`) "
        f"or a factory make(model) -> Solver, got {type(target).__name__}"
    )


def _target_text(target: Any) -> str:
    """How a reproduce line names the solver or factory."""
    if isinstance(target, type) or (callable(target) and not isinstance(target, Solver)):
        qual = getattr(target, "__qualname__", "") or ""
        mod = getattr(target, "__module__", "") or ""
        if "<lambda>" in qual or "<locals>" in qual:
            code = getattr(target, "__code__", None)
            where = f" defined at {code.co_filename}:{code.co_firstlineno}" if code is not None else ""
            return f"<your factory{where}>"
        return f"{mod}.{qual}" if mod else qual
    return f"<your {type(target).__name__} object>"


def _cli_target(target: Any) -> str | None:
    qual = getattr(target, "__qualname__", "") or ""
    mod = getattr(target, "__module__", "") or ""
    if not mod or not qual or "<" in qual or mod == "__main__":
        return None
    return f"{mod}:{qual}"


@dataclass
class _Setup:
    solver: Any
    oracle: SpyOracle | None
    problem: Problem | None
    no_problem_reason: str
    label: str


class _Subject:
    """One check's view of the object under test (built afresh for every check)."""

    def __init__(self, obj: Any, check: str):
        self.case = obj if isinstance(obj, SolverCase) else SolverCase(obj)
        self.target = self.case.solver
        self.check = check
        self.is_factory = _is_factory(self.target)
        self._latent_shape: tuple[int, ...] | None = None
        self._setup: _Setup | None = None

    # -- building ---------------------------------------------------------------------------
    def setup(self) -> _Setup:
        if self._setup is not None:
            return self._setup
        if self.is_factory:
            oracle = make_oracle()
            solver = self.target(oracle)
            if not isinstance(solver, Solver):
                self.fail(observed=f"the factory returned a {type(solver).__name__}, which is not a Solver",
                          expected="an object satisfying flash_plugin.protocols.Solver (`schedule` and "
                          "`solve(y, operator, *, start=None, generator=None)`)",
                          cause="the factory must take the model and return the solver, e.g. "
                          "`lambda model: MySolver(model, num_steps=20)`")
            problem = self.case.problem
            if problem is None:
                y, op = make_oracle_problem(oracle)
                problem = Problem(y, op, tuple(oracle.latent_shape))
            oracle.reset_calls()
            label = self.case.name or _short_repr(solver)
            self._setup = _Setup(solver, oracle, problem, "", label)
        else:
            solver = self.target
            problem, reason = self.case.problem, ""
            if problem is None:
                problem, reason = _problem_from_model(solver)
            self._setup = _Setup(solver, None, problem, reason, self.case.name or _short_repr(solver))
        return self._setup

    def need_spy(self) -> SpyOracle:
        st = self.setup()
        if st.oracle is None:
            raise NotApplicable(
                f"{self.check} spies on the denoiser calls, which needs a factory make(model) -> Solver so that a spy "
                f"model can be injected; {st.label} is a solver object whose model is opaque. "
                "Pass e.g. `lambda model: MySolver(model, num_steps=20)` to run it."
            )
        return st.oracle

    def need_problem(self) -> Problem:
        st = self.setup()
        if st.problem is None:
            raise NotApplicable(f"{self.check} needs a measurement: {st.no_problem_reason}")
        return st.problem

    def latent_shape(self) -> tuple[int, ...]:
        if self._latent_shape is None:
            problem = self.need_problem()
            if problem.latent_shape is not None:
                self._latent_shape = tuple(problem.latent_shape)
            else:  # learn it from one full solve
                y, op = problem.take([0])
                sol = self.setup().solver.solve(y, op, generator=_gen(0))
                self._latent_shape = tuple(sol.latent.shape[1:])
        return self._latent_shape

    # -- reporting --------------------------------------------------------------------------
    def reproduce(self, detail: str = "") -> str:
        extra = ", problem=..." if self.case.problem is not None else ""
        line = f"flash_plugin.conformance.check_solver({_target_text(self.target)}{extra}, checks=[{self.check!r}])"
        cli = _cli_target(self.target) if self.is_factory and self.case.problem is None else None
        if cli is not None:
            line += f"  or  flash-plugin check {cli} --check {self.check}"
        if detail:
            line += f"\n      setting: {detail}"
        return line

    def fail(self, *, observed: str, expected: str, cause: str, detail: str = "") -> NoReturn:
        st = self._setup
        label = st.label if st is not None else _target_text(self.target)
        raise CheckFailure(
            f"{self.check} failed for {label}\n"
            f"  observed: {observed}\n"
            f"  expected: {expected}\n"
            f"  likely cause: {cause}\n"
            f"  reproduce: {self.reproduce(detail)}"
        )


def _short_repr(obj: Any, limit: int = 120) -> str:
    try:
        text = repr(obj)
    except Exception:  # a broken __repr__ must not hide the check's result
        text = f"<{type(obj).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _problem_from_model(solver: Any) -> tuple[Problem | None, str]:
    """A masked measurement shaped by ``solver.model.image_shape`` (`LatentModelSolver`)."""
    hint = (
        "pass problem=Problem(y, operator) (or SolverCase(solver, problem=...)), or a factory make(model) -> Solver "
        "so that the checks can inject a model"
    )
    if not isinstance(solver, LatentModelSolver):
        return None, f"the solver does not expose its model (LatentModelSolver), so its image shape is unknown; {hint}"
    model = solver.model
    latent_shape, image_shape = getattr(model, "latent_shape", None), getattr(model, "image_shape", None)
    if latent_shape is None or image_shape is None:
        return None, f"the solver's model has no `latent_shape` / `image_shape`; {hint}"
    device = getattr(model, "device", None)
    device = device if isinstance(device, torch.device) else torch.device("cpu")
    g = _gen(1234)
    x = (2 * torch.rand((4, *image_shape), generator=g) - 1).to(device)
    op = MaskOperator.random(4, tuple(image_shape), generator=g, device=device)
    return Problem(op.measure(x, g), op, tuple(latent_shape)), ""


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _gens(seeds: Iterable[int]) -> list[torch.Generator]:
    return [_gen(s) for s in seeds]


def _fmt(values: Sequence[Any], limit: int = 8) -> str:
    values = list(values)
    if len(values) <= limit:
        return str(values)
    head = ", ".join(map(str, values[: limit // 2]))
    tail = ", ".join(map(str, values[-(limit // 2):]))
    return f"[{head}, ..., {tail}] ({len(values)} entries)"


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double().cpu() - b.detach().double().cpu()).abs().max()) if a.numel() else 0.0


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.detach().double().cpu(), b.detach().double().cpu(), rtol=RTOL, atol=ATOL)


def _latents(s: _Subject, steps: Sequence[int], seed: int, like: torch.Tensor) -> torch.Tensor:
    """Start latents: the oracle's exact marginal at each level, else standard normal."""
    shape = s.latent_shape()
    g = _gen(seed)
    noise = torch.randn((len(steps), *shape), generator=g, dtype=torch.float64)
    oracle = s.setup().oracle
    if oracle is not None:
        sched = s.setup().solver.schedule
        acp = sched.alphas_cumprod[torch.as_tensor(list(steps), dtype=torch.long)].view(-1, *[1] * len(shape))
        mean, var = oracle.mean.cpu(), oracle.var.cpu()
        noise = acp.sqrt() * mean + (acp * var + 1 - acp).sqrt() * noise
    return noise.to(device=like.device, dtype=like.dtype)


def _check_solution(s: _Subject, sol: Any, *, batch: int, nfe: Sequence[int], start: Sequence[int], what: str,
                    detail: str) -> None:
    """Type, shapes, finiteness, ``nfe`` and ``start_step`` of a `Solution`."""
    if not isinstance(sol, Solution):
        s.fail(observed=f"{what} returned a {type(sol).__name__}", expected="a flash_plugin.types.Solution",
               cause="solve() must return Solution(x, latent, nfe, start_step, ...)", detail=detail)
    for field in ("x", "latent"):
        t = getattr(sol, field)
        if not isinstance(t, torch.Tensor) or t.ndim < 2 or t.shape[0] != batch:
            s.fail(observed=f"{what}: Solution.{field} has shape {tuple(getattr(t, 'shape', ()))}",
                   expected=f"a batched tensor with {batch} samples", cause="the batch dimension is lost or reordered",
                   detail=detail)
        if not torch.all(torch.isfinite(t)):
            s.fail(observed=f"{what}: Solution.{field} contains NaN or Inf", expected="finite values",
                   cause="a division by b_k = 0 or a_k = 0 at the ends of the schedule, or a diverging guidance step",
                   detail=detail)
    for field, want in (("nfe", nfe), ("start_step", start)):
        t = getattr(sol, field)
        if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or tuple(t.shape) != (batch,):
            s.fail(observed=f"{what}: Solution.{field} = {t!r}", expected=f"an integer tensor of shape ({batch},)",
                   cause=f"Solution.{field} is reported per sample", detail=detail)
        if t.tolist() != list(want):
            cause = ("the NFE is not counted per sample (a denoiser evaluation of a sample counts once for that sample)"
                     if field == "nfe" else "the start step of each sample must be reported as given (N for start=None)")
            s.fail(observed=f"{what}: Solution.{field} = {t.tolist()}", expected=f"{list(want)}", cause=cause, detail=detail)


def _diagnose_calls(seen: list[int], want: list[int], timesteps: list[int], k: int) -> str:
    """A likely cause for denoiser timesteps ``seen`` instead of ``want``."""
    if not seen:
        return "the solver made no denoiser call: does it call the model's eps(z, t)? (the spy records model.eps only)"
    if len(seen) == len(want) + 1:
        if seen == timesteps[1 : k + 2][::-1]:
            return ("the solve starts one step too early, at schedule.timesteps[k + 1], and makes k + 1 steps (an off-by-one "
                    "between the start step and the loop); a solve from step k must begin at schedule.timesteps[k]")
        if seen[1:] == want and seen[:-1] == want:
            return "one extra denoiser call, before the first or after the last step (off-by-one in the loop bounds)"
        if seen[1:] == want:
            return "one extra denoiser call before the first step (e.g. the start latent is denoised once more, or the loop runs k + 1 times)"
        if seen[:-1] == want:
            return "one extra denoiser call after the last step (e.g. the loop runs down to k = 0 inclusive, or the result is re-denoised)"
        return "one extra denoiser call (off-by-one in the loop bounds)"
    if len(seen) + 1 == len(want):
        return "one step missing: the loop makes k - 1 steps (off-by-one: it starts at step k - 1 or stops before step 1)"
    if len(seen) == len(want):
        up = timesteps[2 : k + 2][::-1]
        if seen == up:
            return ("the start is off by one: a solve from step k began at schedule.timesteps[k + 1] (the off-by-one of the "
                    "CompVis DDIM truncation); the first call must be at schedule.timesteps[k]")
        down = timesteps[0:k][::-1]
        if seen == down:
            return "the steps are shifted by one level: the denoiser is called at schedule.timesteps[k - 1], ..., [0]"
        return "the denoiser is called at timesteps that are not the schedule's (schedule.timesteps must be what solve() uses)"
    if len(want) and len(seen) % len(want) == 0:
        return f"{len(seen) // len(want)} denoiser calls per step: a solve from step k must make exactly k (one per step)"
    return "a solve that starts at step k must evaluate the denoiser exactly k times, at the schedule's last k timesteps, in order"


def _compare_alone(s: _Subject, batch_sol: Solution, idx: Sequence[int], problem: Problem,
                   starts: Sequence[int] | None, latents: torch.Tensor | None, seeds: Sequence[int], detail: str) -> None:
    solver = s.setup().solver
    for i, j in enumerate(idx):
        yi, opi = problem.take([j])
        start = None if starts is None else StartPoint(torch.tensor([starts[i]]), latents[i : i + 1].clone())
        alone = solver.solve(yi, opi, start=start, generator=_gens([seeds[i]]))
        for field in ("x", "latent"):
            a, b = getattr(batch_sol, field)[i : i + 1], getattr(alone, field)
            if not _close(a, b):
                s.fail(
                    observed=f"sample {i} of the batch differs from the same sample solved alone: Solution.{field} max |diff| = "
                    f"{_max_diff(a, b) if a.shape == b.shape else 'shape ' + str(tuple(b.shape))}",
                    expected=f"equal results (rtol={RTOL}, atol={ATOL}) given the same per-sample generator",
                    cause="something batch-wide: a norm or step size over the whole batch in the guidance, random numbers "
                    "drawn for the batch instead of per sample (flash_plugin.utils.random.randn_per_sample), a "
                    "per-sample operator parameter not select()ed, or samples that are not active still being updated",
                    detail=detail,
                )
        if alone.nfe.tolist() != [batch_sol.nfe[i].item()]:
            s.fail(observed=f"sample {i}: nfe {batch_sol.nfe[i].item()} in the batch, {alone.nfe.tolist()[0]} alone",
                   expected="the same NFE", cause="NFE counted for the batch instead of per sample", detail=detail)


# ----------------------------------------------------------------------------------------------
# The checks
# ----------------------------------------------------------------------------------------------
CHECKS: dict[str, Callable[[Any], None]] = {}
"""Every check by name, in the order they run."""


def _check(fn: Callable[[Any], None]) -> Callable[[Any], None]:
    CHECKS[fn.__name__] = fn
    return fn


@_check
def check_schedule_is_valid(solver_or_factory: Any) -> None:
    """``schedule`` is a `NoiseSchedule` over ``k = 0..N``: ``N >= 1``, ``a_0 = 1``, ``b_0 = 0``,
    ``ᾱ`` non-increasing in ``k`` with ``ᾱ_N < 1``, timesteps ``>= 0`` for ``k >= 1``, and the same
    schedule on every access."""
    s = _Subject(solver_or_factory, "check_schedule_is_valid")
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
        s.fail(observed=f"timesteps[1:] = {_fmt(ts[1:].tolist())}", expected="non-negative denoiser timesteps for k >= 1",
               cause="timesteps[k] must be the denoiser's timestep of the step taken from level k")
    again = solver.schedule
    if not (isinstance(again, NoiseSchedule) and torch.equal(again.alphas_cumprod, acp) and torch.equal(again.timesteps, ts)):
        s.fail(observed="solver.schedule differs between two accesses", expected="the same schedule",
               cause="the schedule is rebuilt with different values on access (e.g. from mutable state)")


@_check
def check_schedule_matches_model(solver_or_factory: Any) -> None:
    """``ᾱ_k`` is the model's ``ᾱ`` at ``timesteps[k]`` for ``k = 1..N`` (spy oracle; factory only):
    the declared noise level of step ``k`` is the one the denoiser is queried at."""
    s = _Subject(solver_or_factory, "check_schedule_matches_model")
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


@_check
def check_full_solve(solver_or_factory: Any) -> None:
    """``solve(y, operator)`` (``start=None``) returns a `Solution` with finite ``x``/``latent`` of
    the batch size, ``nfe == N`` and ``start_step == N`` per sample (and, on the spy oracle,
    exactly ``B·N`` denoiser evaluations and ``x`` shaped like the oracle's image)."""
    s = _Subject(solver_or_factory, "check_full_solve")
    problem = s.need_problem()
    st = s.setup()
    n = st.solver.schedule.num_steps
    y, op = problem.take([0, 1, 2])
    detail = "3 samples, start=None, generator=torch.Generator().manual_seed(0)"
    sol = st.solver.solve(y, op, generator=_gen(0))
    _check_solution(s, sol, batch=3, nfe=[n] * 3, start=[n] * 3, what="a full solve of 3 samples", detail=detail)
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


@_check
def check_start_makes_k_calls(solver_or_factory: Any) -> None:
    """From a `StartPoint` at step ``k`` the solver evaluates the denoiser exactly ``k`` times per
    sample, at ``schedule.timesteps[k], ..., schedule.timesteps[1]`` in that order, and reports
    ``nfe == start_step == k`` (spy oracle; factory only)."""
    s = _Subject(solver_or_factory, "check_start_makes_k_calls")
    oracle = s.need_spy()
    problem = s.need_problem()
    solver = s.setup().solver
    sched = solver.schedule
    n = sched.num_steps
    ts = sched.timesteps.tolist()
    mid = max(1, n // 2)  # first: the most informative diagnosis
    for k in [mid] + sorted({1, min(2, n), n} - {mid}):
        y, op = problem.take([0])
        z = _latents(s, [k], seed=100 + k, like=y)
        detail = f"one sample, StartPoint(step=[{k}], latent at level {k}) with N = {n}, spy oracle make_oracle()"
        oracle.reset_calls()
        sol = solver.solve(y, op, start=StartPoint(torch.tensor([k]), z), generator=_gen(k))
        seen, want = oracle.evaluations(), ts[1 : k + 1][::-1]
        if seen != want:
            s.fail(observed=f"{len(seen)} denoiser evaluations at timesteps {_fmt(seen)}",
                   expected=f"exactly {k} at timesteps {_fmt(want)} "
                   + ("(schedule.timesteps[1])" if k == 1 else f"(schedule.timesteps[{k}], ..., schedule.timesteps[1])"),
                   cause=_diagnose_calls(seen, want, ts, k), detail=detail)
        _check_solution(s, sol, batch=1, nfe=[k], start=[k], what=f"a solve from step {k}", detail=detail)
    k = max(1, n // 2)
    y, op = problem.take([0, 1])
    detail = f"two samples, StartPoint(step=[{k}, {k}]) with N = {n}, spy oracle make_oracle()"
    oracle.reset_calls()
    sol = solver.solve(y, op, start=StartPoint(torch.tensor([k, k]), _latents(s, [k, k], 7, y)), generator=_gens([1, 2]))
    evals = oracle.evaluations()
    if Counter(evals) != Counter(ts[1 : k + 1] * 2):
        s.fail(observed=f"{len(evals)} evaluations for 2 samples at timesteps {_fmt(evals)}",
               expected=f"each of the {k} timesteps once per sample ({2 * k} evaluations)",
               cause="the denoiser runs more or less than once per sample and step", detail=detail)
    _check_solution(s, sol, batch=2, nfe=[k, k], start=[k, k], what=f"a solve of 2 samples from step {k}", detail=detail)


@_check
def check_start_at_zero_decodes_latent(solver_or_factory: Any) -> None:
    """A start at ``k = 0`` makes no denoiser call, reports ``nfe == 0`` and returns the start
    latent and its decoding (spy oracle: identity decoder; a solver object exposing ``model.decode``:
    that decoder)."""
    s = _Subject(solver_or_factory, "check_start_at_zero_decodes_latent")
    problem = s.need_problem()
    st = s.setup()
    y, op = problem.take([0, 1])
    z = _latents(s, [0, 0], seed=5, like=y)
    detail = "two samples, StartPoint(step=[0, 0], latent z)"
    if st.oracle is not None:
        st.oracle.reset_calls()
    sol = st.solver.solve(y, op, start=StartPoint(torch.zeros(2, dtype=torch.long), z.clone()), generator=_gens([1, 2]))
    if st.oracle is not None and st.oracle.calls:
        s.fail(observed=f"{len(st.oracle.evaluations())} denoiser evaluations at timesteps {_fmt(st.oracle.evaluations())}",
               expected="no denoiser call (k = 0: nothing to denoise)",
               cause="the loop runs once before checking the step count, or a final step/data-consistency pass calls the model",
               detail=detail)
    _check_solution(s, sol, batch=2, nfe=[0, 0], start=[0, 0], what="a solve from step 0", detail=detail)
    if not _close(sol.latent, z):
        s.fail(observed=f"Solution.latent differs from the start latent (max |diff| = {_max_diff(sol.latent, z)})",
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
        if not _close(sol.x, want):
            s.fail(observed=f"Solution.x differs from model.decode(start latent) (max |diff| = {_max_diff(sol.x, want)})",
                   expected="x = model.decode(z) for k = 0", cause="x is not the decoding of the returned latent", detail=detail)


@_check
def check_out_of_range_start_raises(solver_or_factory: Any) -> None:
    """A start step outside ``0..N`` (``N + 1``, ``-1``, or one bad sample in a batch) raises a
    ``ValueError`` (e.g. `flash_plugin.errors.StartStepError`) before any work."""
    s = _Subject(solver_or_factory, "check_out_of_range_start_raises")
    problem = s.need_problem()
    solver = s.setup().solver
    n = solver.schedule.num_steps
    for steps, desc in (([n + 1], "N + 1"), ([-1], "-1"), ([1, n + 1], "[1, N + 1] (the second sample out of range)")):
        y, op = problem.take(range(len(steps)))
        z = torch.zeros((len(steps), *s.latent_shape()), dtype=y.dtype, device=y.device)
        detail = f"StartPoint(step={steps}) with N = {n}"
        try:
            sol = solver.solve(y, op, start=StartPoint(torch.tensor(steps), z), generator=_gen(0))
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


@_check
def check_deterministic_given_seed(solver_or_factory: Any) -> None:
    """The same generator seed gives bit-identical ``x`` and ``latent`` (full solve and a solve from
    an intermediate step, twice on the same solver)."""
    s = _Subject(solver_or_factory, "check_deterministic_given_seed")
    problem = s.need_problem()
    solver = s.setup().solver
    n = solver.schedule.num_steps
    y, op = problem.take([0, 1])
    k = max(1, n // 2)
    z = _latents(s, [k, k], seed=9, like=y)
    runs = (("a full solve", None), (f"a solve from step {k}", StartPoint(torch.tensor([k, k]), z)))
    for what, start in runs:
        detail = f"2 samples, {what}, generator=torch.Generator().manual_seed(0), solved twice"
        a = solver.solve(y, op, start=start, generator=_gen(0))
        b = solver.solve(y, op, start=start, generator=_gen(0))
        for field in ("x", "latent"):
            if not torch.equal(getattr(a, field), getattr(b, field)):
                s.fail(observed=f"{what} twice with the same seed: Solution.{field} max |diff| = "
                       f"{_max_diff(getattr(a, field), getattr(b, field))}",
                       expected="bit-identical results",
                       cause="random numbers drawn from torch's global RNG instead of the given generator, or state kept "
                       "between solves (caches, counters, in-place changes of the solver or the model)", detail=detail)


@_check
def check_seed_changes_output(solver_or_factory: Any) -> None:
    """Full solves with different generator seeds give different results (the generator is used)."""
    s = _Subject(solver_or_factory, "check_seed_changes_output")
    problem = s.need_problem()
    solver = s.setup().solver
    y, op = problem.take([0, 1])
    a = solver.solve(y, op, generator=_gen(0))
    b = solver.solve(y, op, generator=_gen(1))
    if torch.equal(a.x, b.x):
        s.fail(observed="identical x for generator seeds 0 and 1", expected="different samples from different seeds",
               cause="the generator is ignored: a fixed internal seed, or the initial noise is not drawn from it",
               detail="2 samples, full solves with torch.Generator().manual_seed(0) and manual_seed(1)")


@_check
def check_batch_matches_samples_alone(solver_or_factory: Any) -> None:
    """A batch solved with one generator per sample equals its samples solved one by one with the
    same generators (full solve)."""
    s = _Subject(solver_or_factory, "check_batch_matches_samples_alone")
    problem = s.need_problem()
    solver = s.setup().solver
    idx, seeds = [0, 1, 2], [10, 11, 12]
    y, op = problem.take(idx)
    detail = "3 samples, start=None, generator=[torch.Generator().manual_seed(s) for s in (10, 11, 12)], then each alone"
    sol = solver.solve(y, op, generator=_gens(seeds))
    _compare_alone(s, sol, idx, problem, None, None, seeds, detail)


@_check
def check_mixed_start_batch_matches_samples_alone(solver_or_factory: Any) -> None:
    """For a `MixedStartSolver`: a batch with different start steps (``N``, ``0``, ``N//3``, ``1``)
    equals its samples solved alone (per-sample generators), reports ``nfe == start_step == k_i``
    and (spy oracle) runs the denoiser on active samples only (total evaluations = sum of starts)."""
    s = _Subject(solver_or_factory, "check_mixed_start_batch_matches_samples_alone")
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
    z = _latents(s, starts, seed=33, like=y)
    detail = f"4 samples, StartPoint(step={starts}) with N = {n}, generator=[manual_seed(s) for s in {seeds}], then each alone"
    oracle = s.setup().oracle
    if oracle is not None:
        oracle.reset_calls()
    sol = solver.solve(y, op, start=StartPoint(torch.tensor(starts), z.clone()), generator=_gens(seeds))
    if oracle is not None:
        ts = solver.schedule.timesteps.tolist()
        want = Counter(t for k0 in starts for t in ts[1 : k0 + 1])
        got = Counter(oracle.evaluations())
        if got != want:
            s.fail(observed=f"{sum(got.values())} denoiser evaluations in total", expected=f"{sum(starts)} = the sum of the starts, "
                   "sample i evaluated at timesteps[k_i], ..., timesteps[1]",
                   cause="the denoiser runs on inactive samples too (samples must join when the loop reaches their start step)",
                   detail=detail)
    _check_solution(s, sol, batch=4, nfe=starts, start=starts, what="a mixed-start solve", detail=detail)
    _compare_alone(s, sol, idx, problem, starts, z, seeds, detail)


@_check
def check_no_autograd_graph(solver_or_factory: Any) -> None:
    """``Solution.x`` and ``latent`` carry no autograd graph (``requires_grad`` False, no
    ``grad_fn``) and ``solve`` leaves torch's grad mode as it found it."""
    s = _Subject(solver_or_factory, "check_no_autograd_graph")
    problem = s.need_problem()
    solver = s.setup().solver
    n = solver.schedule.num_steps
    y, op = problem.take([0, 1])
    k = max(1, n // 2)
    before = torch.is_grad_enabled()
    try:
        for what, start in (("a full solve", None), (f"a solve from step {k}", StartPoint(torch.tensor([k, k]), _latents(s, [k, k], 4, y)))):
            sol = solver.solve(y, op, start=start, generator=_gen(0))
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


@_check
def check_works_under_no_grad(solver_or_factory: Any) -> None:
    """A solve called inside ``torch.no_grad()`` works and gives the same result as outside
    (guidance must enable gradients itself)."""
    s = _Subject(solver_or_factory, "check_works_under_no_grad")
    problem = s.need_problem()
    solver = s.setup().solver
    y, op = problem.take([0, 1])
    detail = "2 samples, full solve with torch.Generator().manual_seed(3), once normally and once under torch.no_grad()"
    ref = solver.solve(y, op, generator=_gen(3))
    try:
        with torch.no_grad():
            out = solver.solve(y, op, generator=_gen(3))
    except Exception as exc:  # noqa: BLE001 - reported as the observation
        s.fail(observed=f"under torch.no_grad() solve raised {type(exc).__name__}: {exc}",
               expected="the same result as with gradients enabled",
               cause="the guidance gradient is computed without `with torch.enable_grad():` (callers often run "
               "inference under torch.no_grad())", detail=detail)
    for field in ("x", "latent"):
        if not _close(getattr(out, field), getattr(ref, field)):
            s.fail(observed=f"under torch.no_grad() Solution.{field} differs (max |diff| = "
                   f"{_max_diff(getattr(out, field), getattr(ref, field))})",
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


@_check
def check_model_unchanged(solver_or_factory: Any) -> None:
    """Solving changes none of the model's parameters, buffers, ``requires_grad`` flags or
    train/eval modes, and leaves no ``.grad`` on its parameters (spy oracle, whose ``gain``
    parameter requires grad like an unfrozen diffusers model; or a solver's ``torch.nn.Module``
    model)."""
    s = _Subject(solver_or_factory, "check_model_unchanged")
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
    st.solver.solve(y, op, generator=_gen(0))
    st.solver.solve(y, op, start=StartPoint(torch.tensor([k, k]), _latents(s, [k, k], 6, y)), generator=_gen(1))
    changed = _state_diff(before, _model_state(model))
    if changed:
        grads = [c for c in changed if c.endswith("grad: None -> set")]
        cause = ("loss.backward() reaches the model's parameters (they accumulate .grad on every solve); take the guidance "
                 "gradient with torch.autograd.grad(loss, z) instead") if grads else (
                 "the solver writes into the model (in-place updates, requires_grad_() or train()/eval() during solve)")
        s.fail(observed=f"after a full solve and a solve from step {k}, changed: {', '.join(changed[:6])}"
               + (f" (+{len(changed) - 6} more)" if len(changed) > 6 else ""),
               expected="the model untouched", cause=cause, detail="2 samples, a full solve then a solve from step N // 2")


@_check
def check_inputs_not_modified(solver_or_factory: Any) -> None:
    """``solve`` modifies neither ``y``, nor the operator's mask (`MaskOperator`), nor the
    `StartPoint`'s ``latent`` and ``step`` in place."""
    s = _Subject(solver_or_factory, "check_inputs_not_modified")
    problem = s.need_problem()
    solver = s.setup().solver
    n = solver.schedule.num_steps
    y, op = problem.take([0, 1])
    k = max(1, n // 2)
    y0 = y.clone()
    mask0 = op.mask.clone() if isinstance(op, MaskOperator) else None
    start = StartPoint(torch.tensor([k, k]), _latents(s, [k, k], 8, y))
    z0, steps0 = start.latent.clone(), start.step.clone()
    solver.solve(y, op, generator=_gen(0))
    solver.solve(y, op, start=start, generator=_gen(1))
    for what, now, then in (("y", y, y0), ("StartPoint.latent", start.latent, z0), ("StartPoint.step", start.step, steps0),
                            ("operator.mask", None if mask0 is None else op.mask, mask0)):
        if then is not None and not torch.equal(now, then):
            s.fail(observed=f"{what} was modified in place by solve()", expected="inputs left untouched",
                   cause="an in-place update (e.g. z.sub_(...) or z[...] = ...) on the caller's tensor; clone() it first",
                   detail=f"2 samples, a full solve then a solve from step {k}")


class _StubEstimator:
    """Severity estimator stand-in: ``ẑ = 0`` and ``σ̂² = 0.5``; metadata ``{}``."""

    def __init__(self, latent_shape: tuple[int, ...]):
        self.latent_shape = latent_shape
        self.metadata: dict[str, Any] = {}

    def estimate(self, y: torch.Tensor) -> SeverityEstimate:
        b = y.shape[0]
        latent = torch.zeros((b, *self.latent_shape), device=y.device, dtype=y.dtype)
        return SeverityEstimate(latent=latent, variance=torch.full((b,), 0.5, dtype=torch.float64, device=y.device))


@_check
def check_flash_force_full_is_identity(solver_or_factory: Any) -> None:
    """``flash(solver, estimator, FlashConfig(force_step=N))`` returns bit for bit what the
    unwrapped solver returns for the same seed (one generator and per-sample generators)."""
    s = _Subject(solver_or_factory, "check_flash_force_full_is_identity")
    solver = s.setup().solver
    if isinstance(solver, FlashSolver):
        raise NotApplicable(f"{s.check}: {s.setup().label} is already a FlashSolver (flash() refuses to wrap it twice)")
    problem = s.need_problem()
    n = solver.schedule.num_steps
    y, op = problem.take([0, 1, 2])
    flashed = flash(solver, _StubEstimator(s.latent_shape()), FlashConfig(force_step=n))
    for desc, make_gen in (("torch.Generator().manual_seed(7)", lambda: _gen(7)),
                           ("per-sample generators seeded [7, 8, 9]", lambda: _gens([7, 8, 9]))):
        detail = f"3 samples, {desc}, flash(solver, <stub estimator>, FlashConfig(force_step=N = {n})) vs solver.solve"
        a = flashed(y, op, generator=make_gen())
        b = solver.solve(y, op, generator=make_gen())
        for field in ("x", "latent", "nfe"):
            if not torch.equal(getattr(a, field), getattr(b, field)):
                s.fail(observed=f"Solution.{field} of the flashed solver differs from the unwrapped one"
                       + (f" (max |diff| = {_max_diff(getattr(a, field), getattr(b, field))})" if field != "nfe"
                          else f" ({a.nfe.tolist()} vs {b.nfe.tolist()})"),
                       expected="bit-identical results at k = N",
                       cause="flash() draws the start noise with flash_plugin.utils.random.randn_per_sample((B, *latent_shape), "
                       "generator) and passes StartPoint(N, noise): a full solve must draw its initial latent the same way "
                       "(first use of the generator) and treat a StartPoint at N with that latent exactly like start=None",
                       detail=detail)


# ----------------------------------------------------------------------------------------------
# Doors
# ----------------------------------------------------------------------------------------------
def _check_name(name: Any) -> str:
    if callable(name) and getattr(name, "__name__", None) in CHECKS:
        return name.__name__
    if isinstance(name, str):
        full = name if name.startswith("check_") else f"check_{name}"
        if full in CHECKS:
            return full
    raise FlashInputError(f"unknown conformance check {name!r}; the checks are: {', '.join(CHECKS)}")


def _selected(checks: Iterable[Any] | None) -> list[str]:
    if checks is None:
        return list(CHECKS)
    names = [_check_name(c) for c in checks]
    return [n for n in CHECKS if n in names]


def _expected(obj: Any, extra: Mapping[str, str] | None) -> dict[str, str]:
    merged: dict[str, str] = {}
    for source in (obj.expected_failures if isinstance(obj, SolverCase) else None, extra):
        for name, reason in (source or {}).items():
            merged[_check_name(name)] = str(reason)
    return merged


def _describe_exception(exc: BaseException, name: str, obj: Any) -> str:
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    where = "\n".join(f"    {f.filename}:{f.lineno} in {f.name}: {f.line}" for f in frames)
    case = obj if isinstance(obj, SolverCase) else SolverCase(obj)
    return (
        f"{name} raised {type(exc).__name__}: {exc}\n  (the solver or its factory raised while the check ran)\n"
        f"  where:\n{where}\n  reproduce: flash_plugin.conformance.check_solver({_target_text(case.solver)}, checks=[{name!r}])"
    )


def check_solver(
    solver_or_factory: Any,
    *,
    expected_failures: Mapping[str, str] | None = None,
    checks: Iterable[Any] | None = None,
    problem: Problem | None = None,
) -> list[CheckResult]:
    """Run the conformance checks on a solver and return one `CheckResult` per check.

    Args:
        solver_or_factory: a factory ``make(model) -> Solver`` (all checks, on a spy Gaussian
            oracle), a `Solver` object (black-box checks only), or a `SolverCase`.
        expected_failures: ``{check_name: reason}``; such a check that fails is ``"xfail"``, one that
            passes is ``"passed"`` with a note. Names may omit the ``check_`` prefix.
        checks: names (or functions) of the checks to run; all of `CHECKS` by default.
        problem: a measurement for the black-box checks of a solver object (see `Problem`).

    Never raises for a failing check (see each result's ``status``); raises `FlashInputError`
    for an unknown check name and ``TypeError`` for an object that is neither a solver nor callable.
    """
    obj = solver_or_factory
    if problem is not None:
        obj = replace(obj, problem=problem) if isinstance(obj, SolverCase) else SolverCase(obj, problem=problem)
    _is_factory(obj.solver if isinstance(obj, SolverCase) else obj)  # TypeError early for a wrong object
    xfail = _expected(obj, expected_failures)
    results: list[CheckResult] = []
    for name in _selected(checks):
        try:
            CHECKS[name](obj)
        except NotApplicable as exc:
            results.append(CheckResult(name, "not applicable", str(exc)))
        except Exception as exc:  # noqa: BLE001 - every error of a check is a failure of that check
            message = str(exc) if isinstance(exc, CheckFailure) else _describe_exception(exc, name, obj)
            if name in xfail:
                results.append(CheckResult(name, "xfail", f"expected failure ({xfail[name]}):\n{message}"))
            else:
                results.append(CheckResult(name, "failed", message))
        else:
            note = f"listed as an expected failure ({xfail[name]}) but passed; remove it from expected_failures" if name in xfail else ""
            results.append(CheckResult(name, "passed", note))
    return results


def format_results(results: Sequence[CheckResult], *, title: str | None = None, verbose: bool = True) -> str:
    """A text report: one line per check, messages of failed/xfail/not applicable ones indented,
    and a summary line."""
    lines = [title] if title else []
    for r in results:
        lines.append(f"  {r.status:<15} {r.name}")
        if r.message and (verbose or r.status == "failed"):
            lines.extend("      " + line for line in r.message.splitlines())
    counts = Counter(r.status for r in results)
    lines.append(", ".join(f"{counts.get(s, 0)} {s}" for s in ("passed", "failed", "xfail", "not applicable")))
    return "\n".join(lines)


def _case_name(obj: Any) -> str:
    case = obj if isinstance(obj, SolverCase) else SolverCase(obj)
    if case.name:
        return case.name
    target = case.solver
    if _is_factory(target):
        try:
            return type(target(make_oracle())).__name__
        except Exception:  # noqa: BLE001 - the checks will report the factory's error
            return getattr(target, "__name__", "factory").replace("<lambda>", "factory")
    return type(target).__name__


def parametrize_with_checks(
    solvers: Sequence[Any],
    *,
    expected_failures: Mapping[str, str] | None = None,
    checks: Iterable[Any] | None = None,
):
    """A ``pytest.mark.parametrize("solver, check", ...)`` decorator: one test per solver x check.

    Ids are ``"<name>-<check name>"`` (name: `SolverCase.name` or the solver's class name, with
    ``_2``, ``_3`` ... for repeats), e.g. ``pytest -k "Sampler and start"``. A check listed in
    ``expected_failures`` (or the case's own) is marked ``xfail`` (not strict); a check that does
    not apply is skipped with the reason::

        @parametrize_with_checks([lambda model: MySolver(model, num_steps=20)])
        def test_conformance(solver, check):
            check(solver)
    """
    import pytest

    names: list[str] = []
    for obj in solvers:
        base = _case_name(obj)
        name, i = base, 1
        while name in names:
            i += 1
            name = f"{base}_{i}"
        names.append(name)
    selected = _selected(checks)
    params = []
    for obj, name in zip(solvers, names):
        xfail = _expected(obj, expected_failures)
        for check in selected:
            marks = [pytest.mark.xfail(reason=xfail[check], strict=False)] if check in xfail else []
            params.append(pytest.param(obj, CHECKS[check], id=f"{name}-{check}", marks=marks))
    return pytest.mark.parametrize("solver, check", params)
