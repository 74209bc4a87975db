"""``flash-plugin check module:attr``: run the conformance checks on a solver, operator or estimator.

``attr`` names a factory ``make(model) -> Solver`` (all solver checks, on a spy Gaussian
oracle), a `Solver` object (black-box checks only), a `flash_plugin.conformance.SolverCase`, an
`Operator` / `OperatorCase` or a `SeverityEstimator` / `EstimatorCase` (the kind is recognised, or
forced with ``--kind``); dotted attribute paths are allowed. The current directory is importable,
as with ``python -m``. The exit status is 1 when a check failed (expected failures and checks that
do not apply do not count)::

    flash-plugin check flash_plugin.conformance.oracles:make_reference_sampler
    flash-plugin check my_pkg.solvers:make_solver --expected-failures '{"check_works_under_no_grad": "needs grad"}' --json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

HELP = "run the conformance checks on a solver (or solver factory), operator or severity estimator (module:attr)"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("check", help=HELP, description=HELP[0].upper() + HELP[1:] + ".")
    parser.add_argument("target", help="module:attr naming a factory make(model) -> Solver, a Solver, an Operator, "
                        "a severity estimator, or a SolverCase / OperatorCase / EstimatorCase")
    parser.add_argument("--kind", choices=("solver", "operator", "estimator"), default=None,
                        help="which checks to run (default: recognised from the object)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the statistical solver checks (default 0)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument(
        "--expected-failures",
        metavar="JSON",
        default=None,
        help='{"check_name": "reason", ...} as JSON text, or @path to a JSON file',
    )
    parser.add_argument(
        "--check",
        "-c",
        dest="checks",
        action="append",
        metavar="NAME",
        default=None,
        help="run only this check (repeatable; the check_ prefix may be omitted)",
    )
    parser.set_defaults(func=run)
    return parser


def resolve_target(target: str) -> Any:
    """The object named by ``module:attr`` (``attr`` may be dotted)."""
    from flash_plugin.errors import FlashInputError

    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise FlashInputError(f"target must be module:attr (e.g. my_pkg.solvers:make_solver), got {target!r}")
    cwd = os.getcwd()
    if cwd not in sys.path:  # like `python -m`: modules of the current directory are importable
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise FlashInputError(f"cannot import module {module_name!r} of target {target!r}: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise FlashInputError(f"{target!r}: {module_name} has no attribute {attr!r}") from None
    return obj


def _expected_failures(text: str | None) -> dict[str, str] | None:
    from flash_plugin.errors import FlashInputError

    if text is None:
        return None
    try:
        data = json.loads(Path(text[1:]).read_text() if text.startswith("@") else text)
    except (OSError, json.JSONDecodeError) as exc:
        raise FlashInputError(f"--expected-failures must be a JSON object or @file.json: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise FlashInputError('--expected-failures must be a JSON object {"check_name": "reason", ...}')
    return {k: str(v) for k, v in data.items()}


def run(args: argparse.Namespace) -> int:
    from flash_plugin.conformance import (
        SolverCase,
        check_operator,
        check_severity_estimator,
        check_solver,
        format_results,
        kind_of,
    )
    from flash_plugin.conformance.harness import is_factory, short_repr
    from flash_plugin.errors import FlashInputError

    obj = resolve_target(args.target)
    kind = args.kind or kind_of(obj)
    expected = _expected_failures(args.expected_failures)
    if kind == "solver":
        try:
            factory = is_factory(obj.solver if isinstance(obj, SolverCase) else obj)
        except TypeError as exc:
            raise FlashInputError(f"{args.target}: {exc}") from None
        results = check_solver(obj, expected_failures=expected, checks=args.checks, seed=args.seed)
        described = "factory (all checks, on a spy Gaussian oracle)" if factory else "solver object (black-box checks only)"
        label = "factory" if factory else "solver"
    else:
        door = check_operator if kind == "operator" else check_severity_estimator
        results = door(obj, expected_failures=expected, checks=args.checks)
        described = label = kind
    failed = any(r.status == "failed" for r in results)
    if args.json:
        report = {
            "target": args.target,
            "kind": label,
            "results": [{"name": r.name, "status": r.status, "message": r.message} for r in results],
            "summary": {s: sum(r.status == s for r in results) for s in ("passed", "failed", "xfail", "not applicable")},
            "ok": not failed,
        }
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        shown = args.target if label == "factory" else f"{args.target} = {short_repr(obj)}"
        print(format_results(results, title=f"Conformance checks of {shown}: {described}"))
    return 1 if failed else 0
