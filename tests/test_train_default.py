"""The default model's training script: a run stopped by its time budget and started again
ends with the same weights as an uninterrupted run, for the autoencoder and the UNet (tiny data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from flash_plugin.data import write_idx
from flash_plugin.models import train_default


def fake_fashion_mnist(d: Path, n_train: int = 32, n_test: int = 16) -> Path:
    """28x28 IDX files (padded to 32x32 by the loader), smooth random images."""
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for name, n in (("train", n_train), ("t10k", n_test)):
        low = torch.rand(n, 1, 7, 7, generator=g)
        imgs = torch.nn.functional.interpolate(low, size=28, mode="bilinear", align_corners=False)[:, 0]
        write_idx(d / f"{name}-images-idx3-ubyte.gz", (imgs * 255).round().numpy())
        write_idx(d / f"{name}-labels-idx1-ubyte.gz", np.zeros(n))
    return d


def _run(stage, out, data, steps, *extra):
    train_default.main([stage, "--out", str(out), "--data", str(data), "--steps", str(steps), "--batch-size", "8",
                        "--lr", "1e-3", "--ckpt-every", "2", "--threads", "1", "--quiet", *extra])


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(next(path.glob("*.safetensors")))


def test_resumed_training_equals_an_uninterrupted_run(tmp_path):
    data = fake_fashion_mnist(tmp_path / "fmnist")
    full, cut = tmp_path / "full", tmp_path / "cut"
    _run("ae", full, data, 5)
    _run("ae", cut, data, 5, "--max-minutes", "0")  # the budget stops it after its first step
    assert '"step": 1' in (cut / "ae" / "summary.json").read_text()
    _run("ae", cut, data, 5)  # started again: resumes at step 1
    a, b = _weights(full / "ae" / "model"), _weights(cut / "ae" / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    _run("unet", full, data, 4)
    _run("unet", cut, data, 4, "--max-minutes", "0")
    _run("unet", cut, data, 4)
    a, b = _weights(full / "unet" / "model_ema"), _weights(cut / "unet" / "model_ema")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    train_default.main(["export", "--out", str(full), "--dest", str(tmp_path / "ld")])
    from flash_plugin.models.latent_diffusion import LatentDiffusion

    ld = LatentDiffusion.from_pretrained(tmp_path / "ld")
    assert tuple(ld.latent_shape) == (4, 8, 8)
