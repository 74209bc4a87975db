"""Per-sample random numbers: a batch gives the same draws as its samples drawn one by one.

``generator`` may be ``None`` (torch's global RNG), one `torch.Generator` for the whole batch, or a
sequence of generators, one per sample. Only the last form makes a batch bit-identical to its
samples drawn alone; a single generator is reproducible for a fixed batch. Draws happen on the
generator's device and are then moved, so CPU generators give the same numbers on any device.
This module is the one home of these rules: the solvers, `flash()` and the operators all draw here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch

from flash_plugin.errors import FlashInputError

GeneratorLike = torch.Generator | Sequence[torch.Generator] | None


def per_sample_generators(generator: GeneratorLike, batch_size: int) -> list[torch.Generator] | None:
    """One generator per sample, or ``None`` when the batch is drawn in one go (one or the global generator)."""
    if generator is None or isinstance(generator, torch.Generator):
        return None
    gens = list(generator)
    if len(gens) != batch_size:
        raise FlashInputError(
            f"generator: got {len(gens)} generators for a batch of {batch_size} samples; pass one per sample or a single one"
        )
    if not all(isinstance(g, torch.Generator) for g in gens):
        raise FlashInputError("generator must be a torch.Generator, a sequence of them (one per sample) or None")
    return gens


def check_generators(generator: GeneratorLike, batch_size: int) -> None:
    """Refuse a sequence of generators that is not one per sample (`FlashInputError`)."""
    per_sample_generators(generator, batch_size)


def subset_generators(generator: GeneratorLike, index: torch.Tensor) -> GeneratorLike:
    """The generators of the samples in ``index`` (a single/global generator is shared)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    gens = list(generator)
    return [gens[i] for i in index.tolist()]


def _draw(fn: Callable[..., torch.Tensor], shape: Sequence[int], generator: GeneratorLike, draw_dtype: torch.dtype,
          default_device: torch.device | str | None) -> torch.Tensor:
    """``fn(shape)`` in ``draw_dtype`` on the generator's device; per sample for a sequence of generators."""
    shape = tuple(int(s) for s in shape)
    gens = per_sample_generators(generator, shape[0])
    if gens is None:
        device = generator.device if isinstance(generator, torch.Generator) else default_device
        return fn(shape, generator=generator, device=device, dtype=draw_dtype)
    if not gens:
        return torch.empty(shape, device=default_device, dtype=draw_dtype)
    draws = [fn((1, *shape[1:]), generator=g, device=g.device, dtype=draw_dtype) for g in gens]
    return torch.cat([d.to(draws[0].device) for d in draws])


def randn_per_sample(
    shape: Sequence[int],
    generator: GeneratorLike,
    *,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal tensor of ``shape`` (first dim = batch) on ``device`` in ``dtype``, drawn in
    float32 (the global RNG: on the CPU), so a solve gives the same noise in every dtype and on every device."""
    out = _draw(torch.randn, shape, generator, torch.float32, "cpu")
    return out.to(device=device, dtype=dtype)


def randn(generator: GeneratorLike, batch_size: int, shape: Sequence[int], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Standard normal draws of shape ``(batch_size, *shape)``, in ``dtype`` on the generator's device
    (the operators' parameters and measurement noise)."""
    return _draw(torch.randn, (batch_size, *shape), generator, dtype, None)


def rand(generator: GeneratorLike, batch_size: int, shape: Sequence[int], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Uniform ``[0, 1)`` draws of shape ``(batch_size, *shape)``, in ``dtype`` on the generator's device."""
    return _draw(torch.rand, (batch_size, *shape), generator, dtype, None)


def stream_seed(seed: int, stream: str, index: int) -> int:
    """A 63-bit seed for ``(seed, stream, index)`` (independent streams for training steps,
    validation chunks, evaluation, ...)."""
    digest = hashlib.blake2b(f"{seed}/{stream}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def stream_generator(seed: int, stream: str, index: int) -> torch.Generator:
    """A CPU generator seeded with `stream_seed`."""
    return torch.Generator().manual_seed(stream_seed(seed, stream, index))
