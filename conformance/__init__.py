"""Conformance suite for solvers: ``check_solver()``, ``parametrize_with_checks()`` and a pytest plugin.

Installed as ``flash_plugin.conformance`` (never as a top-level ``conformance`` module)::

    from flash_plugin.conformance import check_solver, parametrize_with_checks

    results = check_solver(lambda model: MySolver(model, num_steps=20))   # list[CheckResult]

    @parametrize_with_checks([lambda model: MySolver(model, num_steps=20)])
    def test_conformance(solver, check):
        check(solver)

or ``flash-plugin check my_module:make_solver``. See `flash_plugin.conformance.checks` for what
is checked and `flash_plugin.conformance.oracles` for the spy model and the tiny operator.

The names below are loaded on first use (PEP 562), so importing this package (as the pytest
plugin `flash_plugin.conformance.pytest_plugin` does) does not import the checks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .checks import (
        CHECKS,
        CheckFailure,
        CheckResult,
        NotApplicable,
        Problem,
        SolverCase,
        check_solver,
        format_results,
        parametrize_with_checks,
    )

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


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import checks

        return getattr(checks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
