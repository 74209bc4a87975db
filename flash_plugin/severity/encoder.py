"""`SeverityEncoder`: measurement ``y`` -> ``(ẑ, σ̂²)`` in a `LatentDiffusion`'s latent space.

Fabian et al., "Adapt and Diffuse" (ICML 2024); docs/architecture.md, "Severity encoder". The mean
branch is a trainable copy of the autoencoder's ``encoder`` and ``quant_conv`` followed by the
`LatentDiffusion` latent convention (KL: the posterior mean; VQ: the pre-quantisation output), so
that ``ẑ(y) == model.encode(y)`` before training. The variance head reads the encoder's mid-block
features and predicts ``log σ̂²`` (so ``σ̂² > 0``); its last layer starts at zero, so an untrained
head predicts ``exp(log_variance_offset)``. Why not the official head on ``ẑ``:
docs/design-notes.md, "Severity encoder head". Checkpoints are safetensors plus a JSON config.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flash_plugin.errors import CheckpointError, FlashInputError, LatentSpaceMismatchError
from flash_plugin.types import SeverityEstimate
from flash_plugin.utils.validation import check_finite_batch

CONFIG_NAME = "severity_encoder.json"
WEIGHTS_NAME = "severity_encoder.safetensors"
FORMAT_VERSION = 1
LOG_VARIANCE_CLAMP = (-30.0, 15.0)
_AUTOENCODERS = ("AutoencoderKL", "VQModel")

CONFIG_FIELDS = frozenset({
    "format_version",      # int, FORMAT_VERSION
    "class",               # "SeverityEncoder"
    "autoencoder_class",   # "AutoencoderKL" | "VQModel"
    "autoencoder_config",  # the diffusers config of the autoencoder (architecture of the copy)
    "latent_channels",     # channels of ẑ
    "image_shape",         # [C, H, W] the encoder was trained on (y must have this shape)
    "scaling_factor",      # the autoencoder's scaling factor
    "latent_mean",         # per-channel normalisation of the diffusion latent
    "latent_std",
    "latent_id",           # LatentDiffusion.latent_id of the latent space ẑ lives in
    "head",                # {"channels": int, "parameterisation": "exp", "features": "mid_block"}
    "operator",            # operator family (preset name) it was trained for
    "severity_range",      # the family's severity range (as the preset states it)
    "operator_kwargs",     # the family's parameters (e.g. {"std_range": [0.3, 8.0]}), optional
    "noise_std",           # σ_y on the [-1, 1] scale
    "training_data",       # a description of the training images
    "training",            # the training configuration (TrainConfig as a dict) and run facts
    "metrics",             # evaluation numbers (Spearman, ordering accuracy, calibration, ...)
})
HEAD_FIELDS = frozenset({"channels", "parameterisation", "features"})
_REQUIRED_FIELDS = ("format_version", "autoencoder_class", "autoencoder_config", "image_shape", "latent_mean", "latent_std",
                    "latent_id", "head")


def _jsonable(value: Any) -> Any:
    """Config values as plain JSON (tuples -> lists, tensors -> lists, non-finite floats -> None)."""
    if isinstance(value, torch.Tensor):
        return _jsonable(value.detach().cpu().tolist())
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class VarianceHead(nn.Module):
    """``s(f)``: conv3x3 → SiLU → GroupNorm → conv3x3 → SiLU → [mean, std over space] → linear → ``[B]``."""

    def __init__(self, in_channels: int, channels: int = 64):
        super().__init__()
        groups = math.gcd(8, channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.norm = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.SiLU()
        self.out = nn.Linear(2 * channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv1(features))
        h = self.act(self.conv2(self.norm(h)))
        flat = h.flatten(2)
        pooled = torch.cat([flat.mean(dim=2), flat.std(dim=2, unbiased=False)], dim=1)
        return self.out(pooled).squeeze(1)


class SeverityEncoder(nn.Module):
    """Severity encoder over a diffusers autoencoder, built with `from_latent_diffusion` or loaded
    with `from_pretrained`. ``forward(y)`` returns ``(ẑ, σ̂²)`` with gradients (training);
    `estimate` is the `SeverityEstimator` entry point (validated input, no grad).

    Args:
        autoencoder_class: ``"AutoencoderKL"`` or ``"VQModel"``.
        autoencoder_config: the autoencoder's diffusers config (its encoder is rebuilt from it).
        image_shape: ``(C, H, W)`` of the images/measurements.
        latent_mean, latent_std: per-channel normalisation of the diffusion latent.
        scaling_factor: the autoencoder's scaling factor.
        latent_id: `LatentDiffusion.latent_id` of the target latent space.
        head_channels: width of the variance head.
        init_variance: initial (constant) ``σ̂²`` of the untrained head.
        init_seed: seed of the head's random initialisation (the global RNG is not touched).
        metadata: operator family, severity range, noise level, training data, training config
            and metrics (free-form values, but only the keys of `CONFIG_FIELDS`).
    """

    def __init__(
        self,
        autoencoder_class: str,
        autoencoder_config: dict[str, Any],
        *,
        image_shape: tuple[int, int, int],
        latent_mean,
        latent_std,
        scaling_factor: float = 1.0,
        latent_id: str,
        head_channels: int = 64,
        init_variance: float = 0.1,
        init_seed: int = 0,
        metadata: dict[str, Any] | None = None,
    ):
        super().__init__()
        import diffusers

        if autoencoder_class not in _AUTOENCODERS:
            raise FlashInputError(f"autoencoder_class must be one of {_AUTOENCODERS}, got {autoencoder_class!r}")
        if not (init_variance > 0 and math.isfinite(init_variance)):
            raise FlashInputError(f"init_variance must be finite and > 0, got {init_variance}")
        cfg = {k: v for k, v in dict(autoencoder_config).items() if not k.startswith("_")}
        # Deterministic construction (the head's random init) that leaves the global RNG alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(init_seed))
            ae = getattr(diffusers, autoencoder_class).from_config(cfg)
            self.encoder = ae.encoder
            self.quant_conv = getattr(ae, "quant_conv", None)
            del ae  # the decoder of the throw-away instance is not kept
            mid_channels = int(cfg["block_out_channels"][-1])
            self.head_channels = int(head_channels)
            self.head = VarianceHead(mid_channels, self.head_channels)
        self.autoencoder_class = autoencoder_class
        self.autoencoder_config = cfg
        self.is_kl = autoencoder_class == "AutoencoderKL"
        self.image_shape = tuple(int(s) for s in image_shape)
        mean = torch.as_tensor(latent_mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(latent_std, dtype=torch.float32).flatten()
        c = len(mean)
        if std.shape != (c,) or torch.any(std <= 0):
            raise FlashInputError(f"latent_mean/latent_std must have the same length (std > 0), got {tuple(mean.shape)} and {tuple(std.shape)}")
        self.latent_channels = c
        self.register_buffer("latent_mean", mean.view(1, c, 1, 1), persistent=False)
        self.register_buffer("latent_std", std.view(1, c, 1, 1), persistent=False)
        self.scaling_factor = float(scaling_factor)
        self.latent_id = str(latent_id)
        self.log_variance_offset = nn.Parameter(torch.tensor(math.log(init_variance), dtype=torch.float32))
        meta = dict(metadata or {})
        unknown = set(meta) - CONFIG_FIELDS
        if unknown:
            raise FlashInputError(f"metadata has unknown keys {sorted(unknown)}; known: {sorted(CONFIG_FIELDS)}")
        self._extra: dict[str, Any] = {k: meta.get(k) for k in ("operator", "severity_range", "operator_kwargs", "noise_std", "training_data", "training", "metrics")}
        self._extra["training"] = self._extra["training"] or {}
        self._extra["metrics"] = self._extra["metrics"] or {}

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_latent_diffusion(
        cls,
        model,
        *,
        head_channels: int = 64,
        init_variance: float = 0.1,
        init_seed: int = 0,
        operator: str | None = None,
        severity_range=None,
        noise_std: float | None = None,
        training_data: Any = None,
    ) -> "SeverityEncoder":
        """A severity encoder whose mean branch is a trainable copy of ``model.autoencoder``'s
        ``encoder`` (+ ``quant_conv``); the model itself is not changed."""
        ae = model.autoencoder
        enc = cls(
            type(ae).__name__,
            dict(ae.config),
            image_shape=tuple(model.image_shape),
            latent_mean=model.latent_mean.detach().flatten().cpu(),
            latent_std=model.latent_std.detach().flatten().cpu(),
            scaling_factor=model.scaling_factor,
            latent_id=model.latent_id,
            head_channels=head_channels,
            init_variance=init_variance,
            init_seed=init_seed,
            metadata={"operator": operator, "severity_range": severity_range, "noise_std": noise_std, "training_data": training_data},
        )
        enc.encoder.load_state_dict(ae.encoder.state_dict())
        if enc.quant_conv is not None:
            enc.quant_conv.load_state_dict(ae.quant_conv.state_dict())
        device = next(ae.parameters()).device
        return enc.to(device).train()

    # ---- metadata ------------------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """The JSON config `save_pretrained` writes (architecture + provenance + metrics)."""
        return _jsonable({
            "format_version": FORMAT_VERSION,
            "class": type(self).__name__,
            "autoencoder_class": self.autoencoder_class,
            "autoencoder_config": self.autoencoder_config,
            "latent_channels": self.latent_channels,
            "image_shape": list(self.image_shape),
            "scaling_factor": self.scaling_factor,
            "latent_mean": self.latent_mean.flatten(),
            "latent_std": self.latent_std.flatten(),
            "latent_id": self.latent_id,
            "head": {"channels": self.head_channels, "parameterisation": "exp", "features": "mid_block"},
            **self._extra,
        })

    @property
    def metadata(self) -> dict[str, Any]:
        """`SeverityEstimator` metadata: latent space, operator family, severity range, noise level,
        training data, architecture, training configuration and metrics."""
        cfg = self.config
        return {
            "latent_id": cfg["latent_id"],
            "operator": cfg["operator"],
            "severity_range": cfg["severity_range"],
            "operator_kwargs": cfg.get("operator_kwargs"),
            "noise_std": cfg["noise_std"],
            "training_data": cfg["training_data"],
            "architecture": {k: cfg[k] for k in ("class", "autoencoder_class", "latent_channels", "image_shape", "head")},
            "training": cfg["training"],
            "metrics": cfg["metrics"],
        }

    def update_metadata(self, **values: Any) -> None:
        """Set provenance fields (``operator``, ``severity_range``, ``operator_kwargs``, ``noise_std``,
        ``training_data``, ``training``, ``metrics``)."""
        unknown = set(values) - set(self._extra)
        if unknown:
            raise FlashInputError(f"unknown metadata fields {sorted(unknown)}; settable: {sorted(self._extra)}")
        self._extra.update(_jsonable(values))

    @property
    def device(self) -> torch.device:
        return self.log_variance_offset.device

    # ---- forward ----------------------------------------------------------------------------
    def features(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, f)``: the autoencoder-space encoding ``h`` (before scaling/normalisation) and
        the mid-block features ``f``."""
        enc = self.encoder
        h = enc.conv_in(y)
        for block in enc.down_blocks:
            h = block(h)
        f = enc.mid_block(h)
        h = enc.conv_out(enc.conv_act(enc.conv_norm_out(f)))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        if self.is_kl:
            h = h[:, : h.shape[1] // 2]  # posterior mean (= latent_dist.mode())
        return h, f

    def forward(self, y: torch.Tensor, *, detach_head_features: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ẑ, σ̂²)``: ``ẑ`` ``(B, C, h, w)`` in the normalised diffusion latent space, ``σ̂² > 0`` ``[B]``
        (``log σ̂²`` clamped to `LOG_VARIANCE_CLAMP`). ``detach_head_features`` stops the head's
        gradient at the shared trunk (a training option; the outputs are the same)."""
        h, f = self.features(y)
        z = (h * self.scaling_factor - self.latent_mean) / self.latent_std
        log_var = (self.log_variance_offset + self.head(f.detach() if detach_head_features else f)).clamp(*LOG_VARIANCE_CLAMP)
        return z, log_var.exp()

    def check_measurement(self, y: Any) -> torch.Tensor:
        """Validate ``y`` (tensor, rank 4, channels and size as trained, floating, finite)."""
        if not isinstance(y, torch.Tensor):
            raise FlashInputError(f"y must be a torch.Tensor, got {type(y).__name__}")
        c, hgt, wid = self.image_shape
        if y.ndim != 4:
            raise FlashInputError(f"y must have rank 4 (B, {c}, {hgt}, {wid}), got shape {tuple(y.shape)}")
        if y.shape[1] != c:
            raise FlashInputError(f"y must have {c} channel(s) (this encoder's images are {c}x{hgt}x{wid}), got shape {tuple(y.shape)}")
        if tuple(y.shape[2:]) != (hgt, wid):
            raise FlashInputError(f"y must be {hgt}x{wid} pixels (the size the encoder was trained on), got shape {tuple(y.shape)}")
        check_finite_batch("y", y)
        return y

    @torch.no_grad()
    def estimate(self, y: torch.Tensor) -> SeverityEstimate:
        """`SeverityEstimator.estimate`: ``SeverityEstimate(latent=ẑ, variance=σ̂²)`` on the encoder's
        device and dtype (``y`` is moved there), computed without gradients."""
        self.check_measurement(y)
        dtype = self.log_variance_offset.dtype
        z, var = self(y.to(device=self.device, dtype=dtype))
        return SeverityEstimate(latent=z, variance=var)

    # ---- checkpoints --------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, *, metrics: dict[str, Any] | None = None) -> Path:
        """Write ``severity_encoder.safetensors`` + ``severity_encoder.json`` (both atomically)."""
        from flash_plugin.utils.checkpoint import atomic_save_safetensors, atomic_write_json

        if metrics is not None:
            self.update_metadata(metrics=metrics)
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(dict(self.state_dict()), d / WEIGHTS_NAME, metadata={"format": "pt", "latent_id": self.latent_id})
        atomic_write_json(d / CONFIG_NAME, self.config)
        return d

    @classmethod
    def read_config(cls, directory: str | Path) -> dict[str, Any]:
        """The validated JSON config of a saved encoder (raises `CheckpointError`)."""
        from flash_plugin.utils.checkpoint import read_json_config

        d = Path(directory)
        path = d / CONFIG_NAME
        cfg = read_json_config(path, CONFIG_FIELDS, missing=f"{d} has no {CONFIG_NAME}: not a flash-plugin severity encoder directory",
                               required=_REQUIRED_FIELDS, format_version=FORMAT_VERSION)
        if cfg.get("class", "SeverityEncoder") != "SeverityEncoder":
            raise CheckpointError(f"{path}: class {cfg['class']!r} is not SeverityEncoder")
        if cfg["autoencoder_class"] not in _AUTOENCODERS:
            raise CheckpointError(f"{path}: unsupported autoencoder_class {cfg['autoencoder_class']!r}")
        head = cfg["head"]
        if not isinstance(head, dict) or set(head) - HEAD_FIELDS:
            raise CheckpointError(f"{path}: head must be an object with fields among {sorted(HEAD_FIELDS)}, got {head!r}")
        if head.get("parameterisation", "exp") != "exp" or head.get("features", "mid_block") != "mid_block":
            raise CheckpointError(f"{path}: unsupported head {head!r} (this version knows parameterisation 'exp' on 'mid_block' features)")
        return cfg

    @classmethod
    def from_pretrained(cls, directory: str | Path, model=None, *, device: str | torch.device | None = None) -> "SeverityEncoder":
        """Load what `save_pretrained` wrote.

        Args:
            directory: the encoder directory.
            model: a `LatentDiffusion` (or anything with ``latent_id``); when given, the encoder
                must have been trained for its latent space, else `LatentSpaceMismatchError`.
            device: where to put the encoder (default: the model's device, else CPU).

        Raises:
            CheckpointError: missing/truncated files, unknown config fields, tensors that do not
                match the architecture.
            LatentSpaceMismatchError: ``model.latent_id`` differs from the encoder's.
        """
        from flash_plugin.utils.checkpoint import load_safetensors

        d = Path(directory)
        cfg = cls.read_config(d)
        if model is not None:
            model_id = getattr(model, "latent_id", None)
            if model_id != cfg["latent_id"]:
                raise LatentSpaceMismatchError(
                    f"the severity encoder in {d} was trained for latent space {cfg['latent_id']!r} "
                    f"(operator {cfg.get('operator')!r}), but the model's latent_id is {model_id!r}: its ẑ would be "
                    "meaningless for this autoencoder. Train an encoder for this model (flash-plugin train-severity --model ...)."
                )
        tensors = load_safetensors(d / WEIGHTS_NAME)
        try:
            enc = cls(
                cfg["autoencoder_class"], cfg["autoencoder_config"],
                image_shape=tuple(cfg["image_shape"]), latent_mean=cfg["latent_mean"], latent_std=cfg["latent_std"],
                scaling_factor=cfg.get("scaling_factor", 1.0), latent_id=cfg["latent_id"],
                head_channels=int(cfg["head"].get("channels", 64)),
                metadata={k: cfg.get(k) for k in ("operator", "severity_range", "operator_kwargs", "noise_std", "training_data", "training", "metrics")},
            )
        except (TypeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{d / CONFIG_NAME}: cannot build the architecture: {e}") from e
        expected = enc.state_dict()
        missing, unexpected = set(expected) - set(tensors), set(tensors) - set(expected)
        if missing or unexpected:
            raise CheckpointError(
                f"{d / WEIGHTS_NAME} does not match the architecture in {CONFIG_NAME}: "
                f"missing {sorted(missing)[:5]}{'...' if len(missing) > 5 else ''}, unexpected {sorted(unexpected)[:5]}"
            )
        bad = [k for k, v in expected.items() if tuple(v.shape) != tuple(tensors[k].shape)]
        if bad:
            raise CheckpointError(f"{d / WEIGHTS_NAME}: tensor shapes differ from the architecture for {bad[:5]}")
        enc.load_state_dict(tensors)
        if device is None:
            device = getattr(model, "device", None) if model is not None else None
        return enc.to(device or "cpu").eval()

    def extra_repr(self) -> str:
        return f"latent_id={self.latent_id!r}, operator={self._extra.get('operator')!r}, image_shape={self.image_shape}"
