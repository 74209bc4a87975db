"""Conformance suite: checks of solvers, operators and severity estimators, with three doors.

Installed as ``flash_plugin.conformance`` (never as a top-level ``conformance`` module)::

    from flash_plugin.conformance import check_solver, parametrize_with_checks

    results = check_solver(lambda model: MySolver(model, num_steps=20))   # list[CheckResult]

    @parametrize_with_checks([lambda model: MySolver(model, num_steps=20)])
    def test_conformance(solver, check):
        check(solver)

or ``flash-plugin check my_module:make_solver``; `check_operator` and
`check_severity_estimator` do the same for the other two kinds of plugin object. The harness
(`harness`), the call-contract checks (`checks`), the statistical checks (`statistics`), the
operator and estimator checks (`components`) and the doors (`doors`) each have a module; the
spy model and the tiny operator are in `oracles`. See ``docs/make-your-solver-flashable.md``.

The names below are loaded on first use (PEP 562), so importing this package (as the pytest
plugin `flash_plugin.conformance.pytest_plugin` does) does not import the checks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .doors import (
        CHECKS,
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
        check_operator,
        check_severity_estimator,
        check_solver,
        format_results,
        kind_of,
        parametrize_with_checks,
    )

__all__ = [
    "CHECKS",
    "ESTIMATOR_CHECKS",
    "OPERATOR_CHECKS",
    "SOLVER_CHECKS",
    "CheckFailure",
    "CheckResult",
    "EstimatorCase",
    "NotApplicable",
    "OperatorCase",
    "Problem",
    "SolverCase",
    "check_operator",
    "check_severity_estimator",
    "check_solver",
    "format_results",
    "kind_of",
    "parametrize_with_checks",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import doors

        return getattr(doors, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
