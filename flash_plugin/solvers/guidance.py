"""What the guided reference solvers share: weight checks, per-sample norms and cost counters.

Every guidance term is a norm *per sample* (never one norm over the batch), so samples never
interact; the counters record, per sample, the decoder/encoder calls and inner iterations a solve
made, reported in ``Solution.extras`` (docs/architecture.md, "Conventions").
"""

from __future__ import annotations

from typing import Any

import torch

from flash_plugin.solvers.base import ReverseDiffusionSolver
from flash_plugin.utils.validation import check_nonnegative


def check_weight(name: str, value: float) -> float:
    """A guidance weight / step size: a finite number ``>= 0``."""
    return check_nonnegative(name, value)


def per_sample_norm(r: torch.Tensor) -> torch.Tensor:
    """``‖r_i‖₂`` for every sample ``i`` (``[B]``); never a batch-wide norm."""
    return r.flatten(1).norm(dim=1)


def add_count(state: dict, index: torch.Tensor, key: str, n: int | torch.Tensor = 1) -> None:
    """Add ``n`` (int or LongTensor ``[len(index)]``) to the per-sample counter ``state[key]`` at
    the batch positions ``index``. The counter grows as samples join; `pad_counts` sizes it to the batch."""
    if len(index) == 0:
        return
    need = int(index.max().item()) + 1
    c = state.get(key)
    if c is None:
        c = torch.zeros(need, dtype=torch.long, device=index.device)
    elif len(c) < need:
        c = torch.cat([c, c.new_zeros(need - len(c))])
    c[index] += n if isinstance(n, int) else n.to(device=c.device, dtype=torch.long)
    state[key] = c


def pad_counts(state: dict, batch_size: int, device: torch.device, keys: tuple[str, ...]) -> None:
    """Make every counter in ``keys`` a LongTensor ``[batch_size]`` (zeros for samples that never ran)."""
    for key in keys:
        c = state.get(key)
        if c is None:
            c = torch.zeros(batch_size, dtype=torch.long, device=device)
        elif len(c) < batch_size:
            c = torch.cat([c, c.new_zeros(batch_size - len(c))])
        state[key] = c.to(device)


class CountingSolver(ReverseDiffusionSolver):
    """A `ReverseDiffusionSolver` that reports per-sample decoder/encoder calls in ``Solution.extras``."""

    count_keys: tuple[str, ...] = ("count_decoder_calls", "count_encoder_calls")

    def finish(self, z: torch.Tensor, y: torch.Tensor, operator: Any, state: dict) -> torch.Tensor:
        pad_counts(state, z.shape[0], z.device, self.count_keys)
        return z
