"""Conformance suite: checks of solvers, operators and severity estimators, in the manner of
scikit-learn's ``check_estimator``. Installed as ``flash_plugin.conformance``::

    from flash_plugin.conformance import check_solver, parametrize_with_checks

    results = check_solver(lambda model: MySolver(model, num_steps=20))   # list[CheckResult]

    @parametrize_with_checks([lambda model: MySolver(model, num_steps=20)])
    def test_conformance(solver, check):
        check(solver)

or ``flash-plugin check my_module:make_solver``. The names below load on first use (PEP 562), so
that the pytest plugin can import this package without the checks. See
docs/make-your-solver-flashable.md.
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
