"""pytest plugin of the conformance suite (entry point ``pytest11``: ``flash_plugin``).

Loaded into every pytest run where flash-plugin is installed, so it imports nothing heavy: it
registers the marker ``flash_conformance`` and the fixture ``flash_solver_checks``::

    def test_my_solver(flash_solver_checks):
        flash_solver_checks(lambda model: MySolver(model, num_steps=20))
"""

from __future__ import annotations

from typing import Any

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "flash_conformance: conformance checks of a flash-plugin solver (flash_plugin.conformance)"
    )


def run_checks(obj: Any, *, expected_failures=None, checks=None, **kwargs: Any) -> list:
    """Run the door of ``obj``'s kind (`check_solver`, `check_operator`, `check_severity_estimator`)
    with these arguments; ``pytest.fail`` with the report when a check failed."""
    from .doors import check_operator, check_severity_estimator, check_solver, format_results, kind_of

    door = {"solver": check_solver, "operator": check_operator, "estimator": check_severity_estimator}[kind_of(obj)]
    results = door(obj, expected_failures=expected_failures, checks=checks, **kwargs)
    if any(r.status == "failed" for r in results):
        pytest.fail(format_results(results, title="flash-plugin conformance checks failed:", verbose=False), pytrace=False)
    return results


@pytest.fixture
def flash_solver_checks():
    """Run the conformance checks on a solver (or factory), operator or estimator; fails the test if any check fails."""
    return run_checks
