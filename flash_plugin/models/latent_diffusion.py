"""`LatentDiffusion`: the four things a solver needs from a latent diffusion model, over diffusers parts.

``encode(x)`` maps images ``(B, C, H, W)`` in ``[-1, 1]`` to the diffusion latent ``z = (scaling_factor
· E(x) − latent_mean) / latent_std`` per channel (``E``: the KL posterior mode or the VQ
pre-quantisation output; mean 0 and std 1 are the plain diffusers convention); ``decode(z)`` is its
inverse, differentiable in ``z`` (VQ quantisation straight-through); ``eps(z, t)`` is the UNet's
noise prediction at train timesteps ``t``; ``alphas_cumprod`` is the float64 ``ᾱ_t`` of training.
The components are put in eval mode once and their weights are never changed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from flash_plugin.errors import CheckpointError, FlashInputError

CONFIG_NAME = "latent_diffusion.json"
FORMAT_VERSION = 1
_AUTOENCODERS = ("AutoencoderKL", "VQModel")
_UNETS = ("UNet2DModel", "UNet2DConditionModel")
_CONFIG_FIELDS = {"format_version", "autoencoder_class", "unet_class", "latent_mean", "latent_std", "has_conditioning", "name"}


def _alphas_from(scheduler_or_alphas: Any) -> torch.Tensor:
    acp = getattr(scheduler_or_alphas, "alphas_cumprod", scheduler_or_alphas)
    acp = torch.as_tensor(acp, dtype=torch.float64).detach().cpu()
    if acp.ndim != 1 or len(acp) < 2 or torch.any(acp <= 0) or torch.any(acp >= 1 + 1e-12) or torch.any(acp[1:] > acp[:-1]):
        raise FlashInputError("alphas_cumprod must be a decreasing 1-D sequence in (0, 1]")
    return acp


class LatentDiffusion(torch.nn.Module):
    """Latent diffusion model over diffusers components.

    Args:
        autoencoder: ``diffusers.AutoencoderKL`` or ``diffusers.VQModel`` (its ``config.scaling_factor`` is honoured).
        unet: ``diffusers.UNet2DModel`` or ``UNet2DConditionModel`` (epsilon prediction).
        scheduler: any object with ``alphas_cumprod`` (a diffusers scheduler), or the tensor itself.
        conditioning: fixed ``encoder_hidden_states`` ``(1, L, D)`` for a conditional UNet (e.g. the
            empty-prompt embedding of Stable Diffusion); required for ``UNet2DConditionModel``.
        latent_mean, latent_std: per-channel normalisation of the scaled latent (default 0 / 1).
        name: a label used in reports.
    """

    def __init__(self, autoencoder, unet, scheduler, *, conditioning: torch.Tensor | None = None,
                 latent_mean=None, latent_std=None, name: str = "latent-diffusion"):
        super().__init__()
        ae_cls, unet_cls = type(autoencoder).__name__, type(unet).__name__
        if ae_cls not in _AUTOENCODERS:
            raise FlashInputError(f"autoencoder must be one of {_AUTOENCODERS}, got {ae_cls}")
        if unet_cls not in _UNETS:
            raise FlashInputError(f"unet must be one of {_UNETS}, got {unet_cls}")
        if unet_cls == "UNet2DConditionModel" and conditioning is None:
            raise FlashInputError("a UNet2DConditionModel needs a fixed `conditioning` (encoder_hidden_states, e.g. an empty-prompt embedding)")
        self.autoencoder = autoencoder.eval()
        self.unet = unet.eval()
        self.is_vq = ae_cls == "VQModel"
        self.register_buffer("alphas_cumprod", _alphas_from(scheduler), persistent=False)
        c = int(autoencoder.config.latent_channels)
        mean = torch.zeros(c) if latent_mean is None else torch.as_tensor(latent_mean, dtype=torch.float32)
        std = torch.ones(c) if latent_std is None else torch.as_tensor(latent_std, dtype=torch.float32)
        if mean.shape != (c,) or std.shape != (c,) or torch.any(std <= 0):
            raise FlashInputError(f"latent_mean/latent_std must have {c} entries (std > 0)")
        self.register_buffer("latent_mean", mean.view(1, c, 1, 1), persistent=False)
        self.register_buffer("latent_std", std.view(1, c, 1, 1), persistent=False)
        self.register_buffer("conditioning", None if conditioning is None else conditioning.detach(), persistent=False)
        self.scaling_factor = float(getattr(autoencoder.config, "scaling_factor", 1.0) or 1.0)
        self.name = name
        self._latent_id: str | None = None
        down = 2 ** (len(autoencoder.config.block_out_channels) - 1)
        size = int(unet.config.sample_size) if not isinstance(unet.config.sample_size, (tuple, list)) else unet.config.sample_size[0]
        self.latent_shape = (int(unet.config.in_channels), size, size)
        self.image_shape = (int(autoencoder.config.in_channels), size * down, size * down)

    # ---- the four things a solver uses -------------------------------------------------------
    def _check_images(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or tuple(x.shape[1:2]) != self.image_shape[:1]:
            raise FlashInputError(f"images must be (B, {self.image_shape[0]}, H, W), got {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise FlashInputError(f"images must be floating point, got {x.dtype}")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] -> normalised diffusion latent (differentiable w.r.t. ``x``)."""
        self._check_images(x)
        if self.is_vq:
            h = self.autoencoder.encode(x).latents
        else:
            h = self.autoencoder.encode(x).latent_dist.mode()
        return (h * self.scaling_factor - self.latent_mean) / self.latent_std

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latent -> image, differentiable w.r.t. ``z`` (VQ: straight-through quantisation)."""
        h = (z * self.latent_std + self.latent_mean) / self.scaling_factor
        if self.is_vq:
            q = self.autoencoder.quantize(h)[0]
            h = h + (q - h).detach()
            return self.autoencoder.decode(h, force_not_quantize=True).sample
        return self.autoencoder.decode(h).sample

    def eps(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Noise prediction at train timesteps ``t`` (LongTensor ``[B]``)."""
        if self.conditioning is not None:
            cond = self.conditioning.to(z.dtype).expand(z.shape[0], *self.conditioning.shape[1:])
            return self.unet(z, t, encoder_hidden_states=cond).sample
        return self.unet(z, t).sample

    @property
    def latent_id(self) -> str:
        """Identity of the latent space: a hash of the autoencoder's config, weights and normalisation."""
        if self._latent_id is None:
            h = hashlib.sha256()
            cfg = {k: v for k, v in dict(self.autoencoder.config).items() if not k.startswith("_")}
            h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
            for k, v in sorted(self.autoencoder.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
            h.update(self.latent_mean.cpu().numpy().tobytes() + self.latent_std.cpu().numpy().tobytes())
            h.update(str(self.scaling_factor).encode())
            self._latent_id = h.hexdigest()[:16]
        return self._latent_id

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's floating dtype: the dtype latents must have for `eps` (``flash()`` casts ``y`` to it)."""
        for param in self.unet.parameters():
            if param.is_floating_point():
                return param.dtype
        return torch.float32

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_pipeline(cls, pipe, *, conditioning: torch.Tensor | None = None, **kwargs) -> "LatentDiffusion":
        """From a diffusers ``LDMPipeline`` (``vqvae``) or a Stable-Diffusion-like pipeline (``vae``)."""
        comps = getattr(pipe, "components", {}) or {}
        ae = comps.get("vqvae") or comps.get("vae") or getattr(pipe, "vqvae", None) or getattr(pipe, "vae", None)
        unet = comps.get("unet") or getattr(pipe, "unet", None)
        scheduler = comps.get("scheduler") or getattr(pipe, "scheduler", None)
        if ae is None or unet is None or scheduler is None:
            raise FlashInputError(f"{type(pipe).__name__} has no (vqvae|vae, unet, scheduler) components")
        return cls(ae, unet, scheduler, conditioning=conditioning, **kwargs)

    def save_pretrained(self, directory: str | Path) -> None:
        from flash_plugin.utils.checkpoint import atomic_save_safetensors, atomic_write_json

        d = Path(directory)
        self.autoencoder.save_pretrained(d / "autoencoder")
        self.unet.save_pretrained(d / "unet")
        atomic_save_safetensors({"alphas_cumprod": self.alphas_cumprod}, d / "schedule.safetensors")
        if self.conditioning is not None:
            atomic_save_safetensors({"conditioning": self.conditioning}, d / "conditioning.safetensors")
        atomic_write_json(d / CONFIG_NAME, {
            "format_version": FORMAT_VERSION,
            "autoencoder_class": type(self.autoencoder).__name__,
            "unet_class": type(self.unet).__name__,
            "latent_mean": self.latent_mean.flatten().tolist(),
            "latent_std": self.latent_std.flatten().tolist(),
            "has_conditioning": self.conditioning is not None,
            "name": self.name,
        })

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "LatentDiffusion":
        """Load what `save_pretrained` wrote (safetensors only; unknown config fields are refused)."""
        import diffusers

        from flash_plugin.utils.checkpoint import load_safetensors, read_json_config

        d = Path(directory)
        cfg = read_json_config(d / CONFIG_NAME, _CONFIG_FIELDS, missing=f"{d} has no {CONFIG_NAME}: not a flash-plugin LatentDiffusion directory",
                               format_version=FORMAT_VERSION)
        if cfg["autoencoder_class"] not in _AUTOENCODERS or cfg["unet_class"] not in _UNETS:
            raise CheckpointError(f"{d / CONFIG_NAME}: unsupported classes {cfg['autoencoder_class']}/{cfg['unet_class']}")
        for sub in ("autoencoder", "unet"):
            if not (d / sub / "diffusion_pytorch_model.safetensors").is_file():
                raise CheckpointError(f"{d / sub} has no diffusion_pytorch_model.safetensors (only safetensors weights are loaded)")
        try:
            ae = getattr(diffusers, cfg["autoencoder_class"]).from_pretrained(d / "autoencoder", use_safetensors=True, low_cpu_mem_usage=False)
            unet = getattr(diffusers, cfg["unet_class"]).from_pretrained(d / "unet", use_safetensors=True, low_cpu_mem_usage=False)
        except (OSError, ValueError, RuntimeError, EnvironmentError) as e:
            raise CheckpointError(f"cannot load the components in {d}: {e}") from e
        acp = load_safetensors(d / "schedule.safetensors")["alphas_cumprod"]
        cond = load_safetensors(d / "conditioning.safetensors")["conditioning"] if cfg["has_conditioning"] else None
        return cls(ae, unet, acp, conditioning=cond, latent_mean=cfg["latent_mean"], latent_std=cfg["latent_std"], name=cfg["name"])
