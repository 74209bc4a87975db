"""Training of a `SeverityEncoder`: loss, deterministic data, checkpoints, resume, DDP.

Loss (docs/architecture.md, "Severity encoder"), per sample ``i``, averaged over the batch::

    L_i = mean_k (ẑ_ik − z0_ik)²                          latent MSE (per element)
        + λσ · V(σ̄²_i, σ̂²_i)                              variance term
        + λimg · mean_j (D(ẑ_i)_j − x_ij)²                 image MSE through the frozen decoder

``z0 = model.encode(x)`` (no grad), ``D = model.decode`` (frozen weights, gradient w.r.t. ``ẑ``
only), ``σ̄²_i`` = the unbiased variance of the latent error ``ẑ_i − z0_i`` over its dimensions.
The image term is a *per-sample* mean (the official code summed it over the batch, which made its
weight grow with the per-GPU batch size).

The variance term ``V`` (option ``variance_loss``):

* ``"log"`` (default): ``(log σ̂² − log σ̄²)²``. Scale-free: the term and its gradient w.r.t.
  the head's log-variance output do not depend on how small the latent errors are, so the head
  learns whether σ̄² is 1e-3 or 1. Its minimiser is ``exp E[log σ̄² | y]``, the geometric mean,
  which is below the arithmetic ``E[σ̄² | y]`` by a factor ≈ ``exp(−Var[log σ̄² | y] / 2)``
  (≈ 1 % for the spread measured on the bundled model; the calibration slope in
  `flash_plugin.severity.evaluate` measures it).
* ``"relative"``: ``((σ̄² − σ̂²) / σ̄²_ref)²`` with ``σ̄²_ref`` the mean error variance of the
  *initial* encoder on the first validation batch (a constant, stored in the checkpoint). Same
  minimiser as the official term (the conditional mean), rescaled so that it is O(1).
* ``"official"``: ``(σ̄² − σ̂²)²``, the paper's code. On unit-variance latents with small
  errors it is ≈ 1e-5 next to the latent MSE and the head barely learns (prototype: Spearman
  0.04); kept for comparison.

``detach_target_variance`` (default ``True``): stop-gradient on ``σ̄²``, so the variance term
trains only the head (and, through the shared trunk, the features it reads) and never pushes the
mean branch to make its error *match* the prediction. The official code has no stop-gradient
(``False`` reproduces it).

``detach_head_features`` (default ``False``): the head reads the encoder's mid-block features
without back-propagating into the shared trunk.

Optimiser: Adam, lr 1e-4 (``head_lr`` optionally separate), no weight decay, constant learning
rate, λσ = λimg = 1 (the official shipped script).

Measured (bundled ``fashion-mnist-32``, ``gblur-varying``, σ_y = 0.1; batch 16, ≈740 steps ≈ 12 min
on 2 busy CPU cores; best-by-validation encoder; 256 test images, 100 x 10 for the ordering)::

    run                              Spearman(σ̂²,t)  Spearman(σ̂²,σ̄²)  ordering  log-Pearson  slope  latent MSE  PSNR D(ẑ)
    default (log, λσ=1)                  0.901          0.830          0.986      0.851      1.00     0.079     20.00 dB
    head_lr 1e-3                         0.905          0.799          0.988      0.809      1.04     0.081     19.72 dB
    log, λσ=0.1                          0.885          0.757          0.992      0.768      1.17     0.067     20.64 dB
    log, detach_head_features            0.850          0.751          0.985      0.760      1.06     0.073     20.24 dB
    official (σ̄²−σ̂²)², λσ=1              0.883          0.746          0.991      0.750      1.11     0.067     20.61 dB

(untrained encoder: latent MSE 0.23, σ̂² constant). The log term with λσ = 1 gives the best σ̂²
(ranking and calibration) but its gradient through the shared trunk costs ẑ ≈ 0.6 dB; λσ = 0.1
keeps ẑ as good as the official loss with a slightly better ranking. Single short runs: differences
of ±0.02 in a correlation are within run-to-run noise. With this head (exp, mid-block features)
the official term did not collapse here (σ̄² ≈ 0.08 on these unit-variance latents, so the term is
≈ 1e-3, not the prototype's 1e-5).

Data and randomness. Per training step ``s`` one global batch of ``batch_size`` images is drawn
from a permutation that depends only on ``(seed, pass over the data)``; its severities
``t ~ U(0, 1)`` (one per sample), the operator's random parameters and the measurement noise
come from a CPU generator seeded with ``(seed, s)``. So a resumed run sees exactly the batches
of an uninterrupted one, and under DDP every rank builds the same global batch and trains on its
own contiguous slice (the result equals a single-process run up to float summation order).
Validation uses fixed images, fixed severities and fixed noise (seeded independently of the step).

Checkpoints (``out_dir``): ``state.safetensors`` (weights, Adam state, step, early-stopping state;
written atomically after every epoch and when stopping), ``encoder/`` (the best encoder so far by
validation loss, `SeverityEncoder.save_pretrained`), ``log.jsonl`` (one JSON record per logged
step and per epoch), ``train_config.json``. ``resume=True`` continues from ``state.safetensors``;
without it an existing state is refused rather than overwritten.

DDP. Launched by ``torchrun`` (``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` in the environment) the
loop initialises the process group (``gloo`` on CPU, ``nccl`` on CUDA, device ``cuda:LOCAL_RANK``),
wraps the encoder in `DistributedDataParallel` and only rank 0 writes files. ``batch_size`` is the
global batch and must be divisible by the world size. Every rank runs the (small) validation on
the whole validation set, so all ranks take the same early-stopping decision; the time budget is
decided by rank 0 and broadcast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from flash_plugin.errors import CheckpointError, FlashInputError
from flash_plugin.utils.random import stream_generator, stream_seed  # noqa: F401  (re-exported)
from flash_plugin.severity.encoder import SeverityEncoder

STATE_NAME = "state.safetensors"
LOG_NAME = "log.jsonl"
ENCODER_DIR = "encoder"
VARIANCE_LOSSES = ("log", "relative", "official")
_LOG_FLOOR = 1e-10  # σ̄² floor inside the log (an exactly zero error, e.g. t = 0 without noise)


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Hyperparameters and run control of `train_severity_encoder` (all JSON-serialisable).

    ``batch_size`` is the global batch (over all DDP ranks). ``steps_per_epoch=None`` means one
    pass over the training images. ``max_minutes`` limits the wall time of *this call* (a resumed
    run gets a fresh budget); ``max_steps`` stops at that global step. ``patience`` epochs without
    a lower validation loss stop early (``None``/0: never). ``init_variance="auto"`` starts the
    head at the measured mean error variance of the initial encoder.
    """

    epochs: int = 100
    steps_per_epoch: int | None = None
    batch_size: int = 32
    lr: float = 1e-4
    head_lr: float | None = None
    weight_decay: float = 0.0
    lambda_sigma: float = 1.0
    lambda_img: float = 1.0
    variance_loss: str = "log"
    detach_target_variance: bool = True
    detach_head_features: bool = False
    grad_clip: float | None = None
    head_channels: int = 64
    init_variance: float | str = "auto"
    seed: int = 0
    val_batch_size: int = 64
    patience: int | None = 10
    max_minutes: float | None = None
    max_steps: int | None = None
    device: str = "cpu"
    progress: bool = True
    log_every: int = 50

    # fields that determine the trajectory: a resume must not change them
    _TRAJECTORY = ("steps_per_epoch", "batch_size", "lr", "head_lr", "weight_decay", "lambda_sigma", "lambda_img", "variance_loss",
                   "detach_target_variance", "detach_head_features", "grad_clip", "head_channels", "init_variance", "seed", "val_batch_size")

    def __post_init__(self) -> None:
        if self.variance_loss not in VARIANCE_LOSSES:
            raise FlashInputError(f"variance_loss must be one of {VARIANCE_LOSSES}, got {self.variance_loss!r}")
        for name in ("epochs", "batch_size", "val_batch_size", "head_channels", "log_every"):
            if int(getattr(self, name)) < 1:
                raise FlashInputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise FlashInputError(f"steps_per_epoch must be >= 1 or None, got {self.steps_per_epoch}")
        if self.head_lr is not None and not self.head_lr > 0:
            raise FlashInputError(f"head_lr must be > 0 or None, got {self.head_lr}")
        if not (self.lr > 0 and self.lambda_sigma >= 0 and self.lambda_img >= 0 and self.weight_decay >= 0):
            raise FlashInputError("need lr > 0 and lambda_sigma, lambda_img, weight_decay >= 0")
        if self.init_variance != "auto" and not (isinstance(self.init_variance, (int, float)) and self.init_variance > 0):
            raise FlashInputError(f"init_variance must be 'auto' or a positive number, got {self.init_variance!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise FlashInputError(f"max_minutes must be > 0 or None, got {self.max_minutes}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LossTerms:
    """Per-sample loss terms ``[B]`` (``total`` is what is averaged and minimised)."""

    total: torch.Tensor
    latent_mse: torch.Tensor
    variance: torch.Tensor
    image: torch.Tensor
    target_variance: torch.Tensor  # σ̄² (not detached unless detach_target_variance)
    predicted_variance: torch.Tensor  # σ̂²


@dataclass(frozen=True)
class TrainResult:
    """What `train_severity_encoder` returns: the best encoder (by validation loss) and run facts."""

    encoder: SeverityEncoder
    step: int
    epochs_completed: int
    stop_reason: str  # "epochs" | "early_stop" | "time_budget" | "max_steps"
    best_val_loss: float | None
    out_dir: Path
    history: list[dict] = field(default_factory=list)  # the per-epoch validation records


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------
def severity_loss(
    z_hat: torch.Tensor,
    var_hat: torch.Tensor,
    z0: torch.Tensor,
    *,
    x: torch.Tensor | None = None,
    x_hat: torch.Tensor | None = None,
    lambda_sigma: float = 1.0,
    lambda_img: float = 1.0,
    variance_loss: str = "log",
    detach_target_variance: bool = True,
    variance_reference: float | None = None,
) -> LossTerms:
    """Per-sample severity-encoder loss (module docstring). ``x_hat = D(ẑ)`` and ``x`` are needed
    when ``lambda_img > 0``; ``variance_reference`` when ``variance_loss == "relative"``."""
    if variance_loss not in VARIANCE_LOSSES:
        raise FlashInputError(f"variance_loss must be one of {VARIANCE_LOSSES}, got {variance_loss!r}")
    err = (z_hat - z0).flatten(1)
    if err.shape[1] < 2:
        raise FlashInputError("the latent needs at least 2 dimensions for an unbiased error variance")
    latent_mse = err.square().mean(dim=1)
    target = err.var(dim=1, unbiased=True)
    tgt = target.detach() if detach_target_variance else target
    if variance_loss == "log":
        var_term = (torch.log(var_hat) - torch.log(tgt + _LOG_FLOOR)).square()
    elif variance_loss == "relative":
        if not variance_reference or variance_reference <= 0:
            raise FlashInputError("variance_loss='relative' needs a positive variance_reference")
        var_term = ((tgt - var_hat) / variance_reference).square()
    else:
        var_term = (tgt - var_hat).square()
    total = latent_mse + lambda_sigma * var_term
    if lambda_img > 0:
        if x is None or x_hat is None:
            raise FlashInputError("lambda_img > 0 needs x and x_hat = D(ẑ)")
        image = (x_hat - x).flatten(1).square().mean(dim=1)
        total = total + lambda_img * image
    else:
        image = torch.zeros_like(latent_mse)
    return LossTerms(total, latent_mse, var_term, image, target, var_hat)


def compute_losses(encoder, model, x: torch.Tensor, y: torch.Tensor, config: TrainConfig,
                   variance_reference: float | None = None, z0: torch.Tensor | None = None) -> LossTerms:
    """Forward ``y`` through ``encoder`` (a `SeverityEncoder` or its DDP wrapper) and evaluate the
    loss against ``z0 = model.encode(x)`` and ``D = model.decode``."""
    z_hat, var_hat = encoder(y, detach_head_features=True) if config.detach_head_features else encoder(y)
    if z0 is None:
        with torch.no_grad():
            z0 = model.encode(x)
    x_hat = model.decode(z_hat) if config.lambda_img > 0 else None
    return severity_loss(
        z_hat, var_hat, z0.to(z_hat.dtype), x=x, x_hat=x_hat, lambda_sigma=config.lambda_sigma, lambda_img=config.lambda_img,
        variance_loss=config.variance_loss, detach_target_variance=config.detach_target_variance,
        variance_reference=variance_reference,
    )


def make_optimizer(encoder: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam over the encoder's trainable parameters; the variance head (``head.*`` and
    ``log_variance_offset``) gets ``config.head_lr`` when set (it starts from zero, the trunk from
    the pretrained autoencoder)."""
    head, trunk = [], []
    for name, p in encoder.named_parameters():
        if p.requires_grad:
            (head if name.startswith("head.") or name == "log_variance_offset" else trunk).append(p)
    if config.head_lr is None or not head:
        return torch.optim.Adam(trunk + head, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.Adam([{"params": trunk, "lr": config.lr}, {"params": head, "lr": config.head_lr}],
                            lr=config.lr, weight_decay=config.weight_decay)


def training_step(net, model, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer, config: TrainConfig,
                  variance_reference: float | None = None) -> LossTerms:
    """One optimiser step on the batch ``(x, y)`` (the loop's step; under DDP ``net`` is the
    wrapper and the gradients are averaged over the ranks). Returns the loss terms before the step."""
    terms = compute_losses(net, model, x, y, config, variance_reference)
    optimizer.zero_grad(set_to_none=True)
    terms.total.mean().backward()
    if config.grad_clip:
        torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
    optimizer.step()
    return terms


# ----------------------------------------------------------------------------------------------
# Deterministic data (seeds per stream: `flash_plugin.utils.random.stream_seed`)
# ----------------------------------------------------------------------------------------------
def measure(family, x: torch.Tensor, t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``y = A_t(x) + n``: the family's operator at severities ``t`` (its random parameters and the
    noise drawn from ``generator``)."""
    op = family.make(t.to(device=x.device, dtype=torch.float64), generator)
    return op.measure(x, generator)


class BatchSampler:
    """Global batch indices per step: passes over the data are permutations that depend only on
    ``(seed, pass)``; a batch may straddle two passes."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < 1:
            raise FlashInputError("no training images")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._cache: dict[int, torch.Tensor] = {}

    def _perm(self, p: int) -> torch.Tensor:
        if p not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            self._cache[p] = torch.randperm(self.n, generator=stream_generator(self.seed, "perm", p))
        return self._cache[p]

    def indices(self, step: int) -> torch.Tensor:
        pos = step * self.batch_size + torch.arange(self.batch_size)
        passes, within = pos // self.n, pos % self.n
        out = torch.empty(self.batch_size, dtype=torch.long)
        for p in torch.unique(passes).tolist():
            sel = passes == p
            out[sel] = self._perm(int(p))[within[sel]]
        return out


def make_validation_set(family, images: torch.Tensor, *, seed: int, batch_size: int, device) -> dict[str, torch.Tensor]:
    """Fixed validation data: severities ``t ~ U(0,1)`` and measurements from fixed seeds
    (independent of the training step and of the world size)."""
    n = len(images)
    t = torch.rand(n, generator=stream_generator(seed, "val-t", 0), dtype=torch.float64)
    ys = []
    for c, i in enumerate(range(0, n, batch_size)):
        x = images[i : i + batch_size].to(device)
        ys.append(measure(family, x, t[i : i + batch_size], stream_generator(seed, "val", c)))
    return {"x": images, "y": torch.cat(ys).to(images.dtype).cpu(), "t": t}


# ----------------------------------------------------------------------------------------------
# Statistics (kept here so that training has no scipy dependency; evaluate.py re-exports them)
# ----------------------------------------------------------------------------------------------
def _ranks(a: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank), float64."""
    a = a.detach().double().cpu().flatten()
    order = torch.argsort(a, stable=True)
    ranks = torch.empty_like(a)
    ranks[order] = torch.arange(len(a), dtype=torch.float64)
    sorted_a = a[order]
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and sorted_a[j + 1] == sorted_a[i]:
            j += 1
        if j > i:
            ranks[order[i : j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def pearson(a, b) -> float:
    a = torch.as_tensor(a).detach().double().cpu().flatten()
    b = torch.as_tensor(b).detach().double().cpu().flatten()
    if len(a) < 2:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    den = (a.square().sum() * b.square().sum()).sqrt()
    return float((a * b).sum() / den) if den > 0 else float("nan")


def spearman(a, b) -> float:
    """Spearman rank correlation (scipy.stats.spearmanr when scipy is installed, else numpy-free
    average ranks + Pearson, which is the same definition)."""
    a = torch.as_tensor(a).detach().double().cpu().flatten()
    b = torch.as_tensor(b).detach().double().cpu().flatten()
    if len(a) < 2:
        return float("nan")
    try:
        from scipy.stats import spearmanr
    except ImportError:  # pragma: no cover - scipy is optional
        return pearson(_ranks(a), _ranks(b))
    if torch.all(a == a[0]) or torch.all(b == b[0]):
        return float("nan")
    return float(spearmanr(a.numpy(), b.numpy()).statistic)


# ----------------------------------------------------------------------------------------------
# Distributed helpers
# ----------------------------------------------------------------------------------------------
@dataclass
class _Dist:
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

    def any_flag(self, flag: bool, device) -> bool:
        """Rank 0's decision, broadcast (so that every rank stops at the same step)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        torch.distributed.broadcast(t, src=0)
        return bool(t.item() > 0)


def _setup_distributed(device: torch.device) -> tuple[_Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or "RANK" not in os.environ:
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            world = torch.distributed.get_world_size()
        else:
            return _Dist(), device
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        created = True
    return _Dist(dist.get_world_size(), dist.get_rank(), local_rank, created), device


@contextlib.contextmanager
def _frozen(module: torch.nn.Module):
    """Temporarily ``requires_grad=False`` on every parameter of ``module`` (restored after), so
    that backward never writes ``.grad`` into the user's model."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def _progress(total: int, desc: str, enabled: bool, initial: int = 0):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, mininterval=2.0, file=sys.stderr, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def validate(encoder: SeverityEncoder, model, val: dict[str, torch.Tensor], config: TrainConfig, device,
             variance_reference: float | None) -> dict[str, float]:
    """Mean loss terms over the fixed validation set, plus Spearman(σ̂², t) and Spearman(σ̂², σ̄²)."""
    was_training = encoder.training
    encoder.eval()
    sums: dict[str, float] = {"loss": 0.0, "latent_mse": 0.0, "variance_term": 0.0, "image_mse": 0.0}
    vh, vb = [], []
    n = len(val["y"])
    for i in range(0, n, config.val_batch_size):
        x = val["x"][i : i + config.val_batch_size].to(device)
        y = val["y"][i : i + config.val_batch_size].to(device)
        terms = compute_losses(encoder, model, x, y, config, variance_reference)
        sums["loss"] += terms.total.sum().item()
        sums["latent_mse"] += terms.latent_mse.sum().item()
        sums["variance_term"] += terms.variance.sum().item()
        sums["image_mse"] += terms.image.sum().item()
        vh.append(terms.predicted_variance.cpu())
        vb.append(terms.target_variance.cpu())
    encoder.train(was_training)
    out = {f"val_{k}": v / n for k, v in sums.items()}
    var_hat, var_bar = torch.cat(vh), torch.cat(vb)
    out["val_spearman_t"] = spearman(var_hat, val["t"])
    out["val_spearman_error"] = spearman(var_hat, var_bar)
    out["val_sigma_hat_mean"] = var_hat.double().mean().item()
    out["val_sigma_bar_mean"] = var_bar.double().mean().item()
    return out


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
def _family_facts(family) -> dict[str, Any]:
    rng = getattr(family, "severity_range", None)
    return {
        "operator": getattr(family, "name", type(family).__name__),
        "severity_range": list(rng) if rng is not None else None,
        "operator_kwargs": {k: v for k, v in dict(getattr(family, "family_kwargs", None) or {}).items() if k != "image_shape"},
        "noise_std": getattr(family, "noise_std", None),
    }


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def _append_log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(finite_or_none(record)) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log records up to ``step`` (a killed run may have logged steps past its checkpoint)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a half-written last line
        if rec.get("step", 0) <= step:
            keep.append(line)
    from flash_plugin.utils.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, ("\n".join(keep) + "\n" if keep else "").encode())


def train_severity_encoder(
    model,
    family,
    train_images: torch.Tensor,
    val_images: torch.Tensor,
    out_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    encoder: SeverityEncoder | None = None,
    resume: bool = False,
    training_data: Any = None,
    callback: Callable[[int, dict], None] | None = None,
) -> TrainResult:
    """Train a severity encoder for ``model``'s latent space and the operator ``family``.

    Args:
        model: a `LatentDiffusion` (or anything with ``encode``, ``decode``, ``latent_id`` and
            parameters, e.g. the analytic `GaussianOracle`). Its weights are never changed; it is
            moved to ``config.device``.
        family: an operator family (`flash_plugin.operators.presets.TaskPreset` or any object with
            ``make(t, generator) -> operator`` whose operator has ``measure(x, generator)``;
            ``name``, ``noise_std`` and ``severity_range`` are recorded when present).
        train_images, val_images: ``(N, C, H, W)`` in ``[-1, 1]`` (CPU tensors are fine).
        out_dir: checkpoints, the best encoder (``out_dir/encoder``) and the JSON log.
        config: `TrainConfig`.
        encoder: the encoder to train (default `SeverityEncoder.from_latent_diffusion(model)`); any
            module mapping ``y -> (ẑ, σ̂²)`` with ``save_pretrained`` works (the oracle tests use
            a linear one).
        resume: continue from ``out_dir/state.safetensors`` (refused if the trajectory-defining
            config fields differ); without it an existing state is an error.
        training_data: a description recorded in the encoder's metadata.
        callback: ``callback(step, record)`` on rank 0 after every optimiser step.
    """
    config = config or TrainConfig()
    out = Path(out_dir)
    device = torch.device(config.device)
    dist_info, device = _setup_distributed(device)
    state_path = out / STATE_NAME
    log_path = out / LOG_NAME
    try:
        if dist_info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            if state_path.exists() and not resume:
                raise CheckpointError(f"{state_path} exists: pass resume=True (--resume) to continue it, or use another output directory")
        dist_info.barrier()
        model = model.to(device)
        model.eval()
        if encoder is None:
            encoder = SeverityEncoder.from_latent_diffusion(model, head_channels=config.head_channels,
                                                           init_seed=stream_seed(config.seed, "init", 0))
        encoder = encoder.to(device).train()
        facts = _family_facts(family)
        if isinstance(encoder, SeverityEncoder):
            encoder.update_metadata(training_data=training_data, **facts)
        with _frozen(model):
            return _train_loop(model, family, encoder, train_images, val_images, out, config, device, dist_info,
                               resume, callback, facts, training_data)
    finally:
        if dist_info.created_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train_loop(model, family, encoder, train_images, val_images, out, config, device, dist_info, resume, callback, facts,
                training_data) -> TrainResult:
    from flash_plugin.utils.checkpoint import atomic_write_json, load_training_state, save_training_state

    state_path, log_path = out / STATE_NAME, out / LOG_NAME
    world = dist_info.world_size
    if config.batch_size % world:
        raise FlashInputError(f"batch_size {config.batch_size} must be divisible by the number of processes {world}")
    local = config.batch_size // world
    lo_idx, hi_idx = dist_info.rank * local, (dist_info.rank + 1) * local
    spe = config.steps_per_epoch or max(1, len(train_images) // config.batch_size)
    optimizer = make_optimizer(encoder, config)
    val = make_validation_set(family, val_images, seed=config.seed, batch_size=config.val_batch_size, device=device)

    step, best, bad_epochs, history, elapsed_before = 0, None, 0, [], 0.0
    stop_reason = None
    variance_reference = None
    if resume and state_path.exists():
        step, _, meta = load_training_state(state_path, model=encoder, optimizer=optimizer)
        old = meta.get("config", {})
        changed = [k for k in TrainConfig._TRAJECTORY if k in old and old[k] != getattr(config, k)]
        if changed:
            raise CheckpointError(
                f"cannot resume {state_path}: {', '.join(f'{k} {old[k]!r} -> {getattr(config, k)!r}' for k in changed)} "
                "changed (these fields define the training trajectory); use the original values or a new output directory"
            )
        if meta.get("latent_id") not in (None, getattr(model, "latent_id", None)):
            raise CheckpointError(f"cannot resume {state_path}: it was trained for latent space {meta.get('latent_id')!r}, the model's is {model.latent_id!r}")
        best, bad_epochs, history = meta.get("best_val_loss"), meta.get("bad_epochs", 0), meta.get("history", [])
        variance_reference, elapsed_before = meta.get("variance_reference"), meta.get("elapsed_s", 0.0)
        if meta.get("stop_reason") == "early_stop":
            stop_reason = "early_stop"
        if dist_info.is_main:
            _truncate_log(log_path, step)
            print(f"[severity] resumed {state_path} at step {step}", file=sys.stderr)
    else:
        # Start the head at the measured error variance of the initial encoder (first validation batch).
        with torch.no_grad():
            x0 = val["x"][: config.val_batch_size].to(device)
            y0 = val["y"][: config.val_batch_size].to(device)
            z_hat, _ = encoder(y0)
            err = (z_hat - model.encode(x0).to(z_hat.dtype)).flatten(1)
            variance_reference = float(err.var(dim=1, unbiased=True).double().mean().clamp_min(1e-8))
            if config.init_variance == "auto" and hasattr(encoder, "log_variance_offset"):
                encoder.log_variance_offset.fill_(math.log(variance_reference))
        if dist_info.is_main:
            for p in (log_path,):
                if p.exists():
                    p.unlink()
            atomic_write_json(out / "train_config.json", {"config": config.to_dict(), **facts, "training_data": training_data,
                                                          "latent_id": getattr(model, "latent_id", None), "world_size": world})
    if isinstance(encoder, SeverityEncoder) and config.init_variance != "auto" and step == 0:
        with torch.no_grad():
            encoder.log_variance_offset.fill_(math.log(float(config.init_variance)))

    net = encoder
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(encoder, device_ids=[device.index] if device.type == "cuda" else None)

    sampler = BatchSampler(len(train_images), config.batch_size, config.seed)
    t0 = time.time()
    budget_s = None if config.max_minutes is None else config.max_minutes * 60.0

    def meta(reason=None) -> dict:
        return {"config": config.to_dict(), "best_val_loss": best, "bad_epochs": bad_epochs, "history": finite_or_none(history),
                "variance_reference": variance_reference, "elapsed_s": elapsed_before + time.time() - t0,
                "latent_id": getattr(model, "latent_id", None), "stop_reason": reason, **facts}

    def save_state(reason=None) -> None:
        if dist_info.is_main:
            save_training_state(state_path, model=encoder, optimizer=optimizer, step=step, meta=meta(reason))
        dist_info.barrier()

    def export_best(record: dict) -> None:
        if dist_info.is_main and hasattr(encoder, "save_pretrained"):
            if isinstance(encoder, SeverityEncoder):
                encoder.update_metadata(training={"config": config.to_dict(), "step": step, "epoch": record["epoch"],
                                                  "world_size": world, "variance_reference": variance_reference},
                                        metrics={k: v for k, v in record.items() if k.startswith("val_")})
            encoder.save_pretrained(out / ENCODER_DIR)

    if step == 0 and not history:
        # Baseline: the untrained encoder (ẑ = the autoencoder's encoding of y, constant σ̂²).
        vrec = {"step": 0, "epoch": 0, **validate(encoder, model, val, config, device, variance_reference), "elapsed_s": 0.0}
        history.append(vrec)
        if dist_info.is_main:
            _append_log(log_path, vrec)

    total_steps = config.epochs * spe
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    if stop_reason is None and step >= total_steps:
        stop_reason = "epochs" if step >= config.epochs * spe else "max_steps"
    pbar = _progress(total_steps, f"severity[{facts['operator']}]", config.progress and dist_info.is_main, initial=step) if stop_reason is None else None
    running: dict[str, float] = {}
    while stop_reason is None:
        # ---- one optimiser step on the global batch of `step` ----------------------------------
        idx = sampler.indices(step)
        gen = stream_generator(config.seed, "train", step)
        x = train_images[idx].to(device)
        t = torch.rand(config.batch_size, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            y = measure(family, x, t, gen).to(x.dtype)
        x_loc, y_loc = x[lo_idx:hi_idx], y[lo_idx:hi_idx]
        terms = training_step(net, model, x_loc, y_loc, optimizer, config, variance_reference)
        loss = terms.total.mean()
        step += 1
        rec = {"loss": loss.item(), "latent_mse": terms.latent_mse.mean().item(), "variance_term": terms.variance.mean().item(),
               "image_mse": terms.image.mean().item(), "sigma_hat_mean": terms.predicted_variance.mean().item(),
               "sigma_bar_mean": terms.target_variance.mean().item()}
        for k, v in rec.items():
            running[k] = running.get(k, 0.0) + v
        running["n"] = running.get("n", 0) + 1
        if not math.isfinite(rec["loss"]):
            save_state("diverged")
            raise FloatingPointError(f"severity-encoder loss is {rec['loss']} at step {step}; lower --lr or set grad_clip")
        if dist_info.is_main:
            if pbar is not None:
                pbar.update(1)
                if step % 10 == 0:
                    pbar.set_postfix(loss=f"{rec['loss']:.4g}", mse=f"{rec['latent_mse']:.3g}", s2=f"{rec['sigma_hat_mean']:.3g}")
            if step % config.log_every == 0:
                n = running.pop("n")
                _append_log(log_path, {"step": step, "epoch": step / spe, **{k: v / n for k, v in running.items()},
                                       "elapsed_s": elapsed_before + time.time() - t0})
                running.clear()
            if callback is not None:
                callback(step, rec)

        # ---- end of an epoch: validate, keep the best, checkpoint ------------------------------
        if step % spe == 0:
            epoch = step // spe
            vrec = {"step": step, "epoch": epoch, **validate(encoder, model, val, config, device, variance_reference),
                    "elapsed_s": elapsed_before + time.time() - t0}
            history.append(vrec)
            if dist_info.is_main:
                _append_log(log_path, vrec)
            if best is None or vrec["val_loss"] < best:
                best, bad_epochs = vrec["val_loss"], 0
                export_best(vrec)
            else:
                bad_epochs += 1
            if config.patience and bad_epochs >= config.patience:
                stop_reason = "early_stop"
            elif epoch >= config.epochs:
                stop_reason = "epochs"
        if stop_reason is None and config.max_steps is not None and step >= config.max_steps:
            stop_reason = "max_steps"
        if stop_reason is None and budget_s is not None:
            if dist_info.any_flag(time.time() - t0 > budget_s, device):
                stop_reason = "time_budget"
        if step % spe == 0 or stop_reason is not None:
            save_state(stop_reason)
    if pbar is not None:
        pbar.close()
    if dist_info.is_main:
        print(f"[severity] stopped at step {step} ({stop_reason}); best val loss {best}", file=sys.stderr)
    best_dir = out / ENCODER_DIR
    dist_info.barrier()
    if isinstance(encoder, SeverityEncoder) and (best_dir / "severity_encoder.json").exists():
        result_encoder = SeverityEncoder.from_pretrained(best_dir, model, device=device)
    else:
        result_encoder = encoder.eval()
    return TrainResult(result_encoder, step, step // spe, stop_reason, best, out, history)
