"""Degradation operators ``y = A(x) + σ_y n`` on images ``(B, C, H, W)`` in ``[-1, 1]``.

Families (one module each): `GaussianBlur`, `RandomInpainting`, `NonlinearBlur` (weight-free
camera shake) and `GaussianNoise`; the paper's tasks as data in `PRESETS` (`TaskPreset`). All share `BaseOperator`
(validation, the ``[-1, 1]`` image range, per-sample parameters, `select`, `to`, noise from the
caller's generator); the linear ones have a true `adjoint` (`BaseLinearOperator`). Each class
declares its ``operator_family`` (the registry name of the class, e.g. ``"gaussian-blur"``), the
name severity estimators are matched against; a preset's family is its class's.

Registered with the plugin manager through `flash_register_operators` (this module is a builtin
plugin): operator classes and presets are both factories returning an operator. The paper's
learned bkse blur (``"kernel-wizard"``) is third-party model code: the adapter plugin
`flash_plugin.adapters.kernel_wizard` registers it.
"""

import warnings
from typing import Any

from flash_plugin.markers import hookimpl
from flash_plugin.operators.base import (
    BaseLinearOperator,
    BaseOperator,
    GeneratorLike,
    ImageRangeWarning,
    adjointness_error,
    check_image_range,
    check_severity,
)
from flash_plugin.operators.gaussian_blur import GaussianBlur
from flash_plugin.operators.inpainting import RandomInpainting
from flash_plugin.operators.noise import GaussianNoise
from flash_plugin.operators.nonlinear_blur import NonlinearBlur
from flash_plugin.operators.presets import PRESETS, TaskPreset, get_preset

OPERATOR_CLASSES = {
    "gaussian-blur": GaussianBlur,
    "inpainting": RandomInpainting,
    "motion-blur": NonlinearBlur,
    "gaussian-noise": GaussianNoise,
}

__all__ = [
    "BaseLinearOperator",
    "BaseOperator",
    "GaussianBlur",
    "GaussianNoise",
    "GeneratorLike",
    "ImageRangeWarning",
    "NonlinearBlur",
    "OPERATOR_CLASSES",
    "PRESETS",
    "RandomInpainting",
    "TaskPreset",
    "adjointness_error",
    "check_image_range",
    "check_severity",
    "flash_register_operators",
    "get_preset",
]


@hookimpl
def flash_register_operators(register):
    """Register the built-in operator families (classes) and the paper's task presets."""
    for name, cls in OPERATOR_CLASSES.items():
        register(name, cls)
    for name, preset in PRESETS.items():
        register(name, preset)


_MOVED = ("KernelWizard", "KernelWizardBlur", "KernelWizardConfig", "convert_bkse_checkpoint")


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(f"flash_plugin.operators.{name} is deprecated: import it from flash_plugin.adapters.kernel_wizard",
                      DeprecationWarning, stacklevel=2)
        from flash_plugin.adapters import kernel_wizard

        return getattr(kernel_wizard, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
