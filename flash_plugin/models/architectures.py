"""Architectures and schedule of the bundled default model (``fashion-mnist-32``).

Sized so that guided solvers run on a CPU (docs/design-notes.md, "Bundled model sizes").
"""

from __future__ import annotations

import torch

IMAGE_SIZE = 32
IMAGE_CHANNELS = 1
LATENT_CHANNELS = 4
LATENT_SIZE = 8

AUTOENCODER_CONFIG = dict(
    in_channels=IMAGE_CHANNELS,
    out_channels=IMAGE_CHANNELS,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    latent_channels=LATENT_CHANNELS,
    norm_num_groups=8,
    sample_size=IMAGE_SIZE,
    scaling_factor=1.0,  # per-channel normalisation lives in LatentDiffusion (latent_mean/latent_std)
)

UNET_CONFIG = dict(
    sample_size=LATENT_SIZE,
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    layers_per_block=1,
    block_out_channels=(64, 128, 128),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=16,
    attention_head_dim=32,
)

# The paper's LDM schedule: 1000 steps, sqrt(beta) linear from sqrt(0.0015) to sqrt(0.0195)
# (CompVis "linear" = diffusers "scaled_linear"), epsilon prediction, no clipping of latents.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0015,
    beta_end=0.0195,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
)


def ldm_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.0015, beta_end: float = 0.0195) -> torch.Tensor:
    """ᾱ_t, t = 0..T-1, of the paper's LDM schedule, in float64."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def make_autoencoder():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**AUTOENCODER_CONFIG)


def make_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(**UNET_CONFIG)


def make_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_CONFIG)
