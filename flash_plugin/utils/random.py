"""Per-sample random numbers: a batch gives the same draws as its samples drawn one by one.

``generator`` may be ``None`` (torch's global RNG), one `torch.Generator` for the whole batch, or a
sequence of generators, one per sample. Only the last form makes a batch bit-identical to its
samples solved alone; a single generator is reproducible for a fixed batch. Draws happen on the
generator's device and are then moved, so CPU generators give the same numbers on any device.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from flash_plugin.errors import FlashInputError

GeneratorLike = torch.Generator | Sequence[torch.Generator] | None


def check_generators(generator: GeneratorLike, batch_size: int) -> None:
    if isinstance(generator, (list, tuple)) and len(generator) != batch_size:
        raise FlashInputError(f"got {len(generator)} generators for a batch of {batch_size}; pass one per sample or a single one")


def subset_generators(generator: GeneratorLike, index: torch.Tensor) -> GeneratorLike:
    """The generators of the samples in ``index`` (a single/global generator is shared)."""
    if isinstance(generator, (list, tuple)):
        return [generator[i] for i in index.tolist()]
    return generator


def randn_per_sample(
    shape: Sequence[int],
    generator: GeneratorLike,
    *,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal tensor of ``shape`` (first dim = batch)."""
    shape = tuple(shape)
    if isinstance(generator, (list, tuple)):
        check_generators(generator, shape[0])
        if shape[0] == 0:
            return torch.empty(shape, device=device, dtype=dtype)
        parts = [torch.randn(shape[1:], generator=g, device=g.device, dtype=torch.float32) for g in generator]
        return torch.stack(parts).to(device=device, dtype=dtype)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device=device, dtype=dtype)


def stream_seed(seed: int, stream: str, index: int) -> int:
    """A 63-bit seed for ``(seed, stream, index)`` (independent streams for training steps,
    validation chunks, evaluation, ...)."""
    digest = hashlib.blake2b(f"{seed}/{stream}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def stream_generator(seed: int, stream: str, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, stream, index))
