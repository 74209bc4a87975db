"""``flash-plugin plugins``: the loaded plugins and everything they registered."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

HELP = "list the loaded plugins and the registered solvers, operators, severity estimators and models"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("plugins", help=HELP, description=HELP[0].upper() + HELP[1:] + ".")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(func=run)
    return parser


def collect() -> dict[str, Any]:
    """What ``flash-plugin plugins --json`` prints: ``plugins``, ``failed`` and one list per registry
    (each entry plain data: ``name``, ``plugin``, ``target`` as ``module:qualname``, ``description``,
    and ``family`` for operators and severity estimators)."""
    from flash_plugin import plugins, registry

    pm = plugins.get_plugin_manager()
    report: dict[str, Any] = {
        "plugins": plugins.list_plugins(pm),
        "failed": [f.as_dict() for f in pm.load_failures],
    }
    for kind, entries in registry.list_registered(pm=pm).items():
        report[kind] = [r.as_dict() for r in entries.values()]
    return report


def _text(report: dict[str, Any]) -> str:
    """One line per plugin, per failure and per registered name."""
    from flash_plugin.registry import KINDS

    lines = [f"Plugins ({len(report['plugins'])}):"]
    for p in report["plugins"]:
        dist = f"{p['distribution']} {p['version'] or ''}".strip() if p["distribution"] else "-"
        tag = ", builtin" if p["builtin"] else ""
        lines.append(f"  {p['name']}  [{dist}{tag}]  hooks: {', '.join(p['hooks']) or '-'}")
    if report["failed"]:
        lines.append(f"Failed to load ({len(report['failed'])}):")
        for f in report["failed"]:
            dist = f" [{f['distribution']} {f['version']}]" if f["distribution"] else ""
            lines.append(f"  {f['name']} = {f['value']}{dist}: {f['error']}")
    for kind in KINDS:
        entries = report[kind]
        lines.append(f"{kind.replace('_', ' ').capitalize()} ({len(entries)}):")
        width = max((len(e["name"]) for e in entries), default=0)
        for e in entries:
            family = f"  [{e['family']}]" if e.get("family") else ""
            desc = f"  {e['description']}" if e["description"] else ""
            lines.append(f"  {e['name']:<{width}}  ({e['plugin']}){family}{desc}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = collect()
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(_text(report))
    return 0
