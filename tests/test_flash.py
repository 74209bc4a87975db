"""flash(): bit-exactness at k = N, mixed batches, NFE accounting, bad input."""

import pytest
import torch

from flash_plugin.errors import AlreadyFlashedError, FlashInputError, LatentSpaceMismatchError, SeverityError, StartStepError
from flash_plugin.flash import FlashConfig, FlashSolver, flash
from flash_plugin.models.gaussian_oracle import GaussianOracle
from flash_plugin.solvers import Sampler
from flash_plugin.types import SeverityEstimate, StartPoint


class FixedEstimator:
    """Returns ẑ = y and the given σ̂² (a stand-in for a trained severity encoder)."""

    def __init__(self, variances, latent_id=None):
        self.variances = torch.as_tensor(variances, dtype=torch.float64)
        self.metadata = {} if latent_id is None else {"latent_id": latent_id}

    def estimate(self, y):
        return SeverityEstimate(latent=y.clone(), variance=self.variances[: y.shape[0]])


class GroupOnlySolver:
    """A Solver without the mixed-starts capability (delegates to the sampler one group at a time)."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = []

    @property
    def schedule(self):
        return self.inner.schedule

    def solve(self, y, operator, *, start=None, generator=None):
        if start is not None:
            assert torch.unique(start.step).numel() == 1, "mixed starts given to a solver that cannot do them"
            self.calls.append(int(start.step[0]))
        return self.inner.solve(y, operator, start=start, generator=generator)


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.fixture
def oracle():
    return GaussianOracle(torch.full((2, 2, 2), 0.3), torch.full((2, 2, 2), 0.5))


def test_forced_full_start_equals_unwrapped_bit_for_bit(oracle):
    solver = Sampler(oracle, num_steps=100)
    y = torch.randn(3, 2, 2, 2)
    flashed = flash(solver, FixedEstimator([0.01, 0.2, 0.05]), FlashConfig(force_step=solver.schedule.num_steps))
    a = flashed(y, None, generator=torch.Generator().manual_seed(7))
    b = solver.solve(y, None, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.x, b.x) and torch.equal(a.latent, b.latent)
    assert torch.equal(a.nfe, b.nfe)
    a = flashed(y, None, generator=gens([1, 2, 3]))
    b = solver.solve(y, None, generator=gens([1, 2, 3]))
    assert torch.equal(a.x, b.x)


def test_mixed_batch_equals_samples_alone_and_nfe_is_sum_of_starts(oracle):
    solver = Sampler(oracle, num_steps=200)
    var = [0.002, 0.05, 0.3, 0.9]
    y = torch.randn(4, 2, 2, 2)
    flashed = flash(solver, FixedEstimator(var))
    batch = flashed(y, None, generator=gens([10, 11, 12, 13]))
    assert torch.unique(batch.start_step).numel() == 4
    assert batch.nfe.sum().item() == batch.start_step.sum().item()
    oracle.reset_calls()
    flashed(y, None, generator=gens([10, 11, 12, 13]))
    assert sum(len(c) for c in oracle.calls) == batch.start_step.sum().item()  # the denoiser ran on active samples only
    for i in range(4):
        alone = flash(solver, FixedEstimator(var[i : i + 1]))(y[i : i + 1], None, generator=gens([10 + i]))
        torch.testing.assert_close(alone.x[0], batch.x[i], rtol=0, atol=1e-6)
        assert alone.start_step.item() == batch.start_step[i].item()


def test_grouped_fallback_for_solvers_without_mixed_starts(oracle):
    inner = Sampler(oracle, num_steps=100)
    wrapped = GroupOnlySolver(inner)
    var = [0.05, 0.3, 0.05]
    y = torch.randn(3, 2, 2, 2)
    a = flash(wrapped, FixedEstimator(var))(y, None, generator=gens([0, 1, 2]))
    b = flash(inner, FixedEstimator(var))(y, None, generator=gens([0, 1, 2]))
    assert sorted(wrapped.calls) == sorted(set(a.start_step.tolist()))
    torch.testing.assert_close(a.x, b.x, rtol=0, atol=1e-6)
    assert torch.equal(a.nfe, b.nfe)


def test_severity_and_start_reported(oracle):
    solver = Sampler(oracle, num_steps=100)
    sol = flash(solver, FixedEstimator([0.1, 0.4]))(torch.randn(2, 2, 2, 2), None, generator=torch.Generator().manual_seed(0))
    assert sol.severity.tolist() == pytest.approx([0.1, 0.4])
    assert sol.start_step[0] < sol.start_step[1]


def test_variance_scale_acts_on_step_and_noise(oracle):
    """``variance_scale`` v (the official ``var_mult``) starts as if the estimator had said v·σ̂²,
    and the solution still reports the estimator's own σ̂²."""
    solver = Sampler(oracle, num_steps=200)
    y = torch.randn(3, 2, 2, 2)
    var = [0.02, 0.1, 0.3]
    scaled = flash(solver, FixedEstimator(var), FlashConfig(variance_scale=2.5, noise_correction=1.2))(y, None, generator=gens([4, 5, 6]))
    same = flash(solver, FixedEstimator([2.5 * v for v in var]), FlashConfig(noise_correction=1.2))(y, None, generator=gens([4, 5, 6]))
    plain = flash(solver, FixedEstimator(var), FlashConfig(noise_correction=1.2))(y, None, generator=gens([4, 5, 6]))
    assert torch.equal(scaled.start_step, same.start_step) and torch.equal(scaled.x, same.x)
    assert torch.all(scaled.start_step > plain.start_step)
    assert scaled.severity.tolist() == pytest.approx(var)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(FlashInputError, match="variance_scale"):
            FlashConfig(variance_scale=bad)


def test_bad_inputs(oracle):
    solver = Sampler(oracle, num_steps=100)
    y = torch.randn(2, 2, 2, 2)
    for bad in ([float("nan"), 0.1], [-0.1, 0.1], [0.0, 0.1]):
        with pytest.raises(SeverityError):
            flash(solver, FixedEstimator(bad))(y, None)
    with pytest.warns(UserWarning, match="no signal"):
        sol = flash(solver, FixedEstimator([0.95, 0.1]), FlashConfig(noise_correction=1.2))(y, None)
    assert sol.start_step[0].item() == 100 and torch.all(torch.isfinite(sol.x))
    with pytest.raises(FlashInputError, match="does not match the batch"):
        flash(solver, FixedEstimator([0.1]))(y, None)
    with pytest.raises(StartStepError):
        solver.solve(y, None, start=StartPoint(torch.tensor([0, 101]), torch.zeros(2, 2, 2, 2)))
    with pytest.raises(FlashInputError, match="force_step"):
        flash(solver, FixedEstimator([0.1, 0.1]), FlashConfig(force_step=101))
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(FlashInputError, match="noise_correction"):
            FlashConfig(noise_correction=bad)
    flashed = flash(solver, FixedEstimator([0.1, 0.1]))
    with pytest.raises(AlreadyFlashedError, match="already flashed"):
        flash(flashed, FixedEstimator([0.1, 0.1]))
    with pytest.raises(FlashInputError, match="generators"):
        flashed(y, None, generator=gens([1]))


def test_latent_space_mismatch_is_refused(oracle):
    class ModelSolver(Sampler):
        pass

    solver = ModelSolver(oracle, num_steps=10)
    with pytest.raises(LatentSpaceMismatchError, match="latent space"):
        flash(solver, FixedEstimator([0.1], latent_id="some-other-autoencoder"))
    ok = flash(solver, FixedEstimator([0.1], latent_id=oracle.latent_id))
    assert isinstance(ok, FlashSolver)


def test_flash_solver_is_a_solver(oracle):
    from flash_plugin.protocols import MixedStartSolver, Solver

    flashed = flash(Sampler(oracle, num_steps=10), FixedEstimator([0.1]))
    assert isinstance(flashed, Solver) and isinstance(flashed, MixedStartSolver)
    start = StartPoint(torch.tensor([3]), torch.zeros(1, 2, 2, 2))
    assert flashed.solve(torch.zeros(1, 2, 2, 2), None, start=start).nfe.item() == 3


def test_flash_of_a_guided_solver_under_inference_mode(oracle):
    """A researcher's ``torch.inference_mode()`` block: same reconstruction as outside it."""
    from flash_plugin.solvers import LatentDPS

    class Identity:
        def forward(self, x):
            return x

        def select(self, index):
            return self

    flashed = flash(LatentDPS(oracle, zeta=1.0, num_steps=50), FixedEstimator([0.01, 0.2]))
    y = torch.randn(2, 2, 2, 2, generator=torch.Generator().manual_seed(3))
    ref = flashed(y, Identity(), generator=gens([1, 2]))
    with torch.inference_mode():
        sol = flashed(y.clone(), Identity(), generator=gens([1, 2]))
    assert torch.equal(sol.x, ref.x) and torch.equal(sol.nfe, ref.nfe) and sol.nfe.sum() > 0


def test_without_an_estimator_the_registry_supplies_one_per_operator_family(oracle, fresh_plugin_manager):
    """flash(solver) alone: the estimator registered for the operator's family and the model's
    latent space is used (looked up once per family); none fitting is a clear error."""
    from flash_plugin.errors import NotAdaptableError
    from flash_plugin.markers import hookimpl
    from flash_plugin.operators import GaussianBlur, RandomInpainting

    made = []

    class Factory:
        def __init__(self, family, latent_id, variance):
            self.operator_family, self.latent_id, self.variance = family, latent_id, variance

        def __call__(self):
            made.append(self.operator_family)
            est = FixedEstimator([self.variance] * 2, latent_id=self.latent_id)
            est.metadata["operator_family"] = self.operator_family
            return est

    class Plugin:
        @hookimpl
        def flash_register_severity_estimators(self, register):
            register("blur-other-model", Factory("gaussian-blur", "another-autoencoder", 0.9))
            register("blur-here", Factory("gaussian-blur", oracle.latent_id, 0.05))
            register("inpainting-here", Factory("inpainting", oracle.latent_id, 0.5))

    fresh_plugin_manager.register(Plugin(), name="estimators-for-the-oracle")
    flashed = flash(Sampler(oracle, num_steps=100))
    blur = GaussianBlur(torch.tensor([0.5, 1.0]), 0.0)
    y = torch.zeros(2, 2, 2, 2)
    a = flashed(y, blur, generator=gens([0, 1]))
    b = flashed(y, blur, generator=gens([0, 1]))
    assert torch.equal(a.x, b.x) and made == ["gaussian-blur"]  # the other model's blur estimator is skipped, once
    assert torch.allclose(a.severity, torch.full((2,), 0.05, dtype=torch.float64))
    masks = RandomInpainting(torch.ones(2, 1, 2, 2), 0.0)
    c = flashed(y, masks, generator=gens([0, 1]))
    assert torch.allclose(c.severity, torch.full((2,), 0.5, dtype=torch.float64)) and made == ["gaussian-blur", "inpainting"]
    assert int(c.start_step[0]) > int(a.start_step[0])  # a larger σ̂² starts earlier
    assert "<from the registry>" in repr(flashed)

    class Motion:
        operator_family, noise_std = "motion-blur", 0.0

        def forward(self, x):
            return x

    with pytest.raises(NotAdaptableError) as info:
        flashed(y, Motion())
    msg = str(info.value)
    assert "operator family 'motion-blur'" in msg and "blur-here (family gaussian-blur" in msg and "train-severity" in msg


def test_the_bundled_encoders_are_found_for_the_bundled_model():
    from flash_plugin.models import load_default_model, load_test_images
    from flash_plugin.operators import get_preset
    from flash_plugin.solvers import LatentDPS

    model = load_default_model().latent_diffusion
    x, _ = load_test_images()
    g = torch.Generator().manual_seed(0)
    op = get_preset("gblur-fixed").make(torch.ones(2), g)
    y = op.measure(x[:2], g)
    flashed = flash(LatentDPS(model, zeta=0.5, num_steps=20))
    estimator = flashed.estimator_for(op)
    assert estimator.metadata["operator"] == "gblur-varying"  # the paper reuses the varying-blur encoder
    assert flashed(y, op, generator=gens([0, 1])).nfe.max() <= 20
