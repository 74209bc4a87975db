"""Reference solvers (Latent-DPS, GML-DPS, PSLD, ReSample): reduction to the plain sampler, data
consistency, exact NFE/timesteps, absolute ReSample phases, batch = samples alone, no graph left,
diffusers pipelines, hyperparameter table and plugin registration.

Tiny models only: the analytic Gaussian oracle (identity autoencoder) and a random-weight
LatentDiffusion (1x16x16 images, 4x8x8 latents).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flash_plugin.bench.solver_overhead import tiny_components
from flash_plugin.errors import FlashInputError, OperatorCapabilityError, UnknownPluginNameError
from flash_plugin.flash import FlashConfig
from flash_plugin.models.architectures import ldm_alphas_cumprod
from flash_plugin.models.gaussian_oracle import GaussianOracle
from flash_plugin.models.latent_diffusion import LatentDiffusion
from flash_plugin.protocols import LinearOperator, MixedStartSolver, Solver
from flash_plugin.solvers import (
    GMLDPS,
    PAPER_HPARAMS,
    PSLD,
    SOLVERS,
    TASKS,
    TUNED_HPARAMS,
    LatentDPS,
    OriginalReSample,
    ReSample,
    Sampler,
    get_hparams,
    make_solver,
)
from flash_plugin.solvers.hparams import load_evidence
from flash_plugin.types import StartPoint

torch.set_num_threads(1)  # 2 shared cores; the tiny models gain nothing from more


# ---- operators defined here until flash_plugin.operators lands --------------------------------
class MaskOperator:
    """Per-sample pixel mask ``y = m ⊙ x`` (self-adjoint), with ``select`` for mixed starts;
    ``noise_std`` is a float or one value per sample."""

    def __init__(self, mask: torch.Tensor, noise_std: float | torch.Tensor = 0.0):
        self.mask = mask
        self.noise_std = noise_std

    def forward(self, x):
        return x * self.mask.to(x)

    def measure(self, x, generator=None):
        std = torch.as_tensor(self.noise_std, dtype=x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        return self.forward(x) + std * self.mask.to(x) * torch.randn(x.shape, generator=generator).to(x)

    def adjoint(self, y):
        return y * self.mask.to(y)

    def select(self, index):
        std = self.noise_std[index.cpu()] if isinstance(self.noise_std, torch.Tensor) else self.noise_std
        return type(self)(self.mask[index.cpu()], std)


class ForwardOnlyMask:
    """Forward only: no adjoint (nonlinear-blur-like as far as the solvers can tell)."""

    def __init__(self, mask, noise_std=0.0):
        self.mask, self.noise_std = mask, noise_std

    def forward(self, x):
        return x * self.mask.to(x)

    def measure(self, x, generator=None):
        return self.forward(x)

    def select(self, index):
        return ForwardOnlyMask(self.mask[index.cpu()], self.noise_std)


def gens(seeds):
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


# ---- models -----------------------------------------------------------------------------------
SHAPE = (1, 6, 6)


@pytest.fixture(scope="module")
def oracle():
    g = torch.Generator().manual_seed(0)
    mean = 0.3 * torch.randn(SHAPE, generator=g)
    var = 0.1 + 0.5 * torch.rand(SHAPE, generator=g)
    return GaussianOracle(mean, var)


@pytest.fixture(scope="module")
def tiny():
    ae, unet = tiny_components()
    return LatentDiffusion(ae, unet, ldm_alphas_cumprod(), name="tiny")


# ---- solver factories ---------------------------------------------------------------------------
NAMES = ["latent-dps", "gml-dps", "psld", "resample", "resample-original"]
RESAMPLE = {"flash": ReSample, "original": OriginalReSample}  # the two versions, by their old `variant` names


def zero_guidance(name, model, n):
    """(solver with all guidance off, the plain sampler it must equal)."""
    if name == "latent-dps":
        s = LatentDPS(model, zeta=0.0, num_steps=n)
    elif name == "gml-dps":
        s = GMLDPS(model, zeta=0.0, gamma=0.0, num_steps=n)
    elif name == "psld":
        s = PSLD(model, zeta=0.0, gamma=0.0, num_steps=n)
    elif name == "resample":
        s = ReSample(model, num_steps=n, dc_every=0)
    else:
        s = OriginalReSample(model, num_steps=n, dc_every=0, dps_scale=0.0)
    return s, Sampler(model, num_steps=n, eta=s.eta)


def guided(name, model, n, **kw):
    if name == "latent-dps":
        return LatentDPS(model, zeta=kw.get("zeta", 1.0), num_steps=n)
    if name == "gml-dps":
        return GMLDPS(model, zeta=kw.get("zeta", 1.0), gamma=0.05, num_steps=n)
    if name == "psld":
        return PSLD(model, zeta=kw.get("zeta", 1.0), gamma=0.5, num_steps=n)
    if name == "resample":
        return ReSample(model, num_steps=n, dc_every=kw.get("dc_every", 10), inner_steps=kw.get("inner_steps", 100))
    return OriginalReSample(model, num_steps=n, dc_every=kw.get("dc_every", 10), inner_steps=kw.get("inner_steps", 100))


def oracle_problem(oracle, b=4, seed=1, noise_std=0.0):
    g = torch.Generator().manual_seed(seed)
    x = oracle.sample(b, g).float()
    mask = (torch.rand((b, *SHAPE), generator=g) < 0.5).float()
    op = MaskOperator(mask, noise_std)
    return x, op, op.forward(x)


# ---- reduction to the plain sampler ------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_zero_guidance_is_the_plain_sampler_exactly(oracle, name):
    _, op, y = oracle_problem(oracle)
    solver, sampler = zero_guidance(name, oracle, 40)
    starts = torch.tensor([40, 31, 12, 0])
    latent = torch.randn((4, *SHAPE), generator=torch.Generator().manual_seed(5))
    for start in (None, StartPoint(starts, latent)):
        a = solver.solve(y, op, start=start, generator=gens(range(4)))
        b = sampler.solve(y, op, start=start, generator=gens(range(4)))
        assert torch.equal(a.x, b.x) and torch.equal(a.latent, b.latent)
        assert torch.equal(a.nfe, b.nfe)


# ---- guidance makes the observed pixels consistent ---------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_guidance_fits_observed_pixels_on_noiseless_inpainting(oracle, name):
    """Mask on the latent = image of the oracle: the guided solvers pull the observed pixels to y.

    The non-squared DPS step has a residual floor of the order of ζ, hence a small ζ over 100 steps;
    ReSample's proximal hard DC (λ = 1) halves the residual per event, hence DC at every step.
    """
    _, op, y = oracle_problem(oracle)
    n, kw = (50, {"dc_every": 1}) if name.startswith("resample") else (100, {"zeta": 0.3})

    def residual(sol):
        return (op.forward(sol.x) - y).flatten(1).norm(dim=1)

    plain = residual(Sampler(oracle, num_steps=n).solve(y, op, generator=gens(range(4))))
    sol = guided(name, oracle, n, **kw).solve(y, op, generator=gens(range(4)))
    assert torch.isfinite(sol.x).all() and torch.isfinite(sol.latent).all()
    res = residual(sol)
    assert torch.all(res < 0.25 * plain), (res, plain)


# ---- NFE and timesteps --------------------------------------------------------------------------
def expected_timesteps(solver, k):
    """UNet timesteps of a solve started at ``k``: the schedule's last ``k`` in order, plus, for the
    original ReSample, the time-travel calls after each DC step at level ``j`` (timesteps of the
    levels ``j − 1, j − 2, ...``, at most ``time_travel`` of them)."""
    ts = solver.schedule.timesteps
    out = []
    for j in range(k, 0, -1):
        out.append(int(ts[j]))
        if getattr(solver, "time_travel", 0) and solver.dc_stage(j) is not None:
            out += [int(ts[j - 1 - i]) for i in range(min(solver.time_travel, j - 1))]
    return out


def test_resample_original_start_at_k_counts_its_time_travel_calls(oracle):
    """The call contract of every registered solver is checked by the conformance suite
    (tests/test_conformance_registry.py); the original ReSample breaks it on purpose (5 time-travel
    calls per data-consistency event), so its counts are pinned here."""
    name = "resample-original"
    _, op, y = oracle_problem(oracle, b=2)
    n = 30
    solver = guided(name, oracle, n, inner_steps=5)
    ts = solver.schedule.timesteps
    for k in (n, 17, 1, 0):
        oracle.reset_calls()
        start = StartPoint(torch.full((2,), k), torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(k)))
        sol = solver.solve(y, op, start=start, generator=gens([0, 1]))
        assert [c.tolist() for c in oracle.calls] == [[t] * 2 for t in expected_timesteps(solver, k)]
        # DC at levels 21 and 11 (positions 20, 10), 5 time-travel calls each
        assert sol.nfe.tolist() == [k + 5 * ((k >= 21) + (k >= 11))] * 2
        assert expected_timesteps(solver, 12)[:8] == [int(ts[j]) for j in (12, 11, 10, 9, 8, 7, 6, 10)]
    # mixed starts: every sample makes exactly its own number of calls
    oracle.reset_calls()
    starts = torch.tensor([9, 30, 0, 22])
    _, op4, y4 = oracle_problem(oracle, b=4)
    sol = solver.solve(y4, op4, start=StartPoint(starts, torch.zeros((4, *SHAPE))), generator=gens(range(4)))
    want = torch.tensor([len(expected_timesteps(solver, int(k))) for k in starts])
    assert torch.equal(sol.nfe, want)
    assert sum(len(c) for c in oracle.calls) == int(want.sum())


def test_resample_time_travel_follows_the_original(oracle):
    """The DC of the original ReSample starts from ẑ0ᵖ after 5 unconditional DDIM steps from z'_{k−1},
    with the original's off-by-one: UNet at the timestep of level k−1−j, ᾱ of levels k−j → k−j−1."""
    _, op, y = oracle_problem(oracle, b=2)
    n, k = 40, 21  # a DC event at level 21 (position 20)
    solver = OriginalReSample(oracle, num_steps=n, inner_steps=2)
    assert solver.time_travel == 5 and solver.dc_stage(k) == "pixel"
    seen = {}
    hard_dc, travel = solver.hard_dc, solver.travel

    def spy_travel(ctx, z, x0p):
        seen.setdefault("z", z.clone())  # the first event: level 21
        return travel(ctx, z, x0p)

    def spy_dc(x0, *a):
        seen.setdefault("x0", x0.clone())
        return hard_dc(x0, *a)

    solver.travel, solver.hard_dc = spy_travel, spy_dc
    start = StartPoint(torch.full((2,), k), torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(3)))
    oracle.reset_calls()
    solver.solve(y, op, start=start, generator=gens([0, 1]))
    acp, ts = solver.schedule.alphas_cumprod.double(), solver.schedule.timesteps
    z = seen["z"].double()
    for j in range(5):  # reference: the original's loop written out (η = 0)
        a, a_prev = float(acp[k - j]), float(acp[k - j - 1])
        eps = oracle.eps(z.float(), torch.full((2,), int(ts[k - 1 - j]))).double()
        x0p = (z - (1 - a) * eps) / a**0.5
        z = a_prev**0.5 * (z - (1 - a) ** 0.5 * eps) / a**0.5 + (1 - a_prev) ** 0.5 * eps
    torch.testing.assert_close(seen["x0"].double(), x0p, atol=1e-5, rtol=1e-5)
    assert [int(c[0]) for c in oracle.calls[:7]] == [int(ts[j]) for j in (21, 20, 19, 18, 17, 16, 20)]
    assert OriginalReSample(oracle, num_steps=n, time_travel=0).time_travel == 0
    with pytest.raises(FlashInputError, match="time_travel"):
        ReSample(oracle, num_steps=n, time_travel=5)
    with pytest.raises(FlashInputError, match="time_travel"):
        OriginalReSample(oracle, num_steps=n, time_travel=-1)


@pytest.mark.parametrize("variant", ["flash", "original"])
def test_resample_dc_events_sit_at_absolute_timesteps(oracle, variant):
    _, op, y = oracle_problem(oracle, b=1)
    n = 60
    solver = RESAMPLE[variant](oracle, num_steps=n, inner_steps=3)
    events = []
    hard_dc = solver.hard_dc

    def spy(x0, y_, operator, index, state, stage):
        events.append((int(oracle.calls[-1][0]), stage))
        return hard_dc(x0, y_, operator, index, state, stage)

    solver.hard_dc = spy
    oracle.reset_calls()
    solver.solve(y, op, generator=gens([0]))
    full = list(events)
    assert full, "the full run must perform DC events"
    if variant == "flash":  # chaotic > 750: none; semantic 300..750: pixel; refinement <= 300: latent
        assert all((s == "pixel" and 300 < t <= 750) or (s == "latent" and t <= 300) for t, s in full)
        assert {s for _, s in full} == {"pixel", "latent"} and full[-1][0] == int(solver.schedule.timesteps[1])
    else:
        assert {s for _, s in full} == {"pixel", "latent"}
    for k in (47, 33, 12):
        events.clear()
        start = StartPoint(torch.tensor([k]), torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(k)))
        solver.solve(y, op, start=start, generator=gens([0]))
        t_start = int(solver.schedule.timesteps[k])
        assert events == [e for e in full if e[0] <= t_start], (k, events)
        assert events  # each of these late starts still meets DC events


# ---- counters -----------------------------------------------------------------------------------
def test_decoder_and_encoder_calls_are_counted_per_sample(oracle):
    _, op, y = oracle_problem(oracle)
    starts = torch.tensor([12, 0, 20, 5])
    start = StartPoint(starts, torch.zeros((4, *SHAPE)))
    sol = LatentDPS(oracle, num_steps=20).solve(y, op, start=start, generator=gens(range(4)))
    assert torch.equal(sol.extras["count_decoder_calls"], starts)
    assert torch.equal(sol.extras["count_encoder_calls"], torch.zeros(4, dtype=torch.long))
    for cls in (GMLDPS, PSLD):
        sol = cls(oracle, num_steps=20).solve(y, op, start=start, generator=gens(range(4)))
        assert torch.equal(sol.extras["count_decoder_calls"], starts)
        assert torch.equal(sol.extras["count_encoder_calls"], starts)
    rs = ReSample(oracle, num_steps=20, dc_every=5, inner_steps=7)
    sol = rs.solve(y, op, start=start, generator=gens(range(4)))
    stages = {k: rs.dc_stage(k) for k in range(1, 21)}
    for i, k in enumerate(starts.tolist()):
        mine = [stages[j] for j in range(1, k + 1) if stages[j] is not None]
        assert sol.extras["count_dc_events"][i] == len(mine)
        assert sol.extras["count_inner_iterations"][i] == 7 * len(mine)  # noiseless: no early stop
        assert sol.extras["count_encoder_calls"][i] == mine.count("pixel")
        assert sol.extras["count_decoder_calls"][i] == mine.count("pixel") + 7 * mine.count("latent")
    assert torch.equal(sol.nfe, starts)  # inner iterations are not NFE


@pytest.mark.parametrize("variant", ["flash", "original"])
def test_resample_inner_optimisation_stops_per_sample(oracle, variant):
    """Each sample meets its own stopping rule (σ_y² per sample); the batch equals the samples alone."""
    g = torch.Generator().manual_seed(8)
    x = oracle.sample(4, g).float()
    std = torch.tensor([0.02, 0.3, 0.0, 0.1]) if variant == "flash" else torch.zeros(4)
    op = MaskOperator((torch.rand((4, *SHAPE), generator=g) < 0.5).float(), noise_std=std)
    y = op.measure(x, generator=g)
    if variant == "original":  # the original stops at MSE < 1e-6: give one sample a noiseless, easy problem
        y[2] = op.forward(x)[2]
    solver = RESAMPLE[variant](oracle, num_steps=30, inner_steps=60, dc_every=5)
    start = StartPoint(torch.tensor([30, 22, 30, 9]), torch.randn((4, *SHAPE), generator=g))
    batch = solver.solve(y, op, start=start, generator=gens(range(4)))
    its = batch.extras["count_inner_iterations"]
    per_event = its.double() / batch.extras["count_dc_events"].double().clamp(min=1)
    assert len(set(per_event.tolist())) > 1, its  # different samples stopped at different iterations
    for i in range(4):
        idx = torch.tensor([i])
        alone = solver.solve(y[idx], op.select(idx), start=StartPoint(start.step[idx], start.latent[idx]), generator=gens([i]))
        torch.testing.assert_close(batch.latent[i], alone.latent[0], atol=1e-6, rtol=1e-6)
        assert all(v[i] == alone.extras[k][0] for k, v in batch.extras.items())


# ---- batch = its samples solved alone ------------------------------------------------------------
@pytest.mark.parametrize("name", ["resample", "resample-original"])
def test_resample_mixed_start_batch_with_per_sample_early_stop(tiny, name):
    """Batch = samples alone for every registered solver is a conformance check; this one adds
    ReSample's per-sample early stop (sample 1 meets it at once) and the original variant.
    Tolerance 1e-5: batched convolutions of the UNet/decoder round differently from batch-1 ones,
    and the random-weight UNet drives latents to |z| ~ 100."""
    n, b = 20, 4
    g = torch.Generator().manual_seed(3)
    x = (torch.rand((b, 1, 16, 16), generator=g) * 2 - 1)
    # per-sample σ_y: sample 1 meets ReSample's early stop (mean squared residual <= σ_y²) at once
    op = MaskOperator((torch.rand((b, 1, 16, 16), generator=g) < 0.6).float(), noise_std=torch.tensor([0.3, 1.5, 0.3, 0.2]))
    y = op.measure(x, generator=g)
    start = StartPoint(torch.tensor([20, 13, 0, 7]), torch.randn((b, *tiny.latent_shape), generator=g))
    solver = guided(name, tiny, n, inner_steps=6)
    seeds = [11, 12, 13, 14]
    batch = solver.solve(y, op, start=start, generator=gens(seeds))
    for i in range(b):
        idx = torch.tensor([i])
        alone = solver.solve(y[idx], op.select(idx), start=StartPoint(start.step[idx], start.latent[idx]), generator=gens([seeds[i]]))
        torch.testing.assert_close(batch.latent[i], alone.latent[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batch.x[i], alone.x[0], atol=1e-5, rtol=1e-5)
        assert batch.nfe[i] == alone.nfe[0] == len(expected_timesteps(solver, int(start.step[i])))
        for key, val in batch.extras.items():
            assert val[i] == alone.extras[key][0], key
    assert torch.isfinite(batch.x).all()


# ---- no graph, no weight change, no print, under no_grad: conformance checks of every registered
# solver (tests/test_conformance_registry.py) ------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_guided_solvers_work_under_inference_mode(oracle, name):
    """``torch.inference_mode()`` (measurement and start latent made inside it too) gives the same solve."""
    _, op, y = oracle_problem(oracle, b=2)
    solver = guided(name, oracle, 12, inner_steps=4, dc_every=3)
    start = StartPoint(step=torch.tensor([12, 7]), latent=torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(5)))
    ref = solver.solve(y, op, start=start, generator=gens([0, 1]))
    with torch.inference_mode():
        y_inf, z_inf = y.clone(), start.latent.clone()
        assert y_inf.is_inference()
        sol = solver.solve(y_inf, op, start=StartPoint(step=start.step, latent=z_inf), generator=gens([0, 1]))
    assert torch.equal(sol.x, ref.x) and torch.equal(sol.nfe, ref.nfe)
    assert not y_inf.requires_grad and y_inf.is_inference()  # the caller's tensors are left as they were


def test_operator_made_under_inference_mode_gets_a_clear_error(oracle):
    _, op, y = oracle_problem(oracle, b=2)
    with torch.inference_mode():
        op_inf = MaskOperator(op.mask.clone())
        with pytest.raises(FlashInputError, match="inference_mode"):
            LatentDPS(oracle, zeta=1.0, num_steps=5).solve(y, op_inf, generator=gens([0, 1]))


# ---- operator capabilities -----------------------------------------------------------------------
def test_psld_refuses_an_operator_without_adjoint(oracle):
    _, op, y = oracle_problem(oracle)
    assert isinstance(op, LinearOperator)
    for bad in (ForwardOnlyMask(op.mask), ForwardOnlyMask(op.mask, noise_std=0.1)):
        assert not isinstance(bad, LinearOperator)
        oracle.reset_calls()
        with pytest.raises(OperatorCapabilityError, match="adjoint"):
            PSLD(oracle, num_steps=5).solve(y, bad)
        assert oracle.calls == []  # refused at the start, before any UNet call
    # the other solvers need forward only
    for cls in (LatentDPS, GMLDPS):
        cls(oracle, num_steps=3).solve(y, ForwardOnlyMask(op.mask))
    ReSample(oracle, num_steps=3).solve(y, ForwardOnlyMask(op.mask))


def test_every_task_with_the_real_operators(tiny):
    """The paper's four tasks (flash_plugin.operators presets, per-sample parameters, mixed starts)
    through every solver the table configures; PSLD refuses the nonlinear blur (no adjoint)."""
    from flash_plugin.operators import get_preset

    g = torch.Generator().manual_seed(0)
    x = torch.rand((2, 1, 16, 16), generator=g) * 2 - 1
    start = StartPoint(torch.tensor([3, 1]), torch.randn((2, *tiny.latent_shape), generator=g))
    for task in TASKS:
        preset = get_preset(task)
        op = preset.make(preset.sample_severity(2, g), g, **({"image_shape": (1, 16, 16)} if task == "random-inpainting" else {}))
        y = op.measure(x, g)
        for name in ("latent-dps", "gml-dps", "psld", "resample"):
            if task == "nonlinear-blur" and name == "psld":
                with pytest.raises(OperatorCapabilityError):
                    PSLD(tiny, num_steps=3).solve(y, op)
                continue
            solver = make_solver(name, tiny, task, num_steps=3, **({"inner_steps": 2, "dc_every": 1} if name == "resample" else {}))
            sol = solver.solve(y, op, start=start, generator=gens([0, 1]))
            assert sol.nfe.tolist() == [3, 1] and torch.isfinite(sol.x).all(), (task, name)


# ---- diffusers pipelines end to end --------------------------------------------------------------
def test_from_ldm_pipeline_vq_end_to_end():
    from diffusers import DDIMScheduler, LDMPipeline, UNet2DModel, VQModel

    torch.manual_seed(0)
    vq = VQModel(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                 latent_channels=3, num_vq_embeddings=16, norm_num_groups=8, sample_size=16, scaling_factor=1.0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear")
    model = LatentDiffusion.from_pipeline(LDMPipeline(vqvae=vq, unet=unet, scheduler=sched))
    assert model.latent_shape == (3, 8, 8)
    g = torch.Generator().manual_seed(0)
    op = MaskOperator((torch.rand((2, 1, 16, 16), generator=g) < 0.5).float(), noise_std=0.1)
    y = op.measure(torch.rand((2, 1, 16, 16), generator=g) * 2 - 1, generator=g)
    for solver in (LatentDPS(model, num_steps=4), PSLD(model, num_steps=3), ReSample(model, num_steps=4, dc_every=2, inner_steps=2)):
        sol = solver.solve(y, op, generator=gens([0, 1]))
        assert sol.x.shape == (2, 1, 16, 16) and torch.isfinite(sol.x).all()
        assert sol.nfe.tolist() == [solver.schedule.num_steps] * 2
    assert all(p.grad is None for p in model.parameters())


def test_from_stable_diffusion_like_components_end_to_end():
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    vae, _ = tiny_components()
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=4, norm_num_groups=8)
    assert isinstance(vae, AutoencoderKL)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    cond = torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(1))  # e.g. an empty-prompt embedding
    pipe = SimpleNamespace(vae=vae, unet=unet, scheduler=sched)
    model = LatentDiffusion.from_pipeline(pipe, conditioning=cond)
    g = torch.Generator().manual_seed(0)
    op = MaskOperator((torch.rand((2, 1, 16, 16), generator=g) < 0.5).float())
    y = op.measure(torch.rand((2, 1, 16, 16), generator=g) * 2 - 1)
    start = StartPoint(torch.tensor([3, 1]), torch.randn((2, 4, 8, 8), generator=g))
    for solver in (GMLDPS(model, num_steps=5), ReSample(model, num_steps=5, dc_every=1, inner_steps=2)):
        sol = solver.solve(y, op, start=start, generator=gens([0, 1]))
        assert torch.isfinite(sol.x).all() and sol.nfe.tolist() == [3, 1]
    assert all(p.grad is None for p in model.parameters())


# ---- protocols, hyperparameters, plugin registration --------------------------------------------
def test_solvers_satisfy_the_protocols(oracle):
    for cls in (LatentDPS, GMLDPS, PSLD):
        s = cls(oracle, num_steps=7)
        assert isinstance(s, Solver) and isinstance(s, MixedStartSolver) and s.schedule.num_steps == 7
    rs = ReSample(oracle)
    assert rs.schedule.num_steps == 500 and rs.eta == 1.0 and rs.gamma_rs == 400
    assert rs.schedule.timesteps[1:].flip(0)[:3].tolist() == [999, 997, 995]
    assert LatentDPS(oracle).schedule.num_steps == 1000 and LatentDPS(oracle).eta == 1.0
    orig = OriginalReSample(oracle)
    assert orig.eta == 0.0 and orig.gamma_rs == 40 and orig.final_optimization and orig.dps_scale == 0.5


def test_invalid_arguments_are_refused(oracle):
    with pytest.raises(FlashInputError):
        LatentDPS(oracle, zeta=-1.0)
    with pytest.raises(FlashInputError):
        GMLDPS(oracle, gamma=float("nan"))
    with pytest.raises(FlashInputError), pytest.warns(DeprecationWarning):
        ReSample(oracle, variant="dps")
    with pytest.raises(FlashInputError):
        ReSample(oracle, dps_scale=0.5)  # the flash variant has no DPS step
    with pytest.raises(FlashInputError):
        ReSample(oracle, dc_every=-2)


def test_resample_variant_argument_is_deprecated_and_builds_the_right_class(oracle):
    """``ReSample(variant=...)`` (one class with a flag before) warns and builds the version's class,
    which solves exactly as that class built directly."""
    _, op, y = oracle_problem(oracle, b=2)
    for variant, cls in RESAMPLE.items():
        with pytest.warns(DeprecationWarning, match="OriginalReSample"):
            old = ReSample(oracle, num_steps=20, dc_every=3, inner_steps=2, variant=variant)
        new = cls(oracle, num_steps=20, dc_every=3, inner_steps=2)
        assert type(old) is cls and old.variant == variant
        a, b = (s.solve(y, op, generator=gens([0, 1])) for s in (old, new))
        assert torch.equal(a.x, b.x) and torch.equal(a.nfe, b.nfe)
    assert not isinstance(OriginalReSample(oracle), ReSample)  # two algorithms, not a subclass with a flag
    import flash_plugin.solvers.resample as rs_mod

    with pytest.warns(DeprecationWarning, match="VARIANTS"):
        variants = rs_mod.VARIANTS
    assert variants["original"].time_travel == OriginalReSample(oracle).time_travel
    assert variants["flash"].gamma_rs == ReSample(oracle).gamma_rs


PAPER_FFHQ = {  # flash-algorithm.md §9, FFHQ column
    "gblur-varying": {"latent-dps": (1.0, 1.2), "gml-dps": (3.0, 0.05, 1.2), "psld": (2.0, 0.2, 1.0), "resample": (400, 1.2)},
    "gblur-fixed": {"latent-dps": (3.0, 1.2), "gml-dps": (2.0, 0.05, 1.0), "psld": (2.0, 0.1, 1.0), "resample": (2000, 1.2)},
    "nonlinear-blur": {"latent-dps": (1.0, 1.0), "gml-dps": (3.0, 0.05, 1.2), "resample": (200, 1.2)},
    "random-inpainting": {"latent-dps": (7.0, 1.2), "gml-dps": (10.0, 0.05, 1.0), "psld": (10.0, 0.5, 1.0), "resample": (200, 1.2)},
}


def test_hparam_table_is_the_papers_and_make_solver_uses_it(oracle):
    import flash_plugin.solvers.gml_dps as gml_mod
    import flash_plugin.solvers.latent_dps as ldps_mod
    import flash_plugin.solvers.psld as psld_mod
    import flash_plugin.solvers.resample as rs_mod

    assert set(TASKS) == set(PAPER_FFHQ)
    flat = {(s, t): v for t, row in PAPER_FFHQ.items() for s, v in row.items()}
    assert set(PAPER_HPARAMS) == set(flat) and set(TUNED_HPARAMS) == set(PAPER_HPARAMS)
    retuned = {key for key in PAPER_HPARAMS if TUNED_HPARAMS[key] != PAPER_HPARAMS[key]}
    assert retuned <= {(s, t) for s, _, res, _ in recorded_sweeps() for t in res}  # each from a sweep
    docs = {"latent-dps": ldps_mod.__doc__, "gml-dps": gml_mod.__doc__, "psld": psld_mod.__doc__, "resample": rs_mod.__doc__}
    evidence = load_evidence()
    for (s, t), v in flat.items():
        h = get_hparams(s, t, source="paper")
        got = {"latent-dps": (h.zeta, h.noise_correction), "gml-dps": (h.zeta, h.gamma, h.noise_correction),
               "psld": (h.zeta, h.gamma, h.noise_correction), "resample": (h.gamma_rs, h.noise_correction)}[s]
        assert got == v, (s, t)
        paper = evidence[(s, t)]["paper"]  # the evidence stored with the model states the same paper values
        stated = {"latent-dps": ("zeta", "noise_correction"), "gml-dps": ("zeta", "gamma", "noise_correction"),
                  "psld": ("zeta", "gamma", "noise_correction"), "resample": ("gamma_rs", "noise_correction")}[s]
        assert tuple(paper[k] for k in stated) == v, (s, t)
    for s, doc in docs.items():  # each solver cites the one table instead of repeating it
        assert "flash_plugin.solvers.hparams" in doc, s
        assert not [ln for ln in doc.splitlines() if ln.strip().startswith(TASKS)], s
    ldps = get_hparams("latent-dps", "gblur-varying")  # the Flash settings go to FlashConfig, not the solver
    assert set(ldps.solver_kwargs()) == {"zeta"} and set(ldps.flash_kwargs()) == {"noise_correction", "variance_scale"}
    FlashConfig(**ldps.flash_kwargs())
    s = make_solver("gml-dps", oracle, "random-inpainting", num_steps=10)
    tuned = get_hparams("gml-dps", "random-inpainting")
    assert isinstance(s, GMLDPS) and (s.zeta, s.gamma, s.schedule.num_steps) == (tuned.zeta, tuned.gamma, 10)
    s = make_solver("gml-dps", oracle, "random-inpainting", source="paper")
    assert (s.zeta, s.gamma) == (10.0, 0.05)
    s = make_solver("resample", oracle, "gblur-fixed", gamma_rs=7.0, num_steps=50)
    assert s.gamma_rs == 7.0 and s.schedule.num_steps == 50
    assert make_solver("latent-dps", oracle).zeta == 1.0
    assert isinstance(make_solver("sampler", oracle, "gblur-fixed", num_steps=5), Sampler)
    with pytest.raises(FlashInputError, match="adjoint"):
        make_solver("psld", oracle, "nonlinear-blur")
    with pytest.raises(UnknownPluginNameError):
        make_solver("dps", oracle)
    with pytest.raises(FlashInputError):
        get_hparams("psld", "motion-blur")


def test_solvers_are_registered_through_the_plugin_hook():
    from flash_plugin import registry
    from flash_plugin.plugins import make_plugin_manager

    pm = make_plugin_manager(load_external=False)
    got = {}
    pm.hook.flash_register_solvers(register=lambda name, factory: got.__setitem__(name, factory))
    for name in ("sampler", "latent-dps", "gml-dps", "psld", "resample"):
        assert got[name] is SOLVERS[name]
        assert (got[name].__doc__ or "").strip()
        assert registry.get_solver(name, pm=pm) is SOLVERS[name]


def tuning_records_dir():
    """Where the tuning records are: ``results/fashion-mnist-32/tuning`` in the repository (the
    bundled model's ``benchmarks/`` before they moved there)."""
    from flash_plugin.models import DEFAULT_MODEL_DIR

    moved = Path(__file__).resolve().parents[1] / "results" / "fashion-mnist-32" / "tuning"
    return moved if moved.is_dir() else DEFAULT_MODEL_DIR / "benchmarks"


def recorded_sweeps():
    """``[(solver, param, {task: {value: metrics}}, {task: settings held fixed})]`` of the committed tuning runs."""
    import json

    out = []
    for path in sorted(tuning_records_dir().glob("tune_*.json")):
        rec = json.loads(path.read_text())
        if rec.get("method", "flash") == "flash":  # a sweep of the baseline from noise is a check, not the table's source
            out.append((rec["solver"], rec["param"], rec["results"], rec["at"]))
    return out


def test_tuned_values_are_the_best_of_the_recorded_sweeps():
    """TUNED_HPARAMS must be what the committed tuning runs measured (best mean PSNR per task) at the
    table's current other settings, and every entry that differs from the paper's must come from such sweeps."""
    from dataclasses import asdict

    sweeps = recorded_sweeps()
    assert {s for s, *_ in sweeps} >= {"latent-dps", "gml-dps", "psld", "resample"}
    swept: dict[tuple[str, str], set[str]] = {}
    for solver, param, results, at in sweeps:
        for task, by_value in results.items():
            best = max(by_value, key=lambda v: by_value[v]["psnr"])
            tuned = asdict(get_hparams(solver, task))
            assert tuned[param] == float(best), (solver, task, param)
            # the sweep held every other setting at what the table holds now (else it must be re-run)
            assert at[task] == {k: v for k, v in tuned.items() if k != param}, (solver, task, param)
            swept.setdefault((solver, task), set()).add(param)
    for key in PAPER_HPARAMS:
        tuned, paper = asdict(TUNED_HPARAMS[key]), asdict(PAPER_HPARAMS[key])
        changed = {k for k in tuned if tuned[k] != paper[k]}
        assert changed <= swept.get(key, set()), (key, changed)


def test_flash_resample_dc_grid_is_the_official_one(oracle):
    """The official Flash ReSample: every 10th of the ascending DDIM-500 timesteps (1, 21, 41, ...),
    pixel stage for 300 < t <= 750, latent stage for t <= 300, nothing above 750."""
    solver = ReSample(oracle, num_steps=500)
    events = {int(solver.schedule.timesteps[k]): solver.dc_stage(k) for k in range(1, 501) if solver.dc_stage(k)}
    ascending = list(range(1, 1000, 2))  # CompVis "uniform" DDIM-500 grid
    want = {t: ("latent" if t <= 300 else "pixel") for t in ascending[::10] if t <= 750}
    assert events == want and len(want) == 38


def test_resample_alpha_current_is_the_official_mixture(oracle):
    """``resample_alpha="current"`` mixes with ᾱ of the step's own train timestep (official Flash code);
    the default mixes with the target level's ᾱ, which returns z0* at the last step."""
    _, op, y = oracle_problem(oracle, b=1)
    z0, z_prev = torch.randn((1, *SHAPE)), torch.randn((1, *SHAPE))
    default = ReSample(oracle, num_steps=20)
    current = ReSample(oracle, num_steps=20, resample_alpha="current")
    seen = []
    for solver in (default, current):
        solver.hard_dc = lambda *a, **kw: z0
        solver.stochastic_resample = lambda z0_, zp, acp, s2, g, _seen=seen: _seen.append(acp) or zp
        solver.solve(y, op, start=StartPoint(torch.tensor([1]), z_prev), generator=gens([0]))
    assert seen[0] == 1.0  # level 0: clean
    assert seen[1] == pytest.approx(float(ldm_alphas_cumprod().double()[int(default.schedule.timesteps[1])]), rel=1e-6)
    assert ReSample(oracle, num_steps=20).stochastic_resample(z0, z_prev, 1.0, 0.3, None).equal(z0)
    with pytest.raises(FlashInputError, match="resample_alpha"), pytest.warns(DeprecationWarning):
        ReSample(oracle, num_steps=20, variant="original", resample_alpha="current")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_model_that_declares_its_dtype_solves_measurements_of_another(tiny, dtype):
    """LatentDiffusion declares float32: a float64 or bfloat16 y is solved in float32 and the
    result returned in y's dtype (it ended in a raw conv dtype error before)."""
    g = torch.Generator().manual_seed(8)
    op = MaskOperator((torch.rand((2, 1, 16, 16), generator=g) < 0.5).float(), noise_std=0.1)
    y = op.measure(torch.rand((2, 1, 16, 16), generator=g) * 2 - 1, generator=g)
    solver = LatentDPS(tiny, zeta=0.5, num_steps=5)
    ref = solver.solve(y, op, generator=gens([0, 1]))
    sol = solver.solve(y.to(dtype), op, generator=gens([0, 1]))
    assert sol.x.dtype == sol.latent.dtype == dtype
    if dtype == torch.float64:
        torch.testing.assert_close(sol.x, ref.x.double(), rtol=0, atol=0)


def test_moved_helpers_keep_their_old_import_paths():
    """One home each (randomness, the guided-solver helpers, select_operator); the old paths re-export them."""
    import flash_plugin
    import flash_plugin.operators.base as op_base
    import flash_plugin.solvers.base as solver_base
    import flash_plugin.solvers.latent_dps as ldps
    from flash_plugin.solvers import guidance
    from flash_plugin.utils import batch, random

    assert flash_plugin.GeneratorLike is random.GeneratorLike is op_base.GeneratorLike
    assert flash_plugin.randn_per_sample is random.randn_per_sample
    assert (op_base.randn, op_base.rand) == (random.randn, random.rand)
    assert solver_base.select_operator is batch.select_operator
    for name in ("CountingSolver", "add_count", "check_weight", "pad_counts", "per_sample_norm"):
        assert getattr(ldps, name) is getattr(guidance, name)
