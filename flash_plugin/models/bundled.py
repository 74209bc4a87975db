"""The bundled default model ``fashion-mnist-32`` (weights inside the package, see its MODEL_CARD.md).

`load_default_model()` returns a `DefaultModel`: the `LatentDiffusion` (autoencoder f = 4 with
4x8x8 latents, UNet, the paper's 1000-step LDM schedule) and, loaded on first use, one severity
encoder per operator family, plus 64 bundled Fashion-MNIST test images for demos and tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from flash_plugin.errors import CheckpointError, UnknownPluginNameError

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "weights" / "fashion-mnist-32"
SEVERITY_DIR = "severity"


def load_test_images(directory: str | Path = DEFAULT_MODEL_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """The 64 bundled test images ``(64, 1, 32, 32)`` in [-1, 1] and their labels."""
    from flash_plugin.data.fashion_mnist import to_model_range
    from flash_plugin.utils.checkpoint import load_safetensors

    t = load_safetensors(Path(directory) / "test_images.safetensors")
    return to_model_range(t["images"].numpy()), t["labels"]


@dataclass
class DefaultModel:
    """The bundled model set. ``severity_encoder(family)`` loads (and caches) one encoder."""

    latent_diffusion: object
    directory: Path
    _encoders: dict = field(default_factory=dict, repr=False)

    def severity_families(self) -> list[str]:
        d = self.directory / SEVERITY_DIR
        return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []

    def severity_encoder(self, family: str):
        if family not in self._encoders:
            known = self.severity_families()
            if family not in known:
                raise UnknownPluginNameError(f"no bundled severity encoder for {family!r}; bundled: {known}")
            from flash_plugin.severity import SeverityEncoder

            self._encoders[family] = SeverityEncoder.from_pretrained(self.directory / SEVERITY_DIR / family, model=self.latent_diffusion)
        return self._encoders[family]


def load_default_model(directory: str | Path | None = None, device: str | torch.device = "cpu") -> DefaultModel:
    """Load the bundled ``fashion-mnist-32`` model set (or the same layout from ``directory``), in float32."""
    from flash_plugin.models.latent_diffusion import LatentDiffusion

    d = Path(directory) if directory is not None else DEFAULT_MODEL_DIR
    if not d.is_dir():
        raise CheckpointError(f"model directory not found: {d}")
    ld = LatentDiffusion.from_pretrained(d)
    ld.unet.float()  # weights may be stored in float16 (see unet/MODEL_CARD.md); the model computes in float32
    return DefaultModel(latent_diffusion=ld.to(device), directory=d)
