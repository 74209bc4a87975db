"""The harness of the conformance suite: results, cases, the object a check works on, helpers.

A check is a function ``check_<property>(target)`` registered in `SOLVER_CHECKS`,
`OPERATOR_CHECKS` or `ESTIMATOR_CHECKS`. It returns when the property holds, raises `CheckFailure`
(observed, expected, likely cause, reproduce line) when it does not, and `NotApplicable` (a
``unittest.SkipTest``) when it does not apply. A solver check given a factory ``make(model) ->
Solver`` builds a fresh spy oracle and solver for each check; given a solver object, only the
black-box checks run, on a measurement shaped by its model or given as ``problem=Problem(y, operator)``.
"""

from __future__ import annotations

import unittest
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

import torch

from flash_plugin.protocols import LatentModelSolver, Solver
from flash_plugin.types import Solution, StartPoint

from .oracles import MaskOperator, SpyOracle, make_oracle, make_oracle_problem

Status = Literal["passed", "failed", "xfail", "not applicable"]

# Tolerance for "the same result" computed in two different ways (batch vs alone, grad vs no_grad).
# The reference loop is bit-exact; guided solvers may reorder float reductions.
RTOL, ATOL = 1e-4, 1e-5

SOLVER_CHECKS: dict[str, Callable[[Any], None]] = {}
"""Every solver check by name, in the order they run."""
OPERATOR_CHECKS: dict[str, Callable[[Any], None]] = {}
"""Every operator check by name, in the order they run."""
ESTIMATOR_CHECKS: dict[str, Callable[[Any], None]] = {}
"""Every severity-estimator check by name, in the order they run."""


def solver_check(fn: Callable[[Any], None]) -> Callable[[Any], None]:
    SOLVER_CHECKS[fn.__name__] = fn
    return fn


def operator_check(fn: Callable[[Any], None]) -> Callable[[Any], None]:
    OPERATOR_CHECKS[fn.__name__] = fn
    return fn


def estimator_check(fn: Callable[[Any], None]) -> Callable[[Any], None]:
    ESTIMATOR_CHECKS[fn.__name__] = fn
    return fn


# ---- Data types ------------------------------------------------------------------------------
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
        seed: seed of the statistical checks' draws (``0`` by default; a given seed makes every
            check deterministic, other seeds measure their false-alarm rate).
    """

    solver: Any
    name: str | None = None
    problem: Problem | None = None
    expected_failures: Mapping[str, str] | None = None
    seed: int = 0


@dataclass(frozen=True)
class OperatorCase:
    """An operator with what its checks need.

    Attributes:
        operator: a batched `Operator` (per-sample parameters; ``select(index)`` for sub-batches).
        images: clean images ``(B, C, H, W)`` in ``[-1, 1]`` it accepts (default: random images of
            ``operator.image_shape`` when it has one).
        linear: whether ``forward`` is linear (default: the operator has an ``adjoint``).
        name: the name in test ids and reports (default: the class name).
        expected_failures: ``{check_name: reason}``.
    """

    operator: Any
    images: torch.Tensor | None = None
    linear: bool | None = None
    name: str | None = None
    expected_failures: Mapping[str, str] | None = None


@dataclass(frozen=True)
class EstimatorCase:
    """A severity estimator with what its checks need.

    Attributes:
        estimator: a `SeverityEstimator`.
        family: ``make(severity [B], generator) -> Operator``, the operator family it was trained
            for (for the monotonicity check, which does not apply without it).
        images: clean images ``(B, C, H, W)`` in ``[-1, 1]`` to measure.
        name: the name in test ids and reports (default: the class name).
        expected_failures: ``{check_name: reason}``.
    """

    estimator: Any
    family: Callable[[torch.Tensor, Any], Any] | None = None
    images: torch.Tensor | None = None
    name: str | None = None
    expected_failures: Mapping[str, str] | None = None


# ---- What a check works on -------------------------------------------------------------------
def is_factory(target: Any) -> bool:
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


def target_text(target: Any) -> str:
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


def cli_target(target: Any) -> str | None:
    qual = getattr(target, "__qualname__", "") or ""
    mod = getattr(target, "__module__", "") or ""
    if not mod or not qual or "<" in qual or mod == "__main__":
        return None
    return f"{mod}:{qual}"


@dataclass
class Setup:
    solver: Any
    oracle: SpyOracle | None
    problem: Problem | None
    no_problem_reason: str
    label: str


class Subject:
    """One check's view of the object under test (built afresh for every check)."""

    def __init__(self, obj: Any, check: str):
        self.case = obj if isinstance(obj, SolverCase) else SolverCase(obj)
        self.target = self.case.solver
        self.check = check
        self.given_factory = is_factory(self.target)
        self._latent_shape: tuple[int, ...] | None = None
        self._setup: Setup | None = None

    # -- building ---------------------------------------------------------------------------
    def setup(self) -> Setup:
        if self._setup is not None:
            return self._setup
        if self.given_factory:
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
            label = self.case.name or short_repr(solver)
            self._setup = Setup(solver, oracle, problem, "", label)
        else:
            solver = self.target
            problem, reason = self.case.problem, ""
            if problem is None:
                problem, reason = problem_from_model(solver)
            self._setup = Setup(solver, None, problem, reason, self.case.name or short_repr(solver))
        return self._setup

    def solver_over(self, oracle: SpyOracle) -> Any:
        """A fresh solver from the factory over ``oracle`` (the statistical checks' oracle variants)."""
        self.need_spy()
        solver = self.target(oracle)
        oracle.reset_calls()
        return solver

    @property
    def seed(self) -> int:
        return int(self.case.seed)

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
                sol = self.setup().solver.solve(y, op, generator=seeded(0))
                self._latent_shape = tuple(sol.latent.shape[1:])
        return self._latent_shape

    # -- reporting --------------------------------------------------------------------------
    def reproduce(self, detail: str = "") -> str:
        extra = ", problem=..." if self.case.problem is not None else ""
        line = f"flash_plugin.conformance.check_solver({target_text(self.target)}{extra}, checks=[{self.check!r}])"
        cli = cli_target(self.target) if self.given_factory and self.case.problem is None else None
        if cli is not None:
            line += f"  or  flash-plugin check {cli} --check {self.check}"
        if detail:
            line += f"\n      setting: {detail}"
        return line

    def fail(self, *, observed: str, expected: str, cause: str, detail: str = "") -> NoReturn:
        st = self._setup
        label = st.label if st is not None else target_text(self.target)
        raise failure(self.check, label, observed=observed, expected=expected, cause=cause,
                      reproduce=self.reproduce(detail))


def failure(check: str, label: str, *, observed: str, expected: str, cause: str, reproduce: str) -> CheckFailure:
    """The `CheckFailure` of every check: what was observed and expected, the cause, a reproduce line."""
    return CheckFailure(
        f"{check} failed for {label}\n"
        f"  observed: {observed}\n"
        f"  expected: {expected}\n"
        f"  likely cause: {cause}\n"
        f"  reproduce: {reproduce}"
    )


def short_repr(obj: Any, limit: int = 120) -> str:
    try:
        text = repr(obj)
    except Exception:  # a broken __repr__ must not hide the check's result
        text = f"<{type(obj).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def problem_from_model(solver: Any) -> tuple[Problem | None, str]:
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
    g = seeded(1234)
    x = (2 * torch.rand((4, *image_shape), generator=g) - 1).to(device)
    op = MaskOperator.random(4, tuple(image_shape), generator=g, device=device)
    return Problem(op.measure(x, g), op, tuple(latent_shape)), ""


# ---- Helpers ---------------------------------------------------------------------------------
def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def seeded_list(seeds: Iterable[int]) -> list[torch.Generator]:
    return [seeded(s) for s in seeds]


def fmt(values: Sequence[Any], limit: int = 8) -> str:
    values = list(values)
    if len(values) <= limit:
        return str(values)
    head = ", ".join(map(str, values[: limit // 2]))
    tail = ", ".join(map(str, values[-(limit // 2):]))
    return f"[{head}, ..., {tail}] ({len(values)} entries)"


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double().cpu() - b.detach().double().cpu()).abs().max()) if a.numel() else 0.0


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> bool:
    return a.shape == b.shape and torch.allclose(a.detach().double().cpu(), b.detach().double().cpu(), rtol=RTOL, atol=atol)


def batch_tolerance(s: Subject) -> tuple[float, str]:
    """``(atol, how)`` for "a batch equals its samples alone" on the solver's own model.

    The spy oracle is exact per sample. A real network gives slightly different numbers for a
    sample in a batch and alone (other kernels, other reduction orders), so the tolerance grows
    with the drift measured on this model: ``ATOL + 10 (N·drift(eps) + drift(decode))``."""
    st = s.setup()
    model = getattr(st.solver, "model", None) if st.oracle is None else None
    eps, decode, shape = getattr(model, "eps", None), getattr(model, "decode", None), getattr(model, "latent_shape", None)
    if not (callable(eps) and callable(decode) and shape is not None):
        return ATOL, f"atol={ATOL}"
    device = getattr(model, "device", None)
    device = device if isinstance(device, torch.device) else torch.device("cpu")
    z = torch.randn((3, *shape), generator=seeded(77)).to(device)
    sched = st.solver.schedule
    t = torch.full((3,), int(sched.timesteps[max(1, sched.num_steps // 2)]), dtype=torch.long, device=device)
    with torch.no_grad():
        d_eps = max_diff(eps(z, t), torch.cat([eps(z[i : i + 1], t[i : i + 1]) for i in range(3)]))
        d_dec = max_diff(decode(z), torch.cat([decode(z[i : i + 1]) for i in range(3)]))
    atol = ATOL + 10 * (sched.num_steps * d_eps + d_dec)
    return atol, (f"atol={atol:.3g}, from this model's own batch drift ({d_eps:.2g} per denoiser call, {d_dec:.2g} per "
                  f"decode; a sample computed in a batch and alone differs by that much without any bug)")


def start_latents(s: Subject, steps: Sequence[int], seed: int, like: torch.Tensor) -> torch.Tensor:
    """Start latents: the oracle's exact marginal at each level, else standard normal."""
    shape = s.latent_shape()
    g = seeded(seed)
    noise = torch.randn((len(steps), *shape), generator=g, dtype=torch.float64)
    oracle = s.setup().oracle
    if oracle is not None:
        sched = s.setup().solver.schedule
        acp = sched.alphas_cumprod[torch.as_tensor(list(steps), dtype=torch.long)].view(-1, *[1] * len(shape))
        mean, var = oracle.mean.cpu(), oracle.var.cpu()
        noise = acp.sqrt() * mean + (acp * var + 1 - acp).sqrt() * noise
    return noise.to(device=like.device, dtype=like.dtype)


def check_solution(s: Subject, sol: Any, *, batch: int, nfe: Sequence[int], start: Sequence[int], what: str,
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


def diagnose_calls(seen: list[int], want: list[int], timesteps: list[int], k: int) -> str:
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


def compare_alone(s: Subject, batch_sol: Solution, idx: Sequence[int], problem: Problem,
                   starts: Sequence[int] | None, latents: torch.Tensor | None, seeds: Sequence[int], detail: str) -> None:
    solver = s.setup().solver
    atol, how = batch_tolerance(s)
    for i, j in enumerate(idx):
        yi, opi = problem.take([j])
        start = None if starts is None else StartPoint(torch.tensor([starts[i]]), latents[i : i + 1].clone())
        alone = solver.solve(yi, opi, start=start, generator=seeded_list([seeds[i]]))
        for field in ("x", "latent"):
            a, b = getattr(batch_sol, field)[i : i + 1], getattr(alone, field)
            if not close(a, b, atol):
                s.fail(
                    observed=f"sample {i} of the batch differs from the same sample solved alone: Solution.{field} max |diff| = "
                    f"{max_diff(a, b) if a.shape == b.shape else 'shape ' + str(tuple(b.shape))}",
                    expected=f"equal results (rtol={RTOL}, {how}) given the same per-sample generator",
                    cause="something batch-wide: a norm or step size over the whole batch in the guidance, random numbers "
                    "drawn for the batch instead of per sample (flash_plugin.utils.random.randn_per_sample), a "
                    "per-sample operator parameter not select()ed, or samples that are not active still being updated",
                    detail=detail,
                )
        if alone.nfe.tolist() != [batch_sol.nfe[i].item()]:
            s.fail(observed=f"sample {i}: nfe {batch_sol.nfe[i].item()} in the batch, {alone.nfe.tolist()[0]} alone",
                   expected="the same NFE", cause="NFE counted for the batch instead of per sample", detail=detail)

