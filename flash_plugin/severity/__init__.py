"""Severity encoders: ``y -> (ẑ, σ̂²)`` in a latent diffusion model's latent space.

* `SeverityEncoder` (encoder.py): a trainable copy of the autoencoder's encoder plus a variance
  head; satisfies `flash_plugin.protocols.SeverityEstimator`; ``save_pretrained`` /
  ``from_pretrained`` (safetensors + JSON).
* `train_severity_encoder`, `TrainConfig`, `severity_loss` (train.py): the loss, the resumable,
  DDP-capable training loop.
* `evaluate_severity_encoder`, `SeverityReport` (evaluate.py): Spearman, pairwise ordering
  accuracy, calibration, start steps, scatter plot.
* `BundledSeverityEncoder` (bundled.py): the bundled model's encoders as registry factories.

Heavy modules are imported lazily (attribute access), so ``import flash_plugin.severity`` is cheap.

Built-in plugin: `flash_register_severity_estimators` registers each bundled encoder under the task
preset it was trained on (``"gblur-varying"``, ``"nonlinear-blur"``, ``"random-inpainting"``), so
``flash_plugin.registry.get_severity_estimator("gblur-varying")()`` loads it.
"""

from __future__ import annotations

import importlib
from typing import Any

from flash_plugin.markers import hookimpl

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
    "BundledSeverityEncoder": "flash_plugin.severity.bundled",
}

__all__ = sorted([*_EXPORTS, "flash_register_severity_estimators"])


@hookimpl
def flash_register_severity_estimators(register):
    """Register the bundled model's severity encoders (loaded only when a factory is called)."""
    from flash_plugin.severity.bundled import bundled_severity_encoders

    for name, factory in bundled_severity_encoders().items():
        register(name, factory)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'flash_plugin.severity' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
