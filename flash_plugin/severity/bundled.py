"""The bundled model's severity encoders as registry factories (``flash_register_severity_estimators``).

One `BundledSeverityEncoder` per directory under ``weights/fashion-mnist-32/severity/``, registered
under that directory's name, which is the task preset the encoder was trained on (e.g.
``"gblur-varying"``). Registering reads no weights; calling the factory loads the encoder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["BundledSeverityEncoder", "bundled_severity_encoders"]


class BundledSeverityEncoder:
    """Loads one bundled severity encoder when called: ``factory(model=None, *, device=None)``.

    ``model``: a `LatentDiffusion` the encoder must match (`LatentSpaceMismatchError` otherwise),
    e.g. ``load_default_model().latent_diffusion``; ``device``: where to put it (default: the
    model's, else CPU). Each call returns a new `SeverityEncoder`.
    """

    def __init__(self, name: str, directory: str | Path, model_name: str = "fashion-mnist-32") -> None:
        self.name = name
        self.directory = Path(directory)
        self.model_name = model_name

    @property
    def operator_family(self) -> str | None:
        """The family of the preset it was trained on (``None`` if the name is no known preset)."""
        from flash_plugin.operators.presets import PRESETS

        preset = PRESETS.get(self.name)
        return preset.operator_family if preset is not None else None

    @property
    def latent_id(self) -> str | None:
        """The latent space it was trained for, from its JSON config (no weights are read)."""
        import json

        from flash_plugin.severity.encoder import CONFIG_NAME

        try:
            return json.loads((self.directory / CONFIG_NAME).read_text()).get("latent_id")
        except (OSError, ValueError):
            return None

    @property
    def description(self) -> str:
        """One line for ``flash-plugin plugins``."""
        return f"Severity encoder of the bundled {self.model_name} model, trained on the {self.name} task"

    def __call__(self, model: Any = None, *, device: str | torch.device | None = None):
        from flash_plugin.severity.encoder import SeverityEncoder

        return SeverityEncoder.from_pretrained(self.directory, model=model, device=device)

    def __repr__(self) -> str:
        return f"BundledSeverityEncoder({self.name!r}, {str(self.directory)!r})"


def bundled_severity_encoders() -> dict[str, BundledSeverityEncoder]:
    """A factory per bundled encoder directory, by name (no weights are read)."""
    from flash_plugin.models.bundled import DEFAULT_MODEL_DIR, SEVERITY_DIR

    root = DEFAULT_MODEL_DIR / SEVERITY_DIR
    if not root.is_dir():
        return {}
    return {d.name: BundledSeverityEncoder(d.name, d) for d in sorted(root.iterdir()) if d.is_dir()}
