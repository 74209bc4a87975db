"""Image-quality and bookkeeping metrics used by the benchmarks and the model card.

* `psnr`, `ssim`: per-sample, on images in [-1, 1] mapped to [0, 1] (``data_range = 1``); the
  reconstruction is clipped to [-1, 1] first, the reference must already lie in it. PSNR is
  computed in torch (float64) and agrees with ``skimage.metrics.peak_signal_noise_ratio``; SSIM
  *is* ``skimage.metrics.structural_similarity`` (Gaussian-free 7x7 default window, ``channel_axis``
  for C > 1).
* `frechet_distance`, `frechet_distance_from_stats`: the Fréchet (2-Wasserstein) distance between
  Gaussians fitted to two feature sets, in float64, via an eigenvalue formula (no ``sqrtm``).
* `flash_plugin.models.classifier.ClassifierFeatures` (formerly here): 128-d penultimate-layer features of flash-plugin's own Fashion-MNIST
  classifier (`flash_plugin.models.classifier`). The Fréchet distance in this space is reported as
  **FD-FMNIST**. It is *not* Inception FID (the package must work offline and bundles no
  Inception weights) and its values are not comparable to FID numbers in the literature.
* `paired_difference`: mean and standard error of per-image differences of a metric between two
  methods evaluated on the same images.
* `summarize_nfe`: mean/min/max of a per-sample NFE tensor (``Solution.nfe``).
* `pearson`, `spearman`: correlations of two sequences (the severity encoder's training and
  evaluation); NaN where a correlation is undefined (fewer than two values, a constant input).

The other functions check their inputs and raise `flash_plugin.errors.FlashInputError` (a
``ValueError``) with a message naming the problem.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from flash_plugin.errors import FlashInputError

__all__ = [
    "center_crop",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_stats",
    "paired_difference",
    "pearson",
    "psnr",
    "spearman",
    "ssim",
    "summarize_nfe",
]

_RANGE_TOL = 1e-4  # slack allowed on the reference's [-1, 1] range (float rounding)


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------
def _as_float_tensor(a: Any, name: str) -> torch.Tensor:
    if isinstance(a, np.ndarray):
        a = torch.from_numpy(a)
    if not isinstance(a, torch.Tensor):
        raise FlashInputError(f"{name} must be a torch.Tensor or numpy array, got {type(a).__name__}")
    if not (a.dtype.is_floating_point or a.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise FlashInputError(f"{name} must be real-valued, got dtype {a.dtype}")
    return a


def _check_image_pair(x: Any, ref: Any) -> tuple[torch.Tensor, torch.Tensor]:
    x = _as_float_tensor(x, "x")
    ref = _as_float_tensor(ref, "ref")
    if x.ndim != 4:
        raise FlashInputError(f"x must be a batch of images (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape != ref.shape:
        raise FlashInputError(f"x and ref must have the same shape, got {tuple(x.shape)} and {tuple(ref.shape)}")
    if x.shape[0] == 0:
        raise FlashInputError("x and ref are empty (batch size 0)")
    x = x.detach().cpu().to(torch.float64)
    ref = ref.detach().cpu().to(torch.float64)
    if not torch.all(torch.isfinite(x)):
        raise FlashInputError("x contains NaN or Inf")
    if not torch.all(torch.isfinite(ref)):
        raise FlashInputError("ref contains NaN or Inf")
    lo, hi = float(ref.min()), float(ref.max())
    if lo < -1 - _RANGE_TOL or hi > 1 + _RANGE_TOL:
        raise FlashInputError(f"ref must lie in [-1, 1] (the model's image range), got values in [{lo:.4g}, {hi:.4g}]")
    return x, ref


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size x size`` window of ``(..., H, W)`` images (e.g. 28 for padded Fashion-MNIST)."""
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise FlashInputError(f"crop size must be a positive int, got {size!r}")
    h, w = x.shape[-2], x.shape[-1]
    if size > h or size > w:
        raise FlashInputError(f"crop size {size} exceeds the image size {h}x{w}")
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


def _to_unit(x: torch.Tensor, ref: torch.Tensor, crop: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    x = (x.clamp(-1.0, 1.0) + 1.0) / 2.0
    ref = (ref.clamp(-1.0, 1.0) + 1.0) / 2.0
    if crop is not None:
        x, ref = center_crop(x, crop), center_crop(ref, crop)
    return x, ref


# ---------------------------------------------------------------------------------------------
# PSNR / SSIM
# ---------------------------------------------------------------------------------------------
def psnr(x: torch.Tensor, ref: torch.Tensor, *, crop: int | None = None) -> torch.Tensor:
    """Per-sample PSNR in dB, float64 ``[B]``.

    Args:
        x: reconstructions ``(B, C, H, W)`` in [-1, 1] (clipped to it first).
        ref: references, same shape, in [-1, 1].
        crop: if given, evaluate on the central ``crop x crop`` window only.

    Computed on the [0, 1] scale with peak 1: ``10 log10(1 / MSE)``, ``MSE`` over ``C, H, W``.
    Identical images give ``+inf``. Matches ``skimage.metrics.peak_signal_noise_ratio(ref01,
    x01, data_range=1)`` per image.
    """
    x, ref = _check_image_pair(x, ref)
    x, ref = _to_unit(x, ref, crop)
    mse = ((x - ref) ** 2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(1.0 / mse)


def ssim(x: torch.Tensor, ref: torch.Tensor, *, crop: int | None = None) -> torch.Tensor:
    """Per-sample SSIM, float64 ``[B]``, via ``skimage.metrics.structural_similarity``.

    Same conventions as `psnr` (clip ``x``, map to [0, 1], ``data_range=1.0``); for ``C > 1`` the
    channel axis is passed as ``channel_axis``. Images need ``H, W >= 7`` (skimage's default window).
    """
    from skimage.metrics import structural_similarity

    x, ref = _check_image_pair(x, ref)
    x, ref = _to_unit(x, ref, crop)
    if min(x.shape[-2:]) < 7:
        raise FlashInputError(f"SSIM needs images of at least 7x7 pixels (skimage's window), got {tuple(x.shape[-2:])}")
    xa, ra = x.numpy(), ref.numpy()
    out = np.empty(x.shape[0], dtype=np.float64)
    for i in range(x.shape[0]):
        if x.shape[1] == 1:
            out[i] = structural_similarity(ra[i, 0], xa[i, 0], data_range=1.0)
        else:
            out[i] = structural_similarity(ra[i], xa[i], data_range=1.0, channel_axis=0)
    return torch.from_numpy(out)


# ---------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------
def _check_features(f: Any, name: str) -> np.ndarray:
    if isinstance(f, torch.Tensor):
        f = f.detach().cpu().to(torch.float64).numpy()
    if not isinstance(f, np.ndarray):
        raise FlashInputError(f"{name} must be a torch.Tensor or numpy array, got {type(f).__name__}")
    if f.ndim != 2:
        raise FlashInputError(f"{name} must be a 2-D feature matrix (N, D), got shape {f.shape}")
    if f.shape[0] < 2:
        raise FlashInputError(f"{name} needs at least 2 samples to estimate a covariance, got {f.shape[0]}")
    if f.shape[1] < 1:
        raise FlashInputError(f"{name} has no feature dimensions (shape {f.shape})")
    f = f.astype(np.float64)
    if not np.all(np.isfinite(f)):
        raise FlashInputError(f"{name} contains NaN or Inf")
    return f


def feature_statistics(feats: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of features ``(N, D)``."""
    f = _check_features(feats, "feats")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a (numerically) PSD matrix; negative round-off eigenvalues -> 0."""
    w, v = np.linalg.eigh((s + s.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_stats(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` in float64.

    ``tr (S1 S2)^(1/2)`` is computed as the sum of square roots of the eigenvalues of the symmetric
    PSD matrix ``S1^(1/2) S2 S1^(1/2)`` (same spectrum as ``S1 S2``). Unlike ``scipy.linalg.sqrtm``
    this needs no ``eps * I`` offset for singular covariances and returns no complex round-off.
    The result is clipped at 0 (it can be ``-1e-12`` from round-off for identical statistics).
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    s1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    s2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise FlashInputError(f"means must be 1-D vectors of equal length, got shapes {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise FlashInputError(f"covariances must be ({d}, {d}) to match the means, got {s1.shape} and {s2.shape}")
    for name, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", s1), ("sigma2", s2)):
        if not np.all(np.isfinite(a)):
            raise FlashInputError(f"{name} contains NaN or Inf")
    for name, s in (("sigma1", s1), ("sigma2", s2)):
        scale = max(1.0, float(np.abs(s).max()))
        if not np.allclose(s, s.T, rtol=1e-6, atol=1e-9 * scale):
            raise FlashInputError(f"{name} is not symmetric")
        if np.linalg.eigvalsh((s + s.T) / 2).min() < -1e-6 * scale:
            raise FlashInputError(f"{name} is not positive semi-definite")
    r1 = _sqrt_psd(s1)
    m = r1 @ s2 @ r1
    eig = np.linalg.eigvalsh((m + m.T) / 2.0)
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(fd, 0.0)


def frechet_distance(feats_a: Any, feats_b: Any) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N_a, D)``, ``(N_b, D)``.

    With our classifier's 128-d features (`ClassifierFeatures`) this is **FD-FMNIST**, not
    Inception FID. The estimate is biased upwards for small N (and the covariance is rank-deficient
    for N <= D): compare values only at equal N.
    """
    a = _check_features(feats_a, "feats_a")
    b = _check_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise FlashInputError(f"feats_a and feats_b must have the same feature dimension, got {a.shape[1]} and {b.shape[1]}")
    mu1, s1 = feature_statistics(a)
    mu2, s2 = feature_statistics(b)
    return frechet_distance_from_stats(mu1, s1, mu2, s2)


# ---------------------------------------------------------------------------------------------
# statistics and bookkeeping
# ---------------------------------------------------------------------------------------------
def _check_vector(a: Any, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().to(torch.float64).numpy()
    elif isinstance(a, (list, tuple)):
        a = np.asarray(a, dtype=np.float64)
    if not isinstance(a, np.ndarray):
        raise FlashInputError(f"{name} must be a tensor, array or sequence of numbers, got {type(a).__name__}")
    if a.ndim != 1:
        raise FlashInputError(f"{name} must be 1-D (one value per image), got shape {a.shape}")
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise FlashInputError(f"{name} contains NaN or Inf (e.g. PSNR of an exact reconstruction); drop or cap those first")
    return a


def paired_difference(a: Sequence[float] | torch.Tensor | np.ndarray, b: Sequence[float] | torch.Tensor | np.ndarray) -> tuple[float, float, int]:
    """``(mean, standard_error, n)`` of the per-image differences ``a - b``.

    ``a`` and ``b`` are the same metric for two methods on the same ``n`` images (same order).
    The standard error is ``std(a - b, ddof=1) / sqrt(n)``; a 95% interval is roughly
    ``mean ± 1.96 · se``. Needs ``n >= 2``.
    """
    a = _check_vector(a, "a")
    b = _check_vector(b, "b")
    if a.shape != b.shape:
        raise FlashInputError(f"a and b must pair up image by image (same length), got {a.shape[0]} and {b.shape[0]}")
    n = a.shape[0]
    if n < 2:
        raise FlashInputError(f"paired_difference needs at least 2 pairs for a standard error, got {n}")
    d = a - b
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(n)), int(n)


def summarize_nfe(nfe: torch.Tensor | np.ndarray | Sequence[int]) -> dict[str, float | int]:
    """``{"mean": float, "min": int, "max": int}`` of per-sample denoiser evaluations (``Solution.nfe``)."""
    if isinstance(nfe, (list, tuple)):
        nfe = torch.as_tensor(nfe)
    elif isinstance(nfe, np.ndarray):
        nfe = torch.from_numpy(nfe)
    if not isinstance(nfe, torch.Tensor):
        raise FlashInputError(f"nfe must be a tensor of per-sample counts, got {type(nfe).__name__}")
    if nfe.ndim != 1 or nfe.numel() == 0:
        raise FlashInputError(f"nfe must be a non-empty 1-D tensor [B], got shape {tuple(nfe.shape)}")
    if nfe.dtype.is_floating_point:
        if not torch.all(torch.isfinite(nfe)) or not torch.all(nfe == nfe.round()):
            raise FlashInputError("nfe must hold whole numbers")
    elif nfe.dtype == torch.bool or nfe.is_complex():
        raise FlashInputError(f"nfe must be an integer tensor, got dtype {nfe.dtype}")
    nfe = nfe.detach().cpu().to(torch.int64)
    if torch.any(nfe < 0):
        raise FlashInputError("nfe counts must be non-negative")
    return {"mean": float(nfe.to(torch.float64).mean()), "min": int(nfe.min()), "max": int(nfe.max())}


# ---------------------------------------------------------------------------------------------
# correlations (no scipy needed: training uses them)
# ---------------------------------------------------------------------------------------------
def _ranks(a: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank), float64."""
    a = a.detach().double().cpu().flatten()
    order = torch.argsort(a, stable=True)
    ranks = torch.empty_like(a)
    ranks[order] = torch.arange(len(a), dtype=torch.float64)
    sorted_a = a[order]
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and sorted_a[j + 1] == sorted_a[i]:
            j += 1
        if j > i:
            ranks[order[i : j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def pearson(a, b) -> float:
    """Pearson correlation of two equally long sequences (float64); NaN when undefined."""
    a = torch.as_tensor(a).detach().double().cpu().flatten()
    b = torch.as_tensor(b).detach().double().cpu().flatten()
    if len(a) < 2:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    den = (a.square().sum() * b.square().sum()).sqrt()
    return float((a * b).sum() / den) if den > 0 else float("nan")


def spearman(a, b) -> float:
    """Spearman rank correlation: ``scipy.stats.spearmanr`` when scipy is installed, else Pearson
    of the average ranks (the same definition); NaN when undefined (e.g. a constant input)."""
    a = torch.as_tensor(a).detach().double().cpu().flatten()
    b = torch.as_tensor(b).detach().double().cpu().flatten()
    if len(a) < 2:
        return float("nan")
    try:
        from scipy.stats import spearmanr
    except ImportError:  # pragma: no cover - scipy is optional
        return pearson(_ranks(a), _ranks(b))
    if torch.all(a == a[0]) or torch.all(b == b[0]):
        return float("nan")
    return float(spearmanr(a.numpy(), b.numpy()).statistic)


def __getattr__(name: str):
    # `ClassifierFeatures` moved to the classifier it wraps; metrics stays below the models.
    if name == "ClassifierFeatures":
        import warnings

        from flash_plugin.models.classifier import ClassifierFeatures

        warnings.warn("flash_plugin.metrics.ClassifierFeatures moved to flash_plugin.models.classifier.ClassifierFeatures",
                      DeprecationWarning, stacklevel=2)
        return ClassifierFeatures
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
