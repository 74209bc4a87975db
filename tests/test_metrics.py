"""Tests of flash_plugin.metrics and the bundled FD-FMNIST classifier."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from flash_plugin.errors import CheckpointError, FlashInputError
from flash_plugin.metrics import (
    center_crop,
    frechet_distance,
    frechet_distance_from_stats,
    paired_difference,
    psnr,
    ssim,
    summarize_nfe,
)
from flash_plugin.models.classifier import DEFAULT_CLASSIFIER_DIR, ClassifierFeatures, FashionClassifier, load_classifier


def _images(b=4, c=1, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ref = torch.rand(b, c, h, w, generator=g) * 2 - 1
    x = (ref + 0.1 * torch.randn(b, c, h, w, generator=g)).clamp(-1, 1)
    return x, ref


# ---- PSNR / SSIM ---------------------------------------------------------------------------------
@pytest.mark.parametrize("c", [1, 3])
def test_psnr_matches_skimage(c):
    x, ref = _images(c=c)
    ours = psnr(x, ref)
    assert ours.shape == (4,) and ours.dtype == torch.float64
    for i in range(4):
        r01 = ((ref[i].double() + 1) / 2).numpy()
        x01 = ((x[i].double() + 1) / 2).numpy()
        assert ours[i].item() == pytest.approx(peak_signal_noise_ratio(r01, x01, data_range=1.0), abs=1e-9)


def test_psnr_clips_reconstruction_and_crops():
    x, ref = _images()
    over = x.clone()
    over[:, :, 0, 0] = 5.0  # outside [-1, 1]: clipped to 1 before the comparison
    clipped = over.clamp(-1, 1)
    assert torch.allclose(psnr(over, ref), psnr(clipped, ref))
    cropped = psnr(x, ref, crop=28)
    expect = peak_signal_noise_ratio(((center_crop(ref, 28)[0].double() + 1) / 2).numpy(),
                                     ((center_crop(x, 28)[0].double() + 1) / 2).numpy(), data_range=1.0)
    assert cropped[0].item() == pytest.approx(expect, abs=1e-9)
    assert math.isinf(psnr(ref, ref)[0].item())


def test_ssim_identity_and_monotone_in_noise():
    _, ref = _images(b=2, seed=1)
    assert torch.allclose(ssim(ref, ref), torch.ones(2, dtype=torch.float64))
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(ref.shape, generator=g)
    values = [ssim((ref + s * noise).clamp(-1, 1), ref).mean().item() for s in (0.05, 0.2, 0.5)]
    assert 1.0 > values[0] > values[1] > values[2]


def test_ssim_matches_skimage_multichannel():
    x, ref = _images(b=2, c=3)
    ours = ssim(x, ref)
    r = ((ref[1].double() + 1) / 2).numpy()
    xx = ((x[1].double() + 1) / 2).numpy()
    assert ours[1].item() == pytest.approx(structural_similarity(r, xx, data_range=1.0, channel_axis=0), abs=1e-12)


@pytest.mark.parametrize(
    "x, ref, match",
    [
        (torch.zeros(1, 32, 32), torch.zeros(1, 32, 32), "B, C, H, W"),
        (torch.zeros(2, 1, 32, 32), torch.zeros(3, 1, 32, 32), "same shape"),
        (torch.full((1, 1, 32, 32), float("nan")), torch.zeros(1, 1, 32, 32), "NaN"),
        (torch.zeros(1, 1, 32, 32), torch.full((1, 1, 32, 32), 3.0), r"\[-1, 1\]"),
        (torch.zeros(0, 1, 32, 32), torch.zeros(0, 1, 32, 32), "empty"),
        ([[0.0]], torch.zeros(1, 1, 1, 1), "torch.Tensor"),
    ],
)
def test_psnr_ssim_bad_inputs(x, ref, match):
    with pytest.raises(FlashInputError, match=match):
        psnr(x, ref)
    with pytest.raises(ValueError, match=match):  # FlashInputError is a ValueError
        ssim(x, ref)


def test_ssim_too_small_and_bad_crop():
    with pytest.raises(FlashInputError, match="7x7"):
        ssim(torch.zeros(1, 1, 5, 5), torch.zeros(1, 1, 5, 5))
    with pytest.raises(FlashInputError, match="exceeds"):
        psnr(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), crop=9)


# ---- Fréchet distance ----------------------------------------------------------------------------
def test_frechet_exact_formula_closed_form():
    # Diagonal (commuting) covariances: FD = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expect = 1.0 + 0.0 + 4.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0.0
    assert frechet_distance_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expect, abs=1e-12)
    # Rotated (non-diagonal, still commuting) pair and 1-D case.
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(expect, abs=1e-9)
    assert frechet_distance_from_stats([0.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(9.0 + 1.0)


def test_frechet_matches_scipy_sqrtm_on_general_covariances():
    from scipy import linalg

    rng = np.random.default_rng(1)
    m1, m2 = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(5), m2 @ m2.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    covmean = linalg.sqrtm(s1 @ s2).real
    expect = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))
    assert frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(expect, rel=1e-8)
    assert frechet_distance_from_stats(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_sample_based_close_to_exact():
    rng = np.random.default_rng(2)
    mu1, mu2 = np.zeros(4), np.array([1.0, 0.0, 0.5, 0.0])
    s1, s2 = np.diag([1.0, 2.0, 0.5, 1.0]), np.diag([2.0, 1.0, 0.5, 3.0])
    exact = frechet_distance_from_stats(mu1, s1, mu2, s2)
    fa = rng.multivariate_normal(mu1, s1, size=20000)
    fb = rng.multivariate_normal(mu2, s2, size=20000)
    assert frechet_distance(torch.from_numpy(fa), fb) == pytest.approx(exact, abs=0.05)
    # Singular (rank-deficient) covariances are handled without complex round-off.
    assert frechet_distance(fa[:3], fa[3:6]) >= 0.0


@pytest.mark.parametrize(
    "a, b, match",
    [
        (np.zeros((10, 3)), np.zeros((10, 4)), "same feature dimension"),
        (np.zeros(10), np.zeros((10, 1)), "2-D"),
        (np.zeros((1, 3)), np.zeros((10, 3)), "at least 2"),
        (np.full((10, 3), np.nan), np.zeros((10, 3)), "NaN"),
        ("feats", np.zeros((10, 3)), "numpy array"),
    ],
)
def test_frechet_bad_inputs(a, b, match):
    with pytest.raises(FlashInputError, match=match):
        frechet_distance(a, b)


def test_frechet_from_stats_bad_inputs():
    with pytest.raises(FlashInputError, match="equal length"):
        frechet_distance_from_stats(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(FlashInputError, match="covariances"):
        frechet_distance_from_stats(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(FlashInputError, match="symmetric"):
        frechet_distance_from_stats(np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), np.zeros(2), np.eye(2))
    with pytest.raises(FlashInputError, match="positive semi-definite"):
        frechet_distance_from_stats(np.zeros(2), -np.eye(2), np.zeros(2), np.eye(2))


# ---- paired differences / NFE --------------------------------------------------------------------
def test_paired_difference_known_numbers():
    a = [3.0, 5.0, 7.0, 9.0]
    b = [1.0, 2.0, 3.0, 4.0]  # differences 2, 3, 4, 5: mean 3.5, sd sqrt(5/3), se sd / 2
    mean, se, n = paired_difference(torch.tensor(a), np.array(b))
    assert (mean, n) == (3.5, 4)
    assert se == pytest.approx(math.sqrt(5 / 3) / 2)
    assert paired_difference([1.0, 2.0], [1.0, 2.0]) == (0.0, 0.0, 2)


@pytest.mark.parametrize(
    "a, b, match",
    [
        ([1.0, 2.0], [1.0], "same length"),
        ([1.0], [1.0], "at least 2"),
        ([[1.0, 2.0]], [[1.0, 2.0]], "1-D"),
        ([1.0, float("inf")], [1.0, 2.0], "NaN or Inf"),
        ("ab", [1.0, 2.0], "tensor, array or sequence"),
    ],
)
def test_paired_difference_bad_inputs(a, b, match):
    with pytest.raises(FlashInputError, match=match):
        paired_difference(a, b)


def test_summarize_nfe():
    assert summarize_nfe(torch.tensor([10, 20, 30, 40])) == {"mean": 25.0, "min": 10, "max": 40}
    assert summarize_nfe([5]) == {"mean": 5.0, "min": 5, "max": 5}
    for bad, match in [(torch.zeros(2, 2, dtype=torch.long), "1-D"), (torch.tensor([], dtype=torch.long), "non-empty"),
                       (torch.tensor([1.5]), "whole numbers"), (torch.tensor([-1]), "non-negative"), ("3", "tensor")]:
        with pytest.raises(FlashInputError, match=match):
            summarize_nfe(bad)


# ---- classifier / features -----------------------------------------------------------------------
def test_classifier_features_shapes_on_untrained_net():
    torch.manual_seed(0)
    fx = ClassifierFeatures(FashionClassifier(), batch_size=3)
    x = torch.rand(5, 1, 32, 32) * 2 - 1
    f, p = fx.features_and_predictions(x)
    assert f.shape == (5, 128) and f.dtype == torch.float64
    assert torch.allclose(f, fx(x)) and torch.equal(p, fx.predict(x))
    with pytest.raises(FlashInputError, match=r"\(B, 1, 32, 32\)"):
        fx(torch.zeros(2, 3, 32, 32))
    with pytest.raises(FlashInputError, match="NaN"):
        fx(torch.full((1, 1, 32, 32), float("nan")))


def test_load_classifier_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_classifier(tmp_path / "nope")
    d = tmp_path / "clf"
    shutil.copytree(DEFAULT_CLASSIFIER_DIR, d)
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_classifier(d)
    weights.unlink()
    with pytest.raises(CheckpointError, match="not found"):
        load_classifier(d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "mystery": 1}))
    with pytest.raises(CheckpointError, match="unknown fields"):
        load_classifier(d)
    (d / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="JSON"):
        load_classifier(d)


def test_bundled_classifier_accuracy():
    from flash_plugin.data.fashion_mnist import FashionMNISTNotFound, load_fashion_mnist

    try:
        x, y = load_fashion_mnist("test", limit=500)
    except FashionMNISTNotFound as e:
        pytest.skip(f"Fashion-MNIST test split not available (install Debian's dataset-fashion-mnist): {e}")
    pred = ClassifierFeatures(load_classifier()).predict(x)
    acc = (pred == y).double().mean().item()
    assert acc >= 0.9, f"bundled classifier accuracy {acc:.3f} on the first 500 test images"


def test_classifier_features_old_home_warns_and_is_the_same_class():
    import flash_plugin.metrics as metrics

    with pytest.warns(DeprecationWarning, match="moved to flash_plugin.models.classifier"):
        old = metrics.ClassifierFeatures
    assert old is ClassifierFeatures
