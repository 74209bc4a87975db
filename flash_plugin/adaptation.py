"""Adapt third-party objects to flash-plugin's protocols through the plugins' ``flash_adapt_*`` hooks.

An object that already satisfies the protocol is returned as it is; otherwise the plugin manager's
hook (``firstresult``: the first plugin that does not decline with ``None`` wins, the last
registered plugin first) is called through pluggy, so every installed or registered plugin takes
part, and its result is checked against the protocol. `flash()` adapts the solver and the
severity estimator it is given; `NotAdaptableError` says what the object lacks and which plugins
were asked. Every function takes an optional ``pm``; by default the process-wide
`flash_plugin.plugins.get_plugin_manager()` is used.
"""

from __future__ import annotations

import typing
from typing import Any

import pluggy

from flash_plugin import plugins
from flash_plugin.errors import NotAdaptableError
from flash_plugin.protocols import Operator, SeverityEstimator, Solver


def _manager(pm: pluggy.PluginManager | None) -> pluggy.PluginManager:
    return plugins.get_plugin_manager() if pm is None else pm


def _protocol_members(protocol: type) -> list[str]:
    members = getattr(protocol, "__protocol_attrs__", None)  # Python >= 3.12
    if members is None:
        members = typing._get_protocol_attrs(protocol)  # type: ignore[attr-defined]
    return sorted(members)


def _describe(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__} object"


def _missing(obj: Any, protocol: type) -> str:
    missing = [m for m in _protocol_members(protocol) if not hasattr(obj, m)]
    return ", ".join(f"`{m}`" for m in missing) or "nothing by name (check the members' kinds and signatures)"


def _adapt(obj: Any, protocol: type, hookname: str, pm: pluggy.PluginManager | None) -> Any:
    if isinstance(obj, protocol):
        return obj
    pm = _manager(pm)
    hook = getattr(pm.hook, hookname)
    adapted = hook(obj=obj)
    needs = ", ".join(f"`{m}`" for m in _protocol_members(protocol))
    if adapted is None:
        implementers = sorted({impl.plugin_name for impl in hook.get_hookimpls()})
        raise NotAdaptableError(
            f"{_describe(obj)} is not a {protocol.__name__} (the protocol needs {needs}; it lacks "
            f"{_missing(obj, protocol)}) and no plugin adapts it (plugins implementing {hookname}: "
            f"{', '.join(implementers) or 'none'}). Install or register a plugin implementing "
            f"{hookname} for this type, or wrap the object so that it provides {needs}."
        )
    if not isinstance(adapted, protocol):
        raise NotAdaptableError(
            f"a plugin's {hookname} returned {_describe(adapted)} for {_describe(obj)}, but that is "
            f"not a {protocol.__name__} either: it lacks {_missing(adapted, protocol)}"
        )
    return adapted


def adapt_solver(obj: Any, *, pm: pluggy.PluginManager | None = None) -> Solver:
    """``obj`` itself if it satisfies `Solver`, else the first non-None ``flash_adapt_solver``
    result; `NotAdaptableError` (saying what is missing) if no plugin adapts it."""
    return _adapt(obj, Solver, "flash_adapt_solver", pm)


def adapt_operator(obj: Any, *, pm: pluggy.PluginManager | None = None) -> Operator:
    """``obj`` itself if it satisfies `Operator`, else the first non-None ``flash_adapt_operator``
    result; `NotAdaptableError` (saying what is missing) if no plugin adapts it."""
    return _adapt(obj, Operator, "flash_adapt_operator", pm)


def adapt_severity_estimator(obj: Any, *, pm: pluggy.PluginManager | None = None) -> SeverityEstimator:
    """``obj`` itself if it satisfies `SeverityEstimator`, else the first non-None
    ``flash_adapt_severity_estimator`` result; `NotAdaptableError` if no plugin adapts it."""
    return _adapt(obj, SeverityEstimator, "flash_adapt_severity_estimator", pm)
