"""A small CNN classifier for 1x32x32 Fashion-MNIST whose 128-d features define FD-FMNIST.

With no Inception weights offline, image sets are compared by the Fréchet distance of this
classifier's penultimate-layer features (`flash_plugin.metrics.frechet_distance`), reported as
FD-FMNIST: not comparable with published FID numbers. Recipe and accuracy: the classifier's model
card. Train with ``python -m flash_plugin.models.classifier --out DIR``; load with `load_classifier`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flash_plugin.errors import CheckpointError, FlashInputError
from flash_plugin.metrics import _as_float_tensor

DEFAULT_CLASSIFIER_DIR = Path(__file__).resolve().parent.parent / "weights" / "fashion-mnist-32" / "classifier"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.json"
FORMAT_VERSION = 1
_CONFIG_FIELDS = {"format_version", "class_name", "in_channels", "image_size", "channels", "feature_dim", "num_classes", "dropout", "class_names"}


class FashionClassifier(nn.Module):
    """Blocks ``conv3x3 -> BatchNorm -> ReLU -> maxpool 2``, then ``linear -> ReLU`` (the features),
    dropout and ``linear -> num_classes``. ``forward(x)`` gives logits ``[B, num_classes]``,
    ``features(x)`` the post-ReLU ``[B, feature_dim]``."""

    def __init__(self, in_channels: int = 1, image_size: int = 32, channels: tuple[int, ...] = (16, 32, 64),
                 feature_dim: int = 128, num_classes: int = 10, dropout: float = 0.3):
        super().__init__()
        if image_size % (2 ** len(channels)) != 0:
            raise ValueError(f"image_size {image_size} must be divisible by 2**{len(channels)}")
        layers: list[nn.Module] = []
        c_in = in_channels
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in = c
        self.conv = nn.Sequential(*layers)
        side = image_size // (2 ** len(channels))
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(c_in * side * side, feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))
        self.config = {
            "format_version": FORMAT_VERSION,
            "class_name": type(self).__name__,
            "in_channels": int(in_channels),
            "image_size": int(image_size),
            "channels": [int(c) for c in channels],
            "feature_dim": int(feature_dim),
            "num_classes": int(num_classes),
            "dropout": float(dropout),
        }
        self.image_shape = (int(in_channels), int(image_size), int(image_size))
        self.feature_dim = int(feature_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def save_classifier(model: FashionClassifier, out: str | Path, *, class_names: tuple[str, ...] | None = None) -> None:
    from flash_plugin.utils.checkpoint import atomic_save_safetensors, atomic_write_json

    out = Path(out)
    cfg = dict(model.config)
    if class_names is not None:
        cfg["class_names"] = list(class_names)
    atomic_save_safetensors(model.state_dict(), out / WEIGHTS_NAME, metadata={"format": "pt"})
    atomic_write_json(out / CONFIG_NAME, cfg)


def load_classifier(path: str | Path | None = None, device: str | torch.device = "cpu") -> FashionClassifier:
    """Load a classifier directory (default: the bundled one) in eval mode; `CheckpointError` if a
    file is missing, truncated, has unknown config fields or does not match the architecture."""
    from flash_plugin.utils.checkpoint import load_safetensors, read_json_config

    d = Path(path) if path is not None else DEFAULT_CLASSIFIER_DIR
    if not d.is_dir():
        raise CheckpointError(f"classifier directory not found: {d}")
    cfg_path = d / CONFIG_NAME
    cfg = read_json_config(cfg_path, _CONFIG_FIELDS, missing=f"classifier config not found: {cfg_path}",
                           format_version=FORMAT_VERSION)
    if cfg.get("class_name") != FashionClassifier.__name__:
        raise CheckpointError(f"{cfg_path}: class_name must be {FashionClassifier.__name__!r}, got {cfg.get('class_name')!r}")
    try:
        model = FashionClassifier(
            in_channels=cfg["in_channels"], image_size=cfg["image_size"], channels=tuple(cfg["channels"]),
            feature_dim=cfg["feature_dim"], num_classes=cfg["num_classes"], dropout=cfg["dropout"],
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: invalid or missing architecture field: {e}") from e
    state = load_safetensors(d / WEIGHTS_NAME)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{d / WEIGHTS_NAME} does not match the architecture in {cfg_path}: {e}") from e
    model.class_names = tuple(cfg.get("class_names", ()))
    return model.to(device).eval()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on images ``x`` ``(N, 1, 32, 32)`` with labels ``y``."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return correct / len(x)


def train(out: str | Path, *, epochs: int = 4, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
          threads: int = 1, flip: bool = True, channels: tuple[int, ...] = (16, 32, 64), data_root: str | None = None, limit: int | None = None) -> dict:
    """Train with a fixed seed, save the classifier to ``out`` and return (and write) its metrics."""
    from flash_plugin.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist
    from flash_plugin.utils.checkpoint import atomic_write_json

    torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    t0 = time.time()
    x_train, y_train = load_fashion_mnist("train", data_root, limit=limit)
    x_test, y_test = load_fashion_mnist("test", data_root)
    model = FashionClassifier(channels=tuple(channels))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = (len(x_train) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.2)
    gen = torch.Generator().manual_seed(seed)
    log = []
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        total, n = 0.0, 0
        for i in range(0, len(x_train), batch_size):
            idx = perm[i : i + batch_size]
            xb, yb = x_train[idx], y_train[idx]
            if flip:
                m = torch.rand(len(idx), generator=gen) < 0.5
                xb = torch.where(m.view(-1, 1, 1, 1), xb.flip(-1), xb)
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            n += len(idx)
        acc = evaluate(model, x_test, y_test)
        entry = {"epoch": epoch + 1, "train_loss": total / n, "test_accuracy": acc, "elapsed_s": round(time.time() - t0, 1)}
        log.append(entry)
        print(json.dumps(entry), flush=True)
    wall = time.time() - t0
    save_classifier(model, out, class_names=CLASS_NAMES)
    metrics = {
        "test_accuracy": evaluate(model, x_test, y_test),
        "test_images": len(x_test),
        "train_images": len(x_train),
        "epochs": epochs,
        "batch_size": batch_size,
        "optimizer": f"Adam, OneCycle max lr {lr}",
        "augmentation": "random horizontal flip" if flip else "none",
        "seed": seed,
        "threads": threads,
        "wall_time_s": round(wall, 1),
        "torch_version": torch.__version__,
        "command": "python -m flash_plugin.models.classifier " + " ".join(sys.argv[1:]),
        "per_epoch": log,
        "note": "Test accuracy is measured once per epoch for logging only; nothing (epochs, lr, checkpoint) was selected on the test split.",
    }
    atomic_write_json(Path(out) / METRICS_NAME, metrics)
    return metrics


class ClassifierFeatures:
    """Penultimate-layer (128-d) features and predictions of flash-plugin's Fashion-MNIST classifier.

    Args:
        classifier: a `flash_plugin.models.classifier.FashionClassifier`; by default the bundled one
            (`load_classifier()`).
        batch_size: images per forward pass.
        clip: clip inputs to [-1, 1] first (generated samples can overshoot slightly).

    ``feats = ClassifierFeatures()(images)`` gives float64 ``(N, 128)``; use them with
    `frechet_distance` for FD-FMNIST.
    """

    def __init__(self, classifier: torch.nn.Module | None = None, *, batch_size: int = 500, clip: bool = True):
        if classifier is None:
            classifier = load_classifier()
        if not hasattr(classifier, "features") or not hasattr(classifier, "head"):
            raise FlashInputError(f"classifier must have features() and head (a FashionClassifier), got {type(classifier).__name__}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise FlashInputError(f"batch_size must be a positive int, got {batch_size!r}")
        self.classifier = classifier.eval()
        self.batch_size = batch_size
        self.clip = clip
        self.image_shape = tuple(getattr(classifier, "image_shape", (1, 32, 32)))
        self.feature_dim = int(getattr(classifier, "feature_dim", 128))

    def _check(self, x: Any) -> torch.Tensor:
        x = _as_float_tensor(x, "images")
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise FlashInputError(f"images must have shape (B, {', '.join(map(str, self.image_shape))}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise FlashInputError("images are empty (batch size 0)")
        x = x.detach().to(torch.float32)
        if not torch.all(torch.isfinite(x)):
            raise FlashInputError("images contain NaN or Inf")
        return x.clamp(-1.0, 1.0) if self.clip else x

    def _run(self, x: Any, fn) -> torch.Tensor:
        x = self._check(x)
        dev = next(self.classifier.parameters()).device
        outs = []
        with torch.no_grad():
            for i in range(0, x.shape[0], self.batch_size):
                outs.append(fn(x[i : i + self.batch_size].to(dev)).cpu())
        return torch.cat(outs)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``(N, feature_dim)``, float64."""
        return self._run(x, self.classifier.features).to(torch.float64)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, self.classifier)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted class indices, LongTensor ``[N]``."""
        return self.logits(x).argmax(dim=1)

    def features_and_predictions(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both in one pass: features float64 ``(N, D)`` and predicted classes ``[N]``."""

        def both(b: torch.Tensor) -> torch.Tensor:
            f = self.classifier.features(b)
            return torch.cat([f, self.classifier.head(f).argmax(dim=1, keepdim=True).to(f.dtype)], dim=1)

        out = self._run(x, both)
        return out[:, :-1].to(torch.float64), out[:, -1].round().to(torch.long)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train flash-plugin's Fashion-MNIST classifier (features for FD-FMNIST).")
    p.add_argument("--out", required=True, help="output directory (model.safetensors, config.json, metrics.json)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64], help="conv channels of the three blocks")
    p.add_argument("--no-flip", action="store_true", help="disable random horizontal flips")
    p.add_argument("--data-root", default=None, help="directory with the Fashion-MNIST IDX files")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images (smoke tests)")
    a = p.parse_args(argv)
    m = train(a.out, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed, threads=a.threads,
              flip=not a.no_flip, channels=tuple(a.channels), data_root=a.data_root, limit=a.limit)
    print(f"test accuracy {m['test_accuracy']:.4f} after {m['epochs']} epochs in {m['wall_time_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
