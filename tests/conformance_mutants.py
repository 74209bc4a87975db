"""Deliberately broken solvers, one per property of the conformance suite's result checks.

Each mutant passes the call-contract checks (counts, timesteps, determinism, batch = alone) and
is wrong only in what it computes, which is where Flash's intermediate starts expose bugs.
`MUTANTS` maps each to the check that must catch it and phrases its message must contain.
"""

from __future__ import annotations

import torch

from flash_plugin.solvers import Sampler
from flash_plugin.types import StartPoint
from flash_plugin.utils.random import randn_per_sample


class GuidedSampler(Sampler):
    """A minimal correct guided solver: DDPM step minus ζ ∇_z Σ_i ‖y_i − A(D(ẑ0_i))‖ (DPS-like)."""

    ignores_measurement = False
    zeta = 0.3
    sign = 1.0

    def step(self, ctx):
        with torch.enable_grad():
            z = ctx.z.detach().requires_grad_(True)
            eps, x0 = self.predict(ctx, z)
            r = ctx.y - ctx.operator.forward(self.model.decode(x0))
            (grad,) = torch.autograd.grad(r.flatten(1).norm(dim=1).sum(), z)
        with torch.no_grad():
            return self.update(ctx, z.detach(), eps.detach(), x0.detach()) - self.sign * self.zeta * grad


class IgnoresStartLatent(Sampler):
    """Draws fresh noise for k < N instead of using the start latent."""

    def solve(self, y, operator, *, start=None, generator=None, callback=None):
        if start is not None:
            fresh = randn_per_sample(start.latent.shape, generator, device=start.latent.device, dtype=start.latent.dtype)
            start = StartPoint(start.step, fresh)
        return super().solve(y, operator, start=start, generator=generator, callback=callback)


class RenoisesStartLatent(Sampler):
    """Treats the start latent as a clean estimate and re-noises it to level k."""

    def solve(self, y, operator, *, start=None, generator=None, callback=None):
        if start is not None:
            acp = self.schedule.alphas_cumprod[start.step.cpu()].to(start.latent).view(-1, *[1] * (start.latent.ndim - 1))
            noise = randn_per_sample(start.latent.shape, generator, device=start.latent.device, dtype=start.latent.dtype)
            start = StartPoint(start.step, acp.sqrt() * start.latent + (1 - acp).sqrt() * noise)
        return super().solve(y, operator, start=start, generator=generator, callback=callback)


class NoiseAfterLastStep(Sampler):
    """Adds the noise of the smallest level once more after the last step."""

    def step(self, ctx):
        out = super().step(ctx)
        if ctx.k == 1:
            b1 = float(1 - self.schedule.alphas_cumprod[1]) ** 0.5
            out = out + b1 * randn_per_sample(out.shape, ctx.generator, device=out.device, dtype=out.dtype)
        return out


class SkipsLastUpdate(Sampler):
    """Calls the denoiser at the last step but returns the level-1 state unchanged."""

    def step(self, ctx):
        out = super().step(ctx)
        return ctx.z if ctx.k == 1 else out


class DoubleAncestralNoise(Sampler):
    """Ancestral noise with twice the standard deviation (and the deterministic part unchanged)."""

    def update(self, ctx, z, eps, x0):
        out = super().update(ctx, z, eps, x0)
        if ctx.acp_prev < 1.0:
            sigma = ((1 - ctx.acp_prev) / (1 - ctx.acp)) ** 0.5 * (1 - ctx.acp / ctx.acp_prev) ** 0.5
            out = out + sigma * randn_per_sample(z.shape, ctx.generator, device=z.device, dtype=z.dtype)
        return out


class WrongGuidanceSign(GuidedSampler):
    """Adds the guidance gradient instead of subtracting it."""

    sign = -1.0


class LevelOffByOne(Sampler):
    """Looks ᾱ up one level too noisy (k + 1) in the update."""

    def step(self, ctx):
        k = min(ctx.k + 1, self.schedule.num_steps)
        ctx.acp, ctx.acp_prev = float(self.schedule.alphas_cumprod[k]), float(self.schedule.alphas_cumprod[k - 1])
        return super().step(ctx)


class ClipsPrediction(Sampler):
    """Clips the x̂0 prediction to [-1, 1] (a pixel-space habit that biases latents)."""

    def predict(self, ctx, z):
        eps, x0 = super().predict(ctx, z)
        x0 = x0.clamp(-1, 1)
        a, b = ctx.acp**0.5, (1.0 - ctx.acp) ** 0.5
        return (z - a * x0) / b, x0


class IterationCounterGuidance(GuidedSampler):
    """Scales its guidance by the iteration count since the solve began instead of by the level k."""

    def solve(self, y, operator, *, start=None, generator=None, callback=None):
        self._iteration = 0
        return super().solve(y, operator, start=start, generator=generator, callback=callback)

    def step(self, ctx):
        self.zeta = 0.05 * self._iteration
        self._iteration += 1
        return super().step(ctx)


class ClampsMeasurement(GuidedSampler):
    """Clamps y in place to [-0.9, 0.9] (a preprocessing step that overwrites the caller's data)."""

    def solve(self, y, operator, *, start=None, generator=None, callback=None):
        y.clamp_(-0.9, 0.9)
        return super().solve(y, operator, start=start, generator=generator, callback=callback)


class Float32Buffer(GuidedSampler):
    """Accumulates the residual norms in a float32 buffer (which a float64 loss cannot enter)."""

    def step(self, ctx):
        buf = torch.zeros(ctx.z.shape[0], dtype=torch.float32)
        buf[:] = (ctx.y - ctx.operator.forward(ctx.z)).flatten(1).norm(dim=1)
        if buf.dtype != ctx.y.dtype:
            buf.index_put_((torch.arange(len(buf)),), ctx.y.flatten(1)[:, 0])
        return super().step(ctx)


MUTANTS = {
    IgnoresStartLatent: ("check_start_latent_is_first_input", ["differs from start.latent", "ignored"]),
    RenoisesStartLatent: ("check_start_latent_is_first_input", ["differs from start.latent", "re-noised"]),
    NoiseAfterLastStep: ("check_output_variance_bounded", ["near-deterministic", "noise added after the last step"]),
    SkipsLastUpdate: ("check_output_variance_bounded", ["near-deterministic", "last update skipped"]),
    DoubleAncestralNoise: ("check_intermediate_states_on_forward_process", ["forward marginal", "too much noise"]),
    WrongGuidanceSign: ("check_guidance_points_to_posterior", ["moved away from the posterior mean", "wrong sign"]),
    LevelOffByOne: ("check_output_mean_from_any_start", ["output mean off the data mean", "wrong level"]),
    ClipsPrediction: ("check_output_mean_from_any_start", ["unit-variance oracle", "clipped"]),
    IterationCounterGuidance: ("check_resume_equals_tail", ["resumed at level", "iteration count"]),
    ClampsMeasurement: ("check_inputs_not_modified", ["y was modified in place", "version"]),
    Float32Buffer: ("check_float64_problem_solves_in_float64", ["float64 problem raised", "float32"]),
}
