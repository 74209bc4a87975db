"""Shared fixtures.

* ``fresh_plugin_manager``: a new plugin manager (built-ins only, no entry points) that
  `flash_plugin.plugins.get_plugin_manager()` returns for the duration of the test, so code that
  uses the process-wide manager (the registry helpers, the CLI, ``flash()``) sees it. Register
  fake plugins on it with ``pm.register(obj, name=...)``.
* ``fake_distribution``: installs a fake distribution (a ``*.dist-info`` with an
  ``entry_points.txt``, plus its modules) on ``sys.path`` for the duration of the test.
"""

from __future__ import annotations

import functools
import sys
import textwrap
from pathlib import Path

import pytest

from flash_plugin import plugins


@pytest.fixture
def fresh_plugin_manager(monkeypatch: pytest.MonkeyPatch) -> plugins.FlashPluginManager:
    plugins.get_plugin_manager.cache_clear()
    pm = plugins.make_plugin_manager(load_external=False)
    monkeypatch.setattr(plugins, "get_plugin_manager", functools.cache(lambda: pm))
    yield pm
    plugins.get_plugin_manager.cache_clear()


@pytest.fixture
def fake_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``make(dist_name, entry_points={name: "module[:attr]"}, modules={module: source}, version="1.0")``.

    Each call creates its own site directory on ``sys.path``; the modules are removed from
    ``sys.modules`` after the test.
    """
    created: list[str] = []

    def make(
        dist_name: str,
        entry_points: dict[str, str],
        modules: dict[str, str] | None = None,
        version: str = "1.0",
        group: str = plugins.ENTRY_POINT_GROUP,
    ) -> Path:
        site = tmp_path / f"site-{dist_name}"
        info = site / f"{dist_name.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: {version}\n")
        lines = [f"[{group}]"] + [f"{name} = {value}" for name, value in entry_points.items()]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        for module, source in (modules or {}).items():
            (site / f"{module}.py").write_text(textwrap.dedent(source))
            created.append(module)
        monkeypatch.syspath_prepend(str(site))
        return site

    yield make
    for module in created:
        sys.modules.pop(module, None)
