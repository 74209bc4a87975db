"""Restricting a batch's per-sample operator to some of its samples.

Used by `flash()` (groups of equal start step) and by the solvers (samples active at a step, or
still iterating in an inner optimisation); generic over any operator with ``select(index)``.
"""

from __future__ import annotations

from typing import Any

import torch

from flash_plugin.errors import OperatorCapabilityError


def select_operator(operator: Any, index: torch.Tensor, batch_size: int) -> Any:
    """The operator restricted to the samples in ``index`` (the operator itself if all are kept)."""
    if operator is None or (len(index) == batch_size and torch.equal(index.cpu(), torch.arange(batch_size))):
        return operator
    select = getattr(type(operator), "select", None)
    if select is None:
        raise OperatorCapabilityError(
            f"{type(operator).__name__} has no select(index): a batch whose samples start at different steps "
            "needs per-sample operators. Give the operator a select(index) method or solve samples with equal starts together."
        )
    return operator.select(index)
