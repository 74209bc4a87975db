"""flash-plugin: sample-adaptive reconstruction with diffusion models.

    from flash_plugin import flash
    solver = flash(existing_solver, estimator=encoder)
    solution = solver(y, operator, generator=torch.Generator().manual_seed(0))

Public API only; see docs/architecture.md and the README for the rest.
"""

from flash_plugin.flash import FlashConfig, FlashSolver, flash
from flash_plugin.markers import hookimpl
from flash_plugin.schedule import StartPolicy
from flash_plugin.types import NoiseSchedule, SeverityEstimate, Solution, StartPoint
from flash_plugin.utils.random import GeneratorLike, randn_per_sample

__all__ = [
    "FlashConfig",
    "FlashSolver",
    "GeneratorLike",
    "NoiseSchedule",
    "SeverityEstimate",
    "Solution",
    "StartPoint",
    "StartPolicy",
    "flash",
    "hookimpl",
    "randn_per_sample",
]
__version__ = "0.1.0"
