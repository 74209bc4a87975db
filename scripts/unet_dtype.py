"""Store the bundled UNet in float16, and the measurement that says it may be.

    python scripts/unet_dtype.py measure --out results/fashion-mnist-32/benchmarks/unet_float16_check.json
    python scripts/unet_dtype.py convert
    python scripts/unet_dtype.py manifest

``measure`` compares the float32 UNet of the package with its float16 rounding (both computed in
float32: diffusers upcasts the stored weights to the model's float32 when it loads them), on what
the model card reports:

* unconditional DDIM-100 samples (eta 0) seeded as in `flash_plugin.bench.model_card_metrics`
  (its first batch): per-sample PSNR between the two sample sets, and FD-FMNIST of each against
  test images ``N..9999``, with bootstrap standard errors of each FD and of their difference;
* Flash(Latent-DPS) on the first test images as the paired benchmark runs it (``flash-plugin bench
  --task gblur-varying --methods flash ae --batch-size N``): the paired PSNR / SSIM difference
  float16 − float32 with its standard error.

``convert`` rewrites ``unet/diffusion_pytorch_model.safetensors`` in float16 and regenerates
``MANIFEST.sha256``; ``manifest`` only regenerates the manifest (sha256 of every safetensors file).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

WEIGHTS = Path(__file__).resolve().parents[1] / "flash_plugin" / "weights" / "fashion-mnist-32"
UNET_FILE = Path("unet") / "diffusion_pytorch_model.safetensors"


def write_manifest(directory: Path = WEIGHTS) -> Path:
    """``MANIFEST.sha256`` in ``sha256sum`` format: every safetensors file under ``directory``, sorted."""
    lines = []
    for path in sorted(directory.rglob("*.safetensors"), key=lambda p: p.relative_to(directory).as_posix()):
        lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  ./{path.relative_to(directory).as_posix()}")
    out = directory / "MANIFEST.sha256"
    out.write_text("\n".join(lines) + "\n")
    return out


def rounded_copy(src: Path, dest: Path, dtype: torch.dtype) -> Path:
    """``src`` state dict with every floating tensor rounded to ``dtype``, saved at ``dest``."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(src))
    save_file({k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}, str(dest),
              metadata={"format": "pt"})
    return dest


def stored_dtypes(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys()}


def _bootstrap_fd(feats: dict[str, torch.Tensor], ref: torch.Tensor, reps: int, seed: int) -> dict:
    """FD of each feature set against ``ref`` and of the difference between the sets, with bootstrap
    standard errors over the samples (the same resampled indices for both sets: a paired bootstrap)."""
    import numpy as np

    from flash_plugin.metrics import frechet_distance_from_stats

    ref = ref.numpy()
    mu_r, cov_r = ref.mean(0), np.cov(ref, rowvar=False)

    def fd(x: np.ndarray) -> float:
        return frechet_distance_from_stats(x.mean(0), np.cov(x, rowvar=False), mu_r, cov_r)

    arrays = {k: v.numpy() for k, v in feats.items()}
    n = len(next(iter(arrays.values())))
    rng = np.random.default_rng(seed)
    boot = {k: [] for k in arrays}
    for _ in range(reps):
        idx = rng.integers(0, n, n)
        for k, a in arrays.items():
            boot[k].append(fd(a[idx]))
    (a, b) = arrays
    diff = np.array(boot[b]) - np.array(boot[a])
    out = {k: {"fd": fd(v), "bootstrap_se": float(np.std(boot[k], ddof=1))} for k, v in arrays.items()}
    out[f"{b}-{a}"] = {"fd": out[b]["fd"] - out[a]["fd"], "bootstrap_se": float(np.std(diff, ddof=1))}
    # Halves of the float32 set: the spread of FD between two disjoint draws of n/2 samples.
    out["float32_halves"] = [fd(arrays[a][: n // 2]), fd(arrays[a][n // 2 :])]
    return out


def measure(out: Path, *, n_samples: int = 250, n_images: int = 64, task: str = "gblur-varying", solver: str = "latent-dps",
            seed: int = 0, bootstrap: int = 500) -> dict:
    from flash_plugin.bench.paired import benchmark_images
    from flash_plugin.bench.reconstruct import run_task
    from flash_plugin.data.fashion_mnist import load_fashion_mnist
    from flash_plugin.metrics import paired_difference, psnr
    from flash_plugin.models.classifier import ClassifierFeatures
    from flash_plugin.models import load_default_model
    from flash_plugin.registry import get_operator
    from flash_plugin.solvers.base import Sampler

    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:5.0f} s] {msg}", file=sys.stderr, flush=True)

    if stored_dtypes(WEIGHTS / UNET_FILE) != {"F32"}:
        raise SystemExit(f"{WEIGHTS / UNET_FILE} is not float32: measure on the float32 weights (the commit before the conversion)")
    tmp = Path(tempfile.mkdtemp(prefix="unet-fp16-"))
    try:
        half_dir = tmp / "fashion-mnist-32"
        shutil.copytree(WEIGHTS, half_dir)
        rounded_copy(WEIGHTS / UNET_FILE, half_dir / UNET_FILE, torch.float16)
        models = {"float32": load_default_model(WEIGHTS), "float16": load_default_model(half_dir)}
        for name, m in models.items():
            assert m.latent_diffusion.dtype == torch.float32, name  # stored float16, computed in float32

        # (a) unconditional DDIM-100 samples, model_card_metrics' first batch (seed * 1000003 + 0)
        samples = {}
        for name, m in models.items():
            t0 = time.perf_counter()
            sol = Sampler(m.latent_diffusion, num_steps=100, eta=0.0).solve(torch.zeros(n_samples, 1), None,
                                                                            generator=torch.Generator().manual_seed(seed * 1_000_003))
            samples[name] = sol.x.detach()
            log(f"DDIM-100, {n_samples} samples, {name}: {time.perf_counter() - t0:.0f} s")
        per_sample = psnr(samples["float16"].clamp(-1, 1), samples["float32"].clamp(-1, 1))  # PSNR as the metrics clip
        x_test, _ = load_fashion_mnist("test")
        feats = ClassifierFeatures()
        fd = _bootstrap_fd({k: feats(v) for k, v in samples.items()}, feats(x_test[n_samples:]), bootstrap, seed)
        ddim = {
            "n_samples": n_samples,
            "seeds": f"one generator for the batch, seeded {seed} * 1000003 (model_card_metrics' first batch of {n_samples})",
            "psnr_float16_vs_float32_db": {"mean": float(per_sample.mean()), "median": float(per_sample.median()),
                                           "min": float(per_sample.min())},
            "max_abs_pixel_difference": float((samples["float16"] - samples["float32"]).abs().max()),
            "fd_fmnist": fd,
            "fd_reference": f"Fashion-MNIST test images {n_samples}..{len(x_test) - 1}",
        }
        log(f"DDIM: PSNR fp16 vs fp32 median {ddim['psnr_float16_vs_float32_db']['median']:.1f} dB; FD {fd}")

        # (b) Flash(solver) as `flash-plugin bench --methods flash ae --batch-size n_images` runs it
        images = benchmark_images(None)[0][:n_images]
        severities = get_operator(task).sample_severity(n_images, torch.Generator().manual_seed(seed)).to(torch.float32)
        flash_recs = {}
        for name, m in models.items():
            t0 = time.perf_counter()
            run = run_task(task, m, images, severities, solver_name=solver, methods=("flash", "ae"), seed=seed * 1_000_003)
            flash_recs[name] = run.by_method("flash")
            log(f"Flash({solver}) on {task}, {n_images} images, {name}: {time.perf_counter() - t0:.0f} s")
        bench = {"task": task, "solver": solver, "n_images": n_images, "seed": seed}
        for metric in ("psnr", "ssim"):
            a, b = ([getattr(r, metric) for r in flash_recs[k]] for k in ("float16", "float32"))
            mean, se, n = paired_difference(a, b)
            spread = float(torch.tensor(b, dtype=torch.float64).std()) / n**0.5  # the SE a model-card mean carries
            bench[metric] = {"float32": sum(b) / n, "float16": sum(a) / n, "float32_se_over_images": spread,
                             "float16-float32": {"mean": mean, "se": se, "n": n},
                             "max_abs_per_image": max(abs(x - y) for x, y in zip(a, b))}
        bench["nfe_equal"] = [r.nfe for r in flash_recs["float16"]] == [r.nfe for r in flash_recs["float32"]]
        log(f"Flash: {bench}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "question": "may the bundled UNet be stored in float16 (computed in float32 after loading)?",
        "command": "python scripts/unet_dtype.py measure " + " ".join(sys.argv[2:]),
        "ddim100": ddim, "flash": bench,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - t_start, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="float32 vs float16 UNet: DDIM samples and a Flash benchmark")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--n-samples", type=int, default=250)
    m.add_argument("--n-images", type=int, default=64)
    m.add_argument("--threads", type=int, default=None)
    sub.add_parser("convert", help="store the package's UNet in float16 and regenerate MANIFEST.sha256")
    sub.add_parser("manifest", help="regenerate MANIFEST.sha256")
    a = p.parse_args(argv)
    if a.command == "measure":
        if a.threads:
            torch.set_num_threads(a.threads)
        measure(a.out, n_samples=a.n_samples, n_images=a.n_images)
    elif a.command == "convert":
        path = WEIGHTS / UNET_FILE
        tmp = rounded_copy(path, path.with_suffix(".tmp"), torch.float16)
        tmp.replace(path)
        print(f"{path}: {sorted(stored_dtypes(path))}, {path.stat().st_size} bytes; wrote {write_manifest()}")
    else:
        print(f"wrote {write_manifest()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
