"""Model-card numbers of the bundled default model ``fashion-mnist-32``.

    python -m flash_plugin.bench.model_card_metrics --out DIR [--n-samples 1000] [--ddpm-samples 0] [--device cpu]

On the Fashion-MNIST test split (10,000 images, 32x32, [-1, 1]) it measures:

* the autoencoder's reconstruction PSNR and SSIM over all test images (32x32 and the central
  28x28, i.e. without the 2-pixel zero padding), and the classifier's accuracy on them;
* FD-FMNIST -- the Fréchet distance in the 128-d penultimate feature space of flash-plugin's own
  Fashion-MNIST classifier (`flash_plugin.models.classifier`; **not Inception FID**, not comparable
  with published FIDs) -- of N-image sets against a fixed reference, the test images ``N..9999``:

  - ``real_test_first_n``: the first N real test images (the floor: finite-N bias + split noise);
  - ``ae_reconstructions_first_n``: the AE reconstructions of those N images;
  - ``ddim100_eta0``: N unconditional DDIM-100 (eta = 0) samples;
  - ``ddpm1000`` (only with ``--ddpm-samples``): ancestral DDPM over all 1000 steps;

* the classifier's test accuracy and the class histogram of its predictions on the samples.

It writes ``MODEL_CARD_METRICS.json``, ``samples.png`` (8x8 grid of the first 64 DDIM samples) and
``ae_reconstructions.png`` (test images and their reconstructions in alternating rows) to ``--out``.
Most of its time is DDIM sampling.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from flash_plugin.errors import FlashInputError

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "fashion-mnist-32"
FD_LABEL = (
    "FD-FMNIST: Fréchet distance between Gaussians fitted to 128-d penultimate-layer features of flash-plugin's "
    "own Fashion-MNIST classifier (flash_plugin/weights/fashion-mnist-32/classifier). NOT Inception FID: no "
    "Inception weights are available offline; values are not comparable with published FID numbers and are "
    "biased upwards at small N, so compare only entries at the same N and reference set."
)


def _summary(v: torch.Tensor) -> dict:
    a = v.to(torch.float64).numpy()
    return {
        "mean": float(a.mean()),
        "standard_error": float(a.std(ddof=1) / np.sqrt(len(a))),
        "std": float(a.std(ddof=1)),
        "median": float(np.median(a)),
        "min": float(a.min()),
        "n": int(len(a)),
    }


def _histogram(pred: torch.Tensor, names: tuple[str, ...]) -> dict:
    counts = torch.bincount(pred, minlength=len(names)).tolist()
    n = int(len(pred))
    return {
        "counts": {name: int(c) for name, c in zip(names, counts)},
        "fractions": {name: round(c / n, 4) for name, c in zip(names, counts)},
        "n": n,
        "total_variation_from_uniform": round(0.5 * sum(abs(c / n - 1 / len(names)) for c in counts), 4),
    }


def _save_grid(images: torch.Tensor, path: Path, ncols: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imgs = ((images.clamp(-1, 1) + 1) / 2).squeeze(1).numpy()
    n = len(imgs)
    nrows = (n + ncols - 1) // ncols
    h, w = imgs.shape[-2:]
    canvas = np.ones((nrows * (h + 2) + 2, ncols * (w + 2) + 2))
    for i, im in enumerate(imgs):
        r, c = divmod(i, ncols)
        canvas[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + c * (w + 2) : 2 + c * (w + 2) + w] = im
    fig, ax = plt.subplots(figsize=(ncols * 0.9, nrows * 0.9 + 0.4), dpi=100)
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def _sample(model, n: int, num_steps: int, eta: float, batch_size: int, seed: int, log,
            device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, float]:
    from flash_plugin.solvers.base import Sampler

    sampler = Sampler(model, num_steps=num_steps, eta=eta)
    xs, nfes = [], []
    t0 = time.time()
    for b, i in enumerate(range(0, n, batch_size)):
        m = min(batch_size, n - i)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + b)
        sol = sampler.solve(torch.zeros(m, 1, device=device), None, generator=gen)
        xs.append(sol.x.cpu())
        nfes.append(sol.nfe.cpu())
        log(f"  {num_steps}-step sampling: {i + m}/{n} ({time.time() - t0:.0f} s)")
    return torch.cat(xs), torch.cat(nfes), time.time() - t0


def run(out: str | Path, *, n_samples: int = 1000, ddpm_samples: int = 0, batch_size: int = 250, seed: int = 0,
        threads: int = 1, weights: str | Path = DEFAULT_WEIGHTS, data_root: str | None = None, quiet: bool = False,
        device: str = "cpu") -> dict:
    from flash_plugin.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist
    from flash_plugin.metrics import frechet_distance, psnr, ssim, summarize_nfe
    from flash_plugin.models.classifier import ClassifierFeatures
    from flash_plugin.models.classifier import load_classifier
    from flash_plugin.models.latent_diffusion import LatentDiffusion
    from flash_plugin.utils.checkpoint import atomic_write_json

    if n_samples < 2:
        raise FlashInputError(f"--n-samples must be at least 2 (>= 1000 for a meaningful FD), got {n_samples}")
    torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    timings: dict[str, float] = {}

    def log(msg: str) -> None:
        if not quiet:
            print(f"[{time.time() - t_start:6.0f} s] {msg}", flush=True)

    x_test, y_test = load_fashion_mnist("test", data_root)
    if n_samples >= len(x_test):
        raise FlashInputError(f"--n-samples must be below the test split size {len(x_test)} (the rest is the FD reference)")
    model = LatentDiffusion.from_pretrained(weights).to(device)
    clf = load_classifier(Path(weights) / "classifier")
    feats = ClassifierFeatures(clf)
    names = tuple(getattr(clf, "class_names", ()) or CLASS_NAMES)

    # ---- classifier on the real test split --------------------------------------------------
    t = time.time()
    f_test, p_test = feats.features_and_predictions(x_test)
    clf_acc = float((p_test == y_test).double().mean())
    timings["classifier_test_s"] = time.time() - t
    log(f"classifier test accuracy {clf_acc:.4f}")

    # ---- autoencoder reconstructions of the whole test split --------------------------------
    t = time.time()
    recs = []
    with torch.no_grad():
        for i in range(0, len(x_test), 500):
            recs.append(model.decode(model.encode(x_test[i : i + 500].to(device))).cpu())
    rec = torch.cat(recs)
    timings["ae_reconstruction_s"] = time.time() - t
    log(f"AE reconstructions of {len(x_test)} test images in {timings['ae_reconstruction_s']:.0f} s")
    t = time.time()
    ae = {
        "n_images": int(len(x_test)),
        "psnr_db_32x32": _summary(psnr(rec, x_test)),
        "psnr_db_central_28x28": _summary(psnr(rec, x_test, crop=28)),
        "ssim_32x32": _summary(ssim(rec, x_test)),
        "ssim_central_28x28": _summary(ssim(rec, x_test, crop=28)),
    }
    f_rec, p_rec = feats.features_and_predictions(rec)
    ae["classifier_accuracy_on_reconstructions"] = float((p_rec == y_test).double().mean())
    ae["note"] = ("Images in [-1, 1] are mapped to [0, 1] (data_range 1); reconstructions clipped to [-1, 1]. "
                  "The central 28x28 window excludes the 2-pixel padding, which is exactly black in the data.")
    timings["ae_metrics_s"] = time.time() - t
    log(f"AE PSNR {ae['psnr_db_32x32']['mean']:.2f} dB (28x28: {ae['psnr_db_central_28x28']['mean']:.2f}), "
        f"SSIM {ae['ssim_32x32']['mean']:.4f} (28x28: {ae['ssim_central_28x28']['mean']:.4f})")

    n = n_samples
    ref = f_test[n:]
    fd = {
        "label": FD_LABEL,
        "n": n,
        "reference": f"Fashion-MNIST test images {n}..{len(x_test) - 1} ({len(ref)} images)",
        "real_test_first_n": frechet_distance(f_test[:n], ref),
        "ae_reconstructions_first_n": frechet_distance(f_rec[:n], ref),
        "extra_ae_reconstructions_all_vs_test_all": frechet_distance(f_rec, f_test),
    }
    log(f"FD-FMNIST floor (real vs real, N={n}) {fd['real_test_first_n']:.3f}, AE recon {fd['ae_reconstructions_first_n']:.3f}")

    # ---- unconditional samples ----------------------------------------------------------------
    samples: dict[str, dict] = {}
    x_ddim, nfe, secs = _sample(model, n, 100, 0.0, batch_size, seed, log, device)
    timings["ddim100_sampling_s"] = secs
    f_s, p_s = feats.features_and_predictions(x_ddim)
    fd["ddim100_eta0"] = frechet_distance(f_s, ref)
    samples["ddim100_eta0"] = {
        "n": n,
        "solver": "Sampler(num_steps=100, eta=0.0) (DDIM, uniform CompVis timesteps)",
        "seeds": f"one torch.Generator per batch of {batch_size}, seeded {seed} * 1000003 + batch index",
        "nfe": summarize_nfe(nfe),
        "seconds": round(secs, 1),
        "class_histogram": _histogram(p_s, names),
        "fraction_of_pixels_outside_[-1,1]": float(((x_ddim < -1) | (x_ddim > 1)).double().mean()),
    }
    log(f"FD-FMNIST DDIM-100 (N={n}) {fd['ddim100_eta0']:.3f}")
    _save_grid(x_ddim[:64], out / "samples.png", 8, f"fashion-mnist-32: 64 unconditional DDIM-100 samples (eta=0, seed {seed})")

    if ddpm_samples:
        x_ddpm, nfe_p, secs_p = _sample(model, ddpm_samples, 1000, 1.0, batch_size, seed + 1, log, device)
        timings["ddpm1000_sampling_s"] = secs_p
        f_p, p_p = feats.features_and_predictions(x_ddpm)
        fd["ddpm1000_n"] = ddpm_samples
        fd["ddpm1000"] = frechet_distance(f_p, ref)
        if ddpm_samples != n:
            fd["ddpm1000_note"] = f"computed with N={ddpm_samples}, not N={n}: not comparable with the other entries"
        samples["ddpm1000"] = {
            "n": ddpm_samples,
            "solver": "Sampler(num_steps=1000, eta=1.0) (ancestral DDPM)",
            "nfe": summarize_nfe(nfe_p),
            "seconds": round(secs_p, 1),
            "class_histogram": _histogram(p_p, names),
        }
        log(f"FD-FMNIST DDPM-1000 (N={ddpm_samples}) {fd['ddpm1000']:.3f}")
    else:
        fd["ddpm1000"] = None
        fd["ddpm1000_note"] = ("not computed: 1000 steps x N samples takes ~10x the DDIM-100 time on CPU "
                               "(run with --ddpm-samples N on a faster machine)")

    pairs = torch.stack([x_test[:32].view(4, 8, 1, 32, 32), rec[:32].view(4, 8, 1, 32, 32)], dim=1).reshape(64, 1, 32, 32)
    _save_grid(pairs, out / "ae_reconstructions.png", 8, "Fashion-MNIST test images (odd rows) and AE reconstructions (even rows)")

    timings["total_s"] = time.time() - t_start
    result = {
        "model": "fashion-mnist-32",
        "weights": "bundled (flash_plugin/weights/fashion-mnist-32)" if Path(weights).resolve() == DEFAULT_WEIGHTS else str(weights),
        "data": "Fashion-MNIST test split (10,000 images, zero-padded 28 -> 32, scaled to [-1, 1])",
        "classifier": {
            "test_accuracy": clf_acc,
            "test_images": int(len(x_test)),
            "real_test_prediction_histogram": _histogram(p_test, names),
            "weights": "flash_plugin/weights/fashion-mnist-32/classifier",
        },
        "autoencoder": ae,
        "fd_fmnist": fd,
        "samples": samples,
        "run": {
            "command": "python -m flash_plugin.bench.model_card_metrics " + " ".join(sys.argv[1:]),
            "seed": seed,
            "threads": threads,
            "device": str(device),
            "batch_size": batch_size,
            "torch_version": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "timings_s": {k: round(v, 1) for k, v in timings.items()},
        },
        "images": {"samples.png": "first 64 DDIM-100 samples", "ae_reconstructions.png": "32 test images and their reconstructions"},
    }
    atomic_write_json(out / "MODEL_CARD_METRICS.json", result)
    log(f"wrote {out / 'MODEL_CARD_METRICS.json'} in {timings['total_s']:.0f} s")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Compute the model-card metrics of the default fashion-mnist-32 model.")
    p.add_argument("--out", required=True, help="output directory (MODEL_CARD_METRICS.json, samples.png, ae_reconstructions.png)")
    p.add_argument("--n-samples", type=int, default=1000, help="N for FD-FMNIST and DDIM-100 samples (>= 1000 recommended)")
    p.add_argument("--ddpm-samples", type=int, default=0, help="also draw this many DDPM-1000 samples (slow on CPU)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="model directory (with a classifier/ subfolder)")
    p.add_argument("--data-root", default=None, help="directory with the Fashion-MNIST IDX files")
    p.add_argument("--device", default="cpu", help="where the autoencoder and the sampling run (the classifier features run on CPU)")
    a = p.parse_args(argv)
    run(a.out, n_samples=a.n_samples, ddpm_samples=a.ddpm_samples, batch_size=a.batch_size, seed=a.seed,
        threads=a.threads, weights=a.weights, data_root=a.data_root, device=a.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
