"""ReSample: hard data consistency by optimisation, then stochastic resampling.

Paper: B. Song, S. M. Kwon, Z. Zhang, X. Hu, Q. Qu, L. Shen, "Solving Inverse Problems with
Latent Diffusion Models via Hard Data Consistency", ICLR 2024 (code: soominkwon/resample). Used
as a baseline by Z. Fabian, B. Tinaz, M. Soltanolkotabi, "Adapt and Diffuse: Sample-adaptive
Reconstruction via Latent Diffusion Models", ICML 2024 (Flash-Diffusion), which re-implements it
in a simplified form. Both are available here:

``variant="flash"`` (default; the Flash numbers are reported with it, flash-algorithm.md §6.2)
    DDIM over the CompVis grid ``train_timesteps(1000, 500)`` (999, 997, ..., 1), ``η = 1``, one UNet
    call per step and no DPS step::

        ε = ε_θ(z_k, t_k),   ẑ0 = (z_k − sqrt(1 − ᾱ_k) ε) / sqrt(ᾱ_k),   z'_{k−1} = DDIM(η) step

    Hard data consistency (DC) at the levels ``k`` with ``(k − 1) % dc_every == 0`` (positions
    ``0, 10, 20, ...`` counted from the last step ``k = 1``, train timesteps 1, 21, 41, ... on the
    500-step grid); what it does depends on the ABSOLUTE train timestep ``t_k`` (for ``T = 1000``):

    * chaotic, ``t_k > 750``: nothing (``z_{k−1} = z'_{k−1}``);
    * semantic, ``300 < t_k ≤ 750`` (pixel stage):
      ``x* = argmin_x ‖A(x) − y‖² + λ‖x − D(ẑ0)‖²`` from ``x = D(ẑ0)``, then ``z0* = E(x*)``;
    * refinement, ``t_k ≤ 300`` (latent stage):
      ``z0* = argmin_z ‖A(D(z)) − y‖² + λ‖z − ẑ0‖²`` from ``z = ẑ0``;

    Adam, lr 0.1, at most 100 iterations, ``λ = 1`` (squared norms, summed per sample), and a
    sample stops as soon as its mean squared residual ``mean((A(·) − y)²) ≤ σ_y²``
    (``σ_y = operator.noise_std``). Then stochastic resampling::

        σ² = γ_rs (1 − ᾱ_{t−1}) / ᾱ_t · (1 − ᾱ_t / ᾱ_{t−1})     (1000-step ᾱ at t = t_k and t − 1)
        z_{k−1} ~ N((σ² sqrt(ᾱ_{k−1}) z0* + (1 − ᾱ_{k−1}) z'_{k−1}) / (σ² + 1 − ᾱ_{k−1}),
                    σ² (1 − ᾱ_{k−1}) / (σ² + 1 − ᾱ_{k−1}) · I)

    (at ``k = 1``, ``ᾱ_0 = 1``: ``z_0 = z0*``). Checked against the official Flash code
    (z-fabian/flash-diffusion, ``samplers/latent_recon.py`` and ``samplers/data_consistency.py``):
    its ReSample takes every 10th entry of the *ascending* list of DDIM timesteps, which a late start
    truncates at the top, so its DC grid is absolute and starts at the last step, as here; its loss
    sums over the (single-image) batch, i.e. per sample, as here. One deliberate difference: the
    official code mixes with ``ᾱ`` of the *current* train timestep ``t_k`` instead of the target
    level's; on our schedule (``ᾱ_0 = 1``) that would re-noise the clean last step, so the default
    is ``resample_alpha="target"``, and ``resample_alpha="current"`` reproduces the official code.

``variant="original"`` (soominkwon/resample, solvers.md §3.2; ``η = 0`` as in its driver)
    Every step adds the Jacobian-free latent DPS step of the original code::

        ẑ0ᵖ = (z_k − (1 − ᾱ_k) ε) / sqrt(ᾱ_k)              (the original's "Tweedie", (1 − ᾱ) as coded)
        z'_{k−1} ← z'_{k−1} − s_k ∇_{z_k} ‖y − A(D(ẑ0ᵖ))‖₂,   s_k = dps_scale · ᾱ_k,  dps_scale = 0.5

    with ``ε`` detached (no UNet Jacobian). Hard DC at positions ``i = k − 1`` with
    ``i % dc_every == 0`` and ``0 < i ≤ N − ⌊N/3⌋``, pixel stage for ``i ≥ ⌊N/3⌋`` else latent stage
    ("thirds" of the FULL schedule ``N``, so again independent of the start), starting from
    ``ẑ0ᵖ`` without a proximal term: pixel AdamW lr 1e-2, ≤ 2000 iterations; latent AdamW lr 5e-3,
    ≤ 500 iterations, also stopping after 200 iterations once the loss exceeds the loss 200
    iterations earlier; both stop at MSE < 1e-6 (AdamW weight decay 0.01, torch's default).
    Resampling with ``σ² = γ_rs (1 − ᾱ_{k−1}) / (1 − ᾱ_k) · (1 − ᾱ_k / ᾱ_{k−1})`` on the DDIM
    grid, ``γ_rs = 40``, and the same mixture. After the loop, one more latent optimisation of
    ``z_0`` (``final_optimization``). **Time travel** (``time_travel = 5``): before each DC event
    the original runs 5 more unconditional DDIM steps from ``z'_{k−1}`` and starts the DC from the
    ``ẑ0ᵖ`` of the last of them; ``z'_{k−1}`` itself is what the resampling mixes with. Its quirk is
    kept: step ``j = 0..4`` gives the UNet the timestep of level ``k − 1 − j`` but uses ``ᾱ`` of
    level ``k − j`` (and ``k − j − 1`` as the target), one level off (solvers.md §3.2). These
    calls are UNet evaluations: they count as NFE (``Solution.nfe`` = steps + 5 per DC event).
    ``time_travel=0`` starts the DC from the current step's ``ẑ0ᵖ`` (one UNet call per step).
    With time travel the variant breaks the one-call-per-step contract on purpose, so it fails the
    conformance suite's three call-count checks (``flash-plugin check``); with ``time_travel=0`` it
    passes all of them, as the Flash variant does.
    Differences kept on purpose: per-sample norms and losses instead of the original's batch-wide
    ones, and the DPS/DC phases on the full ``N`` instead of the truncated one (solvers.md §3.3).

The default follows the Flash paper's version because the Flash-Diffusion numbers (and the
per-task ``γ_rs`` below) are reported with it.

Per-sample everything: the inner optimisations run on a batch whose samples never interact (the
losses are summed per sample and Adam is element-wise; a sample that meets its stopping rule is
frozen while the others go on), so a batch equals its samples solved alone. Inner iterations are
not UNet calls and are NOT counted as NFE; ``Solution.extras`` reports per sample
``count_decoder_calls``, ``count_encoder_calls``, ``count_dc_events`` and ``count_inner_iterations``
(the final decode of the result is not counted).

Hyperparameters per task (``γ_rs`` and the Flash noise correction c; the paper's official FFHQ
configs, with DDIM-500, ``η = 1``, DC every 10 steps, ``λ = 1``, 100 inner steps). The
authoritative table, with the values re-tuned for the bundled model, is `flash_plugin.solvers.hparams`:

    gblur-varying       γ_rs = 400    c = 1.2
    gblur-fixed         γ_rs = 2000   c = 1.2
    nonlinear-blur      γ_rs = 200    c = 1.2
    random-inpainting   γ_rs = 200    c = 1.2
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Literal

import torch

from flash_plugin.errors import FlashInputError
from flash_plugin.solvers.base import EXTRA_NFE, StepContext, select_operator
from flash_plugin.solvers.latent_dps import CountingSolver, add_count, check_weight, pad_counts, per_sample_norm
from flash_plugin.utils.random import GeneratorLike, randn_per_sample

Variant = Literal["flash", "original"]
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


@dataclass(frozen=True)
class ReSampleVariant:
    """The defaults of one ReSample variant (see the module docstring)."""

    eta: float
    gamma_rs: float
    pixel: InnerOptimizer
    latent: InnerOptimizer
    dps_scale: float | None
    final_optimization: bool
    time_travel: int = 0


_FLASH_INNER = InnerOptimizer(lr=0.1, max_iters=100, prox_weight=1.0, reduction="sum", stop_at_noise=True)
VARIANTS: dict[str, ReSampleVariant] = {
    "flash": ReSampleVariant(eta=1.0, gamma_rs=400.0, pixel=_FLASH_INNER, latent=_FLASH_INNER, dps_scale=None,
                             final_optimization=False),
    "original": ReSampleVariant(
        eta=0.0,
        gamma_rs=40.0,
        pixel=InnerOptimizer(lr=1e-2, max_iters=2000, weight_decay=0.01, reduction="mean", stop_at_noise=False, tol=1e-6),
        latent=InnerOptimizer(lr=5e-3, max_iters=500, weight_decay=0.01, reduction="mean", stop_at_noise=False, tol=1e-6,
                              patience=200),
        dps_scale=0.5,
        final_optimization=True,
        time_travel=5,
    ),
}


def _noise_variance(operator: Any, n: int, device: torch.device) -> torch.Tensor:
    """``σ_y²`` per sample (``[n]``, float64) from ``operator.noise_std`` (a float or one value per sample)."""
    s = torch.as_tensor(getattr(operator, "noise_std", 0.0), dtype=torch.float64).detach().to(device)
    if s.ndim == 0:
        s = s.expand(n)
    if s.numel() != n:
        raise FlashInputError(f"operator.noise_std must be a number or have one entry per sample ({n}), got shape {tuple(s.shape)}")
    return s.reshape(n) ** 2


class ReSample(CountingSolver):
    """ReSample (Song et al. 2024): hard data consistency + stochastic resampling; Flash's version by default.

    Args:
        model: a latent model (``eps``, ``encode``, differentiable ``decode``, ``alphas_cumprod``, ``latent_shape``).
        gamma_rs: resampling variance multiplier ``γ_rs`` (default: 400 for ``"flash"``, the
            paper's gblur-varying value; 40 for ``"original"``).
        num_steps: DDIM steps ``N`` on the CompVis grid (500).
        dc_every: hard-DC spacing in steps (10); ``0`` or ``None`` disables hard DC entirely
            (then ``"flash"`` is the plain DDIM sampler).
        inner_steps, inner_lr, prox_weight: override ``max_iters``/``lr``/``λ`` of both stages'
            inner optimisers (defaults per variant: see `VARIANTS`).
        variant: ``"flash"`` (default) or ``"original"``.
        eta: DDIM stochasticity (default per variant: 1 for ``"flash"``, 0 for ``"original"``).
        dps_scale: ``"original"`` only, the DPS step ``s_k = dps_scale · ᾱ_k`` (0.5).
        final_optimization: a latent optimisation of ``z_0`` after the loop (default: ``"original"``
            with hard DC enabled).
        time_travel: ``"original"`` only, unconditional DDIM steps before each DC event (5; 0 = none).
        resample_alpha: ``ᾱ`` of the resampling mixture: ``"target"`` (level ``k − 1``; default) or
            ``"current"`` (``"flash"`` only: the train timestep ``t_k``, as the official Flash code).
        stage_bounds: absolute train timesteps ``(chaotic_above, refinement_at_most)`` of the
            ``"flash"`` variant; default ``(750, 300)`` scaled to the model's ``T``.
        progress: show a tqdm progress bar.
    """

    name = "resample"
    count_keys = ("count_decoder_calls", "count_encoder_calls", "count_dc_events", "count_inner_iterations")

    def __init__(
        self,
        model: Any,
        *,
        gamma_rs: float | None = None,
        num_steps: int | None = 500,
        dc_every: int | None = 10,
        inner_steps: int | None = None,
        inner_lr: float | None = None,
        prox_weight: float | None = None,
        variant: Variant = "flash",
        eta: float | None = None,
        dps_scale: float | None = None,
        final_optimization: bool | None = None,
        time_travel: int | None = None,
        resample_alpha: Literal["target", "current"] = "target",
        stage_bounds: tuple[int, int] | None = None,
        progress: bool = False,
    ):
        if variant not in VARIANTS:
            raise FlashInputError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
        v = VARIANTS[variant]
        super().__init__(model, num_steps=num_steps, eta=v.eta if eta is None else eta, progress=progress)
        self.variant = variant
        self.gamma_rs = check_weight("gamma_rs", v.gamma_rs if gamma_rs is None else gamma_rs)
        if dc_every is not None and (int(dc_every) != dc_every or dc_every < 0):
            raise FlashInputError(f"dc_every must be a non-negative integer or None, got {dc_every!r}")
        self.dc_every = int(dc_every or 0)
        if variant == "flash" and dps_scale is not None:
            raise FlashInputError("dps_scale applies to variant='original' only (the Flash version has no DPS step)")
        if variant == "flash" and time_travel:
            raise FlashInputError("time_travel applies to variant='original' only (the Flash version has none)")
        if time_travel is not None and (int(time_travel) != time_travel or time_travel < 0):
            raise FlashInputError(f"time_travel must be a non-negative integer, got {time_travel!r}")
        if resample_alpha not in ("target", "current") or (resample_alpha == "current" and variant != "flash"):
            raise FlashInputError(f"resample_alpha must be 'target' or (variant='flash' only) 'current', got {resample_alpha!r}")
        self.resample_alpha = resample_alpha
        self.time_travel = v.time_travel if time_travel is None else int(time_travel)
        self.dps_scale = None if v.dps_scale is None else check_weight("dps_scale", v.dps_scale if dps_scale is None else dps_scale)
        changes: dict[str, Any] = {}
        if inner_steps is not None:
            if int(inner_steps) != inner_steps or inner_steps < 0:
                raise FlashInputError(f"inner_steps must be a non-negative integer, got {inner_steps!r}")
            changes["max_iters"] = int(inner_steps)
        if inner_lr is not None:
            changes["lr"] = check_weight("inner_lr", inner_lr)
        if prox_weight is not None:
            changes["prox_weight"] = check_weight("prox_weight", prox_weight)
        self.pixel_optimizer = replace(v.pixel, **changes)
        self.latent_optimizer = replace(v.latent, **changes)
        self.final_optimization = (v.final_optimization and self.dc_every > 0) if final_optimization is None else bool(final_optimization)
        self._train_acp = torch.as_tensor(model.alphas_cumprod, dtype=torch.float64).detach().cpu()
        big_t = len(self._train_acp)
        if stage_bounds is None:
            stage_bounds = (round(0.75 * big_t), round(0.3 * big_t))
        chaotic_above, refinement_at_most = (int(b) for b in stage_bounds)
        if not 0 <= refinement_at_most <= chaotic_above:
            raise FlashInputError(f"stage_bounds must be (chaotic_above, refinement_at_most) with 0 <= second <= first, got {stage_bounds}")
        self.stage_bounds = (chaotic_above, refinement_at_most)

    def __repr__(self) -> str:
        return (f"ReSample(N={self.schedule.num_steps}, variant={self.variant!r}, eta={self.eta}, gamma_rs={self.gamma_rs}, "
                f"dc_every={self.dc_every})")

    # ---- schedule of the hard-DC events --------------------------------------------------------
    def dc_stage(self, k: int) -> Stage | None:
        """The hard-DC stage performed in the step from level ``k`` (``None``: no DC event).

        Depends on ``k`` and the absolute train timestep ``schedule.timesteps[k]`` only, never on
        where a solve started.
        """
        if self.dc_every <= 0 or not 1 <= k <= self.schedule.num_steps:
            return None
        if self.variant == "original":
            n, i = self.schedule.num_steps, k - 1
            if i % self.dc_every != 0 or not 0 < i <= n - n // 3:
                return None
            return "pixel" if i >= n // 3 else "latent"
        if (k - 1) % self.dc_every != 0:
            return None
        t = int(self.schedule.timesteps[k])
        chaotic_above, refinement_at_most = self.stage_bounds
        if t > chaotic_above:
            return None
        return "latent" if t <= refinement_at_most else "pixel"

    def resample_variance(self, ctx: StepContext) -> float:
        """``σ²`` of the stochastic resampling in the step from level ``ctx.k``."""
        if self.variant == "original":
            acp, prev = ctx.acp, ctx.acp_prev
            return self.gamma_rs * (1 - prev) / (1 - acp) * (1 - acp / prev)
        t = int(self.schedule.timesteps[ctx.k])
        a_t = float(self._train_acp[t])
        a_prev = float(self._train_acp[t - 1]) if t > 0 else 1.0
        return self.gamma_rs * (1 - a_prev) / a_t * (1 - a_t / a_prev)

    # ---- the step --------------------------------------------------------------------------------
    def step(self, ctx: StepContext) -> torch.Tensor:
        z = ctx.z
        with torch.no_grad():
            eps, x0 = self.predict(ctx, z)
            z_prev = self.update(ctx, z, eps, x0)
        if self.variant == "original":
            # Jacobian-free latent DPS step on the original's "Tweedie" estimate (ε has no graph).
            zg = z.detach().requires_grad_(True)
            with torch.enable_grad():
                x0 = (zg - (1.0 - ctx.acp) * eps) / ctx.acp**0.5
                loss = per_sample_norm(ctx.y - ctx.operator.forward(self.model.decode(x0))).sum()
                (grad,) = torch.autograd.grad(loss, zg, allow_unused=True)
            add_count(ctx.state, ctx.index, "count_decoder_calls")
            x0 = x0.detach()
            if grad is not None:
                z_prev = z_prev - (self.dps_scale * ctx.acp) * grad
        add_count(ctx.state, ctx.index, "_steps")
        stage = self.dc_stage(ctx.k)
        if stage is None:
            return z_prev
        if self.time_travel:
            x0 = self.travel(ctx, z_prev, x0)
        z0 = self.hard_dc(x0, ctx.y, ctx.operator, ctx.index, ctx.state, stage)
        if self.resample_alpha == "current":
            acp_mix = float(self._train_acp[int(self.schedule.timesteps[ctx.k])])
        else:
            acp_mix = ctx.acp_prev
        return self.stochastic_resample(z0, z_prev, acp_mix, self.resample_variance(ctx), ctx.generator)

    def travel(self, ctx: StepContext, z: torch.Tensor, x0p: torch.Tensor) -> torch.Tensor:
        """The original's time travel from ``z = z'_{k−1}``: ``min(time_travel, k − 1)`` unconditional
        DDIM steps; returns the ``ẑ0ᵖ`` of the last one (the hard DC's start), or ``x0p`` when
        there is no step to make (``k = 1``).

        Step ``j`` calls the UNet at the timestep of level ``k − 1 − j`` but updates with ``ᾱ`` of
        levels ``k − j → k − j − 1``, as the original code does (soominkwon/resample, ddim.py,
        ``resample_sampling``: ``index_ = total_steps − k − 1`` next to ``step_`` of ``k + 1``).
        """
        n = min(self.time_travel, ctx.k - 1)
        acp, ts = self.schedule.alphas_cumprod, self.schedule.timesteps
        with torch.no_grad():
            z = z.detach()
            for j in range(n):
                sub = replace(ctx, timestep=torch.full_like(ctx.timestep, int(ts[ctx.k - 1 - j])),
                              acp=float(acp[ctx.k - j]), acp_prev=float(acp[ctx.k - j - 1]))
                eps, x0 = self.predict(sub, z)
                x0p = (z - (1.0 - sub.acp) * eps) / sub.acp**0.5
                z = self.update(sub, z, eps, x0)
        add_count(ctx.state, ctx.index, EXTRA_NFE, n)
        return x0p

    def stochastic_resample(self, z0: torch.Tensor, z_prev: torch.Tensor, acp_target: float, sigma2: float,
                            generator: GeneratorLike) -> torch.Tensor:
        """Draw ``z_{k−1}`` around the data-consistent ``z0*`` and the unconditional ``z'_{k−1}``
        (``acp_target``: the ``ᾱ`` of the mixture, see ``resample_alpha``)."""
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
            threshold = _noise_variance(operator, batch, v.device)
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
        """``"original"``: one more latent optimisation of ``z_0`` for every sample that made a step
        (a sample started at ``k = 0`` is returned as given)."""
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
