"""Contract double of the PSLD repository's `DDIMSampler` (LituRout/PSLD, psld.py).

Written for flash-plugin's tests from the documented interface, not copied: same public method
names and keyword arguments as the upstream, and the quirks an adapter must survive (CUDA
buffers, float truncation of `timesteps`, global RNG, batch-wide norms, prints, tqdm).
"""

import numpy as np
import torch
from tqdm import tqdm


class DDIMSampler:
    def __init__(self, model, schedule="linear", **kwargs):
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps

    def register_buffer(self, name, attr):
        # Quirk: tensors always go to the GPU (fails on a CPU-only torch).
        if isinstance(attr, torch.Tensor):
            attr = attr.to(torch.device("cuda"))
        setattr(self, name, attr)

    def make_schedule(self, ddim_num_steps, ddim_discretize="uniform", ddim_eta=0.0, verbose=True):
        total = self.ddpm_num_timesteps
        times = np.arange(0, total, total // ddim_num_steps) + 1
        acp = self.model.alphas_cumprod.detach().cpu().double()
        idx = times - 1 if times[-1] == len(times) else times
        a = acp[torch.as_tensor(idx)]
        a_prev = torch.cat([acp[:1], a[:-1]])
        sig = ddim_eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        self.ddim_timesteps = times
        if verbose:
            print("double: schedule", times)
        self.register_buffer("alphas_cumprod", self.model.alphas_cumprod.float())
        self.register_buffer("ddim_alphas", a.float())
        self.register_buffer("ddim_alphas_prev", a_prev.float().numpy())
        self.register_buffer("ddim_sigmas", sig.float())

    def ddim_sampling(self, cond, shape, x_T=None, ddim_use_original_steps=False, callback=None, timesteps=None,
                      log_every_t=100, measurements=None, operator=None, gamma=1, omega=1, general_inverse=None,
                      noiser=None, **unused):
        device = self.model.betas.device
        state = torch.randn(shape, device=device) if x_T is None else x_T
        if timesteps is None:
            times = self.ddim_timesteps
        else:  # quirk: float arithmetic, then one position dropped
            n = self.ddim_timesteps.shape[0]
            times = self.ddim_timesteps[: int(min(timesteps / n, 1) * n) - 1]
        total = times.shape[0]
        history = {"x_inter": [state], "pred_x0": [state]}
        print(f"double: {total} positions")
        for i, t in enumerate(tqdm(np.flip(times), total=total)):
            index = total - 1 - i
            tt = torch.full((shape[0],), int(t), device=device, dtype=torch.long)
            state, pred = self.p_sample_ddim(state, cond, tt, index=index, measurements=measurements, operator=operator,
                                             gamma=gamma, omega=omega, noiser=noiser)
            if callback:
                callback(i)
            if index % log_every_t == 0 or index == total - 1:
                history["x_inter"].append(state)
                history["pred_x0"].append(pred)
        return state, history

    def p_sample_ddim(self, x, c, t, index, measurements=None, operator=None, gamma=1, omega=1, noiser=None, **unused):
        y = measurements
        z = x.detach().clone().requires_grad_(True)
        e = self.model.apply_model(z, t, None)
        a, a_prev, s = float(self.ddim_alphas[index]), float(self.ddim_alphas_prev[index]), float(self.ddim_sigmas[index])
        z0 = (z - (1 - a) ** 0.5 * e) / a**0.5
        nxt = a_prev**0.5 * z0 + (1 - a_prev - s**2) ** 0.5 * e + s * torch.randn(x.shape, device=x.device)
        img = self.model.differentiable_decode_first_stage(z0)
        fit = torch.linalg.norm(noiser(operator.forward(img)) - y)  # quirk: one norm for the whole batch
        glued = operator.transpose(y) + img - operator.transpose(operator.forward(img))
        enc = self.model.get_first_stage_encoding(self.model.encode_first_stage(glued))
        loss = gamma * torch.linalg.norm(enc - z0) + omega * fit
        grad = torch.autograd.grad(loss, z)[0]
        print("Loss: ", loss.item())
        return (nxt - grad).detach(), z0.detach()
