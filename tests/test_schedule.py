"""Start-step selection and start latent (flash_plugin.schedule)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flash_plugin.errors import FlashInputError, SeverityError, StartStepError
from flash_plugin.schedule import allocate_steps, select_start_step, start_latent
from flash_plugin.solvers.base import train_timesteps
from flash_plugin.types import NoiseSchedule


def ldm_alphas_numpy():
    betas = np.linspace(np.sqrt(0.0015), np.sqrt(0.0195), 1000, dtype=np.float64) ** 2
    return np.cumprod(1 - betas)


def ddpm_schedule():
    acp = torch.from_numpy(ldm_alphas_numpy())
    return NoiseSchedule.from_train_alphas(acp, train_timesteps(1000, 1000))


def brute_force_k(acp_levels: np.ndarray, var: float) -> int:
    """Independent reference: scan every level k = 1..N (k = 0 has infinite SNR) in plain Python."""
    best_k, best_d = 0, float("inf")
    for k in range(1, len(acp_levels)):
        d = abs(acp_levels[k] / (1 - acp_levels[k]) - 1 / var)
        if d < best_d:
            best_k, best_d = k, d
    return best_k


# σ̂² -> k* on the paper's LDM schedule, DDPM-1000. Level k uses ᾱ = alphas_cumprod[k - 1]
# (k counts the steps that remain), so k* = the paper's 0-based index + 1; the paper's table
# (0.155 -> 78, 0.36 -> 143, 1.0 -> 254) is the 0-based index of the matched ᾱ.
TABLE = [(0.001, None), (0.01, None), (0.05, None), (0.1, None), (0.155, 79), (0.25, None), (0.36, 144), (1.0, 255), (5.0, None)]


@pytest.mark.parametrize("var,paper_k", TABLE)
def test_start_step_table_matches_brute_force(var, paper_k):
    acp = ldm_alphas_numpy()
    levels = np.concatenate([[1.0], acp])
    expected = brute_force_k(levels, var)
    got = select_start_step(ddpm_schedule(), torch.tensor([var], dtype=torch.float64)).item()
    assert got == expected
    if paper_k is not None:
        assert got == paper_k


def test_start_step_on_ddim_subsequence_and_diffusers_timesteps():
    from diffusers import DDIMScheduler

    acp = torch.from_numpy(ldm_alphas_numpy())
    ddim = NoiseSchedule.from_train_alphas(acp, train_timesteps(1000, 500))
    assert ddim.num_steps == 500 and ddim.timesteps[1] == 1 and ddim.timesteps[500] == 999
    levels = ddim.alphas_cumprod.numpy()
    for var in (0.02, 0.155, 0.36, 2.0):
        assert select_start_step(ddim, torch.tensor([var])).item() == brute_force_k(levels, var)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear")
    sched.set_timesteps(50)
    ns = NoiseSchedule.from_train_alphas(sched.alphas_cumprod, sched.timesteps)
    assert ns.num_steps == 50
    levels = ns.alphas_cumprod.numpy()
    for var in (0.02, 0.155, 0.36):
        assert select_start_step(ns, torch.tensor([var])).item() == brute_force_k(levels, var)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=1e-5, max_value=50.0, allow_nan=False), min_size=2, max_size=8))
def test_start_step_is_monotone_in_variance(variances):
    v = torch.tensor(sorted(variances), dtype=torch.float64)
    k = select_start_step(ddpm_schedule(), v)
    assert torch.all(k[1:] >= k[:-1]), (v.tolist(), k.tolist())


def test_clamps_and_bad_variances():
    s = ddpm_schedule()
    assert select_start_step(s, torch.tensor([1e-6]), min_step=5).item() == 5
    assert select_start_step(s, torch.tensor([10.0]), max_step=100).item() == 100
    for bad in ([float("nan")], [-0.1], [0.0], [float("inf")]):
        with pytest.raises(SeverityError):
            select_start_step(s, torch.tensor(bad))
    with pytest.raises(SeverityError, match="1-D"):
        select_start_step(s, torch.tensor(0.1))
    with pytest.raises(FlashInputError, match="min_step"):
        select_start_step(s, torch.tensor([0.1]), min_step=10, max_step=5)


def test_start_latent_noise_correction_and_guard():
    s = ddpm_schedule()
    zhat = torch.ones(3, 2)
    var = torch.tensor([0.1, 0.5, 0.9])
    noise = torch.randn(3, 2)
    k = select_start_step(s, var)
    z, k2 = start_latent(zhat, var, k, s, noise_correction=1.0, noise=noise)
    expected = (1 - var).sqrt()[:, None] * zhat + var.sqrt()[:, None] * noise
    torch.testing.assert_close(z, expected)
    assert torch.equal(k, k2)
    # c·σ̂² >= 1: warn and start from noise at k = N.
    with pytest.warns(UserWarning, match="no signal"):
        z, k3 = start_latent(zhat, var, k, s, noise_correction=1.2, noise=noise)
    assert k3[2].item() == s.num_steps and k3[0].item() == k[0].item()
    assert torch.all(torch.isfinite(z))
    torch.testing.assert_close(z[2], noise[2])
    # c = 0: the start is ẑ itself, at the SNR-matched step
    z0, k0 = start_latent(zhat, var, k, s, noise_correction=0.0, noise=noise)
    assert torch.equal(z0, zhat) and torch.equal(k0, k)
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(FlashInputError, match="noise_correction"):
            start_latent(zhat, var, k, s, noise_correction=bad, noise=noise)


def test_start_latent_snr_matched_and_zero_step():
    s = ddpm_schedule()
    zhat, noise = torch.randn(2, 3), torch.randn(2, 3)
    k = torch.tensor([0, 100])
    z, _ = start_latent(zhat, torch.tensor([1e-4, 0.3]), k, s, mode="snr_matched", noise=noise)
    torch.testing.assert_close(z[0], zhat[0])  # k = 0: nothing to denoise
    a, b = s.a[100].float(), s.b[100].float()
    torch.testing.assert_close(z[1], a * zhat[1] + b * noise[1])


def test_schedule_validates_steps():
    s = ddpm_schedule()
    with pytest.raises(StartStepError, match="0..1000"):
        s.check_steps(torch.tensor([1001]))
    with pytest.raises(StartStepError):
        s.check_steps(torch.tensor([-1]))
    with pytest.raises(StartStepError, match="integers"):
        s.check_steps(torch.tensor([1.0]))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(1e-4, 2.0), min_size=1, max_size=40),
    st.floats(0.0, 1.0),
    st.sampled_from([20, 100, 1000]),
)
def test_allocate_steps_meets_the_budget_exactly_and_keeps_the_order(variances, fraction, n):
    sched = NoiseSchedule.from_train_alphas(torch.from_numpy(ldm_alphas_numpy()), train_timesteps(1000, n))
    v = torch.tensor(variances, dtype=torch.float64)
    budget = fraction * n
    k = allocate_steps(sched, v, budget)
    assert int(k.sum()) == round(budget * len(v))  # the mean is the budget (to 1/B)
    assert int(k.min()) >= 0 and int(k.max()) <= n
    order = torch.argsort(v, stable=True)
    assert bool((k[order][1:] >= k[order][:-1]).all())  # a larger σ̂² never gets fewer steps


def test_allocate_steps_bounds_fixed_samples_and_errors():
    sched = NoiseSchedule.from_train_alphas(torch.from_numpy(ldm_alphas_numpy()), train_timesteps(1000, 100))
    v = torch.tensor([0.01, 0.1, 0.3, 0.02])
    k = allocate_steps(sched, v, 30, min_step=10, max_step=60)
    assert int(k.sum()) == 120 and int(k.min()) >= 10 and int(k.max()) <= 60
    fixed = torch.tensor([False, False, True, False])
    k = allocate_steps(sched, v, 40, fixed=fixed)
    assert int(k[2]) == 100 and int(k.sum()) == 160
    with pytest.raises(FlashInputError, match="out of reach"):
        allocate_steps(sched, v, 70, max_step=60)
    with pytest.raises(FlashInputError, match="out of reach"):
        allocate_steps(sched, v, 10, fixed=fixed)  # 100 of the 40 steps go to the held sample alone
    with pytest.raises(FlashInputError, match="budget"):
        allocate_steps(sched, v, float("nan"))


class FourEstimates:
    """ẑ = y and a fixed σ̂² for a batch of four."""

    metadata: dict = {}

    def estimate(self, y):
        from flash_plugin.types import SeverityEstimate

        return SeverityEstimate(y.clone(), torch.tensor([0.02, 0.5, 0.1, 0.05], dtype=torch.float64))


def sampler_on_oracle(num_steps: int):
    from flash_plugin.models.gaussian_oracle import GaussianOracle
    from flash_plugin.solvers import Sampler

    return Sampler(GaussianOracle(torch.zeros(1, 2, 2), torch.ones(1, 2, 2)), num_steps=num_steps)


def test_flash_budget_mode_spends_the_budget():
    from flash_plugin import FlashConfig, flash

    y = torch.zeros(4, 1, 2, 2)
    sol = flash(sampler_on_oracle(100), FourEstimates(), FlashConfig(budget=25.0))(y, None)
    assert int(sol.nfe.sum()) == 100 and sol.nfe.tolist() == sol.start_step.tolist()
    assert sol.start_step[1] == sol.start_step.max() and sol.start_step[0] == sol.start_step.min()
    with pytest.raises(FlashInputError, match="exclude each other"):
        FlashConfig(budget=10, force_step=5)
    with pytest.raises(FlashInputError, match="budget"):
        FlashConfig(budget=-1)


# --- calibrated start policies (StartPolicy) ---------------------------------------------------

from flash_plugin.schedule import StartPolicy  # noqa: E402


def test_start_policy_maps_sigma2_through_its_thresholds():
    pol = StartPolicy((0.1, 0.2), (10, 50, 100))
    got = pol(torch.tensor([0.05, 0.1, 0.15, 0.2, 0.3], dtype=torch.float64))
    assert got.dtype == torch.long and got.tolist() == [10, 10, 50, 50, 100]
    assert StartPolicy((), (25,))(torch.tensor([1e-6, 9.0])).tolist() == [25, 25]
    assert StartPolicy.from_dict(pol.to_dict()) == pol and pol.max_step == 100


@pytest.mark.parametrize("thresholds, steps, match", [
    ((0.1,), (10,), "one step more"),
    ((0.1,), (50, 10), "must not decrease"),
    ((0.2, 0.1), (1, 2, 3), "strictly increasing"),
    ((float("nan"),), (1, 2), "finite"),
    ((0.1,), (1, 2.5), "integers"),
    ((0.1,), (-1, 2), "integers"),
])
def test_start_policy_refuses_bad_tables(thresholds, steps, match):
    with pytest.raises(FlashInputError, match=match):
        StartPolicy(thresholds, steps)


def test_start_policy_refuses_bad_variances_and_bad_dicts():
    pol = StartPolicy((0.1,), (10, 20))
    with pytest.raises(SeverityError):
        pol(torch.tensor([0.1, float("nan")]))
    with pytest.raises(FlashInputError, match="'thresholds' and 'steps'"):
        StartPolicy.from_dict({"steps": [1]})


def test_flash_with_a_start_policy_starts_where_the_policy_says():
    from flash_plugin import FlashConfig, flash

    y = torch.zeros(4, 1, 2, 2)
    pol = StartPolicy((0.04, 0.2), (5, 20, 60))
    # variance_scale must not move the steps: the policy reads the raw σ̂²
    sol = flash(sampler_on_oracle(100), FourEstimates(), FlashConfig(start_policy=pol, variance_scale=8.0, noise_correction=0.0))(y, None)
    assert sol.start_step.tolist() == [5, 60, 20, 20] and sol.nfe.tolist() == [5, 60, 20, 20]
    clamped = flash(sampler_on_oracle(100), FourEstimates(), FlashConfig(start_policy=pol, max_step=30))(y, None)
    assert clamped.start_step.tolist() == [5, 30, 20, 20]
    with pytest.raises(FlashInputError, match="calibrated for another schedule"):
        flash(sampler_on_oracle(50), FourEstimates(), FlashConfig(start_policy=pol))
    with pytest.raises(FlashInputError, match="excludes budget and force_step"):
        FlashConfig(start_policy=pol, budget=10)
    with pytest.raises(FlashInputError, match="must be a flash_plugin.schedule.StartPolicy"):
        FlashConfig(start_policy={"thresholds": [], "steps": [3]})
