"""Port of bkse's blur model ("KernelWizard") and of its checkpoints, for `flash_plugin.adapters.kernel_wizard`.

Tran et al., "Explore Image Deblurring via Encoded Blur Kernel Space", CVPR 2021, code
https://github.com/VinAIResearch/blur-kernel-space-exploring ("bkse"), trained on GoPro
(``options/kernel_encoding/GOPRO/wVAE.yml``, checkpoint ``GOPRO_wVAE.pth``). `KernelWizard` is our
own re-implementation of the architecture, written from reading bkse: it has the same
``state_dict`` keys and shapes as bkse's ``KernelWizard`` for that config, so a user who has the
weights converts them once (`convert_bkse_checkpoint`, which reads the ``.pth`` with
``torch.load(weights_only=True)``) and loads the safetensors file with `KernelWizard.from_pretrained`.

Architecture (GoPro config: ``nf = 64``, 10 front and 20 back residual blocks, ``kernel_dim =
512``, VAE kernel extractor with 4 ResNet blocks, no normalisation layers):

* ``feature_extractor``: conv 3x3, two stride-2 convs (LeakyReLU 0.1), residual blocks → ``H/4``.
* ``adapter`` (the paper's ``G``): a 5-level pix2pix-style U-Net (4x4 stride-2 convs) whose
  bottleneck (``H/128``) is concatenated with the code ``k``; output ``tanh``.
* ``recon_trunk``: residual blocks, two PixelShuffle x2 upsamplings, convs back to ``input_nc``;
  the result is added to the input (``adaptKernel`` is residual).
* ``kernel_extractor`` (the paper's ``F``, ``(sharp, blurred) → (μ, log σ²)`` of the code): not
  used to blur, but part of the checkpoint, so it is built (and usable via `encode_kernel`).

One bkse detail matters for matching its outputs: its U-Net uses an *in-place* LeakyReLU as the
first op of each inner block, so the skip connection carries ``LeakyReLU_0.2(x)``, not ``x``. We
write that explicitly (no in-place ops). Not a plugin (no hooks).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from flash_plugin.errors import CheckpointError, FlashInputError

CODE_STRIDE = 128  # 4 (feature extractor) x 32 (five U-Net downsamplings)
CONFIG_METADATA_KEY = "kernel_wizard_config"

__all__ = ["CODE_STRIDE", "GOPRO_WVAE_CONFIG", "KernelWizard", "KernelWizardConfig", "convert_bkse_checkpoint"]


@dataclass(frozen=True)
class KernelWizardConfig:
    """Hyperparameters of `KernelWizard` (bkse's ``KernelWizard`` options in brackets).

    Attributes:
        input_nc: image channels [``input_nc``].
        nf: feature width [``nf``]; the adapter's bottleneck has ``8·nf`` channels.
        front_blocks: residual blocks of the feature extractor [``front_RBs``].
        back_blocks: residual blocks of the reconstruction trunk [``back_RBs``].
        kernel_dim: channels of the kernel code [``kernel_dim``]; must equal ``8·nf``.
        use_vae: the kernel extractor predicts ``(μ, log σ²)`` [``use_vae``].
        use_sharp: the kernel extractor sees the sharp image too [``KernelExtractor.use_sharp``].
        extractor_blocks: ResNet blocks of the kernel extractor [``KernelExtractor.n_blocks``].
        recon_nf: width of the last upsampling stage (64 hard-coded in bkse; smaller only for
            tests).
    """

    input_nc: int = 3
    nf: int = 64
    front_blocks: int = 10
    back_blocks: int = 20
    kernel_dim: int = 512
    use_vae: bool = True
    use_sharp: bool = True
    extractor_blocks: int = 4
    recon_nf: int = 64

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type in ("int", int) and (not isinstance(v, int) or isinstance(v, bool) or v < (0 if "blocks" in f.name else 1)):
                raise CheckpointError(f"KernelWizardConfig.{f.name} must be a {'non-negative' if 'blocks' in f.name else 'positive'} int, got {v!r}")
        if self.kernel_dim != 8 * self.nf:
            raise CheckpointError(f"KernelWizardConfig: kernel_dim ({self.kernel_dim}) must equal 8 * nf ({8 * self.nf})")

    @classmethod
    def from_bkse(cls, opt: dict[str, Any]) -> KernelWizardConfig:
        """From the ``KernelWizard`` section of a bkse YAML options file (a dict). Only the
        normalisation-free variant (``norm: none``) is supported."""
        ke, ad = opt.get("KernelExtractor", {}), opt.get("Adapter", {})
        for section, norm in (("KernelExtractor", ke.get("norm", "none")), ("Adapter", ad.get("norm", "none"))):
            if norm != "none":
                raise CheckpointError(f"bkse option {section}.norm = {norm!r} is not supported (only 'none')")
        if ke.get("padding_type", "reflect") != "reflect":
            raise CheckpointError("bkse option KernelExtractor.padding_type must be 'reflect'")
        return cls(
            input_nc=int(opt["input_nc"]),
            nf=int(opt["nf"]),
            front_blocks=int(opt["front_RBs"]),
            back_blocks=int(opt["back_RBs"]),
            kernel_dim=int(opt["kernel_dim"]),
            use_vae=bool(opt["use_vae"]),
            use_sharp=bool(ke.get("use_sharp", True)),
            extractor_blocks=int(ke.get("n_blocks", 4)),
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> KernelWizardConfig:
        try:
            data = json.loads(text)
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(data) - known)
            if unknown:
                raise CheckpointError(f"unknown KernelWizardConfig fields in checkpoint: {unknown}")
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as e:
            raise CheckpointError(f"invalid KernelWizardConfig JSON in checkpoint: {e}") from e


GOPRO_WVAE_CONFIG = KernelWizardConfig()  # bkse options/kernel_encoding/GOPRO/wVAE.yml


# ----------------------------------------------------------------------------------------------
# Building blocks (module attribute names and Sequential indices follow bkse's state_dict keys)
# ----------------------------------------------------------------------------------------------
class _ResidualBlock(nn.Module):
    """``x + conv2(relu(conv1(x)))``, 3x3 convs with bias (bkse ``ResidualBlock_noBN``)."""

    def __init__(self, nf: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv2 = nn.Conv2d(nf, nf, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class _ReflectResnetBlock(nn.Module):
    """``x + [pad, conv, ReLU, pad, conv](x)`` with reflection padding, bias-free convs (bkse
    ``ResnetBlock`` with ``norm: none``; the identity slots stand for the absent norm layers)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=False), nn.Identity(), nn.ReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=False), nn.Identity(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class _KernelExtractor(nn.Module):
    """``F``: (sharp, blurred) features → kernel code ``(μ, log σ²)`` at ``H/128``."""

    def __init__(self, cfg: KernelWizardConfig) -> None:
        super().__init__()
        self.kernel_dim, self.use_vae = cfg.kernel_dim, cfg.use_vae
        nf = cfg.nf
        out_nc = 2 * cfg.kernel_dim if cfg.use_vae else cfg.kernel_dim
        in_nc = 2 * nf if cfg.use_sharp else nf
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(in_nc, nf, 7, bias=False), nn.Identity(), nn.ReLU()]
        for i in range(5):
            inc, ouc = min(nf * 2**i, out_nc), min(nf * 2 ** (i + 1), out_nc)
            layers += [nn.Conv2d(inc, ouc, 3, 2, 1, bias=False), nn.Identity(), nn.ReLU()]
        layers += [_ReflectResnetBlock(out_nc) for _ in range(cfg.extractor_blocks)]
        self.model = nn.Sequential(*layers)

    def forward(self, sharp: torch.Tensor, blurred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(torch.cat([sharp, blurred], dim=1))
        if self.use_vae:
            return out[:, : self.kernel_dim], out[:, self.kernel_dim :]
        return out, torch.zeros_like(out)


class _UnetBlock(nn.Module):
    """One level of the pix2pix-style U-Net (4x4 stride-2 conv down, transposed conv up).

    Inner levels return ``cat(up(inner), LeakyReLU_0.2(x))`` (bkse's in-place activation makes the
    skip carry the activated input); the innermost level concatenates the kernel code to its
    bottleneck; the outermost returns ``tanh(up(inner))`` without a skip.
    """

    def __init__(self, outer_nc: int, inner_nc: int, input_nc: int | None = None, submodule: _UnetBlock | None = None,
                 outermost: bool = False, innermost: bool = False) -> None:
        super().__init__()
        self.outermost, self.innermost = outermost, innermost
        input_nc = outer_nc if input_nc is None else input_nc
        downconv = nn.Conv2d(input_nc, inner_nc, 4, 2, 1, bias=False)
        if outermost:
            self.down = nn.Sequential(downconv)
            self.submodule = submodule
            self.up = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(2 * inner_nc, outer_nc, 4, 2, 1), nn.Tanh())
        elif innermost:
            self.down = nn.Sequential(nn.LeakyReLU(0.2), downconv)
            self.up = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(2 * inner_nc, outer_nc, 4, 2, 1, bias=False), nn.Identity())
        else:
            self.down = nn.Sequential(nn.LeakyReLU(0.2), downconv, nn.Identity())
            self.submodule = submodule
            self.up = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(2 * inner_nc, outer_nc, 4, 2, 1, bias=False), nn.Identity())

    def forward(self, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.up(self.submodule(self.down(x), code))
        h = self.down[0](x)
        inner = self.down[1:](h)
        if self.innermost:
            if code.shape[-2:] != inner.shape[-2:]:
                raise FlashInputError(f"kernel code has spatial size {tuple(code.shape[-2:])} but the image needs {tuple(inner.shape[-2:])}")
            return torch.cat([self.up(torch.cat([inner, code], dim=1)), h], dim=1)
        return torch.cat([self.up(self.submodule(inner, code)), h], dim=1)


class _KernelAdapter(nn.Module):
    """``G``: image features and a kernel code → blurred features (5-level U-Net)."""

    def __init__(self, cfg: KernelWizardConfig) -> None:
        super().__init__()
        nf = cfg.nf
        block = _UnetBlock(8 * nf, 8 * nf, innermost=True)
        block = _UnetBlock(4 * nf, 8 * nf, submodule=block)
        block = _UnetBlock(2 * nf, 4 * nf, submodule=block)
        block = _UnetBlock(nf, 2 * nf, submodule=block)
        self.model = _UnetBlock(nf, nf, input_nc=nf, submodule=block, outermost=True)

    def forward(self, features: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        return self.model(features, code)


class KernelWizard(nn.Module):
    """Re-implementation of bkse's ``KernelWizard`` (same state_dict keys; module docstring)."""

    def __init__(self, config: KernelWizardConfig = GOPRO_WVAE_CONFIG) -> None:
        super().__init__()
        self.config = config
        nf, rnf = config.nf, config.recon_nf
        lrelu = nn.LeakyReLU(0.1)
        self.feature_extractor = nn.Sequential(
            nn.Conv2d(config.input_nc, nf, 3, 1, 1), lrelu,
            nn.Conv2d(nf, nf, 3, 2, 1), lrelu,
            nn.Conv2d(nf, nf, 3, 2, 1), lrelu,
            *[_ResidualBlock(nf) for _ in range(config.front_blocks)],
        )
        self.kernel_extractor = _KernelExtractor(config)
        self.adapter = _KernelAdapter(config)
        self.recon_trunk = nn.Sequential(
            *[_ResidualBlock(nf) for _ in range(config.back_blocks)],
            nn.Conv2d(nf, 4 * nf, 3, 1, 1), nn.PixelShuffle(2), lrelu,
            nn.Conv2d(nf, 4 * rnf, 3, 1, 1), nn.PixelShuffle(2), lrelu,
            nn.Conv2d(rnf, rnf, 3, 1, 1), lrelu,
            nn.Conv2d(rnf, config.input_nc, 3, 1, 1),
        )

    def code_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """Shape of one sample's kernel code for an image of ``height x width`` (multiples of 128)."""
        if height % CODE_STRIDE or width % CODE_STRIDE:
            raise FlashInputError(f"KernelWizard needs image sizes that are multiples of {CODE_STRIDE}, got {height}x{width}")
        return (self.config.kernel_dim, height // CODE_STRIDE, width // CODE_STRIDE)

    def adapt_kernel(self, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """Blur sharp images ``x`` (``[0, 1]``, ``(B, input_nc, H, W)``) with codes ``(B, kernel_dim, H/128, W/128)``."""
        out = self.recon_trunk(self.adapter(self.feature_extractor(x), code))
        return out + x

    adaptKernel = adapt_kernel  # bkse's name

    def encode_kernel(self, sharp: torch.Tensor, blurred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(μ, log σ²)`` of the kernel code that turns ``sharp`` into ``blurred`` (bkse ``forward``)."""
        return self.kernel_extractor(self.feature_extractor(sharp), self.feature_extractor(blurred))

    forward = encode_kernel

    # -- checkpoints ---------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the weights as safetensors with the config in the file's metadata."""
        from flash_plugin.utils.checkpoint import atomic_save_safetensors

        atomic_save_safetensors(self.state_dict(), path, metadata={CONFIG_METADATA_KEY: self.config.to_json()})

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        config: KernelWizardConfig | None = None,
        device: torch.device | str | None = None,
    ) -> KernelWizard:
        """Load a safetensors checkpoint (eval mode, frozen). The config comes from ``config``, else
        from the file's metadata, else the GoPro config. Raises `CheckpointError` for a missing or
        truncated file and for missing, unexpected or mis-shaped weights."""
        from flash_plugin.utils.checkpoint import load_safetensors

        tensors = load_safetensors(path)
        if config is None:
            config = _config_from_metadata(path) or GOPRO_WVAE_CONFIG
        with torch.device("meta"):
            model = cls(config)
        _check_state_dict(tensors, model, str(path))
        model.load_state_dict(tensors, strict=True, assign=True)
        model = model.to(device) if device is not None else model
        return model.eval().requires_grad_(False)


def _config_from_metadata(path) -> KernelWizardConfig | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        text = (f.metadata() or {}).get(CONFIG_METADATA_KEY)
    return None if text is None else KernelWizardConfig.from_json(text)


def _check_state_dict(tensors: dict[str, torch.Tensor], model: nn.Module, source: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match KernelWizard({model.config}): "
            f"{len(missing)} missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    wrong = [f"{k}: {tuple(tensors[k].shape)} != {s}" for k, s in expected.items() if tuple(tensors[k].shape) != s]
    if wrong:
        raise CheckpointError(f"{source}: {len(wrong)} weights have the wrong shape, e.g. {wrong[:3]}")


def convert_bkse_checkpoint(
    pth_path: str | os.PathLike,
    out_path: str | os.PathLike,
    config: KernelWizardConfig = GOPRO_WVAE_CONFIG,
) -> Path:
    """Convert a bkse ``.pth`` state dict (e.g. ``GOPRO_wVAE.pth``) to a checked safetensors file.

    Reads with ``torch.load(weights_only=True)`` (no arbitrary code), drops a ``module.`` prefix
    (DataParallel), checks keys and shapes against `KernelWizard` ``(config)`` and writes
    ``out_path`` with the config in its metadata. Returns ``out_path``.
    """
    from flash_plugin.utils.checkpoint import atomic_save_safetensors

    pth_path = Path(pth_path)
    if not pth_path.is_file():
        raise CheckpointError(f"bkse checkpoint not found: {pth_path}")
    try:
        state = torch.load(str(pth_path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise CheckpointError(f"cannot read {pth_path} as a torch state dict: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{pth_path} does not hold a flat state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    with torch.device("meta"):
        model = KernelWizard(config)
    _check_state_dict(state, model, str(pth_path))
    atomic_save_safetensors(state, out_path, metadata={CONFIG_METADATA_KEY: config.to_json()})
    return Path(out_path)
