"""Look up what plugins registered, and adapt third-party objects through the plugins.

The four name registries (solvers, operators, severity estimators, models) are filled by the
``flash_register_*`` hooks (see `flash_plugin.hookspecs`); each is built on first use and cached
on the plugin manager until a plugin is registered or unregistered. Every function takes an
optional ``pm``; by default the process-wide `flash_plugin.plugins.get_plugin_manager()` is used.
"""

from __future__ import annotations

import difflib
import inspect
import re
import typing
from dataclasses import dataclass
from typing import Any

import pluggy

from flash_plugin import plugins
from flash_plugin.errors import DuplicateNameError, NotAdaptableError, UnknownPluginNameError
from flash_plugin.protocols import Operator, SeverityEstimator, Solver

KINDS: dict[str, str] = {
    "solvers": "solver",
    "operators": "operator",
    "severity_estimators": "severity estimator",
    "models": "model",
}
"""Registry names (as in ``flash_register_<kind>``) and their singular, for messages."""

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*\Z")


@dataclass(frozen=True)
class Registration:
    """One name registered by a plugin.

    Attributes:
        kind: the registry, one of `KINDS` (``"solvers"``, ...).
        name: the registered name.
        factory: the registered callable.
        plugin: the name of the plugin that registered it.
    """

    kind: str
    name: str
    factory: Any
    plugin: str

    @property
    def target(self) -> str:
        """``module:qualname`` of the factory; for a factory that is an instance (e.g. a
        `TaskPreset`), that of its class."""
        factory = self.factory
        if not (inspect.isclass(factory) or inspect.isroutine(factory)):
            factory = type(factory)
        module = getattr(factory, "__module__", None) or "?"
        qualname = getattr(factory, "__qualname__", None) or getattr(factory, "__name__", None) or type(factory).__name__
        return f"{module}:{qualname}"

    @property
    def description(self) -> str:
        """One plain line: the factory's ``description`` string if it has one (presets and bundled
        encoders do), else the first line of its docstring; doc markup removed, empty if none."""
        desc = getattr(self.factory, "description", None)
        if not (isinstance(desc, str) and desc.strip()):
            desc = getattr(self.factory, "__doc__", None) or ""
        desc = desc.strip()
        return plain_text(desc.splitlines()[0]) if desc else ""

    @property
    def family(self) -> str | None:
        """The operator family the factory's objects belong to or were trained for
        (``operator_family``), for operators and severity estimators; ``None`` if not declared."""
        family = getattr(self.factory, "operator_family", None)
        return family if isinstance(family, str) else None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready data (strings and ``None`` only); operators and estimators add ``family``."""
        out: dict[str, Any] = {"name": self.name, "plugin": self.plugin, "target": self.target, "description": self.description}
        if self.kind in ("operators", "severity_estimators"):
            out["family"] = self.family
        return out


_ROLE_RE = re.compile(r":[A-Za-z][\w:.-]*:`([^`]*)`")
_LITERAL_RE = re.compile(r"``([^`]*)``|`([^`]*)`")


def plain_text(text: str) -> str:
    """``text`` without reStructuredText markup (roles, ``literals``, `references`), whitespace collapsed."""
    text = _ROLE_RE.sub(r"\1", text)
    text = _LITERAL_RE.sub(lambda m: m.group(1) if m.group(1) is not None else m.group(2), text)
    return " ".join(text.split())


def _manager(pm: pluggy.PluginManager | None) -> pluggy.PluginManager:
    return plugins.get_plugin_manager() if pm is None else pm


def _collect(pm: pluggy.PluginManager, kind: str) -> dict[str, Registration]:
    hookname = f"flash_register_{kind}"
    entries: dict[str, Registration] = {}
    for impl in getattr(pm.hook, hookname).get_hookimpls():
        if impl.hookwrapper or impl.wrapper:
            continue
        plugin_name = impl.plugin_name

        def register(name: str, factory: Any, _plugin: str = plugin_name) -> None:
            if not isinstance(name, str) or not _NAME_RE.match(name):
                raise ValueError(
                    f"plugin {_plugin!r} registered an invalid {KINDS[kind]} name {name!r}: "
                    "use letters, digits, '_', '-' and '.', starting with a letter or digit"
                )
            if not callable(factory):
                raise TypeError(f"plugin {_plugin!r} registered {KINDS[kind]} {name!r} with a non-callable factory {factory!r}")
            if name in entries:
                first = entries[name]
                raise DuplicateNameError(
                    f"{KINDS[kind]} name {name!r} is registered twice: by plugin {first.plugin!r} "
                    f"({first.target}) and by plugin {_plugin!r}; uninstall or block one of them "
                    f"(e.g. {plugins.ENV_LOAD_PLUGINS}=...)"
                )
            entries[name] = Registration(kind, name, factory, _plugin)

        kwargs = {"register": register}
        try:
            impl.function(*(kwargs[arg] for arg in impl.argnames))
        except Exception as exc:
            exc.add_note(f"raised in {hookname} of plugin {plugin_name!r}")
            raise
    return entries


def registry(kind: str, *, pm: pluggy.PluginManager | None = None) -> dict[str, Registration]:
    """All registrations of one kind (``"solvers"``, ``"operators"``, ``"severity_estimators"``,
    ``"models"``), by name, sorted. Raises `DuplicateNameError` if two plugins used one name."""
    if kind not in KINDS:
        raise ValueError(f"unknown registry {kind!r}; known: {', '.join(KINDS)}")
    pm = _manager(pm)
    cache = getattr(pm, "cache", None)
    key = f"registry:{kind}"
    if cache is not None and key in cache:
        return cache[key]
    entries = dict(sorted(_collect(pm, kind).items()))
    if cache is not None:
        cache[key] = entries
    return entries


def list_registered(*, pm: pluggy.PluginManager | None = None) -> dict[str, dict[str, Registration]]:
    """Every registry: ``{kind: {name: Registration}}`` for each kind of `KINDS`."""
    return {kind: registry(kind, pm=pm) for kind in KINDS}


def get_registration(kind: str, name: str, *, pm: pluggy.PluginManager | None = None) -> Registration:
    """The `Registration` of ``name`` in registry ``kind``; `UnknownPluginNameError` if absent."""
    pm = _manager(pm)
    entries = registry(kind, pm=pm)
    if name in entries:
        return entries[name]
    singular = KINDS[kind]
    if entries:
        msg = f"unknown {singular} name {name!r}; registered {kind.replace('_', ' ')}: {', '.join(entries)}"
        close = difflib.get_close_matches(str(name), list(entries), n=1)
        if close:
            msg += f" (did you mean {close[0]!r}?)"
    else:
        msg = f"unknown {singular} name {name!r}: no {kind.replace('_', ' ')} are registered"
    failures = getattr(pm, "load_failures", [])
    if failures:
        msg += f"; note: plugin(s) {', '.join(repr(f.name) for f in failures)} failed to load (see `flash-plugin plugins`)"
    raise UnknownPluginNameError(msg)


def get_solver(name: str, *, pm: pluggy.PluginManager | None = None) -> Any:
    """The solver factory registered as ``name``; `UnknownPluginNameError` lists the known names."""
    return get_registration("solvers", name, pm=pm).factory


def get_operator(name: str, *, pm: pluggy.PluginManager | None = None) -> Any:
    """The operator factory registered as ``name``; `UnknownPluginNameError` lists the known names."""
    return get_registration("operators", name, pm=pm).factory


def get_severity_estimator(name: str, *, pm: pluggy.PluginManager | None = None) -> Any:
    """The severity estimator factory registered as ``name``; `UnknownPluginNameError` lists the known names."""
    return get_registration("severity_estimators", name, pm=pm).factory


def get_model(name: str, *, pm: pluggy.PluginManager | None = None) -> Any:
    """The model loader registered as ``name``; `UnknownPluginNameError` lists the known names."""
    return get_registration("models", name, pm=pm).factory


# --- adaptation ---------------------------------------------------------------------------------


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
