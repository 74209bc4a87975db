"""The deepinv adapter (solvers and physics) against the real deepinv 0.5.

deepinv needs torch 2.14.1 + torchvision 0.29.1, so these tests run in their own environment
(``pip install -e ".[deepinv,test]"``; `.ci/run` builds it) and skip with the reason elsewhere.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.deepinv
dinv = pytest.importorskip("deepinv", reason="deepinv is not installed (it needs torch 2.14.1 + torchvision 0.29.1: pip install -e '.[deepinv]' in an environment of its own)")

from flash_plugin.adapters.deepinv import (  # noqa: E402
    DeepinvAdapter,
    EpsDenoiser,
    PhysicsOperator,
    flash_adapt_operator,
    flash_adapt_solver,
    operator_to_physics,
    vp_times,
)
from flash_plugin.conformance.oracles import MaskOperator, make_oracle  # noqa: E402
from flash_plugin.solvers.base import train_timesteps  # noqa: E402
from flash_plugin.types import NoiseSchedule, StartPoint  # noqa: E402


def _gens(n, base=0):
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


def _setup(n_steps=30, solver="ddpm"):
    model = make_oracle()
    sched = NoiseSchedule.from_train_alphas(model.alphas_cumprod, train_timesteps(1000, n_steps))
    grid = vp_times(sched.alphas_cumprod.flip(0))  # levels N..0 -> times, decreasing
    dps = dinv.sampling.DPS(EpsDenoiser(model), solver=dinv.sampling.DDPMSolver(timesteps=grid), weight=1.0,
                            minus_one_one=False)
    g = torch.Generator().manual_seed(0)
    x = model.sample(3, g).float()
    op = MaskOperator((torch.rand(x.shape, generator=g) > 0.5).float(), noise_std=0.05)
    return model, sched, dps, op, op.measure(x, generator=g)


def test_levels_map_exactly_onto_the_grid():
    model, sched, dps, op, y = _setup()
    a = flash_adapt_solver(dps)
    assert isinstance(a, DeepinvAdapter)
    assert torch.allclose(a.schedule.alphas_cumprod, sched.alphas_cumprod, rtol=0, atol=1e-9)


def test_exactly_k_calls_resume_batch_seed():
    model, sched, dps, op, y = _setup()
    a = DeepinvAdapter(dps)
    n = a.schedule.num_steps
    full = a.solve(y, op, generator=_gens(3), trajectory=True)
    assert full.nfe.tolist() == [n] * 3
    for k in sorted({0, 1, n // 3, n - 1, n}):
        model.reset_calls()
        res = a.solve(y, op, start=StartPoint(torch.full((3,), k), torch.randn(3, *model.latent_shape)), generator=_gens(3))
        assert res.nfe.tolist() == [k] * 3
        assert [int(c[0]) for c in model.calls] == sched.timesteps[1 : k + 1].flip(0).tolist() * 3
    solo = torch.cat([a.solve(y[i : i + 1], op.select(torch.tensor([i])), generator=_gens(1, i)).latent for i in range(3)])
    assert torch.equal(solo, full.latent)
    assert torch.equal(a.solve(y, op, generator=_gens(3)).latent, full.latent)
    assert not torch.equal(a.solve(y, op, generator=_gens(3, 9)).latent, full.latent)


def test_physics_both_ways():
    model, sched, dps, op, y = _setup()
    phys = operator_to_physics(op)
    x = torch.randn(3, *model.latent_shape)
    assert torch.allclose(phys.A(x), op.forward(x))
    back = flash_adapt_operator(phys)
    assert isinstance(back, PhysicsOperator) and back.noise_std == pytest.approx(0.05)
    assert torch.allclose(back.forward(x), op.forward(x)) and torch.allclose(back.adjoint(y), op.adjoint(y))
    assert flash_adapt_operator(op) is None and flash_adapt_solver(object()) is None


@pytest.mark.parametrize("solver", ["ddim", "ddpm"])
def test_exact_resume(solver):
    """Exactly k calls from every k; with the deterministic DDIM solver a solve from the level-k
    state of a full run equals its tail up to the float32 rounding of the stored state (DDPM draws
    from a stream the adapter does not replay: calls only)."""
    model = make_oracle()
    sched = NoiseSchedule.from_train_alphas(model.alphas_cumprod, train_timesteps(1000, 30))
    grid = vp_times(sched.alphas_cumprod.flip(0))
    cls = dinv.sampling.DDIMSolver if solver == "ddim" else dinv.sampling.DDPMSolver
    dps = dinv.sampling.DPS(EpsDenoiser(model), solver=cls(timesteps=grid), weight=1.0, minus_one_one=False)
    g = torch.Generator().manual_seed(0)
    x = model.sample(3, g).float()
    op = MaskOperator((torch.rand(x.shape, generator=g) > 0.5).float(), noise_std=0.05)
    y = op.measure(x, generator=g)
    a = DeepinvAdapter(dps)
    n = a.schedule.num_steps
    full = a.solve(y, op, generator=_gens(3), trajectory=True)
    out = {}
    for k in sorted({0, 1, n // 3, n - 1, n}):
        lat = torch.stack([full.extras["trajectory"][i][n - k] for i in range(3)])
        res = a.solve(y, op, start=StartPoint(torch.full((3,), k), lat), generator=_gens(3))
        out[k] = (res.nfe.tolist(), (res.latent - full.latent).abs().max().item())
    print(f"deepinv DPS ({solver}): N={n}", out)
    for k, (nfe, diff) in out.items():
        assert nfe == [k] * 3
        if solver == "ddim":
            assert diff < 1e-5, (k, diff)


def _conformance_factory(model):
    sched = NoiseSchedule.from_train_alphas(model.alphas_cumprod, train_timesteps(1000, 20))
    grid = vp_times(sched.alphas_cumprod.flip(0))
    return DeepinvAdapter(dinv.sampling.DPS(EpsDenoiser(model), solver=dinv.sampling.DDPMSolver(timesteps=grid), weight=1.0,
                                            minus_one_one=False))


DEEPINV_EXPECTED_FAILURES = {
    "output_mean_from_any_start": "deepinv's DPS builds its DPSDataFidelity with clip=[-1, 1] (deepinv/sampling/diffusion.py), "
    "so the denoised estimate it steps with is clipped: on the unit-variance oracle the output mean is 0.70x the data mean "
    "(read from deepinv's source; not isolated by an experiment)",
}
STATISTICAL = ("output_mean_from_any_start", "output_variance_bounded", "intermediate_states_on_forward_process",
               "resume_equals_tail", "guidance_points_to_posterior")


def _conformance(statistical: bool):
    from flash_plugin.conformance import SOLVER_CHECKS, check_solver, format_results

    names = [n for n in SOLVER_CHECKS if statistical or n.removeprefix("check_") not in STATISTICAL]
    results = check_solver(_conformance_factory, expected_failures=DEEPINV_EXPECTED_FAILURES, checks=names)
    assert not [r for r in results if r.status == "failed"], format_results(results)


def test_conformance_call_contract():
    _conformance(statistical=False)


@pytest.mark.slow
def test_conformance_statistical():
    """Every check, the statistical ones included (minutes: 2000-sample checks, one deepinv call per sample)."""
    _conformance(statistical=True)
