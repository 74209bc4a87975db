"""Latent models: `LatentDiffusion` over diffusers components, the analytic `GaussianOracle`, and
the bundled default model ``fashion-mnist-32`` (registered through ``flash_register_models``)."""

from __future__ import annotations

from flash_plugin.markers import hookimpl
from flash_plugin.models.bundled import DEFAULT_MODEL_DIR, DefaultModel, load_default_model, load_test_images
from flash_plugin.models.gaussian_oracle import GaussianOracle
from flash_plugin.models.latent_diffusion import LatentDiffusion

__all__ = ["DEFAULT_MODEL_DIR", "DefaultModel", "GaussianOracle", "LatentDiffusion", "load_default_model", "load_test_images"]


@hookimpl
def flash_register_models(register):
    register("fashion-mnist-32", load_default_model)
