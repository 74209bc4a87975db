"""Deprecated: the bkse blur moved to `flash_plugin.adapters.kernel_wizard` (third-party model code, an adapter plugin)."""

import warnings

warnings.warn(
    "flash_plugin.operators.kernel_wizard is deprecated: import from flash_plugin.adapters.kernel_wizard",
    DeprecationWarning,
    stacklevel=2,
)

from flash_plugin.adapters.kernel_wizard import *  # noqa: E402,F401,F403
from flash_plugin.adapters.kernel_wizard import __all__  # noqa: E402,F401
