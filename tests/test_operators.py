"""Degradation operators: adjointness, severity, determinism, per-sample batches, gradients,
dtype/device, input validation, presets and plugin registration."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flash_plugin.errors import FlashInputError, UnknownPluginNameError
from flash_plugin.operators import (
    PRESETS,
    BaseLinearOperator,
    GaussianBlur,
    GaussianNoise,
    NonlinearBlur,
    RandomInpainting,
    TaskPreset,
    adjointness_error,
    flash_register_operators,
    get_preset,
)
from flash_plugin.operators.gaussian_blur import gaussian_kernels_1d
from flash_plugin.operators.nonlinear_blur import linear_to_srgb, random_trajectories, srgb_to_linear, trajectory_kernels
from flash_plugin.protocols import LinearOperator, Operator

FAST = settings(max_examples=25, deadline=None)
OPERATOR_DIR = Path(__file__).resolve().parents[1] / "flash_plugin" / "operators"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def build(family: str, t: torch.Tensor, generator=None, image_shape=(32, 32), noise_std: float = 0.0):
    """One operator of ``family`` at severities ``t`` (masks/kernels from ``generator``)."""
    if family == "blur":
        return GaussianBlur.from_severity(t, generator, noise_std=noise_std)
    if family == "inpainting":
        return RandomInpainting.from_severity(t, generator, image_shape=image_shape, noise_std=noise_std)
    if family == "nonlinear":
        return NonlinearBlur.from_severity(t, generator, noise_std=noise_std)
    if family == "noise":
        return GaussianNoise(noise_std, batch_size=len(t))
    raise AssertionError(family)


FAMILIES = ["blur", "inpainting", "nonlinear", "noise"]
LINEAR = ["blur", "inpainting", "noise"]


def psnr01(y: torch.Tensor, x: torch.Tensor) -> float:
    """Mean per-image PSNR (dB) on the [0, 1] scale, y clipped to [-1, 1]."""
    mse = ((y.clamp(-1, 1) - x) / 2).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse)).mean())


@pytest.fixture(scope="module")
def fmnist() -> torch.Tensor:
    from flash_plugin.data.fashion_mnist import FashionMNISTNotFound, load_fashion_mnist

    try:
        x, _ = load_fashion_mnist("test", limit=32)
    except FashionMNISTNotFound as e:
        pytest.skip(f"Fashion-MNIST not found: {e}")
    return x


# ----------------------------------------------------------------------------------------------
# Adjointness <A u, v> = <u, A* v>
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", LINEAR)
@FAST
@given(
    b=st.integers(1, 3),
    c=st.integers(1, 3),
    h=st.integers(2, 20),
    w=st.integers(2, 20),
    ts=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3),
    seed=st.integers(0, 2**31 - 1),
)
def test_adjoint_is_exact_in_float64(family, b, c, h, w, ts, seed):
    op = build(family, torch.tensor(ts[:b], dtype=torch.float64), gen(seed), image_shape=(h, w))
    assert isinstance(op, LinearOperator)
    assert adjointness_error(op, (b, c, h, w), gen(seed + 1)) < 1e-10


def test_adjoint_of_blur_is_not_the_blur_itself_at_borders():
    """Reflection padding makes the blur non-symmetric: the adjoint must differ from A near borders
    (guards against returning A instead of A*)."""
    op = GaussianBlur(torch.tensor([1.5], dtype=torch.float64))
    y = torch.randn(1, 1, 10, 10, generator=gen(0), dtype=torch.float64)
    assert not torch.allclose(op.adjoint(y), op.forward(y))
    assert adjointness_error(op, (1, 1, 10, 10), gen(1)) < 1e-10


def test_operators_satisfy_the_protocols():
    t = torch.tensor([0.5])
    for family in FAMILIES:
        op = build(family, t, gen(0))
        assert isinstance(op, Operator)
        assert isinstance(op, LinearOperator) == (family in LINEAR)
        assert isinstance(op, BaseLinearOperator) == (family in LINEAR)


# ----------------------------------------------------------------------------------------------
# Severity: PSNR(A_t(x), x) decreases with t on real images
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["blur", "inpainting", "nonlinear"])
def test_psnr_decreases_with_severity(fmnist, family):
    x = fmnist
    values = []
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        op = build(family, torch.full((len(x),), t), gen(123))  # same seed for every t
        values.append(psnr01(op.forward(x), x))
    assert all(a > b for a, b in zip(values, values[1:])), values
    assert values[-1] < 20.0, values  # t = 1 is a real degradation on 32-px images


def test_severity_maps_to_documented_parameters():
    t = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(GaussianBlur.from_severity(t).std, torch.tensor([0.3, 4.15, 8.0], dtype=torch.float64))
    assert torch.allclose(GaussianBlur.from_severity(t, std_range=(0.3, 3.0)).std, torch.tensor([0.3, 1.65, 3.0], dtype=torch.float64))
    op = RandomInpainting.from_severity(t, gen(0), image_shape=(1, 20, 25))
    assert torch.allclose(op.kept_fraction, torch.tensor([1.0, 0.6, 0.2], dtype=torch.float64))
    assert op.mask.shape == (3, 1, 20, 25)


# ----------------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_measurement_different_seed_different(family):
    x = torch.rand(2, 1, 16, 16, generator=gen(5)) * 2 - 1
    t = torch.tensor([0.6, 0.9])

    def y(seed):
        return build(family, t, gen(seed), (16, 16), noise_std=0.1).measure(x, gen(seed + 100))

    assert torch.equal(y(1), y(1))
    assert not torch.allclose(y(1), y(2))
    if family == "inpainting":
        assert not torch.equal(build(family, t, gen(1), (16, 16)).mask, build(family, t, gen(2), (16, 16)).mask)
    if family == "nonlinear":
        assert not torch.equal(build(family, t, gen(1)).kernels, build(family, t, gen(2)).kernels)


def test_noise_is_drawn_from_the_callers_generator_and_zero_noise_is_exact():
    x = torch.zeros(2, 1, 8, 8)
    op = GaussianNoise(0.1, batch_size=2)
    expected = 0.1 * torch.randn(x.shape, generator=gen(3))
    assert torch.allclose(op.measure(x, gen(3)), expected)
    assert torch.equal(GaussianNoise(0.0).measure(x, gen(3)), x)
    assert torch.equal(GaussianBlur(torch.tensor([1.0, 2.0])).measure(x, gen(3)), GaussianBlur(torch.tensor([1.0, 2.0])).forward(x))


def test_noise_std_matches_requested_level():
    y = GaussianNoise(0.1).measure(torch.zeros(4, 1, 64, 64), gen(0))
    assert abs(y.std().item() - 0.1) < 0.005


# ----------------------------------------------------------------------------------------------
# A batch equals its samples one by one
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_samples_one_by_one(family):
    x = torch.rand(3, 2, 16, 16, generator=gen(0), dtype=torch.float64) * 2 - 1
    t = torch.tensor([0.1, 1.0, 0.5], dtype=torch.float64)
    op = build(family, t, gen(7), (16, 16))
    y = op.forward(x)
    for i in range(3):
        yi = op.select(torch.tensor([i])).forward(x[i : i + 1])
        torch.testing.assert_close(yi, y[i : i + 1], rtol=0, atol=1e-12)
    # per-sample generators: a batch built from [g_0, g_1, g_2] equals samples built from g_i alone
    batch = build(family, t, [gen(10 + i) for i in range(3)], (16, 16), noise_std=0.1)
    y_batch = batch.measure(x, [gen(20 + i) for i in range(3)])
    for i in range(3):
        single = build(family, t[i : i + 1], gen(10 + i), (16, 16), noise_std=0.1)
        torch.testing.assert_close(single.measure(x[i : i + 1], gen(20 + i)), y_batch[i : i + 1], rtol=0, atol=1e-12)


def test_select_with_bool_mask_and_order():
    op = GaussianBlur.from_severity(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    sub = op.select(torch.tensor([False, True, False, True]))
    assert sub.batch_size == 2 and torch.equal(sub.std, op.std[[1, 3]]) and torch.equal(sub.severity, op.severity[[1, 3]])
    assert torch.equal(op.select([3, 0]).std, op.std[[3, 0]])
    assert op.batch_size == 4  # original untouched
    for bad in (torch.tensor([4]), torch.tensor([True, False]), torch.tensor([0.5]), torch.tensor([], dtype=torch.long)):
        with pytest.raises(FlashInputError, match="index"):
            op.select(bad)


def test_blur_kernels_are_zero_padded_per_sample():
    k = gaussian_kernels_1d(torch.tensor([0.0, 0.5, 3.0], dtype=torch.float64), truncate=4.0)
    assert k.shape == (3, 25) and torch.allclose(k.sum(1), torch.ones(3, dtype=torch.float64))
    assert k[0, 12] == 1.0 and k[0].count_nonzero() == 1  # std 0: identity
    assert k[1].count_nonzero() == 5  # radius ceil(4 * 0.5) = 2


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_gradcheck(family):
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    op = build(family, t, gen(0), (12, 12))
    x = (torch.rand(2, 1, 12, 12, generator=gen(1), dtype=torch.float64) * 1.6 - 0.8).requires_grad_()
    assert torch.autograd.gradcheck(op.forward, (x,), fast_mode=True)
    if isinstance(op, BaseLinearOperator):
        assert torch.autograd.gradcheck(op.adjoint, (x,), fast_mode=True)


def test_nonlinear_blur_gradient_flows_through_every_unsaturated_pixel():
    op = NonlinearBlur.from_severity(torch.tensor([0.5]), gen(0))
    x = (torch.rand(1, 1, 16, 16, generator=gen(1)) * 1.0 - 0.9).requires_grad_()  # dark: no saturation
    op.forward(x).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad > 0).all()
    black = torch.full((1, 1, 16, 16), -1.0, requires_grad=True)  # the sRGB toe keeps gradients finite at black
    op.forward(black).sum().backward()
    assert torch.isfinite(black.grad).all()


def test_camera_response_round_trip():
    u = torch.linspace(-0.1, 1.1, 121, dtype=torch.float64)
    torch.testing.assert_close(linear_to_srgb(srgb_to_linear(u)), u)


def test_zero_severity_nonlinear_blur_has_identity_kernel_and_is_identity_without_exposure():
    paths = random_trajectories(2, gen(0))
    kern = trajectory_kernels(paths, torch.zeros(2))
    assert kern.shape == (2, 3, 3) and torch.all(kern[:, 1, 1] == 1)
    x = torch.rand(2, 1, 16, 16, generator=gen(1), dtype=torch.float64) * 2 - 1
    op = NonlinearBlur.from_severity(torch.zeros(2), gen(0), exposure=1.0)
    torch.testing.assert_close(op.forward(x), x)


# ----------------------------------------------------------------------------------------------
# dtype and device
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_float32_and_float64_inputs_and_to_cpu(family):
    op = build(family, torch.tensor([0.4, 0.9]), gen(0), (16, 16), noise_std=0.1)
    x64 = torch.rand(2, 3, 16, 16, generator=gen(1), dtype=torch.float64) * 2 - 1
    y64, y32 = op.forward(x64), op.forward(x64.float())
    assert y64.dtype == torch.float64 and y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, atol=1e-5, rtol=0)
    moved = op.to("cpu")
    assert moved is not op and type(moved) is type(op)
    torch.testing.assert_close(moved.measure(x64, gen(2)), op.measure(x64, gen(2)))
    assert op.measure(x64.float(), gen(2)).dtype == torch.float32


def test_no_hard_coded_device_in_operator_code():
    needle = "cu" + "da"
    for path in OPERATOR_DIR.glob("*.py"):
        assert needle not in path.read_text().lower(), path


# ----------------------------------------------------------------------------------------------
# Bad input is an error naming the parameter, never a silent broadcast
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_bad_inputs_raise(family):
    op = build(family, torch.tensor([0.5, 0.5]), gen(0), (8, 8))
    good = torch.zeros(2, 1, 8, 8)
    with pytest.raises(FlashInputError, match="x must have rank 4"):
        op.forward(good[0])
    with pytest.raises(FlashInputError, match="x has batch length 1"):
        op.forward(good[:1])  # no broadcast of a 2-sample operator
    with pytest.raises(FlashInputError, match="x has batch length 3"):
        op.measure(torch.zeros(3, 1, 8, 8), gen(0))
    nan = good.clone()
    nan[1, 0, 3, 3] = float("nan")
    with pytest.raises(FlashInputError, match="x contains NaN or Inf"):
        op.forward(nan)
    with pytest.raises(FlashInputError, match="x must have a floating dtype"):
        op.forward(good.long())
    if isinstance(op, BaseLinearOperator):
        with pytest.raises(FlashInputError, match="y contains NaN or Inf"):
            op.adjoint(nan)


@pytest.mark.parametrize("family", ["blur", "inpainting", "nonlinear"])
@pytest.mark.parametrize("t", [[1.5], [-0.1], [float("nan")], [[0.5]]])
def test_bad_severity_raises_naming_t(family, t):
    with pytest.raises(FlashInputError, match=r"^t \(severity\)"):
        build(family, torch.tensor(t), gen(0))


def test_other_bad_parameters():
    with pytest.raises(FlashInputError, match="noise_std"):
        GaussianBlur(torch.tensor([1.0]), noise_std=-0.1)
    with pytest.raises(FlashInputError, match="std"):
        GaussianBlur(torch.tensor([-1.0]))
    with pytest.raises(FlashInputError, match="std_range"):
        GaussianBlur.from_severity(torch.tensor([0.5]), std_range=(2.0, 1.0))
    with pytest.raises(FlashInputError, match="image_shape"):
        RandomInpainting.from_severity(torch.tensor([0.5]), image_shape=(8,))
    with pytest.raises(FlashInputError, match="spatial size"):
        RandomInpainting.from_severity(torch.tensor([0.5]), image_shape=(8, 8)).forward(torch.zeros(1, 1, 8, 9))
    with pytest.raises(FlashInputError, match="mask must be binary"):
        RandomInpainting(torch.full((1, 1, 4, 4), 0.5))
    with pytest.raises(FlashInputError, match="kernels must each sum to 1"):
        NonlinearBlur(torch.ones(1, 3, 3))
    with pytest.raises(FlashInputError, match="generator"):
        build("inpainting", torch.tensor([0.5, 0.5]), [gen(0)])


# ----------------------------------------------------------------------------------------------
# Inpainting masks
# ----------------------------------------------------------------------------------------------
def test_random_masks_are_per_sample_and_nested_across_severity():
    t = torch.tensor([0.5, 0.5])
    op = RandomInpainting.from_severity(t, gen(0), image_shape=(16, 16))
    assert not torch.equal(op.mask[0], op.mask[1])
    light = RandomInpainting.from_severity(torch.tensor([0.2]), gen(4), image_shape=(16, 16)).mask
    heavy = RandomInpainting.from_severity(torch.tensor([0.9]), gen(4), image_shape=(16, 16)).mask
    assert torch.all(light | ~heavy)  # every pixel kept at t = 0.9 is kept at t = 0.2


def test_paper_nested_mask_is_shared_and_nested():
    t = torch.tensor([0.9, 0.9, 0.5])
    op = RandomInpainting.from_severity(t, gen(0), image_shape=(32, 32), nested=True)
    other = RandomInpainting.from_severity(t, gen(99), image_shape=(32, 32), nested=True)
    assert torch.equal(op.mask, other.mask)  # independent of the caller's generator
    assert torch.equal(op.mask[0], op.mask[1]) and torch.all(op.mask[2] | ~op.mask[0])
    assert abs(op.kept_fraction[0].item() - 0.28) < 0.05


# ----------------------------------------------------------------------------------------------
# repr, presets, registration
# ----------------------------------------------------------------------------------------------
def test_repr_is_readable():
    text = repr(GaussianBlur.from_severity(torch.tensor([0.0, 1.0]), noise_std=0.1))
    assert text.startswith("GaussianBlur(B=2, severity=[0, 1], noise_std=0.1")
    assert "B=None" in repr(GaussianNoise(0.1))


def test_presets_match_the_paper_table():
    assert set(PRESETS) == {"gblur-varying", "gblur-fixed", "nonlinear-blur", "random-inpainting"}
    assert get_preset("gblur-fixed").severity_range == (1.0, 1.0)
    assert get_preset("random-inpainting").severity_range == (0.875, 1.0)
    assert all(p.noise_std == 0.1 for p in PRESETS.values())
    g = gen(0)
    for preset in PRESETS.values():
        t = preset.sample_severity(4, g)
        lo, hi = preset.severity_range
        assert t.shape == (4,) and bool(((t >= lo) & (t <= hi)).all())
        op = preset.make(t, g)
        assert isinstance(op, preset.family) and op.noise_std == 0.1 and op.batch_size == 4
        assert op.measure(torch.zeros(4, 1, 32, 32), g).shape == (4, 1, 32, 32)
    assert torch.equal(get_preset("gblur-fixed").sample_severity(3), torch.ones(3, dtype=torch.float64))
    kept = get_preset("random-inpainting").make(torch.tensor([0.875, 1.0])).kept_fraction
    assert torch.allclose(kept, torch.tensor([0.3, 0.2], dtype=torch.float64), atol=1e-3)


def test_preset_variants_and_overrides():
    base = get_preset("gblur-varying")
    noisy = dataclasses.replace(base, noise_std=0.2, family_kwargs={"std_range": (0.5, 1.0)})
    assert base.noise_std == 0.1 and noisy.noise_std == 0.2
    assert torch.allclose(noisy.make(torch.tensor([1.0])).std, torch.tensor([1.0], dtype=torch.float64))
    op = get_preset("random-inpainting").make(torch.tensor([1.0]), gen(0), image_shape=(8, 8))
    assert op.mask.shape == (1, 1, 8, 8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.noise_std = 0.3
    with pytest.raises(TypeError):
        base.family_kwargs["std_range"] = (0, 1)
    with pytest.raises(FlashInputError, match="severity_range"):
        TaskPreset("bad", GaussianBlur, severity_range=(0.5, 1.5))


def test_unknown_preset_lists_known_names():
    with pytest.raises(UnknownPluginNameError, match="gblur-varying") as info:
        get_preset("gblur")
    assert isinstance(info.value, KeyError)


def test_hook_registers_classes_and_presets():
    registered = {}

    def register(name, obj):
        assert name not in registered
        registered[name] = obj

    flash_register_operators(register)
    assert registered["gaussian-blur"] is GaussianBlur
    assert registered["inpainting"] is RandomInpainting
    assert registered["gblur-varying"] is PRESETS["gblur-varying"]
    assert set(PRESETS) <= set(registered)  # "kernel-wizard": the bkse adapter plugin (tests/test_adapters_kernel_wizard.py)
    op = registered["gblur-varying"](torch.tensor([0.5]))  # a preset is a factory
    assert isinstance(op, GaussianBlur)
