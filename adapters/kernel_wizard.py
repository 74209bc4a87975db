"""Plugin: the paper's non-linear blur, bkse's learned blur-kernel space, as the operator ``"kernel-wizard"``.

Flash's ``nl_blur`` task uses the blur model of Tran et al., "Explore Image Deblurring via Encoded
Blur Kernel Space", CVPR 2021 (bkse). Its ``adaptKernel(x, k)`` blurs a sharp image ``x ∈ [0, 1]``
with the blur described by a code ``k``; Flash (like DPS) draws ``k ~ N(0, 1.2²)`` of shape
``(512, 2, 2)`` for a 256-px image:

.. math::  y = 2\\, G(\\tfrac{x + 1}{2}, k_b) - 1, \\quad \\text{clipped to } [-1, 1].

`KernelWizardBlur` is that operator on our port of bkse's network
(`flash_plugin.adapters.kernel_wizard_net`), for users who have bkse's GoPro weights (they cannot
be downloaded here; the bundled model uses the weight-free `flash_plugin.operators.NonlinearBlur`).
The code's spatial size is the working size divided by 128 (``(512, 2, 2)`` at 256 px). Images of
another size (e.g. our 32-px Fashion-MNIST) are resized bilinearly to the working size, blurred
and resized back (area averaging when shrinking); one-channel images are replicated to the
model's 3 channels and the output averaged back to one.

Registered through flash-plugin's entry point ``kernel_wizard`` (``flash_register_operators``),
like the other adapters; it was ``flash_plugin.operators.kernel_wizard`` before.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
import torch.nn.functional as F

from flash_plugin.adapters.kernel_wizard_net import (
    CODE_STRIDE,
    GOPRO_WVAE_CONFIG,
    KernelWizard,
    KernelWizardConfig,
    convert_bkse_checkpoint,
)
from flash_plugin.errors import FlashInputError
from flash_plugin.markers import hookimpl
from flash_plugin.operators.base import BaseOperator
from flash_plugin.utils.random import GeneratorLike, randn

DEFAULT_CODE_STD = 1.2

__all__ = [
    "CODE_STRIDE",
    "DEFAULT_CODE_STD",
    "GOPRO_WVAE_CONFIG",
    "KernelWizard",
    "KernelWizardBlur",
    "KernelWizardConfig",
    "convert_bkse_checkpoint",
    "flash_register_operators",
]


class KernelWizardBlur(BaseOperator):
    """The paper's learned nonlinear blur (bkse): ``y = clip(2·G((x + 1)/2, k_b) − 1)``, one kernel code per sample.

    Args:
        model: a `KernelWizard` (its device and dtype are used for the computation; inputs on
            another device raise `FlashInputError`: call ``op.to(device)``).
        codes: per-sample kernel codes ``(B, kernel_dim, h, w)``; the working image size is
            ``(128·h, 128·w)``.
        noise_std: ``σ_y`` on the ``[-1, 1]`` scale.
        channels: channels of the input images: ``model.config.input_nc`` (default) or 1
            (replicated to the model's channels and averaged back).

    ``severity`` is ``None``: the paper ignores ``t`` for this task.
    """

    _per_sample = ("codes",)
    operator_family = "kernel-wizard"
    output_range = (-1.0, 1.0)  # clipped

    def __init__(self, model: KernelWizard, codes: torch.Tensor, noise_std: float = 0.0, *, channels: int | None = None) -> None:
        if not isinstance(model, KernelWizard):
            raise FlashInputError(f"model must be a KernelWizard, got {type(model).__name__}")
        codes = torch.as_tensor(codes)
        if codes.ndim != 4 or codes.shape[0] < 1 or codes.shape[1] != model.config.kernel_dim:
            raise FlashInputError(
                f"codes must have shape (B, {model.config.kernel_dim}, h, w), got {tuple(codes.shape)}"
            )
        if not codes.is_floating_point() or not bool(torch.isfinite(codes).all()):
            raise FlashInputError("codes must be finite floating tensors")
        channels = model.config.input_nc if channels is None else int(channels)
        if channels not in (1, model.config.input_nc):
            raise FlashInputError(f"channels must be 1 or {model.config.input_nc}, got {channels}")
        super().__init__(int(codes.shape[0]), noise_std)
        self.model = model
        self.codes = codes
        self.channels = channels

    @classmethod
    def from_model(
        cls,
        model: KernelWizard,
        batch_size: int,
        generator: GeneratorLike = None,
        *,
        noise_std: float = 0.0,
        work_size: int = 256,
        code_std: float = DEFAULT_CODE_STD,
        channels: int | None = None,
    ) -> KernelWizardBlur:
        """Draw codes ``k_b ~ N(0, code_std²)`` of shape ``(kernel_dim, work_size/128, work_size/128)``
        from ``generator`` (float64, like every draw here; cast to the model's dtype at use)."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise FlashInputError(f"batch_size must be a positive int, got {batch_size!r}")
        codes = code_std * randn(generator, batch_size, model.code_shape(work_size, work_size))
        return cls(model, codes, noise_std, channels=channels)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        batch_size: int = 1,
        generator: GeneratorLike = None,
        *,
        config: KernelWizardConfig | None = None,
        device: torch.device | str | None = None,
        **kwargs: Any,
    ) -> KernelWizardBlur:
        """`KernelWizard.from_pretrained` then `from_model` (``kwargs``: noise_std, work_size,
        code_std, channels)."""
        return cls.from_model(KernelWizard.from_pretrained(path, config, device), batch_size, generator, **kwargs)

    @property
    def work_size(self) -> tuple[int, int]:
        return (CODE_STRIDE * self.codes.shape[-2], CODE_STRIDE * self.codes.shape[-1])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> KernelWizardBlur:
        """A new operator with codes and model on ``device`` (model in ``dtype`` if given). The
        model is copied only if it has to move; the original operator and model are unchanged."""
        new = super().to(device, dtype)
        p = next(self.model.parameters())
        if (device is not None and torch.device(device) != p.device) or (dtype is not None and dtype != p.dtype):
            new.model = copy.deepcopy(self.model).to(device=device, dtype=dtype)
        return new

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        p = next(self.model.parameters())
        if x.device != p.device:
            raise FlashInputError(f"x is on {x.device} but the KernelWizard model is on {p.device}; use op.to(x.device)")
        b, c, h, w = x.shape
        u = ((x + 1) / 2).to(p.dtype)
        if c != self.model.config.input_nc:  # one channel: replicate
            u = u.expand(b, self.model.config.input_nc, h, w)
        size = self.work_size
        if (h, w) != size:
            u = F.interpolate(u, size=size, mode="bilinear", align_corners=False)
        out = self.model.adapt_kernel(u, self.codes.to(device=p.device, dtype=p.dtype))
        if (h, w) != size:
            shrink = h <= size[0] and w <= size[1]
            out = F.interpolate(out, size=(h, w), mode="area") if shrink else F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
        if c != self.model.config.input_nc:
            out = out.mean(dim=1, keepdim=True)
        return (2 * out - 1).clamp(-1, 1).to(x.dtype)

    def _repr_extra(self) -> str:
        return f"work_size={self.work_size}, channels={self.channels}"


@hookimpl
def flash_register_operators(register):
    """Register `KernelWizardBlur` as ``"kernel-wizard"``."""
    register("kernel-wizard", KernelWizardBlur)
