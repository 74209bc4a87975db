"""Exceptions raised by flash-plugin. Every error a user can trigger has its own class."""

from __future__ import annotations


class FlashError(Exception):
    """Base class of all flash-plugin errors."""


class FlashInputError(FlashError, ValueError):
    """An argument has the wrong shape, dtype, device, range or contains NaN/Inf."""


class StartStepError(FlashInputError):
    """A start step lies outside ``0..N`` for the solver's schedule."""


class SeverityError(FlashInputError):
    """An estimated severity ``σ̂²`` is NaN, infinite or not positive."""


class AlreadyFlashedError(FlashError, TypeError):
    """``flash()`` was given a solver that is already a `FlashSolver`."""


class NotAdaptableError(FlashError, TypeError):
    """No plugin could adapt an object to the requested protocol."""


class UnknownPluginNameError(FlashError, KeyError):
    """A solver/operator/estimator/model name is not registered by any plugin."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class DuplicateNameError(FlashError, ValueError):
    """Two plugins registered the same name in the same registry."""


class CheckpointError(FlashError, ValueError):
    """A checkpoint is missing, truncated, has unknown config fields, or does not match the model."""


class LatentSpaceMismatchError(CheckpointError):
    """A severity encoder was trained for a different autoencoder (latent space) than the solver's."""


class OperatorFamilyMismatchError(FlashInputError):
    """A severity estimator's metadata names another operator family than the operator's."""


class OperatorCapabilityError(FlashError, TypeError):
    """A solver needs an operator capability (e.g. an adjoint) that the operator lacks."""
