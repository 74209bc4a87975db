"""Training of a `SeverityEncoder`: its loss, its degraded data, its configuration and its loop.

Loss (docs/architecture.md, "Severity encoder"), per sample ``i``, averaged over the batch::

    L_i = mean_k (ẑ_ik − z0_ik)²                          latent MSE (per element)
        + λσ · V(σ̄²_i, σ̂²_i)                              variance term
        + λimg · mean_j (D(ẑ_i)_j − x_ij)²                 image MSE through the frozen decoder

``z0 = model.encode(x)`` (no grad), ``D = model.decode`` (frozen weights, gradient w.r.t. ``ẑ``
only), ``σ̄²_i`` = the unbiased variance of the latent error ``ẑ_i − z0_i`` over its dimensions.
The image term is a per-sample mean, so that its weight does not grow with the per-GPU batch
size (the official code sums it over the batch).

The variance term ``V`` (``variance_loss``): ``"log"`` (default) compares ``log σ̂²`` with
``log σ̄²``; it is scale-free, so the head learns whether σ̄² is 1e-3 or 1, and its minimiser is
the geometric mean of σ̄² given ``y`` (slightly below the arithmetic mean; the calibration slope in
`flash_plugin.severity.evaluate` measures it). ``"relative"`` is ``((σ̄² − σ̂²) / σ̄²_ref)²``
with ``σ̄²_ref`` the initial encoder's mean error variance (stored in the checkpoint): the
official minimiser, rescaled to O(1). ``"official"`` is the paper's ``(σ̄² − σ̂²)²``, which is
tiny next to the latent MSE when the errors are small. ``detach_target_variance`` (default on)
stops the gradient through ``σ̄²``, so the variance term never pushes the mean branch to make its
error match the prediction (off reproduces the official code); ``detach_head_features`` keeps the
head out of the shared trunk. Optimiser: Adam, constant learning rate, λσ = λimg = 1 (the
official script). docs/training.md compares the variants.

Step ``s`` trains on the global batch ``SeededBatches(n, batch_size, seed).indices(s)``; its
severities ``t ~ U(0, 1)``, the operator's random parameters and the noise come from
``step_generator(seed, "train", s)`` (`flash_plugin.utils.training`). Validation uses fixed
images, severities and noise. ``out_dir`` holds ``state.safetensors`` (weights, Adam state, step,
early-stopping state; after every epoch and when stopping), ``encoder/`` (the best encoder by
validation loss), ``log.jsonl`` and ``train_config.json``. Under ``torchrun`` every rank builds
the same global batch and trains on its own slice of it, validates on the whole validation set
(so all ranks take the same early-stopping decision) and only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from flash_plugin.errors import CheckpointError, FlashInputError
from flash_plugin.metrics import spearman as _spearman
from flash_plugin.severity.encoder import SeverityEncoder
from flash_plugin.utils.checkpoint import atomic_write_json
from flash_plugin.utils.random import stream_seed as _stream_seed
from flash_plugin.utils.training import (  # noqa: F401  (LOG_NAME: the log's file name, as before)
    LOG_NAME,
    STATE_NAME,
    Distributed,
    SeededBatches,
    TimeBudget,
    TrainingRun,
    changed_fields,
    distributed,
    finite_or_none as _finite_or_none,
    frozen,
    progress_bar,
    step_generator,
)

ENCODER_DIR = "encoder"
VARIANCE_LOSSES = ("log", "relative", "official")
_LOG_FLOOR = 1e-10  # σ̄² floor inside the log (an exactly zero error, e.g. t = 0 without noise)

# Names that used to live here: old name -> (module, name) of their new home.
_MOVED = {
    "pearson": ("flash_plugin.metrics", "pearson"),
    "spearman": ("flash_plugin.metrics", "spearman"),
    "_ranks": ("flash_plugin.metrics", "_ranks"),
    "finite_or_none": ("flash_plugin.utils.training", "finite_or_none"),
    "BatchSampler": ("flash_plugin.utils.training", "SeededBatches"),
    "stream_generator": ("flash_plugin.utils.random", "stream_generator"),
    "stream_seed": ("flash_plugin.utils.random", "stream_seed"),
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        module, new = _MOVED[name]
        warnings.warn(f"flash_plugin.severity.train.{name} moved to {module}.{new}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), new)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
# Data: measurements at random severities
# ----------------------------------------------------------------------------------------------
def measure(family, x: torch.Tensor, t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``y = A_t(x) + n``: the family's operator at severities ``t`` (its random parameters and the
    noise drawn from ``generator``)."""
    op = family.make(t.to(device=x.device, dtype=torch.float64), generator)
    return op.measure(x, generator)


def make_validation_set(family, images: torch.Tensor, *, seed: int, batch_size: int, device) -> dict[str, torch.Tensor]:
    """Fixed validation data: severities ``t ~ U(0,1)`` and measurements from fixed seeds
    (independent of the training step and of the world size)."""
    n = len(images)
    t = torch.rand(n, generator=step_generator(seed, "val-t", 0), dtype=torch.float64)
    ys = []
    for c, i in enumerate(range(0, n, batch_size)):
        x = images[i : i + batch_size].to(device)
        ys.append(measure(family, x, t[i : i + batch_size], step_generator(seed, "val", c)))
    return {"x": images, "y": torch.cat(ys).to(images.dtype).cpu(), "t": t}


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
    out["val_spearman_t"] = _spearman(var_hat, val["t"])
    out["val_spearman_error"] = _spearman(var_hat, var_bar)
    out["val_sigma_hat_mean"] = var_hat.double().mean().item()
    out["val_sigma_bar_mean"] = var_bar.double().mean().item()
    return out


# ----------------------------------------------------------------------------------------------
# The loop (built from flash_plugin.utils.training)
# ----------------------------------------------------------------------------------------------
def _family_facts(family) -> dict[str, Any]:
    rng = getattr(family, "severity_range", None)
    return {
        "operator": getattr(family, "name", type(family).__name__),
        "severity_range": list(rng) if rng is not None else None,
        "operator_kwargs": {k: v for k, v in dict(getattr(family, "family_kwargs", None) or {}).items() if k != "image_shape"},
        "noise_std": getattr(family, "noise_std", None),
    }




@dataclass
class _Session:
    """One `train_severity_encoder` call: what it trains, with what, and where it stands."""

    model: Any
    family: Any
    encoder: torch.nn.Module
    config: TrainConfig
    device: torch.device
    dist: Distributed
    out: Path
    facts: dict[str, Any]
    training_data: Any
    callback: Callable[[int, dict], None] | None
    train_images: torch.Tensor
    step: int = 0
    best: float | None = None
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)
    variance_reference: float | None = None
    elapsed_before: float = 0.0
    stop_reason: str | None = None

    def __post_init__(self) -> None:
        self.shard = self.dist.shard(self.config.batch_size)  # this rank's slice of the global batch
        self.batches = SeededBatches(len(self.train_images), self.config.batch_size, self.config.seed)
        self.steps_per_epoch = self.config.steps_per_epoch or self.batches.steps_per_pass
        self.optimizer = make_optimizer(self.encoder, self.config)
        self.run = TrainingRun(self.out, model=self.encoder, optimizer=self.optimizer, dist=self.dist)
        self.net: torch.nn.Module = self.encoder  # the DDP wrapper under torchrun
        self.budget = TimeBudget(self.config.max_minutes, self.dist)
        self.val: dict[str, torch.Tensor] = {}

    def elapsed_s(self) -> float:
        return self.elapsed_before + self.budget.elapsed_s

    def meta(self, reason: str | None = None) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "best_val_loss": self.best, "bad_epochs": self.bad_epochs,
                "history": _finite_or_none(self.history), "variance_reference": self.variance_reference,
                "elapsed_s": self.elapsed_s(), "latent_id": getattr(self.model, "latent_id", None), "stop_reason": reason,
                **self.facts}


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
    with distributed(config.device) as (dist, device):
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            if (out / STATE_NAME).exists() and not resume:
                raise CheckpointError(f"{out / STATE_NAME} exists: pass resume=True (--resume) to continue it, or use another output directory")
        dist.barrier()
        model = model.to(device)
        model.eval()
        if encoder is None:
            encoder = SeverityEncoder.from_latent_diffusion(model, head_channels=config.head_channels,
                                                           init_seed=_stream_seed(config.seed, "init", 0))
        encoder = encoder.to(device).train()
        facts = _family_facts(family)
        if isinstance(encoder, SeverityEncoder):
            encoder.update_metadata(training_data=training_data, **facts)
        with frozen(model):
            s = _Session(model=model, family=family, encoder=encoder, config=config, device=device, dist=dist, out=out,
                         facts=facts, training_data=training_data, callback=callback, train_images=train_images)
            _start(s, val_images, resume)
            _loop(s)
            return _finish(s)


def _start(s: _Session, val_images: torch.Tensor, resume: bool) -> None:
    """Validation set, resume or fresh start, DDP wrapper, and the untrained baseline's record."""
    cfg = s.config
    s.val = make_validation_set(s.family, val_images, seed=cfg.seed, batch_size=cfg.val_batch_size, device=s.device)
    if resume and s.run.has_state():
        _resume(s)
    else:
        _fresh_start(s)
    if isinstance(s.encoder, SeverityEncoder) and cfg.init_variance != "auto" and s.step == 0:
        with torch.no_grad():
            s.encoder.log_variance_offset.fill_(math.log(float(cfg.init_variance)))
    s.net = s.dist.wrap(s.encoder, s.device)
    s.budget = TimeBudget(cfg.max_minutes, s.dist)  # this call's clock starts with the training
    if s.step == 0 and not s.history:
        # Baseline: the untrained encoder (ẑ = the autoencoder's encoding of y, constant σ̂²).
        vrec = {"step": 0, "epoch": 0, **validate(s.encoder, s.model, s.val, cfg, s.device, s.variance_reference), "elapsed_s": 0.0}
        s.history.append(vrec)
        s.run.log.append(vrec)


def _check_resumable(s: _Session, meta: dict[str, Any]) -> None:
    path, old = s.run.state_path, meta.get("config", {})
    changed = changed_fields(old, s.config.to_dict(), TrainConfig._TRAJECTORY)
    if changed:
        raise CheckpointError(
            f"cannot resume {path}: {', '.join(f'{k} {old[k]!r} -> {getattr(s.config, k)!r}' for k in changed)} "
            "changed (these fields define the training trajectory); use the original values or a new output directory"
        )
    if meta.get("latent_id") not in (None, getattr(s.model, "latent_id", None)):
        raise CheckpointError(f"cannot resume {path}: it was trained for latent space {meta.get('latent_id')!r}, the model's is {s.model.latent_id!r}")


def _resume(s: _Session) -> None:
    s.step, meta = s.run.resume(check=lambda meta: _check_resumable(s, meta))
    s.best, s.bad_epochs, s.history = meta.get("best_val_loss"), meta.get("bad_epochs", 0), meta.get("history", [])
    s.variance_reference, s.elapsed_before = meta.get("variance_reference"), meta.get("elapsed_s", 0.0)
    if meta.get("stop_reason") == "early_stop":
        s.stop_reason = "early_stop"
    if s.dist.is_main:
        print(f"[severity] resumed {s.run.state_path} at step {s.step}", file=sys.stderr)


def _fresh_start(s: _Session) -> None:
    """Start the head at the measured error variance of the initial encoder (first validation batch)."""
    cfg, enc = s.config, s.encoder
    with torch.no_grad():
        x0 = s.val["x"][: cfg.val_batch_size].to(s.device)
        y0 = s.val["y"][: cfg.val_batch_size].to(s.device)
        z_hat, _ = enc(y0)
        err = (z_hat - s.model.encode(x0).to(z_hat.dtype)).flatten(1)
        s.variance_reference = float(err.var(dim=1, unbiased=True).double().mean().clamp_min(1e-8))
        if cfg.init_variance == "auto" and hasattr(enc, "log_variance_offset"):
            enc.log_variance_offset.fill_(math.log(s.variance_reference))
    if s.dist.is_main:
        s.run.log.clear()
        atomic_write_json(s.out / "train_config.json", {"config": cfg.to_dict(), **s.facts, "training_data": s.training_data,
                                                        "latent_id": getattr(s.model, "latent_id", None),
                                                        "world_size": s.dist.world_size})


def _loop(s: _Session) -> None:
    cfg, spe = s.config, s.steps_per_epoch
    total = cfg.epochs * spe if cfg.max_steps is None else min(cfg.epochs * spe, cfg.max_steps)
    if s.stop_reason is None and s.step >= total:
        s.stop_reason = "epochs" if s.step >= cfg.epochs * spe else "max_steps"
    if s.stop_reason is not None:
        return
    bar = progress_bar(total, f"severity[{s.facts['operator']}]", enabled=cfg.progress and s.dist.is_main, initial=s.step)
    running: dict[str, float] = {}
    while s.stop_reason is None:
        rec = _train_step(s)
        if s.dist.is_main:
            _report_step(s, rec, running, bar)
        if s.step % spe == 0:
            _end_epoch(s)
        if s.stop_reason is None and cfg.max_steps is not None and s.step >= cfg.max_steps:
            s.stop_reason = "max_steps"
        if s.stop_reason is None and s.budget.exceeded(s.device):
            s.stop_reason = "time_budget"
        if s.step % spe == 0 or s.stop_reason is not None:
            s.run.save(s.step, s.meta(s.stop_reason))
    bar.close()


def _train_step(s: _Session) -> dict[str, float]:
    """One optimiser step on this rank's slice of the global batch of step ``s.step``."""
    cfg = s.config
    gen = step_generator(cfg.seed, "train", s.step)
    x = s.train_images[s.batches.indices(s.step)].to(s.device)
    t = torch.rand(cfg.batch_size, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = measure(s.family, x, t, gen).to(x.dtype)
    terms = training_step(s.net, s.model, x[s.shard], y[s.shard], s.optimizer, cfg, s.variance_reference)
    s.step += 1
    rec = {"loss": terms.total.mean().item(), "latent_mse": terms.latent_mse.mean().item(),
           "variance_term": terms.variance.mean().item(), "image_mse": terms.image.mean().item(),
           "sigma_hat_mean": terms.predicted_variance.mean().item(), "sigma_bar_mean": terms.target_variance.mean().item()}
    if not math.isfinite(rec["loss"]):
        s.run.save(s.step, s.meta("diverged"))
        raise FloatingPointError(f"severity-encoder loss is {rec['loss']} at step {s.step}; lower --lr or set grad_clip")
    return rec


def _report_step(s: _Session, rec: dict[str, float], running: dict[str, float], bar) -> None:
    """Progress bar, the log's running means every ``log_every`` steps, the callback (rank 0)."""
    for k, v in rec.items():
        running[k] = running.get(k, 0.0) + v
    running["n"] = running.get("n", 0) + 1
    bar.update(1)
    if s.step % 10 == 0:
        bar.set_postfix(loss=f"{rec['loss']:.4g}", mse=f"{rec['latent_mse']:.3g}", s2=f"{rec['sigma_hat_mean']:.3g}")
    if s.step % s.config.log_every == 0:
        n = running.pop("n")
        s.run.log.append({"step": s.step, "epoch": s.step / s.steps_per_epoch, **{k: v / n for k, v in running.items()},
                          "elapsed_s": s.elapsed_s()})
        running.clear()
    if s.callback is not None:
        s.callback(s.step, rec)


def _end_epoch(s: _Session) -> None:
    """Validate, keep the best encoder, decide on early stopping."""
    cfg, epoch = s.config, s.step // s.steps_per_epoch
    vrec = {"step": s.step, "epoch": epoch, **validate(s.encoder, s.model, s.val, cfg, s.device, s.variance_reference),
            "elapsed_s": s.elapsed_s()}
    s.history.append(vrec)
    s.run.log.append(vrec)
    if s.best is None or vrec["val_loss"] < s.best:
        s.best, s.bad_epochs = vrec["val_loss"], 0
        _export_best(s, vrec)
    else:
        s.bad_epochs += 1
    if cfg.patience and s.bad_epochs >= cfg.patience:
        s.stop_reason = "early_stop"
    elif epoch >= cfg.epochs:
        s.stop_reason = "epochs"


def _export_best(s: _Session, record: dict) -> None:
    enc = s.encoder
    if not (s.dist.is_main and hasattr(enc, "save_pretrained")):
        return
    if isinstance(enc, SeverityEncoder):
        enc.update_metadata(training={"config": s.config.to_dict(), "step": s.step, "epoch": record["epoch"],
                                      "world_size": s.dist.world_size, "variance_reference": s.variance_reference},
                            metrics={k: v for k, v in record.items() if k.startswith("val_")})
    enc.save_pretrained(s.out / ENCODER_DIR)


def _finish(s: _Session) -> TrainResult:
    """The best encoder saved (or the last one) and the run's facts."""
    if s.dist.is_main:
        print(f"[severity] stopped at step {s.step} ({s.stop_reason}); best val loss {s.best}", file=sys.stderr)
    best_dir = s.out / ENCODER_DIR
    s.dist.barrier()
    if isinstance(s.encoder, SeverityEncoder) and (best_dir / "severity_encoder.json").exists():
        encoder = SeverityEncoder.from_pretrained(best_dir, s.model, device=s.device)
    else:
        encoder = s.encoder.eval()
    return TrainResult(encoder, s.step, s.step // s.steps_per_epoch, s.stop_reason, s.best, s.out, s.history)
