"""Sharding a batched run across processes started by ``torchrun``.

``torchrun --nproc_per_node=P -m flash_plugin.cli bench ...`` starts ``P`` copies of a command;
`Shard.from_env` joins them into one process group (gloo on CPU, nccl on CUDA) and gives each
its rank. A run's batches are cut exactly as in a single process and dealt out round by round:
in round ``r`` the process of rank ``p`` solves batch ``r·P + p``. Every batch keeps its own
seeds, so the merged result equals the single-process result image for image. After each round
the processes exchange their results (`Shard.gather`), so the first process can write the whole
state and a stopped run resumes from it. Without ``torchrun`` (no ``WORLD_SIZE`` in the
environment) a `Shard` is the whole run and nothing is initialised.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def is_main_process() -> bool:
    """Whether this process reports: always without ``torchrun``, else only rank 0."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class Shard:
    """This process's place in the run: ``rank`` of ``world`` processes, on ``device``."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"
    _group: bool = False

    @classmethod
    def from_env(cls, device: str = "cpu") -> Shard:
        """The shard ``torchrun`` describes in ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``, or the
        whole run. ``device="cuda"`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(device=device)
        import torch.distributed as dist

        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        if device == "cuda":
            device = f"cuda:{local}"
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if not dist.is_initialized():
            if backend == "nccl":
                torch.cuda.set_device(device)
            dist.init_process_group(backend)
        return cls(rank, world, device, True)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rounds(self, items: Sequence[T]) -> Iterator[T | None]:
        """This process's item of each round (``None`` when the last round has none for it);
        every process sees the same number of rounds, so collective calls stay in step."""
        for start in range(0, len(items), self.world):
            i = start + self.rank
            yield items[i] if i < len(items) else None

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` in rank order (tensors inside travel on the CPU)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """Leave the process group (a no-op for a single process)."""
        if self._group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._group = False
