"""Inputs that would otherwise give a wrong result without a word: images on another scale, an
estimator trained for another operator family, and measurements in another dtype."""

from __future__ import annotations

import warnings

import pytest
import torch

from flash_plugin.errors import FlashInputError, OperatorFamilyMismatchError
from flash_plugin.flash import FlashConfig, estimator_family, flash
from flash_plugin.models.gaussian_oracle import GaussianOracle
from flash_plugin.operators import (
    OPERATOR_CLASSES,
    PRESETS,
    GaussianBlur,
    GaussianNoise,
    ImageRangeWarning,
    get_preset,
)
from flash_plugin.solvers import Sampler
from flash_plugin.types import SeverityEstimate


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    """Images in [-1, 1] that reach both ends of the range, as real images do."""
    x = torch.rand(n, 1, 32, 32, generator=gen(seed)) * 2 - 1
    x[:, :, 0, 0], x[:, :, 0, 1] = -1.0, 1.0
    return x


def preset_operator(task: str, n: int = 2):
    return get_preset(task).make(torch.linspace(0.2, 1.0, n), gen(1))


# ----------------------------------------------------------------------------------------------
# Image range at measure time
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", sorted(PRESETS))
@pytest.mark.parametrize(
    "scale",
    [
        pytest.param(lambda x: (x + 1) * 127.5, id="0-255"),
        pytest.param(lambda x: (x + 1) * 0.6, id="0-1.2"),
        pytest.param(lambda x: x * 2.0, id="-2-2"),
    ],
)
def test_measure_refuses_images_on_another_scale(task, scale):
    op = preset_operator(task)
    with pytest.raises(FlashInputError, match=r"must be images in \[-1, 1\].*x / 127\.5 - 1.*2 \* x - 1"):
        op.measure(scale(images()), gen(2))
    assert op.measure(scale(images()), gen(2), check_range=False).shape == (2, 1, 32, 32)  # the opt-out


@pytest.mark.parametrize("task", sorted(PRESETS))
def test_measure_warns_on_images_in_0_1_and_is_silent_on_minus_1_1(task):
    op = preset_operator(task)
    x = images()
    with pytest.warns(ImageRangeWarning, match=r"2 \* x - 1"):
        op.measure((x + 1) / 2, gen(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = op.measure(x, gen(2))
        op.measure(x.clamp(-1.0, 1.0) * 1.4, gen(2))  # decoded estimates overshoot a little: accepted
        op.measure(torch.zeros(2, 1, 32, 32), gen(2))  # a flat mid-grey batch is no [0, 1] batch
    assert torch.isfinite(y).all()


def test_forward_does_not_check_the_range():
    # Solvers call forward on decoded estimates, which may be far off while the diffusion runs.
    op = preset_operator("gblur-varying")
    assert torch.isfinite(op.forward(images() * 5)).all()


# ----------------------------------------------------------------------------------------------
# Measurement range at flash() time
# ----------------------------------------------------------------------------------------------
class RecordingEstimator:
    """ẑ = y, a fixed σ̂²; counts its calls (to show that a refusal comes before any work)."""

    def __init__(self, metadata=None, variance: float = 0.1):
        self.metadata = dict(metadata or {})
        self.variance = variance
        self.calls = 0

    def estimate(self, y):
        self.calls += 1
        return SeverityEstimate(latent=y.clone(), variance=torch.full((y.shape[0],), self.variance, dtype=torch.float64))


@pytest.fixture
def oracle_solver():
    oracle = GaussianOracle(torch.full((1, 32, 32), 0.0), torch.full((1, 32, 32), 0.3))
    return Sampler(oracle, num_steps=20)


def test_flash_refuses_a_measurement_of_0_255_images_before_any_work(oracle_solver):
    op = preset_operator("gblur-varying")
    y = op.measure((images() + 1) * 127.5, gen(2), check_range=False)
    est = RecordingEstimator()
    with pytest.raises(FlashInputError, match=r"another scale.*x / 127\.5 - 1.*check_measurement_range=False"):
        flash(oracle_solver, est)(y, op, generator=gen(3))
    assert est.calls == 0
    sol = flash(oracle_solver, est, FlashConfig(check_measurement_range=False))(y, op, generator=gen(3))
    assert est.calls == 1 and sol.x.shape == y.shape


def test_flash_accepts_measurements_of_images_in_range_whatever_the_noise(oracle_solver):
    for task in sorted(PRESETS):
        op = preset_operator(task)
        flash(oracle_solver, RecordingEstimator())(op.measure(images(), gen(2)), op, generator=gen(3))
    # An operator stating its noise as 0 while y carries σ = 0.3 (clean images at the range's ends):
    # |y| stays far below the bound 3 = 1 + 2 + 10·0.
    op = GaussianBlur(torch.tensor([0.0, 0.0]))
    y = op.forward(images()) + 0.3 * torch.randn(2, 1, 32, 32, generator=gen(4))
    flash(oracle_solver, RecordingEstimator())(y, op, generator=gen(3))


def test_flash_checks_no_range_where_the_operator_states_none(oracle_solver):
    class Unbounded:  # e.g. a plugin's operator whose output has another scale
        noise_std = 0.0

        def forward(self, x):
            return 100 * x

    y = 100 * images()
    assert flash(oracle_solver, RecordingEstimator())(y, Unbounded(), generator=gen(3)).x.shape == y.shape


# ----------------------------------------------------------------------------------------------
# Operator families
# ----------------------------------------------------------------------------------------------
def test_operator_families_are_the_registry_names_of_their_classes():
    for name, cls in OPERATOR_CLASSES.items():
        assert cls.operator_family == name
        assert cls.output_range == (-1.0, 1.0)
    for name, preset in PRESETS.items():
        assert preset.operator_family == preset.family.operator_family
        assert preset_operator(name).operator_family == preset.operator_family


def test_bundled_encoders_match_the_tasks_they_serve():
    # The demo and the benchmark use the varying-blur encoder for the fixed-blur task too.
    from flash_plugin.bench.reconstruct import ENCODER_FOR_TASK
    from flash_plugin.registry import get_severity_estimator

    encoders = {name: get_severity_estimator(name)() for name in set(ENCODER_FOR_TASK.values())}
    for task, name in ENCODER_FOR_TASK.items():
        assert estimator_family(encoders[name]) == preset_operator(task).operator_family, task
    assert estimator_family(encoders["random-inpainting"]) != preset_operator("gblur-varying").operator_family


@pytest.mark.parametrize(
    "metadata",
    [{"operator": "random-inpainting"}, {"operator": "inpainting"}, {"operator_family": "inpainting", "operator": "gblur-varying"}],
)
def test_an_estimator_of_another_family_is_refused_before_any_work(oracle_solver, metadata):
    op = preset_operator("gblur-fixed")
    y = op.measure(images(), gen(2))
    est = RecordingEstimator(metadata)
    with pytest.raises(OperatorFamilyMismatchError, match="'inpainting'.*'gaussian-blur'.*check_operator_family=False"):
        flash(oracle_solver, est)(y, op, generator=gen(3))
    assert est.calls == 0
    flash(oracle_solver, est, FlashConfig(check_operator_family=False))(y, op, generator=gen(3))
    assert est.calls == 1


@pytest.mark.parametrize("metadata", [{"operator": "gblur-varying"}, {"operator": "gaussian-blur"}, {"operator": "no-such-operator"}, {}])
def test_an_estimator_of_the_same_or_an_unknown_family_is_accepted(oracle_solver, metadata):
    op = preset_operator("gblur-fixed")
    est = RecordingEstimator(metadata)
    flash(oracle_solver, est)(op.measure(images(), gen(2)), op, generator=gen(3))
    assert est.calls == 1


def test_an_operator_without_a_family_is_not_checked(oracle_solver):
    est = RecordingEstimator({"operator": "random-inpainting"})

    class Plain:
        noise_std = 0.1

    flash(oracle_solver, est)(images(), Plain(), generator=gen(3))
    assert est.calls == 1


# ----------------------------------------------------------------------------------------------
# Dtypes and other measurements that cannot work
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda y: ((y + 1) * 127.5).to(torch.uint8), "real floating dtype"),
        (lambda y: y.to(torch.complex64), "real floating dtype"),
        (lambda y: torch.where(y > 0.5, torch.nan, y), "NaN or Inf"),
        (lambda y: y[:0], "empty batch"),
    ],
    ids=["uint8", "complex", "nan", "empty"],
)
def test_flash_refuses_measurements_that_cannot_work_before_any_work(oracle_solver, bad, message):
    op = GaussianNoise(0.1)
    est = RecordingEstimator()
    with pytest.raises(FlashInputError, match=message):
        flash(oracle_solver, est)(bad(op.measure(images(), gen(2))), op, generator=gen(3))
    assert est.calls == 0


@pytest.fixture(scope="module")
def bundle():
    from flash_plugin.models import load_default_model

    return load_default_model()


def test_severity_encoder_takes_any_floating_dtype(bundle):
    enc = bundle.severity_encoder("gblur-varying")
    op = preset_operator("gblur-varying")
    y = op.measure(images(), gen(2))
    ref = enc.estimate(y)
    same = enc.estimate(y.double())  # float32 -> float64 -> float32 is exact
    assert torch.equal(same.latent, ref.latent) and torch.equal(same.variance, ref.variance)
    for dtype in (torch.float16, torch.bfloat16):
        est = enc.estimate(y.to(dtype))
        assert est.latent.dtype == torch.float32
        torch.testing.assert_close(est.variance, ref.variance, rtol=0.1, atol=0)


def test_flash_takes_float64_float16_and_bfloat16_measurements(bundle):
    from flash_plugin.solvers import LatentDPS

    op = preset_operator("gblur-varying")
    y = op.measure(images(), gen(2))
    solver = flash(LatentDPS(bundle.latent_diffusion, zeta=0.5), estimator=bundle.severity_encoder("gblur-varying"),
                   config=FlashConfig(force_step=3))
    ref = solver(y, op, generator=gen(3))
    as64 = solver(y.double(), op, generator=gen(3))
    assert as64.x.dtype == torch.float64
    assert torch.equal(as64.x, ref.x.double()) and torch.equal(as64.nfe, ref.nfe)  # computed in float32, as before
    for dtype in (torch.float16, torch.bfloat16):
        sol = solver(y.to(dtype), op, generator=gen(3))
        assert sol.x.dtype == dtype and torch.isfinite(sol.x.float()).all()
        assert (sol.x.float() - ref.x).abs().mean() < 0.1


def test_a_plugin_operator_family_is_found_through_the_registry(fresh_plugin_manager):
    from flash_plugin.markers import hookimpl

    class Swirl:
        """A plugin's operator factory."""

        operator_family = "swirl"

    class SwirlPlugin:
        @hookimpl
        def flash_register_operators(self, register):
            register("swirl-task", Swirl)

    fresh_plugin_manager.register(SwirlPlugin(), name="swirl")
    assert estimator_family(RecordingEstimator({"operator": "swirl-task"})) == "swirl"
    assert estimator_family(RecordingEstimator({"operator": "gblur-fixed"})) == "gaussian-blur"
    assert estimator_family(RecordingEstimator({"operator": "unknown-task"})) is None
