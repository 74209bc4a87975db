"""The ``flash-plugin`` command line (argparse), one subcommand per module of `SUBCOMMAND_MODULES`.

A subcommand module defines ``add_parser(subparsers)``, which adds its parser and sets
``func=run``, and ``run(args) -> int | None``, the exit status (``None``: 0). Heavy imports (torch,
diffusers) stay inside ``run`` so that ``flash-plugin --help`` is fast. A `FlashError` is printed
as ``flash-plugin: error: ...`` with exit status 1; other exceptions keep their traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
from collections.abc import Sequence

from flash_plugin.errors import FlashError

SUBCOMMAND_MODULES: list[str] = [
    "flash_plugin.commands.demo",
    "flash_plugin.commands.bench",
    "flash_plugin.commands.reconstruct",
    "flash_plugin.commands.train_severity",
    "flash_plugin.commands.eval_severity",
    "flash_plugin.commands.check",
    "flash_plugin.commands.plugins",
]
"""Modules that each add one subcommand (see the module docstring); others append to this list."""


def _version() -> str:
    try:
        return importlib.metadata.version("flash-plugin")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per module of `SUBCOMMAND_MODULES`."""
    parser = argparse.ArgumentParser(
        prog="flash-plugin",
        description="Sample-adaptive reconstruction with diffusion models (Flash-Diffusion as a plugin).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True)
    for modname in SUBCOMMAND_MODULES:
        importlib.import_module(modname).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flash-plugin`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
    except FlashError as exc:
        print(f"flash-plugin: error: {exc}", file=sys.stderr)
        return 1
    return 0 if status is None else int(status)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
