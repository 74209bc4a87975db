"""pytest plugin of the conformance suite (entry point ``pytest11``: ``flash_plugin``).

Loaded into every pytest run of an environment where flash-plugin is installed, so it only
defines hooks and a fixture; nothing heavy is imported until the fixture is used.

* marker ``flash_conformance``: registered so that projects can tag their conformance tests
  (``pytest -m flash_conformance``) under ``--strict-markers``;
* fixture ``flash_solver_checks``: a function ``run(solver_or_factory, *, expected_failures=None,
  checks=None, problem=None) -> list[CheckResult]`` that runs
  `flash_plugin.conformance.check_solver` and fails the test with the report when a check failed::

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


def run_checks(solver_or_factory: Any, *, expected_failures=None, checks=None, problem=None) -> list:
    """`check_solver` that calls ``pytest.fail`` with the report when any check failed."""
    from .checks import check_solver, format_results

    results = check_solver(solver_or_factory, expected_failures=expected_failures, checks=checks, problem=problem)
    if any(r.status == "failed" for r in results):
        pytest.fail(format_results(results, title="flash-plugin conformance checks failed:", verbose=False), pytrace=False)
    return results


@pytest.fixture
def flash_solver_checks():
    """Run the conformance checks on a solver or factory; fails the test if any check fails."""
    return run_checks
