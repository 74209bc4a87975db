"""Contract double of the DPS repository's sampler (DPS2022/diffusion-posterior-sampling,
guided_diffusion/gaussian_diffusion.py), written for flash-plugin's tests from the documented
interface, not copied: `create_sampler`, a `SpacedDiffusion` subclass `DDPM` with `timestep_map`,
`num_timesteps` as the loop bound, `p_sample_loop(model, x_start, measurement, measurement_cond_fn,
record, save_root)`. Quirks kept: `x_start.requires_grad_()` in place, a `q_sample` of the
measurement drawn from the global RNG each step, the `noisy_measurement` keyword, the global RNG for
the DDPM noise, and the batch refusal (`if t != 0` on a batch tensor). Fixed-small variance only.
"""

import numpy as np
import torch
from tqdm.auto import tqdm


def linear_betas(steps):
    scale = 1000 / steps
    return np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)


class GaussianDiffusion:
    def __init__(self, betas):
        self.betas = np.asarray(betas, dtype=np.float64)
        self.num_timesteps = len(self.betas)
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])

    def q_sample(self, x_start, t):
        a = torch.as_tensor(self.alphas_cumprod, dtype=x_start.dtype)[t].view(-1, *([1] * (x_start.ndim - 1)))
        return a.sqrt() * x_start + (1 - a).sqrt() * torch.randn_like(x_start)

    def p_mean_variance(self, model, x, t):
        eps = model(x, t)
        acp = torch.as_tensor(self.alphas_cumprod, dtype=x.dtype)[t].view(-1, 1, 1, 1)
        prev = torch.as_tensor(self.alphas_cumprod_prev, dtype=x.dtype)[t].view(-1, 1, 1, 1)
        beta = torch.as_tensor(self.betas, dtype=x.dtype)[t].view(-1, 1, 1, 1)
        x0 = (x - (1 - acp).sqrt() * eps) / acp.sqrt()
        mean = beta * prev.sqrt() / (1 - acp) * x0 + (1 - prev) * (1 - beta).sqrt() / (1 - acp) * x
        var = beta * (1 - prev) / (1 - acp)
        return {"mean": mean, "variance": var, "pred_xstart": x0}

    def p_sample_loop(self, model, x_start, measurement, measurement_cond_fn, record, save_root):
        img = x_start
        for idx in tqdm(list(range(self.num_timesteps))[::-1]):
            time = torch.tensor([idx] * img.shape[0])
            img = img.requires_grad_()
            out = self.p_sample(x=img, t=time, model=model)
            noisy = self.q_sample(measurement, t=time)
            img, distance = measurement_cond_fn(x_t=out["sample"], measurement=measurement, noisy_measurement=noisy,
                                                x_prev=img, x_0_hat=out["pred_xstart"])
            img = img.detach_()
        return img


class SpacedDiffusion(GaussianDiffusion):
    def __init__(self, use_timesteps, betas):
        base = GaussianDiffusion(betas)
        keep = sorted(set(use_timesteps))
        last, new = 1.0, []
        for i, a in enumerate(base.alphas_cumprod):
            if i in keep:
                new.append(1 - a / last)
                last = a
        self.timestep_map = keep
        super().__init__(np.array(new))

    def p_mean_variance(self, model, x, t):
        mapped = lambda xx, tt: model(xx, torch.as_tensor(self.timestep_map)[tt])
        return super().p_mean_variance(mapped, x, t)


class DDPM(SpacedDiffusion):
    def p_sample(self, model, x, t):
        out = self.p_mean_variance(model, x, t)
        sample = out["mean"]
        noise = torch.randn_like(x)
        if t != 0:  # quirk: ambiguous for a batch of more than one
            sample = sample + out["variance"].sqrt() * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}


def create_sampler(steps=1000, respacing=100):
    stride = steps / respacing
    return DDPM(use_timesteps=[round(i * stride) for i in range(respacing)], betas=linear_betas(steps))
