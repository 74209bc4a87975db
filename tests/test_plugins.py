"""Plugin manager, hook specs, name registries, adaptation hooks and `flash-plugin plugins`."""

from __future__ import annotations

import inspect
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from flash_plugin import adaptation, cli, hookspecs, plugins, registry
from flash_plugin.errors import DuplicateNameError, FlashError, NotAdaptableError, UnknownPluginNameError
from flash_plugin.markers import hookimpl
from flash_plugin.protocols import Operator, SeverityEstimator, Solver

REPO = Path(__file__).resolve().parents[1]

EXPECTED_HOOKS = {
    "flash_register_solvers": False,
    "flash_register_operators": False,
    "flash_register_severity_estimators": False,
    "flash_register_models": False,
    "flash_adapt_solver": True,
    "flash_adapt_operator": True,
    "flash_adapt_severity_estimator": True,
}  # name -> firstresult


def spec_opts(name: str) -> dict:
    return getattr(getattr(hookspecs, name), "flash_plugin_spec")


# --- hook specs ---------------------------------------------------------------------------------


def test_hookspecs_are_the_agreed_set():
    assert plugins.hook_names() == sorted(EXPECTED_HOOKS)
    for name, firstresult in EXPECTED_HOOKS.items():
        assert spec_opts(name)["firstresult"] is firstresult, name


@pytest.mark.parametrize("name", sorted(EXPECTED_HOOKS))
def test_every_hook_is_documented(name):
    spec = getattr(hookspecs, name)
    doc = inspect.getdoc(spec)
    assert doc, f"{name} has no docstring"
    assert "return" in doc.lower(), f"{name}: the docstring must say what to return"
    for param in inspect.signature(spec).parameters:
        assert f":param {param}:" in doc, f"{name}: parameter {param!r} is not documented"
    stops = "Stops at first non-None result" in doc
    assert stops is spec_opts(name)["firstresult"], f"{name}: say 'Stops at first non-None result' iff firstresult"


def test_every_hook_is_listed_in_the_readme():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    missing = [name for name in EXPECTED_HOOKS if f"`{name}" not in readme]
    assert not missing, f"README.md does not mention hook(s) {missing}"


def test_hookspecs_module_holds_only_specs():
    functions = [n for n, f in vars(hookspecs).items() if inspect.isfunction(f) and f.__module__ == hookspecs.__name__]
    assert sorted(functions) == sorted(EXPECTED_HOOKS)


# --- fake plugins -------------------------------------------------------------------------------


class FakeSolver:
    """A fake solver for tests."""

    schedule = None

    def solve(self, y, operator, *, start=None, generator=None):
        raise NotImplementedError


class Foreign:
    """A third-party object that satisfies no protocol."""


class RegistersEverything:
    @hookimpl
    def flash_register_solvers(self, register):
        register("fake-solver", FakeSolver)

    @hookimpl
    def flash_register_operators(self, register):
        register("fake-operator", FakeSolver)

    @hookimpl
    def flash_register_severity_estimators(self, register):
        register("fake-estimator", FakeSolver)

    @hookimpl
    def flash_register_models(self, register):
        register("fake-model", FakeSolver)


def test_fake_plugin_registers_in_every_registry(fresh_plugin_manager):
    pm = fresh_plugin_manager
    pm.register(RegistersEverything(), name="everything")
    assert registry.get_solver("fake-solver") is FakeSolver
    assert registry.get_operator("fake-operator") is FakeSolver
    assert registry.get_severity_estimator("fake-estimator") is FakeSolver
    assert registry.get_model("fake-model") is FakeSolver
    listed = registry.list_registered()
    assert set(listed) == set(registry.KINDS)
    entry = listed["solvers"]["fake-solver"]
    assert (entry.plugin, entry.description) == ("everything", "A fake solver for tests.")
    assert entry.target.endswith(":FakeSolver")


def test_registry_sees_plugins_registered_after_a_lookup(fresh_plugin_manager):
    pm = fresh_plugin_manager
    with pytest.raises(UnknownPluginNameError):
        registry.get_solver("fake-solver")
    plugin = RegistersEverything()
    pm.register(plugin, name="late")
    assert registry.get_solver("fake-solver") is FakeSolver
    pm.unregister(plugin)
    with pytest.raises(UnknownPluginNameError):
        registry.get_solver("fake-solver")


def test_impl_may_take_a_subset_of_arguments_and_a_module_is_a_plugin(fresh_plugin_manager, tmp_path, monkeypatch):
    (tmp_path / "fake_module_plugin.py").write_text(
        textwrap.dedent(
            """
            from flash_plugin.markers import hookimpl

            class Op:
                pass

            @hookimpl
            def flash_register_operators(register):
                register("module-op", Op)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import fake_module_plugin

    try:
        fresh_plugin_manager.register(fake_module_plugin)
        assert registry.get_operator("module-op") is fake_module_plugin.Op
    finally:
        sys.modules.pop("fake_module_plugin", None)


# --- bad input ----------------------------------------------------------------------------------


def test_unknown_name_lists_known_names(fresh_plugin_manager):
    fresh_plugin_manager.register(RegistersEverything(), name="everything")
    with pytest.raises(UnknownPluginNameError) as info:
        registry.get_solver("fake-slover")
    msg = str(info.value)
    assert "'fake-slover'" in msg and "fake-solver" in msg and "did you mean" in msg
    assert isinstance(info.value, KeyError) and isinstance(info.value, FlashError)
    with pytest.raises(UnknownPluginNameError, match="fake-model"):
        registry.get_model("nope")


def test_unknown_name_in_empty_registry():
    pm = plugins.make_plugin_manager(load_external=False, builtins=())
    with pytest.raises(UnknownPluginNameError, match="'nothing-here': no severity estimators are registered"):
        registry.get_severity_estimator("nothing-here", pm=pm)


def test_duplicate_name_names_both_plugins(fresh_plugin_manager):
    class A:
        @hookimpl
        def flash_register_solvers(self, register):
            register("same", FakeSolver)

    class B:
        @hookimpl
        def flash_register_solvers(self, register):
            register("same", Foreign)

        @hookimpl
        def flash_register_models(self, register):
            register("same", Foreign)  # same name in another registry is fine

    fresh_plugin_manager.register(A(), name="plugin-a")
    fresh_plugin_manager.register(B(), name="plugin-b")
    with pytest.raises(DuplicateNameError) as info:
        registry.get_solver("same")
    assert "'plugin-a'" in str(info.value) and "'plugin-b'" in str(info.value) and "'same'" in str(info.value)
    assert registry.get_model("same") is Foreign


@pytest.mark.parametrize("bad", ["", "with space", "-leading", 3])
def test_invalid_registered_name_is_rejected_naming_the_plugin(fresh_plugin_manager, bad):
    class Bad:
        @hookimpl
        def flash_register_models(self, register):
            register(bad, FakeSolver)

    fresh_plugin_manager.register(Bad(), name="bad-plugin")
    with pytest.raises(ValueError, match="bad-plugin"):
        registry.list_registered()


def test_unknown_registry_kind():
    with pytest.raises(ValueError, match="solvers"):
        registry.registry("sovlers")


# --- adaptation hooks (firstresult) -------------------------------------------------------------

ADAPTERS = [
    (registry.adapt_solver, "flash_adapt_solver", Solver),
    (registry.adapt_operator, "flash_adapt_operator", Operator),
    (registry.adapt_severity_estimator, "flash_adapt_severity_estimator", SeverityEstimator),
]


class SatisfiesAll:
    """Satisfies Solver, Operator and SeverityEstimator (structurally)."""

    schedule = None
    noise_std = 0.0
    metadata: dict = {}

    def solve(self, y, operator, *, start=None, generator=None): ...

    def forward(self, x): ...

    def measure(self, x, generator=None): ...

    def estimate(self, y): ...


def make_adapter_plugin(hookname, result, calls):
    class P:
        pass

    def impl(obj):
        calls.append(obj)
        return result

    impl.__name__ = hookname
    setattr(P, hookname, staticmethod(hookimpl(impl)))
    return P()


@pytest.mark.parametrize("adapt, hookname, protocol", ADAPTERS)
def test_adaptation_stops_at_first_non_none_result(fresh_plugin_manager, adapt, hookname, protocol):
    pm = fresh_plugin_manager
    adapted, other = SatisfiesAll(), SatisfiesAll()
    calls_first, calls_declines, calls_never = [], [], []
    # LIFO: the last registered plugin is called first.
    pm.register(make_adapter_plugin(hookname, other, calls_never), name="never-reached")
    pm.register(make_adapter_plugin(hookname, adapted, calls_first), name="adapts")
    pm.register(make_adapter_plugin(hookname, None, calls_declines), name="declines")
    obj = Foreign()
    assert adapt(obj) is adapted
    assert calls_declines == [obj] and calls_first == [obj] and calls_never == []


@pytest.mark.parametrize("adapt, hookname, protocol", ADAPTERS)
def test_object_satisfying_the_protocol_is_returned_unchanged(fresh_plugin_manager, adapt, hookname, protocol):
    calls = []
    fresh_plugin_manager.register(make_adapter_plugin(hookname, SatisfiesAll(), calls), name="adapts")
    obj = SatisfiesAll()
    assert adapt(obj) is obj and calls == []


@pytest.mark.parametrize("adapt, hookname, protocol", ADAPTERS)
def test_not_adaptable_says_what_is_missing(fresh_plugin_manager, adapt, hookname, protocol):
    calls = []
    fresh_plugin_manager.register(make_adapter_plugin(hookname, None, calls), name="declines")
    with pytest.raises(NotAdaptableError) as info:
        adapt(Foreign())
    msg = str(info.value)
    assert protocol.__name__ in msg and "Foreign" in msg and hookname in msg and "declines" in msg
    for member in adaptation._protocol_members(protocol):
        assert f"`{member}`" in msg
    assert isinstance(info.value, TypeError)


@pytest.mark.parametrize("adapt, hookname, protocol", ADAPTERS)
def test_plugin_returning_a_non_conforming_object_is_an_error(fresh_plugin_manager, adapt, hookname, protocol):
    fresh_plugin_manager.register(make_adapter_plugin(hookname, Foreign(), []), name="sloppy")
    with pytest.raises(NotAdaptableError, match=f"{hookname} returned .*not a {protocol.__name__}"):
        adapt(Foreign())


def test_registration_and_adaptation_are_called_through_pluggy(fresh_plugin_manager):
    """Both halves of the plugin API call the hooks through the plugin manager (its monitoring sees
    them), so an implementation registered under another name (``specname``) takes part too."""
    pm = fresh_plugin_manager
    seen = []
    undo = pm.add_hookcall_monitoring(lambda name, impls, kwargs: seen.append(name), lambda *a: None)

    class Renamed:
        @hookimpl(specname="flash_register_solvers")
        def provide(self, register):
            register("renamed-solver", FakeSolver)

        @hookimpl(specname="flash_adapt_solver")
        def adapt(self, obj):
            return SatisfiesAll() if isinstance(obj, Foreign) else None

    try:
        pm.register(Renamed(), name="renamed")
        entry = registry.registry("solvers")["renamed-solver"]
        assert (entry.factory, entry.plugin) == (FakeSolver, "renamed")
        assert isinstance(adaptation.adapt_solver(Foreign()), SatisfiesAll)
    finally:
        undo()
    assert "flash_register_solvers" in seen and "flash_adapt_solver" in seen
    assert registry.adapt_solver is adaptation.adapt_solver  # re-exported where flash() imports it


class ForeignSampler:
    """A third-party solver that is no `Solver`: ``sample(y, k, z, seeds)`` instead of ``solve``."""

    def __init__(self, model, num_steps):
        from flash_plugin.solvers import Sampler

        self._impl = Sampler(model, num_steps=num_steps)
        self.calls = []

    def sample(self, y, k, z, generators):
        from flash_plugin.types import StartPoint

        self.calls.append(None if k is None else k.tolist())
        start = None if k is None else StartPoint(k, z)
        return self._impl.solve(y, None, start=start, generator=generators)


class ForeignSamplerAdapter:
    """What a third-party plugin's ``flash_adapt_solver`` returns for a `ForeignSampler`."""

    def __init__(self, foreign):
        self.foreign = foreign
        self.schedule = foreign._impl.schedule

    def solve(self, y, operator, *, start=None, generator=None):
        return self.foreign.sample(y, None if start is None else start.step, None if start is None else start.latent, generator)


class ForeignEstimator:
    """A third-party severity model: ``predict(y) -> (latent, variance)``."""

    def predict(self, y):
        return y.clone(), torch.full((y.shape[0],), 0.05, dtype=torch.float64)


class ForeignPlugin:
    @hookimpl
    def flash_adapt_solver(self, obj):
        return ForeignSamplerAdapter(obj) if isinstance(obj, ForeignSampler) else None

    @hookimpl
    def flash_adapt_severity_estimator(self, obj):
        if not isinstance(obj, ForeignEstimator):
            return None
        from flash_plugin.types import SeverityEstimate

        class Estimator:
            metadata: dict = {}

            def estimate(self, y):
                return SeverityEstimate(*obj.predict(y))

        return Estimator()


def test_flash_uses_a_third_party_plugins_adaptation(fresh_plugin_manager):
    """A plugin registered with the plugin manager adapts foreign objects, and `flash()` runs
    through its adapters: the foreign solver starts each sample at its estimated step."""
    from flash_plugin import flash
    from flash_plugin.models.gaussian_oracle import GaussianOracle

    oracle = GaussianOracle(torch.full((2, 2, 2), 0.3), torch.full((2, 2, 2), 0.5))
    foreign = ForeignSampler(oracle, num_steps=50)
    with pytest.raises(NotAdaptableError, match="flash_adapt_solver"):
        flash(foreign, ForeignEstimator())
    fresh_plugin_manager.register(ForeignPlugin(), name="third-party")
    flashed = flash(foreign, ForeignEstimator())
    assert isinstance(flashed.solver, ForeignSamplerAdapter) and flashed.solver.foreign is foreign
    y = torch.randn(2, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    sol = flashed(y, None, generator=[torch.Generator().manual_seed(i) for i in range(2)])
    assert foreign.calls and all(k is not None for k in foreign.calls)  # the foreign sampler ran, from k* < N
    assert 0 < int(sol.start_step[0]) < 50 and torch.equal(sol.nfe, sol.start_step)


# --- entry points, environment switches, failures -----------------------------------------------

GOOD_PLUGIN = """
from flash_plugin.markers import hookimpl

def factory():
    '''Made by {name}.'''

@hookimpl
def flash_register_solvers(register):
    register("{name}-solver", factory)
"""


def two_fake_plugins(fake_distribution):
    fake_distribution("fake-dist-a", {"fake_a": "fake_plugin_a"}, {"fake_plugin_a": GOOD_PLUGIN.format(name="a")}, version="1.2")
    fake_distribution("fake-dist-b", {"fake_b": "fake_plugin_b"}, {"fake_plugin_b": GOOD_PLUGIN.format(name="b")})


def loaded(pm) -> set[str]:
    return {name for name, _ in pm.list_name_plugin() if name.startswith("fake_")}


def test_entry_points_are_loaded_with_their_distribution(fake_distribution):
    two_fake_plugins(fake_distribution)
    pm = plugins.make_plugin_manager(load_external=True, allow=["fake_a", "fake-dist-b"])
    assert loaded(pm) == {"fake_a", "fake_b"}
    assert registry.get_solver("a-solver", pm=pm).__doc__ == "Made by a."
    info = {p["name"]: p for p in plugins.list_plugins(pm)}["fake_a"]
    assert info == {"name": "fake_a", "distribution": "fake-dist-a", "version": "1.2", "builtin": False, "hooks": ["flash_register_solvers"]}


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, {"fake_a", "fake_b"}),
        ({plugins.ENV_DISABLE_EXTERNAL: "1"}, set()),
        ({plugins.ENV_DISABLE_EXTERNAL: "0"}, {"fake_a", "fake_b"}),
        ({plugins.ENV_LOAD_PLUGINS: "fake_a"}, {"fake_a"}),
        ({plugins.ENV_LOAD_PLUGINS: "fake-dist-b, fake_a"}, {"fake_a", "fake_b"}),
        ({plugins.ENV_LOAD_PLUGINS: "Fake_Dist_B"}, {"fake_b"}),
        ({plugins.ENV_LOAD_PLUGINS: ""}, set()),
        ({plugins.ENV_DISABLE_EXTERNAL: "1", plugins.ENV_LOAD_PLUGINS: "fake_a"}, set()),
    ],
)
def test_environment_switches(fake_distribution, monkeypatch, env, expected):
    two_fake_plugins(fake_distribution)
    monkeypatch.delenv(plugins.ENV_DISABLE_EXTERNAL, raising=False)
    monkeypatch.delenv(plugins.ENV_LOAD_PLUGINS, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugins.get_plugin_manager.cache_clear()
    try:
        assert loaded(plugins.get_plugin_manager()) == expected
    finally:
        plugins.get_plugin_manager.cache_clear()


def test_get_plugin_manager_is_cached_and_clearable(monkeypatch):
    monkeypatch.setenv(plugins.ENV_DISABLE_EXTERNAL, "1")
    plugins.get_plugin_manager.cache_clear()
    try:
        first = plugins.get_plugin_manager()
        assert plugins.get_plugin_manager() is first
        plugins.get_plugin_manager.cache_clear()
        assert plugins.get_plugin_manager() is not first
    finally:
        plugins.get_plugin_manager.cache_clear()


def test_allow_list_naming_no_installed_plugin_warns(fake_distribution):
    two_fake_plugins(fake_distribution)
    with pytest.warns(plugins.PluginLoadWarning, match="no-such-plugin"):
        pm = plugins.make_plugin_manager(load_external=True, allow=["fake_a", "no-such-plugin"])
    assert loaded(pm) == {"fake_a"}


BROKEN_PLUGINS = {
    "fake_import_error": ("fake_broken_import", "import fake_module_that_does_not_exist\n", "ModuleNotFoundError"),
    "fake_raises": ("fake_broken_raises", "raise RuntimeError('boom at import')\n", "RuntimeError: boom at import"),
    "fake_missing_attr": ("fake_broken_attr:nothing_here", "x = 1\n", "AttributeError"),
    "fake_unknown_hook": (
        "fake_broken_unknown",
        "from flash_plugin.markers import hookimpl\n@hookimpl\ndef flash_register_solverz(register):\n    pass\n",
        "unknown hook(s) flash_register_solverz",
    ),
    "fake_bad_args": (
        "fake_broken_args",
        "from flash_plugin.markers import hookimpl\n@hookimpl\ndef flash_register_solvers(register, nonsense):\n    pass\n",
        "nonsense",
    ),
}


@pytest.mark.parametrize("broken", sorted(BROKEN_PLUGINS))
def test_broken_plugin_is_reported_by_name_and_others_still_load(fake_distribution, broken):
    value, source, error = BROKEN_PLUGINS[broken]
    fake_distribution("fake-dist-broken", {broken: value}, {value.split(":")[0]: source}, version="0.3")
    two_fake_plugins(fake_distribution)
    with pytest.warns(plugins.PluginLoadWarning, match=broken):
        pm = plugins.make_plugin_manager(load_external=True, allow=["fake_a", "fake_b", broken])
    assert loaded(pm) == {"fake_a", "fake_b"}
    assert registry.get_solver("b-solver", pm=pm)
    [failure] = pm.load_failures
    assert (failure.name, failure.value, failure.distribution, failure.version) == (broken, value, "fake-dist-broken", "0.3")
    assert error in failure.error
    with pytest.raises(UnknownPluginNameError, match=broken):
        registry.get_solver("missing", pm=pm)


def test_cli_lists_the_failed_plugin(fake_distribution, monkeypatch, capsys):
    fake_distribution("fake-dist-broken", {"fake_broken": "fake_broken_mod"}, {"fake_broken_mod": "raise ImportError('nope')\n"})
    two_fake_plugins(fake_distribution)
    with pytest.warns(plugins.PluginLoadWarning):
        pm = plugins.make_plugin_manager(load_external=True, allow=["fake_a", "fake_broken"])
    monkeypatch.setattr(plugins, "get_plugin_manager", lambda: pm)
    assert cli.main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "fake_a" in out and "fake-dist-a 1.2" in out and "a-solver" in out
    assert "fake_broken" in out and "ImportError: nope" in out
    assert cli.main(["plugins", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [f["name"] for f in report["failed"]] == ["fake_broken"]
    assert {"name": "a-solver", "plugin": "fake_a", "description": "Made by a."}.items() <= report["solvers"][0].items()


# --- built-in plugins ---------------------------------------------------------------------------


def test_builtin_modules(tmp_path, monkeypatch):
    sources = {
        "fake_builtin_ok": "from flash_plugin.markers import hookimpl\n@hookimpl\ndef flash_register_models(register):\n    register('builtin-model', dict)\n",
        "fake_builtin_nohooks": "def flash_register_models(register):\n    pass\n",
    }
    for name, source in sources.items():
        (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        pm = plugins.make_plugin_manager(
            load_external=False, builtins=("fake_builtin_ok", "fake_builtin_nohooks", "fake_builtin_absent", "fake_builtin_absent.sub")
        )
        assert [n for n, _ in pm.list_name_plugin()] == ["fake_builtin_ok"]
        assert registry.get_model("builtin-model", pm=pm) is dict
    finally:
        for name in sources:
            sys.modules.pop(name, None)


@pytest.mark.parametrize(
    "source, error",
    [("raise RuntimeError('our bug')\n", RuntimeError), ("import fake_dependency_that_is_missing\n", ModuleNotFoundError)],
)
def test_builtin_that_fails_to_import_raises(tmp_path, monkeypatch, source, error):
    (tmp_path / "fake_builtin_broken.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(error):
            plugins.make_plugin_manager(load_external=False, builtins=("fake_builtin_broken",))
    finally:
        sys.modules.pop("fake_builtin_broken", None)


def test_real_builtins_register_through_the_hooks():
    """Every built-in module that exists and has hook implementations is registered, nothing else."""
    pm = plugins.make_plugin_manager(load_external=False)
    names = {n for n, _ in pm.list_name_plugin()}
    assert names <= set(plugins.BUILTIN_PLUGINS)
    for info in plugins.list_plugins(pm):
        assert info["builtin"] and info["distribution"] == "flash-plugin" and info["hooks"]
    registry.list_registered(pm=pm)  # no duplicates among the built-ins


def test_importing_the_plugin_modules_has_no_side_effects():
    import subprocess

    code = (
        "import sys, flash_plugin.plugins, flash_plugin.registry, flash_plugin.cli;"
        "assert flash_plugin.plugins.get_plugin_manager.cache_info().currsize == 0;"
        "flash_plugin.cli.build_parser();"
        "assert flash_plugin.plugins.get_plugin_manager.cache_info().currsize == 0"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO.parent)


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_plugins_text_and_json(fresh_plugin_manager, capsys):
    fresh_plugin_manager.register(RegistersEverything(), name="everything")
    assert cli.main(["plugins"]) == 0
    out = capsys.readouterr().out
    for word in ("everything", "fake-solver", "fake-operator", "fake-estimator", "fake-model", "Severity estimators"):
        assert word in out
    assert cli.main(["plugins", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"plugins", "failed", *registry.KINDS}
    assert "everything" in {p["name"] for p in report["plugins"]}
    assert [e["name"] for e in report["models"] if e["plugin"] == "everything"] == ["fake-model"]


def test_cli_reports_flash_errors_without_traceback(fresh_plugin_manager, capsys):
    class Dup:
        @hookimpl
        def flash_register_operators(self, register):
            register("twice", dict)
            register("twice", list)

    fresh_plugin_manager.register(Dup(), name="dup")
    assert cli.main(["plugins"]) == 1
    assert "flash-plugin: error:" in capsys.readouterr().err


def test_every_subcommand_module_adds_a_parser():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert "plugins" in sub.choices
    assert len(sub.choices) == len(cli.SUBCOMMAND_MODULES)
    for name, subparser in sub.choices.items():
        assert callable(subparser.get_default("func")), f"subcommand {name!r} sets no func"


def test_cli_requires_a_subcommand(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


# --- built-in registrations as `flash-plugin plugins` shows them --------------------------------------


def test_bundled_severity_encoders_are_registered_and_load_only_when_called(fresh_plugin_manager, monkeypatch):
    from flash_plugin.models import DEFAULT_MODEL_DIR
    from flash_plugin.severity.encoder import SeverityEncoder

    loads = []
    real = SeverityEncoder.from_pretrained.__func__
    monkeypatch.setattr(SeverityEncoder, "from_pretrained", classmethod(lambda cls, d, *a, **k: loads.append(d) or real(cls, d, *a, **k)))
    entries = registry.registry("severity_estimators")
    bundled = sorted(p.name for p in (DEFAULT_MODEL_DIR / "severity").iterdir() if p.is_dir())
    assert list(entries) == bundled and {e.plugin for e in entries.values()} == {"flash_plugin.severity"}
    assert loads == []  # registering and listing read no weights
    encoder = registry.get_severity_estimator("gblur-varying")()
    assert len(loads) == 1 and isinstance(encoder, SeverityEstimator)
    assert encoder.metadata["operator"] == "gblur-varying"
    assert [e["family"] for e in map(registry.Registration.as_dict, entries.values())] == ["gaussian-blur", "motion-blur", "inpainting"]


def test_cli_plugins_one_clean_line_per_entry(fresh_plugin_manager, capsys):
    from flash_plugin.operators import PRESETS

    assert cli.main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "(module doc" not in out and "`" not in out
    lines = out.splitlines()
    for name, preset in PRESETS.items():
        [line] = [ln for ln in lines if ln.split()[0] == name and "flash_plugin.operators" in ln]
        assert line.endswith(preset.description) and f"[{preset.operator_family}]" in line
    assert "Severity estimators (3):" in lines
    for plugin in plugins.list_plugins(fresh_plugin_manager):  # a plugin is one line, its hooks included
        [line] = [ln for ln in lines if ln.split()[0] == plugin["name"]]
        assert line.endswith("hooks: " + ", ".join(plugin["hooks"]))


def test_cli_plugins_json_holds_data_not_reprs(fresh_plugin_manager, capsys):
    import re

    assert cli.main(["plugins", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for kind in registry.KINDS:
        for entry in report[kind]:
            assert all(v is None or isinstance(v, str) for v in entry.values()), entry
            assert re.fullmatch(r"[\w.]+:[\w.]+", entry["target"]), entry
            assert "`" not in entry["description"] and "(module doc" not in entry["description"]
    presets = {e["name"]: e for e in report["operators"] if e["target"] == "flash_plugin.operators.presets:TaskPreset"}
    assert set(presets) == {"gblur-fixed", "gblur-varying", "nonlinear-blur", "random-inpainting"}
    assert presets["gblur-fixed"]["family"] == presets["gblur-varying"]["family"] == "gaussian-blur"


def test_plain_text_removes_doc_markup():
    assert registry.plain_text("Blur of std ``noise_std`` in `measure`; see :class:`GaussianBlur`.") == (
        "Blur of std noise_std in measure; see GaussianBlur."
    )
    assert registry.plain_text("  two   spaces ") == "two spaces"
