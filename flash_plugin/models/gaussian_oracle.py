"""An analytic "latent diffusion model" whose data distribution is Gaussian.

Data ``z0 ~ N(μ, diag(s²))`` per latent dimension, forward process ``z_t = a_t z0 + b_t ε`` with
``a_t = sqrt(ᾱ_t)``, ``b_t = sqrt(1 − ᾱ_t)``. Then ``z_t ~ N(a_t μ, a_t² s² + b_t²)`` and the
optimal (MMSE) noise prediction is linear in ``z_t``::

    ε*(z_t, t) = E[ε | z_t] = b_t (z_t − a_t μ) / (a_t² s² + b_t²)

The autoencoder is linear: ``decode(z) = scale · z`` (image = latent shape), ``encode(x) = x / scale``;
``scale = 1`` is the identity. Every call of `eps` is recorded (``calls``), so tests can check
how many denoiser evaluations a solver made and at which timesteps.
"""

from __future__ import annotations

import torch

from flash_plugin.models.architectures import ldm_alphas_cumprod


class GaussianOracle(torch.nn.Module):
    def __init__(self, mean: torch.Tensor, var: torch.Tensor, alphas_cumprod: torch.Tensor | None = None, *, scale: float = 1.0,
                 name: str = "gaussian-oracle"):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float64)
        var = torch.as_tensor(var, dtype=torch.float64).expand_as(mean).clone()
        if torch.any(var <= 0):
            raise ValueError("oracle variances must be > 0")
        self.register_buffer("mean", mean)
        self.register_buffer("var", var)
        acp = ldm_alphas_cumprod() if alphas_cumprod is None else torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.register_buffer("alphas_cumprod", acp)
        self.scale = float(scale)
        self.latent_shape = tuple(mean.shape)
        self.image_shape = tuple(mean.shape)
        self.name = name
        self.calls: list[torch.Tensor] = []
        self.decoder_calls = 0

    @property
    def latent_id(self) -> str:
        return f"gaussian-oracle-scale{self.scale}-shape{'x'.join(map(str, self.latent_shape))}"

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def eps(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=z.device).long().expand(z.shape[0])
        self.calls.append(t.detach().cpu().clone())
        acp = self.alphas_cumprod.to(z.device)[t].to(z.dtype).view(-1, *([1] * (z.ndim - 1)))
        a, b = acp.sqrt(), (1 - acp).sqrt()
        mu, s2 = self.mean.to(z), self.var.to(z)
        return b * (z - a * mu) / (a * a * s2 + b * b)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self.decoder_calls += 1
        return z * self.scale

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` latents from the data distribution."""
        e = torch.randn((n, *self.latent_shape), generator=generator, dtype=torch.float64)
        return self.mean + self.var.sqrt() * e

    def reset_calls(self) -> None:
        self.calls.clear()
        self.decoder_calls = 0
