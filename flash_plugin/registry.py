"""Look up what plugins registered: the four name registries (solvers, operators, severity
estimators, models).

Each registry is filled by calling its ``flash_register_*`` hook (see `flash_plugin.hookspecs`)
through pluggy, one plugin at a time so that every name is attributed to the plugin that
registered it; it is built on first use and cached on the plugin manager until a plugin is
registered or unregistered. Every function takes an optional ``pm``; by default the process-wide
`flash_plugin.plugins.get_plugin_manager()` is used. Adapting third-party objects is the other
half of the plugin API, in `flash_plugin.adaptation`; its functions are re-exported here.
"""

from __future__ import annotations

import difflib
import inspect
import re
from dataclasses import dataclass
from typing import Any

import pluggy

from flash_plugin import plugins
from flash_plugin.adaptation import adapt_operator, adapt_severity_estimator, adapt_solver  # noqa: F401 (re-exported)
from flash_plugin.errors import DuplicateNameError, UnknownPluginNameError

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
    impls = [impl for impl in getattr(pm.hook, hookname).get_hookimpls() if not (impl.hookwrapper or impl.wrapper)]
    for impl in impls:
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

        # pluggy calls this plugin's implementation alone, so each name is attributed to its plugin
        only_this = pm.subset_hook_caller(hookname, remove_plugins=[other.plugin for other in impls if other is not impl])
        try:
            only_this(register=register)
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
