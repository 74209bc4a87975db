"""Hard data consistency by optimisation, then stochastic resampling: what both ReSample versions share.

B. Song, S. M. Kwon, Z. Zhang, X. Hu, Q. Qu, L. Shen, "Solving Inverse Problems with Latent
Diffusion Models via Hard Data Consistency", ICLR 2024 (code: soominkwon/resample). At some
levels ``k`` the unconditional step ``z'_{k−1}`` is followed by a *hard data-consistency* (DC)
event: an optimisation that makes the clean estimate agree with ``y``, either in pixel space
(``x* = argmin_x ‖A(x) − y‖² + λ‖x − x_init‖²``, then ``z0* = E(x*)``) or in latent space
(``z0* = argmin_z ‖A(D(z)) − y‖² + λ‖z − z_init‖²``), and a draw around ``z0*`` and ``z'_{k−1}``::

    z_{k−1} ~ N((σ² sqrt(ᾱ) z0* + (1 − ᾱ) z'_{k−1}) / (σ² + 1 − ᾱ),  σ² (1 − ᾱ) / (σ² + 1 − ᾱ) · I)

(``ᾱ``: that of the target level; ``ᾱ = 1`` returns ``z0*``). Which levels have an event, its
stage, ``σ²``, the optimiser settings and what happens before the event are the versions' own
(`flash_plugin.solvers.resample`).

Everything is per sample: the inner losses are summed per sample and Adam is element-wise, and a
sample that meets its stopping rule is frozen while the others go on, so a batch equals its
samples solved alone. Inner iterations are not UNet calls and are not NFE; ``Solution.extras``
reports per sample ``count_decoder_calls``, ``count_encoder_calls``, ``count_dc_events`` and
``count_inner_iterations`` (the final decode of the result is not counted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar, Literal

import torch

from flash_plugin.errors import FlashInputError
from flash_plugin.solvers.base import StepContext
from flash_plugin.solvers.guidance import CountingSolver, add_count, check_weight, pad_counts
from flash_plugin.utils.batch import select_operator
from flash_plugin.utils.random import GeneratorLike, randn_per_sample

Stage = Literal["pixel", "latent"]


@dataclass(frozen=True)
class InnerOptimizer:
    """Settings of one hard data-consistency optimisation (per sample).

    Attributes:
        lr: Adam(W) learning rate.
        max_iters: at most this many updates.
        prox_weight: ``λ`` of the proximal term ``λ‖v − v_init‖²`` (0 = none).
        weight_decay: decoupled (AdamW) weight decay; 0 = plain Adam.
        reduction: ``"sum"`` (squared norms) or ``"mean"`` (MSE) of both terms per sample.
        stop_at_noise: stop a sample when its mean squared residual ``≤ σ_y²``; otherwise when ``< tol``.
        tol: threshold when ``stop_at_noise`` is false.
        patience: if set, also stop once ``iteration ≥ patience`` and the loss exceeds the loss
            ``patience`` iterations earlier (the original latent optimisation).
    """

    lr: float
    max_iters: int
    prox_weight: float = 0.0
    weight_decay: float = 0.0
    reduction: Literal["sum", "mean"] = "sum"
    stop_at_noise: bool = True
    tol: float = 0.0
    patience: int | None = None


def noise_variance(operator: Any, n: int, device: torch.device) -> torch.Tensor:
    """``σ_y²`` per sample (``[n]``, float64) from ``operator.noise_std`` (a float or one value per sample)."""
    s = torch.as_tensor(getattr(operator, "noise_std", 0.0), dtype=torch.float64).detach().to(device)
    if s.ndim == 0:
        s = s.expand(n)
    if s.numel() != n:
        raise FlashInputError(f"operator.noise_std must be a number or have one entry per sample ({n}), got shape {tuple(s.shape)}")
    return s.reshape(n) ** 2


def _check_count(name: str, value: Any) -> int:
    if int(value) != value or value < 0:
        raise FlashInputError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


class HardDCSolver(CountingSolver):
    """The loop of a ReSample-type solver: DDIM step, hard DC at the levels of `dc_stage`, resampling.

    A subclass sets the optimiser defaults (`pixel_defaults`, `latent_defaults`) and implements
    `dc_stage` and `resample_variance`; it may add to the step (`guide`), change where a DC event
    starts (`dc_start`) and the ``ᾱ`` of the mixture (`mixture_alpha`).

    Args:
        model: a latent model (``eps``, ``encode``, differentiable ``decode``, ``alphas_cumprod``, ``latent_shape``).
        gamma_rs: resampling variance multiplier ``γ_rs``.
        num_steps: DDIM steps ``N`` on the CompVis grid.
        dc_every: hard-DC spacing in steps; ``0`` or ``None`` disables hard DC entirely.
        inner_steps, inner_lr, prox_weight: override ``max_iters``/``lr``/``λ`` of both stages'
            inner optimisers.
        eta: DDIM stochasticity.
        final_optimization: a latent optimisation of ``z_0`` after the loop.
        progress: show a tqdm progress bar.
    """

    count_keys = ("count_decoder_calls", "count_encoder_calls", "count_dc_events", "count_inner_iterations")
    pixel_defaults: ClassVar[InnerOptimizer]
    latent_defaults: ClassVar[InnerOptimizer]

    def __init__(self, model: Any, *, gamma_rs: float, num_steps: int | None, dc_every: int | None,
                 inner_steps: int | None, inner_lr: float | None, prox_weight: float | None, eta: float,
                 final_optimization: bool, progress: bool):
        super().__init__(model, num_steps=num_steps, eta=eta, progress=progress)
        self.gamma_rs = check_weight("gamma_rs", gamma_rs)
        if dc_every is not None and (int(dc_every) != dc_every or dc_every < 0):
            raise FlashInputError(f"dc_every must be a non-negative integer or None, got {dc_every!r}")
        self.dc_every = int(dc_every or 0)
        changes: dict[str, Any] = {}
        if inner_steps is not None:
            changes["max_iters"] = _check_count("inner_steps", inner_steps)
        if inner_lr is not None:
            changes["lr"] = check_weight("inner_lr", inner_lr)
        if prox_weight is not None:
            changes["prox_weight"] = check_weight("prox_weight", prox_weight)
        self.pixel_optimizer = replace(self.pixel_defaults, **changes)
        self.latent_optimizer = replace(self.latent_defaults, **changes)
        self.final_optimization = bool(final_optimization)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(N={self.schedule.num_steps}, eta={self.eta}, gamma_rs={self.gamma_rs}, "
                f"dc_every={self.dc_every})")

    # ---- what a version defines ------------------------------------------------------------------
    def dc_stage(self, k: int) -> Stage | None:
        """The hard-DC stage performed in the step from level ``k`` (``None``: no DC event)."""
        raise NotImplementedError

    def resample_variance(self, ctx: StepContext) -> float:
        """``σ²`` of the stochastic resampling in the step from level ``ctx.k``."""
        raise NotImplementedError

    def guide(self, ctx: StepContext, eps: torch.Tensor, z_prev: torch.Tensor,
              x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z'_{k−1}, clean estimate)`` after any guidance of the step; none by default."""
        return z_prev, x0

    def dc_start(self, ctx: StepContext, z_prev: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The latent a DC event starts from: the step's clean estimate by default."""
        return x0

    def mixture_alpha(self, ctx: StepContext) -> float:
        """``ᾱ`` of the resampling mixture: the target level's by default."""
        return ctx.acp_prev

    # ---- the step --------------------------------------------------------------------------------
    def step(self, ctx: StepContext) -> torch.Tensor:
        with torch.no_grad():
            eps, x0 = self.predict(ctx, ctx.z)
            z_prev = self.update(ctx, ctx.z, eps, x0)
        z_prev, x0 = self.guide(ctx, eps, z_prev, x0)
        add_count(ctx.state, ctx.index, "_steps")
        stage = self.dc_stage(ctx.k)
        if stage is None:
            return z_prev
        x0 = self.dc_start(ctx, z_prev, x0)
        z0 = self.hard_dc(x0, ctx.y, ctx.operator, ctx.index, ctx.state, stage)
        return self.stochastic_resample(z0, z_prev, self.mixture_alpha(ctx), self.resample_variance(ctx), ctx.generator)

    def stochastic_resample(self, z0: torch.Tensor, z_prev: torch.Tensor, acp_target: float, sigma2: float,
                            generator: GeneratorLike) -> torch.Tensor:
        """Draw ``z_{k−1}`` around the data-consistent ``z0*`` and the unconditional ``z'_{k−1}``
        (``acp_target``: the ``ᾱ`` of the mixture, see `mixture_alpha`)."""
        b2 = 1.0 - acp_target
        if b2 <= 0.0:  # clean target level: the data-consistent estimate itself
            return z0
        denom = sigma2 + b2
        mean = (sigma2 * acp_target**0.5 * z0 + b2 * z_prev) / denom
        std = math.sqrt(sigma2 * b2 / denom)
        noise = randn_per_sample(z0.shape, generator, device=z0.device, dtype=z0.dtype)
        return mean + std * noise

    # ---- hard data consistency ------------------------------------------------------------------
    def hard_dc(self, x0: torch.Tensor, y: torch.Tensor, operator: Any, index: torch.Tensor, state: dict, stage: Stage) -> torch.Tensor:
        """``z0*`` of one DC event for the samples at batch positions ``index`` (pixel or latent stage)."""
        model = self.model
        add_count(state, index, "count_dc_events")
        if stage == "pixel":
            with torch.no_grad():
                x_init = model.decode(x0)
            add_count(state, index, "count_decoder_calls")
            x = self._optimize(x_init, y, operator, index, state, self.pixel_optimizer, render=None)
            with torch.no_grad():
                z0 = model.encode(x)
            add_count(state, index, "count_encoder_calls")
            return z0.detach()
        return self._optimize(x0, y, operator, index, state, self.latent_optimizer, render=model.decode)

    def _optimize(self, v0: torch.Tensor, y: torch.Tensor, operator: Any, index: torch.Tensor, state: dict,
                  cfg: InnerOptimizer, render: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
        """Per-sample Adam(W) on ``data(v) + λ‖v − v0‖²`` with ``data = ‖A(render(v)) − y‖²``.

        Adam is element-wise and every loss is per sample, so a sample's trajectory depends on its
        own data only; a sample that meets its stopping rule is frozen (and no longer evaluated).
        """
        batch = v0.shape[0]
        anchor = v0.detach()
        v = anchor.clone()
        m, s = torch.zeros_like(v), torch.zeros_like(v)
        if cfg.stop_at_noise:
            threshold = noise_variance(operator, batch, v.device)
        else:
            threshold = torch.full((batch,), cfg.tol, dtype=torch.float64, device=v.device)
        history = torch.full((cfg.max_iters, batch), math.inf, dtype=torch.float64, device=v.device) if cfg.patience else None
        evals = torch.zeros(batch, dtype=torch.long, device=v.device)  # forward passes per sample
        updates = torch.zeros(batch, dtype=torch.long, device=v.device)  # optimiser steps per sample
        active = torch.arange(batch, device=v.device)
        op, y_a, anchor_a, thr_a = operator, y, anchor, threshold.to(v.dtype)
        beta1, beta2, eps_adam = 0.9, 0.999, 1e-8
        mean = cfg.reduction == "mean"
        it = 0
        while it < cfg.max_iters:
            with torch.enable_grad():  # also under a caller's no_grad: the DC takes its own gradients
                full = len(active) == batch
                va = (v if full else v[active]).detach().requires_grad_(True)
                pred = va if render is None else render(va)
                res = (op.forward(pred) - y_a).flatten(1)
                data = res.pow(2).sum(1)
                mse = data.detach() / res.shape[1]
                loss = data / res.shape[1] if mean else data
                if cfg.prox_weight > 0:
                    d2 = (va - anchor_a).flatten(1).pow(2)
                    loss = loss + cfg.prox_weight * (d2.mean(1) if mean else d2.sum(1))
                stop = (mse <= thr_a) if cfg.stop_at_noise else (mse < thr_a)
                if history is not None:
                    history[it, active] = loss.detach().double()
                    if it >= cfg.patience:
                        stop |= loss.detach() > history[it - cfg.patience, active]
                n_stop = int(stop.sum())
                if n_stop:
                    gone = active[stop]
                    evals[gone], updates[gone] = it + 1, it
                    if n_stop == len(active):
                        active = active[:0]
                        break
                    keep = ~stop
                    (grad,) = torch.autograd.grad(loss[keep].sum(), va, allow_unused=True)
                    grad = torch.zeros_like(va) if grad is None else grad
                    active, grad = active[keep], grad[keep]
                    op = select_operator(operator, active, batch)
                    y_a, anchor_a, thr_a = y[active], anchor[active], threshold[active].to(v.dtype)
                    full = False
                else:
                    (grad,) = torch.autograd.grad(loss.sum(), va, allow_unused=True)
                    grad = torch.zeros_like(va) if grad is None else grad
            it += 1
            with torch.no_grad():  # Adam(W), exactly torch.optim.Adam(W)'s update, restricted to `active`
                mk, sk, vk = (m, s, v) if full else (m[active], s[active], v[active])
                mk.mul_(beta1).add_(grad, alpha=1 - beta1)
                sk.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (sk.sqrt() / math.sqrt(1 - beta2**it)).add_(eps_adam)
                if cfg.weight_decay:
                    vk.mul_(1 - cfg.lr * cfg.weight_decay)
                vk.addcdiv_(mk, denom, value=-cfg.lr / (1 - beta1**it))
                if not full:
                    m[active], s[active], v[active] = mk, sk, vk
        evals[active], updates[active] = it, it
        if render is not None:
            add_count(state, index, "count_decoder_calls", evals)
        add_count(state, index, "count_inner_iterations", updates)
        return v.detach()

    def finish(self, z: torch.Tensor, y: torch.Tensor, operator: Any, state: dict) -> torch.Tensor:
        """With ``final_optimization``, one more latent optimisation of ``z_0`` for every sample
        that made a step (a sample started at ``k = 0`` is returned as given)."""
        if self.final_optimization and "_steps" in state:
            stepped = state["_steps"]
            idx = (stepped > 0).nonzero().flatten().to(z.device)
            if len(idx):
                z = z.clone()
                z[idx] = self._optimize(z[idx], y[idx], select_operator(operator, idx, z.shape[0]), idx, state,
                                        self.latent_optimizer, render=self.model.decode)
                add_count(state, idx, "count_dc_events")
        pad_counts(state, z.shape[0], z.device, self.count_keys)
        return z
