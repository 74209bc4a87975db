"""The pieces every training loop here shares: seeded batches, resumable state, JSONL log, progress, DDP.

A step's data is a function of ``(seed, step)`` alone: `SeededBatches` draws the indices from
one permutation per pass over the data, seeded by the pass, and `step_generator` gives the step's
random draws. A run resumed from its last checkpoint therefore sees the batches of an
uninterrupted run and ends with the same weights. `TrainingRun` holds a run's files (the state in
safetensors with JSON metadata, written atomically, and the JSONL log, cut back to the checkpoint
on resume); `Distributed` wraps ``torch.distributed`` for runs launched by ``torchrun``, where
every rank builds the same global batch, trains on its own slice and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from flash_plugin.errors import FlashInputError
from flash_plugin.utils.checkpoint import atomic_write_bytes, load_training_state, save_training_state
from flash_plugin.utils.random import stream_seed

STATE_NAME = "state.safetensors"
LOG_NAME = "log.jsonl"

__all__ = [
    "Distributed",
    "JsonlLog",
    "SeededBatches",
    "TimeBudget",
    "TrainingRun",
    "changed_fields",
    "distributed",
    "finite_or_none",
    "frozen",
    "progress_bar",
    "setup_distributed",
    "step_generator",
]


# ----------------------------------------------------------------------------------------------
# Seeded data
# ----------------------------------------------------------------------------------------------
def step_generator(seed: int, stream: str, step: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded by ``(seed, stream, step)``: the random draws of one step."""
    return torch.Generator(device=device).manual_seed(stream_seed(seed, stream, step))


class SeededBatches:
    """Batch indices per step, a function of ``(seed, step)``.

    The data are read in passes, each a permutation of ``range(n)`` seeded by the pass index
    (``permutation_seed(p)``, by default ``stream_seed(seed, "perm", p)``). With ``drop_last``
    a pass holds ``n // batch_size`` whole batches and the rest of the permutation is skipped;
    without it the passes form one stream and a batch may straddle two of them.
    """

    def __init__(self, n: int, batch_size: int, seed: int, *, drop_last: bool = False,
                 permutation_seed: Callable[[int], int] | None = None):
        if n < 1:
            raise FlashInputError("no training images")
        if batch_size < 1 or (drop_last and n < batch_size):
            raise FlashInputError(f"cannot draw whole batches of {batch_size} from {n} images")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.span = (n // batch_size) * batch_size if drop_last else n  # positions read per pass
        self._seed_of = permutation_seed or (lambda p: stream_seed(seed, "perm", p))
        self._cache: dict[int, torch.Tensor] = {}

    @property
    def steps_per_pass(self) -> int:
        return max(1, self.span // self.batch_size)

    def permutation(self, p: int) -> torch.Tensor:
        if p not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            self._cache[p] = torch.randperm(self.n, generator=torch.Generator().manual_seed(self._seed_of(p)))
        return self._cache[p]

    def indices(self, step: int) -> torch.Tensor:
        pos = step * self.batch_size + torch.arange(self.batch_size)
        passes, within = pos // self.span, pos % self.span
        out = torch.empty(self.batch_size, dtype=torch.long)
        for p in torch.unique(passes).tolist():
            sel = passes == p
            out[sel] = self.permutation(int(p))[within[sel]]
        return out


# ----------------------------------------------------------------------------------------------
# Log, progress, clock
# ----------------------------------------------------------------------------------------------
def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


class JsonlLog:
    """One strict-JSON record per line; ``enabled=False`` (a DDP rank other than 0) writes nothing."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def append(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(finite_or_none(record)) + "\n")

    def clear(self) -> None:
        if self.enabled and self.path.exists():
            self.path.unlink()

    def truncate(self, step: int) -> None:
        """Keep the records up to ``step``: a killed run may have logged steps past its checkpoint."""
        if not (self.enabled and self.path.exists()):
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a half-written last line
            if rec.get("step", 0) <= step:
                keep.append(line)
        atomic_write_bytes(self.path, ("\n".join(keep) + "\n" if keep else "").encode())

    def read(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kwargs) -> None: ...
    def close(self) -> None: ...


def progress_bar(total: int, desc: str, *, enabled: bool = True, initial: int = 0, mininterval: float = 2.0):
    """A tqdm bar on stderr over ``total`` steps, starting at ``initial`` (a resumed run); a no-op
    object when disabled or without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return _NoBar()
    if not enabled:
        return _NoBar()
    return tqdm(total=total, initial=initial, desc=desc, mininterval=mininterval, file=sys.stderr, dynamic_ncols=True)


class TimeBudget:
    """Wall time of this call, and whether it exceeds ``minutes`` (``None``: never). Under DDP rank
    0 decides and broadcasts, so that every rank stops at the same step."""

    def __init__(self, minutes: float | None, dist: Distributed | None = None):
        self.limit_s = None if minutes is None else minutes * 60.0
        self.dist = dist or Distributed()
        self.t0 = time.time()

    @property
    def elapsed_s(self) -> float:
        return time.time() - self.t0

    def exceeded(self, device: torch.device | str = "cpu") -> bool:
        if self.limit_s is None:
            return False
        return self.dist.rank0_flag(self.elapsed_s > self.limit_s, device)


# ----------------------------------------------------------------------------------------------
# Resumable state
# ----------------------------------------------------------------------------------------------
def changed_fields(old: dict[str, Any], new: dict[str, Any], fields) -> list[str]:
    """The ``fields`` recorded in ``old`` whose value differs in ``new`` (a resume must not change them)."""
    return [k for k in fields if k in old and old[k] != new.get(k)]


class TrainingRun:
    """The files of a training run in ``out_dir``: ``state.safetensors`` (model, optimizer, optional
    EMA, step and JSON metadata; `flash_plugin.utils.checkpoint`, atomic) and ``log.jsonl``.

    Under DDP (``dist``) only rank 0 writes, and `save` waits for every rank.
    """

    def __init__(self, out_dir: str | os.PathLike, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 ema: torch.nn.Module | None = None, dist: Distributed | None = None):
        self.out = Path(out_dir)
        self.model, self.optimizer, self.ema = model, optimizer, ema
        self.dist = dist or Distributed()
        self.state_path = self.out / STATE_NAME
        self.log = JsonlLog(self.out / LOG_NAME, enabled=self.dist.is_main)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)

    def has_state(self) -> bool:
        return self.state_path.exists()

    def resume(self, check: Callable[[dict[str, Any]], None] | None = None) -> tuple[int, dict[str, Any]]:
        """Load the state in place, let ``check(meta)`` refuse it (by raising), then cut the log
        back to the state's step. Returns ``(step, meta)``."""
        step, _, meta = load_training_state(self.state_path, model=self.model, optimizer=self.optimizer, ema=self.ema)
        if check is not None:
            check(meta)
        self.log.truncate(step)
        return step, meta

    def save(self, step: int, meta: dict[str, Any] | None = None) -> None:
        if self.dist.is_main:
            save_training_state(self.state_path, model=self.model, optimizer=self.optimizer, step=step, ema=self.ema, meta=meta)
        self.dist.barrier()


@contextlib.contextmanager
def frozen(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``requires_grad=False`` on every parameter of ``module`` for the block (restored after), so
    that backward never writes ``.grad`` into a model that is not trained."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, f in flags:
            p.requires_grad_(f)


# ----------------------------------------------------------------------------------------------
# DDP
# ----------------------------------------------------------------------------------------------
@dataclass
class Distributed:
    """This process's place in a ``torch.distributed`` run (world size 1: a plain single process)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    created_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def rank0_flag(self, flag: bool, device: torch.device | str = "cpu") -> bool:
        """Rank 0's ``flag``, broadcast to every rank."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        torch.distributed.broadcast(t, src=0)
        return bool(t.item() > 0)

    def shard(self, batch_size: int) -> slice:
        """This rank's contiguous slice of a global batch of ``batch_size``."""
        if batch_size % self.world_size:
            raise FlashInputError(f"batch_size {batch_size} must be divisible by the number of processes {self.world_size}")
        local = batch_size // self.world_size
        return slice(self.rank * local, (self.rank + 1) * local)

    def wrap(self, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """``module`` in `DistributedDataParallel` (gradients averaged over the ranks), or as it is."""
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def setup_distributed(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), or
    one already initialised: ``gloo`` on CPU, ``nccl`` on CUDA with the device ``cuda:LOCAL_RANK``.
    Without either, a single process on ``device``."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or "RANK" not in os.environ:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
            return Distributed(), device
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        created = True
    return Distributed(dist.get_world_size(), dist.get_rank(), local_rank, created), device


@contextlib.contextmanager
def distributed(device: str | torch.device) -> Iterator[tuple[Distributed, torch.device]]:
    """`setup_distributed` for the block; a process group it created is destroyed after it."""
    dist, dev = setup_distributed(torch.device(device))
    try:
        yield dist, dev
    finally:
        if dist.created_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
