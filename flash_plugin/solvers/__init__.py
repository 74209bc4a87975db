"""Reference solvers, one module per paper, all on the shared loop of `base`.

Built-in plugin: `flash_register_solvers` registers ``"sampler"``, ``"latent-dps"``,
``"gml-dps"``, ``"psld"`` and ``"resample"`` (the classes themselves are the factories);
`OriginalReSample`, the ReSample authors' version, is not registered (see docs/solvers.md).
"""

from flash_plugin.markers import hookimpl
from flash_plugin.solvers.base import ReverseDiffusionSolver, Sampler, StepContext, train_timesteps
from flash_plugin.solvers.gml_dps import GMLDPS
from flash_plugin.solvers.hparams import (
    PAPER_HPARAMS,
    SOLVERS,
    TASKS,
    TUNED_HPARAMS,
    SolverHparams,
    get_hparams,
    make_solver,
)
from flash_plugin.solvers.latent_dps import LatentDPS
from flash_plugin.solvers.psld import PSLD
from flash_plugin.solvers.resample import OriginalReSample, ReSample

__all__ = [
    "ReverseDiffusionSolver",
    "Sampler",
    "StepContext",
    "train_timesteps",
    "LatentDPS",
    "GMLDPS",
    "PSLD",
    "ReSample",
    "OriginalReSample",
    "SolverHparams",
    "PAPER_HPARAMS",
    "TUNED_HPARAMS",
    "TASKS",
    "SOLVERS",
    "get_hparams",
    "make_solver",
    "flash_register_solvers",
]


@hookimpl
def flash_register_solvers(register):
    """Register the reference solvers under their names (see `SOLVERS`)."""
    for name, cls in SOLVERS.items():
        register(name, cls)
