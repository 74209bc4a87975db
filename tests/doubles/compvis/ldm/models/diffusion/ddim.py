"""Contract double of the ReSample repository's `DDIMSampler` (soominkwon/resample, ddim.py).

Written for flash-plugin's tests from the documented interface, not copied. Reproduces what an
adapter must survive: CUDA buffers, S < 1000 only, the float truncation of `timesteps`,
`x_T.requires_grad_()` in place, a DPS step called with `noisy_measurement=`, DC events derived
from the number of positions run (none in the first third, pixel stage down to a third, latent
stage below, every 10th index, 5 time-travel denoiser calls), stochastic resampling from the
global RNG, batch-mean losses, one final latent optimisation, prints and tqdm. The inner
optimisations run fewer iterations than the upstream's (the tests need the structure, not the
convergence).
"""

import numpy as np
import torch
from tqdm import tqdm


class DDIMSampler:
    def __init__(self, model, schedule="linear", **kwargs):
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps

    def register_buffer(self, name, attr):
        if isinstance(attr, torch.Tensor):
            attr = attr.to(torch.device("cuda"))
        setattr(self, name, attr)

    def make_schedule(self, ddim_num_steps, ddim_discretize="uniform", ddim_eta=0.0, verbose=True):
        total = self.ddpm_num_timesteps
        self.ddim_timesteps = np.arange(0, total, total // ddim_num_steps) + 1
        if ddim_num_steps >= total:
            return  # quirk: no DDIM arrays at S = T
        acp = self.model.alphas_cumprod.detach().cpu().double()
        a = acp[torch.as_tensor(self.ddim_timesteps)]
        a_prev = torch.cat([acp[:1], a[:-1]])
        self.register_buffer("ddim_alphas", a.float())
        self.register_buffer("ddim_alphas_prev", a_prev.float())
        self.register_buffer("ddim_sigmas", (ddim_eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()).float())

    def resample_sampling(self, measurement, measurement_cond_fn, cond, shape, operator_fn=None, inter_timesteps=10,
                          x_T=None, ddim_use_original_steps=False, callback=None, timesteps=None, log_every_t=100, **unused):
        travel = 5  # quirk: the argument is ignored
        device = self.model.betas.device
        img = torch.randn(shape, device=device) if x_T is None else x_T
        img = img.requires_grad_()  # quirk: in place on the caller's tensor
        if timesteps is None:
            times = self.ddim_timesteps
        else:
            n = self.ddim_timesteps.shape[0]
            times = self.ddim_timesteps[: int(min(timesteps / n, 1) * n) - 1]
        total = times.shape[0]
        order = list(np.flip(times))
        history = {"x_inter": [img], "pred_x0": [img]}
        for i, t in enumerate(tqdm(order, total=total)):
            index = total - 1 - i
            tt = torch.full((shape[0],), int(t), device=device, dtype=torch.long)
            a_t = float(self.ddim_alphas[index])
            a_prev = float(self.ddim_alphas_prev[index])
            out, pred, tweedie = self.p_sample_ddim(img, cond, tt, index=index)
            img, _ = measurement_cond_fn(x_t=out, measurement=measurement, noisy_measurement=measurement,
                                         x_prev=img, x_0_hat=tweedie, scale=0.5 * a_t)
            third = total // 3
            if 0 < index <= total - third and index % 10 == 0:
                keep = img.detach().clone()
                for j in range(i, min(i + travel, total - 1)):
                    tj = torch.full((shape[0],), int(order[j + 1]), device=device, dtype=torch.long)
                    img, pred, tweedie = self.p_sample_ddim(img, cond, tj, index=total - j - 2)
                var = 40 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
                if index >= third:
                    pix = self.pixel_optimization(measurement, self.model.decode_first_stage(tweedie.detach()), operator_fn)
                    img = self.stochastic_resample(self.model.encode_first_stage(pix), keep, a_prev, var).requires_grad_()
                else:
                    z, _ = self.latent_optimization(measurement, tweedie.detach(), operator_fn)
                    img = self.stochastic_resample(z, keep, a_prev, var)
            if callback:
                callback(i)
            if index % log_every_t == 0 or index == total - 1:
                history["x_inter"].append(img)
                history["pred_x0"].append(pred)
        final, _ = self.latent_optimization(measurement, img.detach(), operator_fn)
        return final.detach().clone(), history

    def p_sample_ddim(self, x, c, t, index, **unused):
        e = self.model.apply_model(x, t, c)
        a, a_prev, s = float(self.ddim_alphas[index]), float(self.ddim_alphas_prev[index]), float(self.ddim_sigmas[index])
        z0 = (x - (1 - a) ** 0.5 * e) / a**0.5
        nxt = a_prev**0.5 * z0 + (1 - a_prev - s**2) ** 0.5 * e + s * torch.randn(x.shape, device=x.device)
        return nxt, z0, (x - (1 - a) * e) / a**0.5

    def pixel_optimization(self, measurement, x_prime, operator_fn, eps=1e-3, max_iters=20):
        v = x_prime.detach().clone().requires_grad_()
        opt = torch.optim.AdamW([v], lr=1e-2)
        for _ in range(max_iters):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(operator_fn(v), measurement.detach())  # quirk: batch mean
            loss.backward()
            opt.step()
        return v

    def latent_optimization(self, measurement, z_init, operator_fn, eps=1e-3, max_iters=10, lr=None):
        if not z_init.requires_grad:
            z_init = z_init.requires_grad_()
        opt = torch.optim.AdamW([z_init], lr=5e-3)
        first = None
        for _ in range(max_iters):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(operator_fn(self.model.differentiable_decode_first_stage(z_init)), measurement.detach())
            first = loss.detach() if first is None else first
            loss.backward()
            opt.step()
        return z_init, first

    def stochastic_resample(self, pseudo_x0, x_t, a_t, sigma):
        noise = torch.randn_like(pseudo_x0)
        mean = (sigma * a_t**0.5 * pseudo_x0 + (1 - a_t) * x_t) / (sigma + 1 - a_t)
        return mean + noise * (1 / (1 / sigma + 1 / (1 - a_t))) ** 0.5
