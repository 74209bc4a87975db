"""The DPS adapter against a contract double of the DPS repository's sampler and 'ps' step.

`test_real_dps_*` run on a real checkout when ``FLASH_DPS_REPO`` (the repository root) and
``FLASH_MOTIONBLUR_REPO`` (a LeviBorodenko/motionblur checkout, imported as the package
``motionblur``, which the repository's ``util/img_utils.py`` imports) are set; skipped otherwise.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest
import torch

from flash_plugin.adapters.compvis import forget_upstream, import_upstream
from flash_plugin.adapters.dps import DPSAdapter, DPSModel, flash_adapt_solver, gaussian, is_dps_sample_fn
from flash_plugin.conformance.oracles import MaskOperator, make_oracle
from flash_plugin.errors import FlashInputError
from flash_plugin.types import StartPoint

DOUBLES = Path(__file__).parent / "doubles" / "dps"
PACKAGES = ("guided_diffusion", "util")


def _gens(n: int, base: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


@pytest.fixture
def dps_double():
    forget_upstream(PACKAGES)
    gd = import_upstream(DOUBLES, "guided_diffusion.gaussian_diffusion", PACKAGES)
    cm = import_upstream(DOUBLES, "guided_diffusion.condition_methods", PACKAGES)
    yield gd, cm, gd.create_sampler(1000, 30), torch.as_tensor(gd.linear_betas(1000))
    forget_upstream(PACKAGES)


def _setup(sampler, cm, betas, scale=0.3):
    model = make_oracle(alphas_cumprod=torch.cumprod(1 - betas, 0))
    g = torch.Generator().manual_seed(0)
    x = model.sample(3, g).float()
    op = MaskOperator((torch.rand(x.shape, generator=g) > 0.5).float(), noise_std=0.0)
    y = op.measure(x, generator=g)
    method = cm.get_conditioning_method("ps", None, gaussian, scale=scale)
    sample_fn = functools.partial(sampler.p_sample_loop, model=DPSModel(model), measurement_cond_fn=method.conditioning)
    return model, y, op, sample_fn


def _resume(sampler, cm, betas):
    model, y, op, sample_fn = _setup(sampler, cm, betas)
    adapter = flash_adapt_solver(sample_fn)
    assert isinstance(adapter, DPSAdapter)
    n = adapter.schedule.num_steps
    full = adapter.solve(y, op, generator=_gens(3), trajectory=True)
    out = {}
    for k in sorted({0, 1, n // 3, n - 1, n}):
        lat = torch.stack([full.extras["trajectory"][i][n - k] for i in range(3)])
        states = [full.extras["rng_states"][i][n - k] for i in range(3)]
        model.reset_calls()
        res = adapter.solve(y, op, start=StartPoint(torch.full((3,), k), lat), rng_state=states)
        assert [int(c[0]) for c in model.calls] == adapter.schedule.timesteps[1 : k + 1].flip(0).tolist() * 3
        out[k] = (res.nfe.tolist(), (res.latent - full.latent).abs().max().item())
    solo = torch.cat([adapter.solve(y[i : i + 1], op.select(torch.tensor([i])), generator=_gens(1, i)).latent for i in range(3)])
    return adapter, full, out, solo, (y, op)


def test_double_refuses_batches(dps_double):
    gd, cm, sampler, betas = dps_double
    model, y, op, sample_fn = _setup(sampler, cm, betas)
    with pytest.raises(RuntimeError):
        sample_fn(x_start=torch.randn(3, *model.latent_shape), measurement=y, record=False, save_root=None)


def test_exactly_k_calls_resume_batch(dps_double):
    gd, cm, sampler, betas = dps_double
    adapter, full, out, solo, (y, op) = _resume(sampler, cm, betas)
    for k, (nfe, diff) in out.items():
        assert nfe == [k] * 3 and diff == 0.0, (k, nfe, diff)
    assert torch.equal(solo, full.latent)
    state = torch.get_rng_state()
    again = adapter.solve(y, op, generator=_gens(3))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(again.latent, full.latent)
    assert not torch.equal(adapter.solve(y, op, generator=_gens(3, 5)).latent, full.latent)


def test_inputs_grad_modes_and_hook(dps_double):
    gd, cm, sampler, betas = dps_double
    model, y, op, sample_fn = _setup(sampler, cm, betas)
    assert is_dps_sample_fn(sample_fn) and flash_adapt_solver(sampler) is None and flash_adapt_solver(object()) is None
    adapter = DPSAdapter(sampler, model, scale=0.3)
    lat = torch.randn(3, *model.latent_shape)
    before = lat.clone()
    start = StartPoint(torch.tensor([5, 0, 30]), lat)
    ref = adapter.solve(y, op, start=start, generator=_gens(3))
    with torch.inference_mode():
        inf = adapter.solve(y, op, start=start, generator=_gens(3))
    assert torch.equal(ref.latent, inf.latent) and torch.equal(lat, before) and not lat.requires_grad
    assert ref.nfe.tolist() == [5, 0, 30] and torch.equal(ref.latent[1], lat[1])
    with pytest.raises(FlashInputError):
        DPSAdapter(sampler)  # no model
    with pytest.raises(FlashInputError):
        DPSAdapter(sampler, model, scale=-1)


REAL, MB = os.environ.get("FLASH_DPS_REPO"), os.environ.get("FLASH_MOTIONBLUR_REPO")


@pytest.fixture
def real_dps(tmp_path, monkeypatch):
    if not REAL or not MB:
        pytest.skip("FLASH_DPS_REPO and FLASH_MOTIONBLUR_REPO are not both set: no checkouts of "
                    "github.com/DPS2022/diffusion-posterior-sampling and github.com/LeviBorodenko/motionblur")
    (tmp_path / "motionblur").symlink_to(Path(MB).resolve())
    monkeypatch.syspath_prepend(str(tmp_path))
    forget_upstream(PACKAGES + ("motionblur",))
    gd = import_upstream(REAL, "guided_diffusion.gaussian_diffusion", PACKAGES)
    cm = import_upstream(REAL, "guided_diffusion.condition_methods", PACKAGES)
    sampler = gd.create_sampler(sampler="ddpm", steps=1000, noise_schedule="linear", model_mean_type="epsilon",
                                model_var_type="fixed_small", dynamic_threshold=False, clip_denoised=False,
                                rescale_timesteps=False, timestep_respacing="60")
    yield gd, cm, sampler, torch.as_tensor(gd.get_named_beta_schedule("linear", 1000))
    forget_upstream(PACKAGES + ("motionblur",))


def test_real_dps_calls_resume_batch(real_dps):
    gd, cm, sampler, betas = real_dps
    adapter, full, out, solo, _ = _resume(sampler, cm, betas)
    print(f"DPS: N={adapter.schedule.num_steps}", out, "batch vs alone", (solo - full.latent).abs().max().item())
    for k, (nfe, diff) in out.items():
        assert nfe == [k] * 3 and diff == 0.0
    assert torch.equal(solo, full.latent)
    y, op = _
    assert torch.equal(adapter.solve(y, op, generator=_gens(3)).latent, full.latent)
    assert not torch.equal(adapter.solve(y, op, generator=_gens(3, 5)).latent, full.latent)


DPS_EXPECTED_FAILURES: dict[str, str] = {}  # none: the DPS adapter passes every call-contract check


def test_conformance_call_contract(dps_double):
    from flash_plugin.conformance import SOLVER_CHECKS, check_solver, format_results

    gd, cm, _, _ = dps_double

    def make(model):
        acp = torch.as_tensor(model.alphas_cumprod, dtype=torch.float64)
        betas = 1 - acp / torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
        sampler = gd.DDPM(use_timesteps=[round(i * len(acp) / 20) for i in range(20)], betas=betas.numpy())
        return DPSAdapter(sampler, model, scale=0.3)

    statistical = ("output_mean_from_any_start", "output_variance_bounded", "intermediate_states_on_forward_process",
                   "resume_equals_tail", "guidance_points_to_posterior")
    names = [c.__name__ if callable(c) else c for c in SOLVER_CHECKS]
    names = [n for n in names if n.removeprefix("check_") not in statistical]
    results = check_solver(make, expected_failures=DPS_EXPECTED_FAILURES, checks=names)
    assert not [r for r in results if r.status == "failed"], format_results(results)
