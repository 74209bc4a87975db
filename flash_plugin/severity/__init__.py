"""Severity encoders: ``y -> (ẑ, σ̂²)`` in a latent diffusion model's latent space.

* `SeverityEncoder` (encoder.py): a trainable copy of the autoencoder's encoder plus a variance
  head; satisfies `flash_plugin.protocols.SeverityEstimator`; ``save_pretrained`` /
  ``from_pretrained`` (safetensors + JSON).
* `train_severity_encoder`, `TrainConfig`, `severity_loss` (train.py): the loss, the resumable,
  DDP-capable training loop.
* `evaluate_severity_encoder`, `SeverityReport` (evaluate.py): Spearman, pairwise ordering
  accuracy, calibration, start steps, scatter plot.

Heavy modules are imported lazily (attribute access), so ``import flash_plugin.severity`` is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SeverityEncoder": "flash_plugin.severity.encoder",
    "TrainConfig": "flash_plugin.severity.train",
    "TrainResult": "flash_plugin.severity.train",
    "LossTerms": "flash_plugin.severity.train",
    "severity_loss": "flash_plugin.severity.train",
    "train_severity_encoder": "flash_plugin.severity.train",
    "SeverityReport": "flash_plugin.severity.evaluate",
    "evaluate_severity_encoder": "flash_plugin.severity.evaluate",
    "ordering_accuracy": "flash_plugin.severity.evaluate",
    "calibration": "flash_plugin.severity.evaluate",
    "plot_severity": "flash_plugin.severity.evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'flash_plugin.severity' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
