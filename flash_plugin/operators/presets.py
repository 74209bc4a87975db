"""Task presets: the paper's evaluation tasks as data (operator family, severity range, noise).

==================  ==================  ==================  ==============================
preset              family              evaluation ``t``    paper (256 px, CelebA/LSUN)
==================  ==================  ==================  ==============================
gblur-varying       `GaussianBlur`      ``U(0, 1)``         std 0.3 → 3.0 px
gblur-fixed         `GaussianBlur`      ``1``               std 3.0 px
nonlinear-blur      `NonlinearBlur`     ``U(0, 1)``         bkse GoPro blur, ``t`` ignored
random-inpainting   `RandomInpainting`  ``U(0.875, 1)``     70–80 % missing pixels
==================  ==================  ==================  ==============================

All use ``σ_y = 0.1`` on the ``[-1, 1]`` scale (the paper's 0.05 on ``[0, 1]``). Our nonlinear
blur is the weight-free `NonlinearBlur` (the paper's bkse weights cannot be downloaded here; the
adapter `flash_plugin.adapters.kernel_wizard` is for users who have them). Every number is a field: derive a variant with
``dataclasses.replace(PRESETS["gblur-varying"], noise_std=0.2)``.

Usage::

    preset = get_preset("gblur-varying")
    t = preset.sample_severity(batch_size, generator)
    op = preset.make(t, generator)          # per-sample kernels / masks drawn from generator
    y = op.measure(x, generator)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from flash_plugin.errors import FlashInputError, UnknownPluginNameError
from flash_plugin.operators.base import BaseOperator, GeneratorLike, _check_noise_std, _check_range, rand
from flash_plugin.operators.gaussian_blur import DEFAULT_STD_RANGE, GaussianBlur
from flash_plugin.operators.inpainting import RandomInpainting
from flash_plugin.operators.nonlinear_blur import NonlinearBlur

__all__ = ["PRESETS", "TaskPreset", "get_preset"]


@dataclass(frozen=True)
class TaskPreset:
    """A degradation task: an operator family with its evaluation severities and noise level.

    Attributes:
        name: the preset's registry name.
        family: the operator class; it must provide
            ``from_severity(t, generator, *, noise_std, **family_kwargs)``.
        severity_range: ``(lo, hi)`` within ``[0, 1]``: `sample_severity` draws ``t ~ U(lo, hi)``
            (``lo == hi`` fixes ``t``).
        noise_std: ``σ_y`` on the ``[-1, 1]`` scale.
        family_kwargs: extra keyword arguments of ``family.from_severity`` (e.g. ``std_range``,
            ``image_shape``); stored read-only.
        description: one line for listings.
    """

    name: str
    family: type[BaseOperator]
    severity_range: tuple[float, float] = (0.0, 1.0)
    noise_std: float = 0.1
    family_kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)
    description: str = ""

    def __post_init__(self) -> None:
        lo, hi = _check_range(self.severity_range, "severity_range")
        if hi > 1.0:
            raise FlashInputError(f"severity_range must lie in [0, 1], got ({lo}, {hi})")
        object.__setattr__(self, "severity_range", (lo, hi))
        object.__setattr__(self, "noise_std", _check_noise_std(self.noise_std))
        object.__setattr__(self, "family_kwargs", MappingProxyType(dict(self.family_kwargs)))
        if not callable(getattr(self.family, "from_severity", None)):
            raise FlashInputError(f"family {self.family!r} has no from_severity(t, generator, ...)")

    def make(self, t, generator: GeneratorLike = None, **overrides: Any) -> BaseOperator:
        """The operator at severities ``t`` (``[B]`` in ``[0, 1]``), drawing per-sample masks or
        kernels from ``generator``; ``overrides`` replace family kwargs for this call (e.g.
        ``image_shape``)."""
        kwargs = {**self.family_kwargs, **overrides}
        return self.family.from_severity(t, generator, noise_std=self.noise_std, **kwargs)

    __call__ = make  # a preset is an operator factory (the plugin registry's contract)

    @property
    def operator_family(self) -> str | None:
        """The family name of the operators it makes (``family.operator_family``), e.g.
        ``"gaussian-blur"`` for both Gaussian-blur presets."""
        return getattr(self.family, "operator_family", None)

    def sample_severity(self, batch_size: int, generator: GeneratorLike = None) -> torch.Tensor:
        """``t ~ U(severity_range)``, float64 ``[batch_size]``, from ``generator``."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise FlashInputError(f"batch_size must be a positive int, got {batch_size!r}")
        lo, hi = self.severity_range
        return lo + (hi - lo) * rand(generator, batch_size, ()).reshape(batch_size)

    def replace(self, **changes: Any) -> TaskPreset:
        """``dataclasses.replace(self, **changes)``."""
        return dataclasses.replace(self, **changes)


IMAGE_SHAPE = (1, 32, 32)  # the bundled Fashion-MNIST model's images; override with make(..., image_shape=...)

PRESETS: Mapping[str, TaskPreset] = MappingProxyType({
    p.name: p
    for p in (
        TaskPreset(
            "gblur-varying", GaussianBlur, (0.0, 1.0), 0.1, {"std_range": DEFAULT_STD_RANGE},
            "Gaussian deblurring, std varying with t ~ U(0, 1)",
        ),
        TaskPreset(
            "gblur-fixed", GaussianBlur, (1.0, 1.0), 0.1, {"std_range": DEFAULT_STD_RANGE},
            "Gaussian deblurring at the largest std (t = 1)",
        ),
        TaskPreset(
            "nonlinear-blur", NonlinearBlur, (0.0, 1.0), 0.1, {},
            "Camera-shake motion blur in linear intensity with saturation, t ~ U(0, 1)",
        ),
        TaskPreset(
            "random-inpainting", RandomInpainting, (0.875, 1.0), 0.1, {"image_shape": IMAGE_SHAPE},
            "Random pixel inpainting, 70-80 % of the pixels missing",
        ),
    )
})


def get_preset(name: str) -> TaskPreset:
    """The preset called ``name``; an unknown name raises `UnknownPluginNameError` listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownPluginNameError(f"unknown task preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None
