"""Reference solvers, one module per paper, all on the shared loop of `base`."""

from flash_plugin.solvers.base import ReverseDiffusionSolver, Sampler, StepContext, train_timesteps

__all__ = ["ReverseDiffusionSolver", "Sampler", "StepContext", "train_timesteps"]
