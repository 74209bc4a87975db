"""The conformance suite: the reference sampler passes, broken solvers fail the right check with a
useful message, black-box solvers get "not applicable" with reasons, expected failures are data,
`parametrize_with_checks` makes readable tests, the CLI and the pytest plugin work."""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import json
import re
import textwrap
from pathlib import Path

import pytest
import torch

from flash_plugin.errors import FlashInputError
from flash_plugin.protocols import LinearOperator, Operator
from flash_plugin.solvers import Sampler
from flash_plugin.types import StartPoint

conf = importlib.import_module("flash_plugin.conformance")
oracles = importlib.import_module("flash_plugin.conformance.oracles")
check_cmd = importlib.import_module("flash_plugin.commands.check")

pytest_plugins = ["pytester"]

ALL = list(conf.CHECKS)
SPY_CHECKS = {"check_schedule_matches_model", "check_start_makes_k_calls", "check_start_latent_is_first_input",
              "check_output_mean_from_any_start", "check_output_variance_bounded",
              "check_intermediate_states_on_forward_process", "check_resume_equals_tail",
              "check_guidance_points_to_posterior", "check_float64_problem_solves_in_float64"}


# ---- solvers under test ------------------------------------------------------------------------
def reference(model):
    return Sampler(model, num_steps=20)


class ToyDPS(Sampler):
    """A minimal guided solver: DDPM step minus ζ ∇_z ‖y − A(D(ẑ0(z)))‖ per sample (DPS-like)."""

    ignores_measurement = False
    zeta = 0.3
    batch_norm = False  # broken variant: one norm for the whole batch
    backward = False  # broken variant: loss.backward() (reaches the model's parameters)
    enable_grad = True  # broken variant: no torch.enable_grad() around the gradient

    def step(self, ctx):
        with torch.enable_grad() if self.enable_grad else contextlib.nullcontext():
            z = ctx.z.detach().requires_grad_(True)
            eps, x0 = self.predict(ctx, z)
            r = ctx.y - ctx.operator.forward(self.model.decode(x0))
            norm = r.norm() if self.batch_norm else r.flatten(1).norm(dim=1).sum()
            if self.backward:
                norm.backward()
                grad = z.grad
            else:
                (grad,) = torch.autograd.grad(norm, z)
        with torch.no_grad():
            return self.update(ctx, z.detach(), eps.detach(), x0.detach()) - self.zeta * grad


class BatchNormDPS(ToyDPS):
    batch_norm = True


class BackwardDPS(ToyDPS):
    backward = True


class NoEnableGradDPS(ToyDPS):
    enable_grad = False


class ExtraCallSampler(Sampler):
    """Makes one extra denoiser call after the loop."""

    def finish(self, z, y, operator, state):
        self.model.eps(z, torch.full((z.shape[0],), int(self.schedule.timesteps[1])))
        return z


class EarlyStartSampler(Sampler):
    """Off-by-one: a solve from step k starts at k + 1."""

    def solve(self, y, operator, *, start=None, generator=None):
        if start is not None:
            start = StartPoint((start.step + 1).clamp(max=self.schedule.num_steps), start.latent)
        return super().solve(y, operator, start=start, generator=generator)


class ShiftedTimestepSampler(Sampler):
    """The CompVis truncation off-by-one: step k queries the denoiser at timesteps[k + 1]."""

    def step(self, ctx):
        k = min(ctx.k + 1, self.schedule.num_steps)
        ctx.timestep = torch.full_like(ctx.timestep, int(self.schedule.timesteps[k]))
        return super().step(ctx)


class GlobalRNGSampler(Sampler):
    """Ignores the generator (draws from torch's global RNG)."""

    def solve(self, y, operator, *, start=None, generator=None):
        return super().solve(y, operator, start=start, generator=None)


class UncheckedStartSampler(Sampler):
    """Clamps out-of-range start steps instead of raising."""

    def solve(self, y, operator, *, start=None, generator=None):
        if start is not None:
            start = StartPoint(start.step.clamp(0, self.schedule.num_steps), start.latent)
        return super().solve(y, operator, start=start, generator=generator)


class Opaque:
    """A black-box solver: no model, no capabilities, only the Solver protocol."""

    def __init__(self, inner):
        self._inner = inner

    @property
    def schedule(self):
        return self._inner.schedule

    def solve(self, y, operator, *, start=None, generator=None):
        return self._inner.solve(y, operator, start=start, generator=generator)


def by_name(results):
    return {r.name: r for r in results}


# ---- the reference passes ----------------------------------------------------------------------
def test_reference_sampler_passes_every_check():
    results = conf.check_solver(lambda m: Sampler(m, num_steps=20))
    assert [r.name for r in results] == ALL and len(ALL) >= 22
    guidance = "check_guidance_points_to_posterior"  # the plain sampler declares that it ignores y
    assert {r.name: r.status for r in results} == {n: "not applicable" if n == guidance else "passed" for n in ALL}, \
        conf.format_results(results)
    assert all(r.ok and (r.message == "") == (r.name != guidance) for r in results)
    assert "ignores_measurement = True" in by_name(results)[guidance].message


def test_guided_solver_on_the_oracle_passes_every_check():
    """The mask operator makes a guided solver (operator.forward, autograd, select) work on the oracle."""
    results = conf.check_solver(lambda m: ToyDPS(m, num_steps=10))
    assert all(r.status == "passed" for r in results), conf.format_results(results)


# ---- broken solvers fail the right check -------------------------------------------------------
@pytest.mark.parametrize(
    "cls, check, phrases",
    [
        (ExtraCallSampler, "check_start_makes_k_calls", ["6 denoiser evaluations", "exactly 5", "one extra denoiser call after the last step"]),
        (EarlyStartSampler, "check_start_makes_k_calls", ["6 denoiser evaluations", "exactly 5", "starts one step too early"]),
        (ShiftedTimestepSampler, "check_start_makes_k_calls", ["at timesteps [501, 401, 301, 201, 101]", "exactly 5 at timesteps [401, 301, 201, 101, 1]", "off by one"]),
        (EarlyStartSampler, "check_start_at_zero_decodes_latent", ["denoiser evaluations", "no denoiser call"]),
        (GlobalRNGSampler, "check_deterministic_given_seed", ["same seed", "bit-identical", "global RNG"]),
        (GlobalRNGSampler, "check_flash_force_full_is_identity", ["differs from the unwrapped", "global RNG"]),
        (UncheckedStartSampler, "check_out_of_range_start_raises", ["returned a Solution", "StartStepError"]),
        (BatchNormDPS, "check_batch_matches_samples_alone", ["differs from the same sample solved alone", "batch-wide"]),
        (BackwardDPS, "check_model_unchanged", ["parameter gain.grad: None -> set", "torch.autograd.grad"]),
        (NoEnableGradDPS, "check_works_under_no_grad", ["under torch.no_grad() solve raised RuntimeError", "torch.enable_grad()"]),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else (v if isinstance(v, str) else None),
)
def test_broken_solver_fails_the_relevant_check(cls, check, phrases):
    (result,) = conf.check_solver(lambda m: cls(m, num_steps=10), checks=[check])
    assert result.status == "failed", result
    msg = result.message
    for part in ("observed:", "expected:", "likely cause:", "reproduce:", f"checks=[{check!r}]", cls.__name__):
        assert part in msg, msg
    for phrase in phrases:
        assert phrase in msg, msg


def test_a_check_raises_assertion_error_naming_observed_and_expected():
    with pytest.raises(AssertionError) as info:
        conf.CHECKS["check_start_makes_k_calls"](lambda m: ExtraCallSampler(m, num_steps=6))
    assert isinstance(info.value, conf.CheckFailure)
    assert re.search(r"observed: 4 denoiser evaluations at timesteps \[333, 167, 1, 1\]", str(info.value)), str(info.value)
    assert "expected: exactly 3 at timesteps [333, 167, 1]" in str(info.value)


def test_extra_call_also_breaks_the_full_solve_count():
    result = by_name(conf.check_solver(lambda m: ExtraCallSampler(m, num_steps=10)))
    assert result["check_full_solve"].status == "failed"
    assert "33 denoiser evaluations" in result["check_full_solve"].message and "3 x N = 30" in result["check_full_solve"].message
    assert result["check_schedule_is_valid"].status == "passed"


def test_solver_exception_is_a_failure_with_its_location():
    class Crashing(Sampler):
        def step(self, ctx):
            raise RuntimeError("boom")

    result = by_name(conf.check_solver(lambda m: Crashing(m, num_steps=5), checks=["full_solve", "schedule_is_valid"]))
    assert result["check_schedule_is_valid"].status == "passed"
    assert result["check_full_solve"].status == "failed"
    assert "RuntimeError: boom" in result["check_full_solve"].message and "in step" in result["check_full_solve"].message


def test_factory_returning_a_non_solver_fails():
    (result,) = conf.check_solver(lambda m: object(), checks=["schedule_is_valid"])
    assert result.status == "failed" and "observed: the factory returned a object, which is not a Solver" in result.message
    with pytest.raises(TypeError, match="factory"):
        conf.check_solver(42)


# ---- black-box solvers ---------------------------------------------------------------------------
def test_solver_object_gets_black_box_checks_and_reasons_for_the_rest():
    solver = Sampler(oracles.make_oracle(), num_steps=10)
    results = by_name(conf.check_solver(solver))
    for name in SPY_CHECKS:
        assert results[name].status == "not applicable"
        assert "factory make(model) -> Solver" in results[name].message and "opaque" in results[name].message
    assert {n for n, r in results.items() if r.status == "passed"} == set(ALL) - SPY_CHECKS


def test_opaque_solver_needs_a_problem():
    opaque = Opaque(Sampler(oracles.make_oracle(), num_steps=10))
    results = by_name(conf.check_solver(opaque))
    assert results["check_schedule_is_valid"].status == "passed"
    assert results["check_full_solve"].status == "not applicable"
    assert "problem=Problem(y, operator)" in results["check_full_solve"].message
    assert "supports_mixed_starts" in results["check_mixed_start_batch_matches_samples_alone"].message
    assert all(r.status in ("passed", "not applicable") for r in results.values())

    oracle = oracles.make_oracle()
    y, op = oracles.make_oracle_problem(oracle)
    results = by_name(conf.check_solver(opaque, problem=conf.Problem(y, op)))  # latent shape found by a probe solve
    applicable = {n for n, r in results.items() if r.status != "not applicable"}
    assert applicable == set(ALL) - SPY_CHECKS - {"check_mixed_start_batch_matches_samples_alone", "check_model_unchanged"}
    assert all(results[n].status == "passed" for n in applicable), conf.format_results(list(results.values()))


def test_black_box_broken_solver_still_fails():
    results = by_name(conf.check_solver(GlobalRNGSampler(oracles.make_oracle(), num_steps=8),
                                        checks=["deterministic_given_seed", "start_makes_k_calls"]))
    assert results["check_deterministic_given_seed"].status == "failed"
    assert "<your GlobalRNGSampler object>" in results["check_deterministic_given_seed"].message
    assert results["check_start_makes_k_calls"].status == "not applicable"


def test_not_applicable_is_a_pytest_skip():
    with pytest.raises(conf.NotApplicable) as info:
        conf.CHECKS["check_start_makes_k_calls"](Sampler(oracles.make_oracle(), num_steps=5))
    assert isinstance(info.value, __import__("unittest").SkipTest)


# ---- expected failures ---------------------------------------------------------------------------
def test_expected_failures_are_data():
    make = lambda m: ExtraCallSampler(m, num_steps=8)  # noqa: E731
    failing = {r.name for r in conf.check_solver(make) if r.status == "failed"}
    assert "check_start_makes_k_calls" in failing and "check_schedule_is_valid" not in failing
    expected = {name.removeprefix("check_") if i % 2 else name: "known: extra call in finish()" for i, name in enumerate(sorted(failing))}
    expected["check_schedule_is_valid"] = "listed by mistake"
    results = by_name(conf.check_solver(make, expected_failures=expected))
    assert {n for n, r in results.items() if r.status == "xfail"} == failing
    assert all("known: extra call in finish()" in results[n].message for n in failing)
    assert results["check_schedule_is_valid"].status == "passed"
    assert "expected failure" in results["check_schedule_is_valid"].message and "passed" in results["check_schedule_is_valid"].message
    assert all(r.ok for r in results.values())
    case = conf.SolverCase(make, name="Extra", expected_failures={"start_makes_k_calls": "known"})
    assert by_name(conf.check_solver(case, checks=["start_makes_k_calls"]))["check_start_makes_k_calls"].status == "xfail"
    with pytest.raises(FlashInputError, match="unknown conformance check 'no_such_thing'"):
        conf.check_solver(make, expected_failures={"no_such_thing": "?"})
    with pytest.raises(FlashInputError, match="unknown conformance check"):
        conf.check_solver(make, checks=["nope"])


# ---- parametrize_with_checks ------------------------------------------------------------------------
@conf.parametrize_with_checks([lambda m: Sampler(m, num_steps=12), conf.SolverCase(lambda m: ToyDPS(m, num_steps=6), name="ToyDPS")])
def test_parametrized_conformance(solver, check):
    check(solver)


def test_parametrize_with_checks_ids_and_marks():
    deco = conf.parametrize_with_checks(
        [reference, lambda m: Sampler(m, num_steps=5), conf.SolverCase(lambda m: ExtraCallSampler(m, num_steps=5), name="Extra")],
        expected_failures={"check_start_makes_k_calls": "known"},
        checks=["full_solve", "check_start_makes_k_calls"],
    )
    argnames, params = deco.args
    assert argnames == "solver, check"
    ids = [p.id for p in params]
    assert ids == [
        "Sampler-check_full_solve", "Sampler-check_start_makes_k_calls",
        "Sampler_2-check_full_solve", "Sampler_2-check_start_makes_k_calls",
        "Extra-check_full_solve", "Extra-check_start_makes_k_calls",
    ]
    assert all(re.fullmatch(r"[A-Za-z0-9_]+-check_[a-z_]+", i) for i in ids)
    assert [p.values[1] for p in params[:2]] == [conf.CHECKS["check_full_solve"], conf.CHECKS["check_start_makes_k_calls"]]
    xfails = [p.id for p in params if any(m.name == "xfail" for m in p.marks)]
    assert xfails == ["Sampler-check_start_makes_k_calls", "Sampler_2-check_start_makes_k_calls", "Extra-check_start_makes_k_calls"]
    full = conf.parametrize_with_checks([reference]).args[1]
    assert [p.id for p in full] == [f"Sampler-{name}" for name in ALL]


# ---- the operator of the oracles ----------------------------------------------------------------------
def test_mask_operator():
    g = torch.Generator().manual_seed(0)
    op = oracles.MaskOperator.random(3, (2, 4, 4), keep=0.5, noise_std=0.1, generator=g)
    assert isinstance(op, Operator) and isinstance(op, LinearOperator)
    x, v = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    assert torch.allclose((op.forward(x) * v).sum(), (x * op.adjoint(v)).sum())
    assert torch.equal(op.select([2, 0]).forward(x[[2, 0]]), op.forward(x)[[2, 0]])
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)]  # noqa: E731
    batch = op.measure(x, gens())
    alone = torch.cat([op.select([i]).measure(x[i : i + 1], [gens()[i]]) for i in range(3)])
    assert torch.equal(batch, alone)
    assert op.severity.shape == (3,) and torch.all((op.severity > 0) & (op.severity < 1))
    with pytest.raises(FlashInputError, match="select"):
        op.forward(x[:2])
    with pytest.raises(FlashInputError, match="binary"):
        oracles.MaskOperator(torch.full((1, 2), 0.5))
    oracle = oracles.make_oracle()
    y, op = oracles.make_oracle_problem(oracle)
    assert y.shape == (4, *oracle.image_shape) and oracle.calls == [] and y.dtype == torch.float32
    assert oracle.eps(torch.zeros(1, *oracle.latent_shape), torch.tensor([5])).shape == (1, *oracle.latent_shape)
    assert oracle.evaluations() == [5]


# ---- command line ------------------------------------------------------------------------------------
def run_cli(argv):
    parser = argparse.ArgumentParser(prog="flash-plugin")
    check_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_reference_sampler_passes(capsys):
    assert run_cli(["check", "flash_plugin.conformance.oracles:make_reference_sampler", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["kind"] == "factory"
    assert report["summary"] == {"passed": len(ALL) - 1, "failed": 0, "xfail": 0, "not applicable": 1}  # Sampler ignores y
    assert [r["name"] for r in report["results"]] == ALL
    from flash_plugin import cli  # the subcommand is wired into the real command line

    assert cli.main(["check", "flash_plugin.conformance.oracles:make_reference_sampler", "-c", "schedule_is_valid"]) == 0
    assert "1 passed, 0 failed" in capsys.readouterr().out


def test_cli_broken_solver_exits_1_and_expected_failures(tmp_path, monkeypatch, capsys):
    (tmp_path / "conf_cli_broken_mod.py").write_text(textwrap.dedent("""
        import torch
        from flash_plugin.solvers import Sampler

        class Unchecked(Sampler):
            def solve(self, y, operator, *, start=None, generator=None):
                if start is not None:
                    start = type(start)(start.step.clamp(0, self.schedule.num_steps), start.latent)
                return super().solve(y, operator, start=start, generator=generator)

        def make(model):
            return Unchecked(model, num_steps=6)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    try:
        assert run_cli(["check", "conf_cli_broken_mod:make", "-c", "out_of_range_start_raises", "-c", "full_solve"]) == 1
        out = capsys.readouterr().out
        assert "failed          check_out_of_range_start_raises" in out and "passed          check_full_solve" in out
        assert "flash-plugin check conf_cli_broken_mod:make --check check_out_of_range_start_raises" in out
        (tmp_path / "xf.json").write_text(json.dumps({"out_of_range_start_raises": "clamps on purpose"}))
        assert run_cli(["check", "conf_cli_broken_mod:make", "-c", "out_of_range_start_raises", "--expected-failures", "@xf.json"]) == 0
        assert "xfail" in capsys.readouterr().out
    finally:
        import sys

        sys.modules.pop("conf_cli_broken_mod", None)
    with pytest.raises(FlashInputError, match="module:attr"):
        run_cli(["check", "no_colon_here"])
    with pytest.raises(FlashInputError, match="cannot import"):
        run_cli(["check", "no_such_module_xyz:make"])
    with pytest.raises(FlashInputError, match="no attribute"):
        run_cli(["check", "flash_plugin.conformance.oracles:nope"])
    with pytest.raises(FlashInputError, match="JSON"):
        run_cli(["check", "flash_plugin.conformance.oracles:make_reference_sampler", "--expected-failures", "[1"])


def test_cli_checks_operators_and_estimators(tmp_path, monkeypatch, capsys):
    (tmp_path / "conf_cli_components_mod.py").write_text(textwrap.dedent("""
        import torch
        from flash_plugin.conformance import OperatorCase
        from flash_plugin.operators import GaussianBlur

        blur = OperatorCase(GaussianBlur(torch.tensor([1.0, 2.0]), 0.1), images=torch.zeros(2, 1, 8, 8) + 0.5)

        class Broken(GaussianBlur):
            def adjoint(self, y):
                return 2 * super().adjoint(y)

        broken = Broken(torch.tensor([1.0, 2.0]), 0.1)
        broken.image_shape = (1, 8, 8)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    try:
        assert run_cli(["check", "conf_cli_components_mod:blur", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["kind"] == "operator" and [r["name"] for r in report["results"]] == list(conf.OPERATOR_CHECKS)
        assert run_cli(["check", "conf_cli_components_mod:broken", "-c", "adjoint"]) == 1  # recognised as an operator
        out = capsys.readouterr().out
        assert "failed          check_operator_adjoint" in out and "operator" in out
        with pytest.raises(FlashInputError, match="the solver checks are"):
            run_cli(["check", "conf_cli_components_mod:broken", "--kind", "solver", "-c", "adjoint"])
    finally:
        import sys

        sys.modules.pop("conf_cli_components_mod", None)


# ---- pytest plugin --------------------------------------------------------------------------------------
def test_pytest_plugin_imports_nothing_heavy_at_import_time():
    for module in (importlib.import_module("flash_plugin.conformance.pytest_plugin"), conf):
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {a.name for node in tree.body if isinstance(node, ast.Import) for a in node.names}
        imported |= {node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.level == 0}
        assert imported <= {"__future__", "typing", "pytest"}, (module.__name__, imported)


def test_pytest_plugin_fixture_and_marker(pytester, monkeypatch):
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makepyfile(test_solvers="""
        import pytest
        import torch
        from flash_plugin.solvers import Sampler

        class Extra(Sampler):
            def finish(self, z, y, operator, state):
                self.model.eps(z, torch.full((z.shape[0],), int(self.schedule.timesteps[1])))
                return z

        @pytest.mark.flash_conformance
        def test_good(flash_solver_checks):
            results = flash_solver_checks(lambda m: Sampler(m, num_steps=6), checks=["full_solve", "start_makes_k_calls"])
            assert [r.status for r in results] == ["passed", "passed"]

        def test_broken(flash_solver_checks):
            flash_solver_checks(lambda m: Extra(m, num_steps=6), checks=["start_makes_k_calls"])

        def test_operator(flash_solver_checks):
            from flash_plugin.operators import GaussianBlur

            results = flash_solver_checks(GaussianBlur(torch.tensor([1.0, 2.0]), 0.1), images=torch.full((2, 1, 8, 8), 0.5))
            assert [r.name for r in results][0] == "check_operator_adjoint"
    """)
    result = pytester.runpytest_inprocess("-p", "flash_plugin.conformance.pytest_plugin", "--strict-markers", "-p", "no:cacheprovider",
                                          "-W", "ignore::pytest.PytestAssertRewriteWarning")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*failed*check_start_makes_k_calls*", "*observed: 4 denoiser evaluations*"])


def test_reference_resample_variants_and_time_travel():
    """Both ReSample variants pass every check; the original's time travel (5 extra UNet calls per
    DC event, on purpose) fails exactly the three call-count checks, and the mean check: its travel
    steps call the UNet one level below the ᾱ they use (the upstream's off-by-one), which biases
    the output mean (about 1.06x the data mean from k = N/2 on the oracle)."""
    from flash_plugin.solvers import OriginalReSample, ReSample

    for cls, kw in ((ReSample, {}), (OriginalReSample, {"time_travel": 0})):
        results = conf.check_solver(lambda m, cls=cls, kw=kw: cls(m, num_steps=20, dc_every=3, inner_steps=3, **kw))
        assert all(r.status == "passed" for r in results), conf.format_results(results)
    results = conf.check_solver(lambda m: OriginalReSample(m, num_steps=20, dc_every=3, inner_steps=3))
    failed = {r.name for r in results if r.status != "passed"}
    assert failed == {"check_full_solve", "check_start_makes_k_calls", "check_mixed_start_batch_matches_samples_alone",
                      "check_output_mean_from_any_start"}
