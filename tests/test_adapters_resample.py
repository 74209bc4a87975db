"""The ReSample adapter against a contract double of ReSample's sampler and 'ps' step.

`test_real_resample_*` run on a real checkout when ``FLASH_RESAMPLE_REPO`` points at one (skipped
with the reason otherwise). The real repository imports ``torchvision.utils`` (unused on this
path); where torchvision does not import next to the project's torch, those tests put a two-module
stand-in into ``sys.modules`` for the duration of the test.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest
import torch

from flash_plugin.adapters.compvis import CompVisModel, forget_upstream, import_upstream
from flash_plugin.adapters.resample import ReSampleAdapter, flash_adapt_solver, is_resample_sampler
from flash_plugin.conformance.oracles import MaskOperator, make_oracle
from flash_plugin.errors import FlashInputError
from flash_plugin.types import StartPoint

DOUBLES = Path(__file__).parent / "doubles" / "compvis"
PACKAGES = ("ldm", "ldm_inverse", "scripts")


def _gens(n: int, base: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


@pytest.fixture
def resample_module():
    forget_upstream(PACKAGES)
    yield import_upstream(DOUBLES, "ldm.models.diffusion.ddim")
    forget_upstream(PACKAGES)


def _problem(model, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = model.sample(batch, g).float()
    op = MaskOperator((torch.rand(x.shape, generator=g) > 0.5).float(), noise_std=0.0)
    return op.measure(x, generator=g), op


def dc_events(n: int, k: int, mode: str) -> int:
    """DC events of the upstream loop (module docstring of the adapter), counted independently."""
    total = n if mode == "keep_full_run_phases" else k
    third = total // 3
    positions = range(min(k, total) - 1, -1, -1)  # indices of the positions actually run
    return sum(1 for index in positions if 0 < index <= total - third and index % 10 == 0)


def _resume(module, mode: str, num_steps: int = 60, ks=None):
    model = make_oracle()
    y, op = _problem(model)
    adapter = ReSampleAdapter(module.DDIMSampler(CompVisModel(model)), start_mode=mode, num_steps=num_steps)
    n = adapter.schedule.num_steps
    full = adapter.solve(y, op, generator=_gens(3), trajectory=True)
    out = {}
    for k in ks or sorted({0, 1, n // 3, n // 2, n - 1, n}):
        lat = torch.stack([full.extras["trajectory"][i][n - k] for i in range(3)])
        states = [full.extras["rng_states"][i][n - k] for i in range(3)]
        res = adapter.solve(y, op, start=StartPoint(torch.full((3,), k), lat), rng_state=states)
        out[k] = (res.nfe.tolist(), (res.latent - full.latent).abs().max().item())
    return adapter, full, out


@pytest.mark.parametrize("mode", ["keep_full_run_phases", "upstream_truncation"])
def test_calls_are_k_plus_time_travel(resample_module, mode):
    adapter, full, out = _resume(resample_module, mode)
    n = adapter.schedule.num_steps
    assert full.nfe.tolist() == [n + 5 * dc_events(n, n, mode)] * 3
    for k, (nfe, diff) in out.items():
        travel = 5 * dc_events(n, k, mode) if k else 0
        assert nfe == [k + travel] * 3, (k, nfe)
        if mode == "keep_full_run_phases":
            assert diff == 0.0, (k, diff)  # a solve from level k is the tail of the full run
    if mode == "upstream_truncation":  # phases re-derived from k: not the tail (here at k = N/2)
        assert out[n // 2][1] > 1e-3


def test_batch_solo_seed_and_inputs(resample_module):
    model = make_oracle()
    y, op = _problem(model)
    adapter = ReSampleAdapter(resample_module.DDIMSampler(CompVisModel(model)), num_steps=40)
    lat = torch.randn(3, *model.latent_shape)
    before = lat.clone()
    start = StartPoint(torch.tensor([40, 25, 0]), lat)
    state = torch.get_rng_state()
    batch = adapter.solve(y, op, start=start, generator=_gens(3))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(lat, before) and not lat.requires_grad
    solo = torch.cat([adapter.solve(y[i : i + 1], op.select(torch.tensor([i])), generator=_gens(1, i),
                                    start=StartPoint(start.step[i : i + 1], lat[i : i + 1])).latent for i in range(3)])
    assert torch.equal(batch.latent, solo)
    with torch.inference_mode():
        again = adapter.solve(y, op, start=start, generator=_gens(3))
    assert torch.equal(again.latent, batch.latent)
    assert not torch.equal(adapter.solve(y, op, start=start, generator=_gens(3, 7)).latent, batch.latent)


def test_hook_and_bad_input(resample_module):
    sampler = resample_module.DDIMSampler(CompVisModel(make_oracle()))
    assert is_resample_sampler(sampler)
    adapted = flash_adapt_solver(sampler)
    assert isinstance(adapted, ReSampleAdapter) and adapted.schedule.num_steps == 500
    assert adapted.start_mode == "keep_full_run_phases"
    for other in (object(), resample_module.DDIMSampler, None):
        assert flash_adapt_solver(other) is None
    from flash_plugin.adapters.psld import flash_adapt_solver as psld_hook

    assert psld_hook(sampler) is None  # the PSLD adapter does not claim ReSample's sampler
    with pytest.raises(FlashInputError):
        ReSampleAdapter(sampler, start_mode="truncate")
    with pytest.raises(FlashInputError, match="S < 1000"):
        ReSampleAdapter(sampler, num_steps=1000)


# ---- the real repository (opt-in) --------------------------------------------------------------
REAL = os.environ.get("FLASH_RESAMPLE_REPO")


@pytest.fixture
def real_resample(monkeypatch):
    if not REAL:
        pytest.skip("FLASH_RESAMPLE_REPO is not set: no checkout of github.com/soominkwon/resample to test against")
    pytest.importorskip("einops", reason="the ReSample repository imports einops")
    pytest.importorskip("yaml", reason="the ReSample repository imports yaml")
    import diffusers  # noqa: F401  (imported first: it probes torchvision's spec, which a stand-in lacks)

    try:
        import torchvision.utils  # noqa: F401
    except Exception:  # torchvision does not import next to this torch: a stand-in for the unused import
        tv, tvu = types.ModuleType("torchvision"), types.ModuleType("torchvision.utils")
        tv.torch, tv.utils = torch, tvu
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setitem(sys.modules, "torchvision", tv)
        monkeypatch.setitem(sys.modules, "torchvision.utils", tvu)
    forget_upstream(PACKAGES)
    yield import_upstream(REAL, "ldm.models.diffusion.ddim", PACKAGES)
    forget_upstream(PACKAGES)


@pytest.mark.parametrize("mode", ["keep_full_run_phases", "upstream_truncation"])
def test_real_resample_calls_and_resume(real_resample, mode):
    adapter, full, out = _resume(real_resample, mode, num_steps=100)
    n = adapter.schedule.num_steps
    print(f"ReSample {mode}: N={n} full nfe {full.nfe.tolist()}", out)
    assert full.nfe.tolist() == [n + 5 * dc_events(n, n, mode)] * 3
    for k, (nfe, diff) in out.items():
        assert nfe == [k + (5 * dc_events(n, k, mode) if k else 0)] * 3
        if mode == "keep_full_run_phases":
            assert diff == 0.0


def test_real_resample_batch_and_hook(real_resample):
    model = make_oracle()
    y, op = _problem(model)
    sampler = real_resample.DDIMSampler(CompVisModel(model))
    assert isinstance(flash_adapt_solver(sampler), ReSampleAdapter)
    adapter = ReSampleAdapter(sampler, num_steps=40)
    batch = adapter.solve(y, op, generator=_gens(3))
    solo = torch.cat([adapter.solve(y[i : i + 1], op.select(torch.tensor([i])), generator=_gens(1, i)).latent for i in range(3)])
    assert torch.equal(batch.latent, solo)
    assert torch.equal(adapter.solve(y, op, generator=_gens(3)).latent, batch.latent)


RESAMPLE_EXPECTED_FAILURES = {
    "schedule_matches_model": "the adapter's schedule is the upstream's own float32 ddim_alphas (what the sampler "
    "really uses), 1e-8 from the model's float64 ᾱ",
    "full_solve": "ReSample's time travel makes 5 extra denoiser calls per data-consistency event (k + 5·events, "
    "reported honestly in Solution.nfe; checked in test_calls_are_k_plus_time_travel)",
    "start_makes_k_calls": "the same time-travel calls: k + 5·events denoiser calls from step k",
    "output_variance_bounded": "the CompVis sampler's last step ends at ᾱ_train[0] = 0.9985, not at 1: the output keeps "
    "noise of variance 0.0015, 16.9x the near-deterministic oracle's data variance (as for PSLD)",
    "resume_equals_tail": "with one upstream call per sample, the time-travel calls at lower levels' timesteps are read as "
    "states of those levels (χ² 70.7 vs 62.6, variance ratio up to 1.62); exact resume in this mode is measured "
    "per sample in this file's own tests (0.0)",
}


def test_conformance_call_contract(resample_module):
    from flash_plugin.conformance import SOLVER_CHECKS, check_solver, format_results

    statistical = ("output_mean_from_any_start", "output_variance_bounded", "intermediate_states_on_forward_process",
                   "resume_equals_tail", "guidance_points_to_posterior")
    names = [c.__name__ if callable(c) else c for c in SOLVER_CHECKS]
    names = [n for n in names if n.removeprefix("check_") not in statistical]
    results = check_solver(lambda model: ReSampleAdapter(resample_module.DDIMSampler(CompVisModel(model)), num_steps=20),
                           expected_failures=RESAMPLE_EXPECTED_FAILURES, checks=names)
    assert not [r for r in results if r.status == "failed"], format_results(results)
