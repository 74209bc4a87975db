"""Contract double of ReSample's `ldm_inverse/condition_methods.py` ('ps' only).

Written for flash-plugin's tests from the documented interface: the step reads only the noiser's
`__name__`, calls `operator.forward(x, noisy_measurement=...)` and takes one norm over the batch.
"""

import torch


class _PosteriorSampling:
    def __init__(self, model, operator, noiser):
        self.model, self.operator, self.noiser = model, operator, noiser

    def conditioning(self, x_prev, x_t, x_0_hat, measurement, scale=None, **kwargs):
        if self.noiser.__name__ != "gaussian":
            raise NotImplementedError(self.noiser.__name__)
        pred = self.operator.forward(self.model.differentiable_decode_first_stage(x_0_hat), **kwargs)
        norm = torch.linalg.norm(measurement - pred)  # quirk: one norm for the batch
        grad = torch.autograd.grad(norm, x_prev)[0]
        x_t -= grad * (0.3 if scale is None else scale)
        return x_t, norm


def get_conditioning_method(name, model, operator, noiser, **kwargs):
    if name != "ps":
        raise NameError(name)
    return _PosteriorSampling(model, operator, noiser)
