"""Contract double of DPS's `guided_diffusion/condition_methods.py` ('ps'), written for the tests:
reads the noiser's `__name__`, passes keywords to `operator.forward`, one norm over the batch."""

import torch


class PosteriorSampling:
    def __init__(self, operator, noiser, **kwargs):
        self.operator, self.noiser = operator, noiser
        self.scale = kwargs.get("scale", 1.0)

    def conditioning(self, x_prev, x_t, x_0_hat, measurement, **kwargs):
        assert self.noiser.__name__ == "gaussian"
        norm = torch.linalg.norm(measurement - self.operator.forward(x_0_hat, **kwargs))
        grad = torch.autograd.grad(norm, x_prev)[0]
        x_t -= grad * self.scale
        return x_t, norm


def get_conditioning_method(name, operator, noiser, **kwargs):
    if name != "ps":
        raise NameError(name)
    return PosteriorSampling(operator, noiser, **kwargs)
