"""The plugin manager: hook specs + external plugins (entry points) + built-in plugins.

`get_plugin_manager()` builds the manager on first use and caches it; importing this module has
no side effects. Building a manager (`make_plugin_manager`):

1. adds the specs of `flash_plugin.hookspecs`;
2. loads the entry points of group ``flash_plugin`` one by one, unless disabled by the
   environment (below). A plugin that fails to import, or does not validate against the specs,
   is unregistered, recorded in ``manager.load_failures`` and reported with a
   `PluginLoadWarning`; the other plugins still load;
3. registers the built-in plugin modules of `BUILTIN_PLUGINS` (under their module names) through
   the very same hooks;
4. calls ``check_pending()``.

Environment switches (read when a manager is built):

``FLASH_PLUGIN_DISABLE_EXTERNAL=1``
    load no entry points at all (built-ins only).
``FLASH_PLUGIN_LOAD_PLUGINS=name1,name2``
    load only these entry points (matched by entry-point name or distribution name); an empty
    value loads none.

Tests build a fresh manager with `make_plugin_manager` (uncached) and call
``get_plugin_manager.cache_clear()``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import pluggy

from flash_plugin import hookspecs
from flash_plugin.markers import PROJECT_NAME

ENTRY_POINT_GROUP = PROJECT_NAME
DISTRIBUTION_NAME = "flash-plugin"
ENV_DISABLE_EXTERNAL = "FLASH_PLUGIN_DISABLE_EXTERNAL"
ENV_LOAD_PLUGINS = "FLASH_PLUGIN_LOAD_PLUGINS"

BUILTIN_PLUGINS: tuple[str, ...] = (
    "flash_plugin.operators",
    "flash_plugin.solvers",
    "flash_plugin.severity",
    "flash_plugin.models",
)
"""Modules registered as built-in plugins. A module that does not exist yet, or that defines no
``flash_*`` hook implementation, is skipped; one that raises on import is a bug and raises."""

_TRUE = {"1", "true", "yes", "on"}


class PluginLoadWarning(UserWarning):
    """An external plugin could not be loaded and was skipped."""


@dataclass(frozen=True)
class PluginLoadFailure:
    """An entry point of group ``flash_plugin`` that could not be loaded.

    Attributes:
        name: the entry-point name (the plugin's name).
        value: what the entry point points at, e.g. ``"my_pkg.flash_hooks"``.
        distribution: the distribution that declares it (``None`` if unknown).
        version: that distribution's version.
        error: ``"ExceptionType: message"`` of what went wrong.
    """

    name: str
    value: str
    distribution: str | None
    version: str | None
    error: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class FlashPluginManager(pluggy.PluginManager):
    """A `pluggy.PluginManager` that also keeps the plugins that failed to load.

    Attributes:
        load_failures: one `PluginLoadFailure` per external plugin that was skipped.
        cache: derived data (e.g. the name registries of `flash_plugin.registry`); emptied
            whenever a plugin is registered or unregistered.
    """

    def __init__(self, project_name: str = PROJECT_NAME) -> None:
        super().__init__(project_name)
        self.load_failures: list[PluginLoadFailure] = []
        self.cache: dict[str, Any] = {}

    def register(self, plugin: object, name: str | None = None) -> str | None:
        self.cache.clear()
        return super().register(plugin, name)

    def unregister(self, plugin: object | None = None, name: str | None = None) -> Any | None:
        self.cache.clear()
        return super().unregister(plugin, name)


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def _env_allow_list() -> set[str] | None:
    raw = os.environ.get(ENV_LOAD_PLUGINS)
    if raw is None:
        return None
    return {_normalize(n) for n in raw.split(",") if n.strip()}


def _env_disabled() -> bool:
    return os.environ.get(ENV_DISABLE_EXTERNAL, "").strip().lower() in _TRUE


def _fail(pm: FlashPluginManager, failure: PluginLoadFailure) -> None:
    pm.load_failures.append(failure)
    dist = f" (distribution {failure.distribution} {failure.version})" if failure.distribution else ""
    warnings.warn(
        f"flash-plugin: plugin {failure.name!r}{dist} failed to load and was skipped: {failure.error}. "
        f"Run `flash-plugin plugins` to list plugins; set {ENV_LOAD_PLUGINS} to choose which ones load.",
        PluginLoadWarning,
        stacklevel=3,
    )


def _unknown_hooks(pm: pluggy.PluginManager, plugin: object) -> list[str]:
    """Hook implementations of ``plugin`` that match no spec and are not ``optionalhook``."""
    unknown = []
    for caller in pm.get_hookcallers(plugin) or []:
        if caller.has_spec():
            continue
        for impl in caller.get_hookimpls():
            if impl.plugin is plugin and not impl.optionalhook:
                unknown.append(caller.name)
    return sorted(set(unknown))


def load_external_plugins(pm: FlashPluginManager, allow: Iterable[str] | None = None) -> int:
    """Load the entry points of group ``flash_plugin`` into ``pm``, one at a time.

    Args:
        pm: the manager to load into.
        allow: if given, load only the entry points whose name or distribution name is listed.

    Returns:
        The number of plugins loaded. Failures are appended to ``pm.load_failures`` and warned
        about (`PluginLoadWarning`); they never stop the other plugins from loading.
    """
    allowed = None if allow is None else {_normalize(n) for n in allow}
    matched: set[str] = set()
    seen: set[str] = set()
    loaded = 0
    for dist in importlib.metadata.distributions():
        dist_name = dist.metadata["Name"]
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP or ep.name in seen:
                continue
            if allowed is not None:
                hit = {_normalize(ep.name), _normalize(dist_name or "")} & allowed
                if not hit:
                    continue
                matched |= hit
            seen.add(ep.name)
            if pm.is_blocked(ep.name) or pm.get_plugin(ep.name) is not None:
                continue
            try:
                pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=ep.name)
                plugin = pm.get_plugin(ep.name)
                unknown = _unknown_hooks(pm, plugin) if plugin is not None else []
                if unknown:
                    raise pluggy.PluginValidationError(
                        plugin,
                        f"implements unknown hook(s) {', '.join(unknown)} (known hooks: "
                        f"{', '.join(hook_names())}); mark it optionalhook=True if intended",
                    )
            except Exception as exc:  # a broken plugin must not take the others down
                if pm.get_plugin(ep.name) is not None:
                    pm.unregister(name=ep.name)
                _fail(pm, PluginLoadFailure(ep.name, ep.value, dist_name, dist.version, f"{type(exc).__name__}: {exc}"))
            else:
                loaded += 1
    if allowed is not None:
        for missing in sorted(allowed - matched):
            warnings.warn(
                f"flash-plugin: {ENV_LOAD_PLUGINS} names {missing!r} but no installed plugin has that name",
                PluginLoadWarning,
                stacklevel=2,
            )
    return loaded


def register_builtin_plugins(pm: pluggy.PluginManager, modules: Iterable[str] = BUILTIN_PLUGINS) -> list[str]:
    """Import and register the built-in plugin modules, each under its module name.

    A module that does not exist, or that defines no ``flash_*`` hook implementation, is skipped.
    Any other import error propagates (a broken built-in is a bug in flash-plugin).

    Returns:
        The names of the modules registered.
    """
    registered = []
    for modname in modules:
        try:
            module = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name is not None and (exc.name == modname or modname.startswith(exc.name + ".")):
                continue
            raise
        impls = [a for a in dir(module) if a.startswith("flash_") and pm.parse_hookimpl_opts(module, a) is not None]
        if impls and pm.get_plugin(modname) is None:
            pm.register(module, name=modname)
            registered.append(modname)
    return registered


def make_plugin_manager(
    *,
    load_external: bool | None = None,
    allow: Iterable[str] | None = None,
    builtins: Iterable[str] = BUILTIN_PLUGINS,
) -> FlashPluginManager:
    """Build a new (uncached) plugin manager.

    Args:
        load_external: load entry points of group ``flash_plugin``; ``None`` (default) follows
            the environment (``FLASH_PLUGIN_DISABLE_EXTERNAL``).
        allow: load only these external plugins (entry-point or distribution names); ``None``
            (default) follows ``FLASH_PLUGIN_LOAD_PLUGINS`` if set, else allows all.
        builtins: modules to register as built-in plugins.
    """
    pm = FlashPluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    if load_external is None:
        load_external = not _env_disabled()
    if allow is None:
        allow = _env_allow_list()
    if load_external:
        load_external_plugins(pm, allow)
    register_builtin_plugins(pm, builtins)
    pm.check_pending()
    return pm


@functools.cache
def get_plugin_manager() -> FlashPluginManager:
    """The process-wide plugin manager, built on first call (see `make_plugin_manager`).

    ``get_plugin_manager.cache_clear()`` forgets it (the next call builds a new one).
    """
    return make_plugin_manager()


def hook_names() -> list[str]:
    """Names of all hook specs in `flash_plugin.hookspecs`, sorted."""
    return sorted(n for n in vars(hookspecs) if n.startswith("flash_") and hasattr(getattr(hookspecs, n), f"{PROJECT_NAME}_spec"))


def list_plugins(pm: pluggy.PluginManager | None = None) -> list[dict[str, Any]]:
    """Describe the registered plugins: ``name``, ``distribution``, ``version``, ``builtin``, ``hooks``.

    Sorted by name. ``distribution``/``version`` are those of the distribution that declared the
    entry point; for built-ins, flash-plugin's own (``version`` is ``None`` when not installed).
    """
    pm = get_plugin_manager() if pm is None else pm
    distinfo = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    builtins = set(BUILTIN_PLUGINS)
    out = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:  # blocked
            continue
        dist = distinfo.get(id(plugin))
        builtin = name in builtins
        if dist is not None:
            dist_name, version = dist.project_name, dist.version
        elif builtin:
            dist_name, version = DISTRIBUTION_NAME, _own_version()
        else:
            dist_name = version = None
        hooks = sorted({caller.name for caller in pm.get_hookcallers(plugin) or []})
        out.append({"name": name, "distribution": dist_name, "version": version, "builtin": builtin, "hooks": hooks})
    return sorted(out, key=lambda d: d["name"])


def _own_version() -> str | None:
    try:
        return importlib.metadata.version(DISTRIBUTION_NAME)
    except importlib.metadata.PackageNotFoundError:
        return None
