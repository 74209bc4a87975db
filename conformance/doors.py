"""The three doors of the conformance suite, in the style of scikit-learn's ``check_estimator``.

`check_solver`, `check_operator` and `check_severity_estimator` run every check of their kind and
return one `CheckResult` per check; `parametrize_with_checks` gives one pytest test per object and
check; ``flash-plugin check`` (`flash_plugin.commands.check`) is the command line. Expected failures
are data (``{check_name: reason}``); a check that raises anything but `CheckFailure` or
`NotApplicable` fails, reported with where it raised.
"""

from __future__ import annotations

import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from flash_plugin.errors import FlashInputError
from flash_plugin.protocols import Operator, SeverityEstimator, Solver

from . import checks as _solver_checks  # noqa: F401 - registers the solver checks
from . import components as _component_checks  # noqa: F401 - registers the operator and estimator checks
from . import statistics as _statistical_checks  # noqa: F401 - registers the statistical solver checks
from .harness import (
    ESTIMATOR_CHECKS,
    OPERATOR_CHECKS,
    SOLVER_CHECKS,
    CheckFailure,
    CheckResult,
    EstimatorCase,
    NotApplicable,
    OperatorCase,
    Problem,
    SolverCase,
    is_factory,
    target_text,
)
from .oracles import make_oracle

CHECKS = SOLVER_CHECKS
"""Every solver check by name, in the order they run (`SOLVER_CHECKS`)."""

Kind = Literal["solver", "operator", "estimator"]


@dataclass(frozen=True)
class _Suite:
    kind: Kind
    door: str
    checks: dict[str, Callable[[Any], None]]
    case: type
    field: str  # the case's attribute holding the object under test


SUITES: dict[str, _Suite] = {
    "solver": _Suite("solver", "check_solver", SOLVER_CHECKS, SolverCase, "solver"),
    "operator": _Suite("operator", "check_operator", OPERATOR_CHECKS, OperatorCase, "operator"),
    "estimator": _Suite("estimator", "check_severity_estimator", ESTIMATOR_CHECKS, EstimatorCase, "estimator"),
}


def kind_of(obj: Any) -> Kind:
    """Which suite applies: a case's kind, else a `SeverityEstimator`, an `Operator`, or a solver."""
    for suite in SUITES.values():
        if isinstance(obj, suite.case):
            return suite.kind
    if isinstance(obj, SeverityEstimator) and not isinstance(obj, Solver):
        return "estimator"
    if isinstance(obj, Operator) and not isinstance(obj, Solver):
        return "operator"
    return "solver"


def _check_name(suite: _Suite, name: Any) -> str:
    if callable(name) and getattr(name, "__name__", None) in suite.checks:
        return name.__name__
    if isinstance(name, str):  # "check_operator_adjoint", "operator_adjoint" or "adjoint"
        for full in (name, f"check_{name}", f"check_{suite.kind}_{name}"):
            if full in suite.checks:
                return full
    raise FlashInputError(f"unknown conformance check {name!r}; the {suite.kind} checks are: {', '.join(suite.checks)}")


def _selected(suite: _Suite, checks: Iterable[Any] | None) -> list[str]:
    if checks is None:
        return list(suite.checks)
    names = [_check_name(suite, c) for c in checks]
    return [n for n in suite.checks if n in names]


def _expected(suite: _Suite, obj: Any, extra: Mapping[str, str] | None) -> dict[str, str]:
    merged: dict[str, str] = {}
    for source in (obj.expected_failures if isinstance(obj, suite.case) else None, extra):
        for name, reason in (source or {}).items():
            merged[_check_name(suite, name)] = str(reason)
    return merged


def _describe_exception(suite: _Suite, exc: BaseException, name: str, obj: Any) -> str:
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    where = "\n".join(f"    {f.filename}:{f.lineno} in {f.name}: {f.line}" for f in frames)
    target = getattr(obj, suite.field) if isinstance(obj, suite.case) else obj
    return (
        f"{name} raised {type(exc).__name__}: {exc}\n  (the {suite.kind} or its factory raised while the check ran)\n"
        f"  where:\n{where}\n  reproduce: flash_plugin.conformance.{suite.door}({target_text(target)}, checks=[{name!r}])"
    )


def _run(suite: _Suite, obj: Any, expected_failures: Mapping[str, str] | None, checks: Iterable[Any] | None) -> list[CheckResult]:
    xfail = _expected(suite, obj, expected_failures)
    results: list[CheckResult] = []
    for name in _selected(suite, checks):
        try:
            suite.checks[name](obj)
        except NotApplicable as exc:
            results.append(CheckResult(name, "not applicable", str(exc)))
        except Exception as exc:  # noqa: BLE001 - every error of a check is a failure of that check
            message = str(exc) if isinstance(exc, CheckFailure) else _describe_exception(suite, exc, name, obj)
            if name in xfail:
                results.append(CheckResult(name, "xfail", f"expected failure ({xfail[name]}):\n{message}"))
            else:
                results.append(CheckResult(name, "failed", message))
        else:
            note = f"listed as an expected failure ({xfail[name]}) but passed; remove it from expected_failures" if name in xfail else ""
            results.append(CheckResult(name, "passed", note))
    return results


def check_solver(
    solver_or_factory: Any,
    *,
    expected_failures: Mapping[str, str] | None = None,
    checks: Iterable[Any] | None = None,
    problem: Problem | None = None,
    seed: int | None = None,
) -> list[CheckResult]:
    """Run the solver checks and return one `CheckResult` per check.

    Args:
        solver_or_factory: a factory ``make(model) -> Solver`` (all checks, on a spy Gaussian
            oracle), a `Solver` object (black-box checks only), or a `SolverCase`.
        expected_failures: ``{check_name: reason}``; such a check that fails is ``"xfail"``, one that
            passes is ``"passed"`` with a note. Names may omit the ``check_`` prefix.
        checks: names (or functions) of the checks to run; all of `SOLVER_CHECKS` by default.
        problem: a measurement for the black-box checks of a solver object (see `Problem`).
        seed: seed of the statistical checks (see `SolverCase.seed`).

    Never raises for a failing check (see each result's ``status``); raises `FlashInputError`
    for an unknown check name and ``TypeError`` for an object that is neither a solver nor callable.
    """
    obj = solver_or_factory if isinstance(solver_or_factory, SolverCase) else SolverCase(solver_or_factory)
    if problem is not None:
        obj = replace(obj, problem=problem)
    if seed is not None:
        obj = replace(obj, seed=int(seed))
    is_factory(obj.solver)  # TypeError early for a wrong object
    return _run(SUITES["solver"], obj, expected_failures, checks)


def check_operator(
    operator: Any,
    *,
    expected_failures: Mapping[str, str] | None = None,
    checks: Iterable[Any] | None = None,
    images: Any = None,
    linear: bool | None = None,
) -> list[CheckResult]:
    """Run the operator checks (`OPERATOR_CHECKS`) on an `Operator` or an `OperatorCase`.

    ``images`` (clean images the operator accepts) and ``linear`` fill the case's fields."""
    obj = operator if isinstance(operator, OperatorCase) else OperatorCase(operator)
    if images is not None:
        obj = replace(obj, images=images)
    if linear is not None:
        obj = replace(obj, linear=bool(linear))
    return _run(SUITES["operator"], obj, expected_failures, checks)


def check_severity_estimator(
    estimator: Any,
    *,
    expected_failures: Mapping[str, str] | None = None,
    checks: Iterable[Any] | None = None,
    family: Callable[[Any, Any], Any] | None = None,
    images: Any = None,
) -> list[CheckResult]:
    """Run the severity-estimator checks (`ESTIMATOR_CHECKS`) on a `SeverityEstimator` or an
    `EstimatorCase`; ``family`` (``make(severity, generator) -> Operator``) and ``images`` fill the
    case's fields."""
    obj = estimator if isinstance(estimator, EstimatorCase) else EstimatorCase(estimator)
    if family is not None:
        obj = replace(obj, family=family)
    if images is not None:
        obj = replace(obj, images=images)
    return _run(SUITES["estimator"], obj, expected_failures, checks)


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


def _case_name(suite: _Suite, obj: Any) -> str:
    case = obj if isinstance(obj, suite.case) else suite.case(obj)
    if case.name:
        return case.name
    target = getattr(case, suite.field)
    if suite.kind == "solver" and is_factory(target):
        try:
            return type(target(make_oracle())).__name__
        except Exception:  # noqa: BLE001 - the checks will report the factory's error
            return getattr(target, "__name__", "factory").replace("<lambda>", "factory")
    return type(target).__name__


def parametrize_with_checks(
    objects: Sequence[Any],
    *,
    expected_failures: Mapping[str, str] | None = None,
    checks: Iterable[Any] | None = None,
    kind: Kind = "solver",
):
    """A ``pytest.mark.parametrize("solver, check", ...)`` decorator: one test per object x check.

    ``kind`` selects the suite (``"solver"``, ``"operator"`` or ``"estimator"``; the first
    argument's name follows it). Ids are ``"<name>-<check name>"`` (name: the case's ``name`` or
    the class name, with ``_2``, ``_3`` ... for repeats), e.g. ``pytest -k "Sampler and start"``.
    A check listed in ``expected_failures`` (or the case's own) is marked ``xfail`` (not strict); a
    check that does not apply is skipped with the reason::

        @parametrize_with_checks([lambda model: MySolver(model, num_steps=20)])
        def test_conformance(solver, check):
            check(solver)
    """
    import pytest

    suite = SUITES[kind]
    names: list[str] = []
    for obj in objects:
        base = _case_name(suite, obj)
        name, i = base, 1
        while name in names:
            i += 1
            name = f"{base}_{i}"
        names.append(name)
    selected = _selected(suite, checks)
    params = []
    for obj, name in zip(objects, names):
        xfail = _expected(suite, obj, expected_failures)
        for check in selected:
            marks = [pytest.mark.xfail(reason=xfail[check], strict=False)] if check in xfail else []
            params.append(pytest.param(obj, suite.checks[check], id=f"{name}-{check}", marks=marks))
    return pytest.mark.parametrize(f"{kind}, check", params)
