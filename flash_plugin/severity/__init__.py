"""Severity encoders ``y -> (ẑ, σ̂²)``: the model (encoder.py), its training (train.py), its
evaluation (evaluate.py) and the bundled encoders (bundled.py), imported on first attribute access.

The built-in plugin registers each bundled encoder under the task preset it was trained on
(``get_severity_estimator("gblur-varying")()`` loads it).
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
