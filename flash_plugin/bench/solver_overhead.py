"""Per-step cost of the reference solvers and the share of time spent outside the networks.

    python -m flash_plugin.bench.solver_overhead [--model tiny|default] [--steps 50] [--batch 4]
    python -m flash_plugin.bench.solver_overhead --model default --steps 20 --batch 2 --inner-steps 20

All solvers run side by side in one process on the same model, measurement and starts (rounds
interleave the solvers; the median round is reported). The model's ``eps`` (UNet), ``decode`` and
``encode`` are wrapped with timers that also time their *backward* passes (identity autograd
functions at each call's input and output mark when the backward pass enters and leaves the
network), so ``net %`` is the share of the solve spent inside the UNet/decoder/encoder, forward
and backward, and ``outside %`` = 100 − ``net %`` is everything else: the solver's own tensor
arithmetic, the operator, ReSample's optimiser updates, Python. The target is < 10 % outside.

``--model tiny`` (default): the random-weight test model (1×16×16 images, 4×8×8 latents, a few
thousand parameters), a worst case for the share outside. ``--model default``: the bundled
``fashion-mnist-32`` LDM. This is a script, not a test; it prints a table and returns.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import torch


class _Clock:
    """Accumulates seconds per network, forward and backward."""

    def __init__(self, sync: Callable[[], None]):
        self.sync = sync
        self.seconds: dict[str, float] = {}
        self._open: dict[str, float] = {}

    def add(self, key: str, dt: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + dt

    def open(self, key: str) -> None:
        self.sync()
        self._open[key] = time.perf_counter()

    def close(self, key: str) -> None:
        self.sync()
        start = self._open.pop(key, None)
        if start is not None:
            self.add(key, time.perf_counter() - start)

    def total(self) -> float:
        return sum(self.seconds.values())


class _BackwardMark(torch.autograd.Function):
    """Identity whose backward opens (at a network's output: the network's backward comes next) or
    closes (at its input: the network's backward is done) the clock entry ``key``."""

    @staticmethod
    def forward(ctx, x, clock, key, action):
        ctx.clock, ctx.key, ctx.action = clock, key, action
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        getattr(ctx.clock, ctx.action)(ctx.key)
        return g, None, None, None
        return g, None, None


class TimedModel:
    """Delegates to ``model``; times ``eps``/``decode``/``encode`` forward and backward passes."""

    def __init__(self, model: Any, clock: _Clock):
        self._model, self._clock = model, clock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def _timed(self, key: str, fn: Callable[..., torch.Tensor], x: torch.Tensor, *args) -> torch.Tensor:
        clock = self._clock
        grad = torch.is_grad_enabled() and x.requires_grad
        if grad:
            x = _BackwardMark.apply(x, clock, key + " bwd", "close")
        clock.sync()
        t0 = time.perf_counter()
        out = fn(x, *args)
        clock.sync()
        clock.add(key + " fwd", time.perf_counter() - t0)
        return _BackwardMark.apply(out, clock, key + " bwd", "open") if grad else out

    def eps(self, z, t):
        return self._timed("unet", self._model.eps, z, t)

    def decode(self, z):
        return self._timed("decoder", self._model.decode, z)

    def encode(self, x):
        return self._timed("encoder", self._model.encode, x)


def tiny_components(seed: int = 0):
    """``(autoencoder, unet)``: the random-weight test model's diffusers parts (1x16x16 images,
    4x8x8 latents); the tests build their tiny LatentDiffusion from these too."""
    from diffusers import AutoencoderKL, UNet2DModel

    torch.manual_seed(seed)
    ae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                       latent_channels=4, norm_num_groups=8, sample_size=16)
    unet = UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    return ae, unet


def tiny_model():
    from flash_plugin.models.architectures import ldm_alphas_cumprod
    from flash_plugin.models.latent_diffusion import LatentDiffusion

    ae, unet = tiny_components()
    return LatentDiffusion(ae, unet, ldm_alphas_cumprod(), name="tiny-random")


SOLVER_NAMES = ("sampler", "latent-dps", "gml-dps", "psld", "resample", "resample-original")


def solvers(model, steps: int, inner_steps: int | None) -> dict[str, Any]:
    from flash_plugin.solvers import GMLDPS, PSLD, LatentDPS, ReSample, Sampler

    return {
        "sampler": Sampler(model, num_steps=steps),
        "latent-dps": LatentDPS(model, num_steps=steps),
        "gml-dps": GMLDPS(model, num_steps=steps),
        "psld": PSLD(model, num_steps=steps),
        "resample": ReSample(model, num_steps=steps, inner_steps=inner_steps),
        "resample-original": ReSample(model, num_steps=steps, variant="original", inner_steps=inner_steps),
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("tiny", "default"), default="tiny")
    p.add_argument("--steps", type=int, default=50, help="reverse steps N of every solver (ReSample's DC every 10)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    p.add_argument("--inner-steps", type=int, default=None, help="cap ReSample's inner iterations (default: each variant's)")
    p.add_argument("--solvers", default=None, help="comma-separated subset of: " + ", ".join(SOLVER_NAMES))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    from flash_plugin.operators import get_preset

    if args.model == "tiny":
        model = tiny_model()
    else:
        from flash_plugin.models import load_default_model

        model = load_default_model().latent_diffusion
    model = model.to(device)
    image_shape = tuple(model.image_shape)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    clock = _Clock(sync)
    timed = TimedModel(model, clock)

    g = torch.Generator().manual_seed(0)
    x = (torch.rand((args.batch, *image_shape), generator=g) * 2 - 1).to(device)
    preset = get_preset("random-inpainting")
    op = preset.make(preset.sample_severity(args.batch, g), g, image_shape=image_shape).to(device)
    y = op.measure(x, g)
    table = solvers(timed, args.steps, args.inner_steps)
    if args.solvers:
        wanted = [n.strip() for n in args.solvers.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(table))
        if unknown:
            p.error(f"unknown solvers {unknown}; choose from {', '.join(table)}")
        table = {n: table[n] for n in wanted}
    from flash_plugin.types import StartPoint

    warm = StartPoint(torch.full((args.batch,), min(2, args.steps)), torch.randn((args.batch, *model.latent_shape), generator=g).to(device))
    for solver in table.values():  # warm-up: first calls allocate and pick kernels
        solver.solve(y, op, start=warm, generator=[torch.Generator().manual_seed(i) for i in range(args.batch)])
    runs: dict[str, list[tuple[float, dict[str, float], dict]]] = {name: [] for name in table}
    for _ in range(args.rounds):
        for name, solver in table.items():
            clock.seconds.clear()
            sync()
            t0 = time.perf_counter()
            sol = solver.solve(y, op, generator=[torch.Generator().manual_seed(i) for i in range(args.batch)])
            sync()
            runs[name].append((time.perf_counter() - t0, dict(clock.seconds), sol.extras))

    print(f"model {getattr(model, 'name', args.model)} | device {device} | batch {args.batch} | N = {args.steps} | "
          f"torch threads {torch.get_num_threads()} | median of {args.rounds} interleaved rounds")
    head = f"{'solver':<18} {'ms/step':>8} {'unet %':>7} {'dec %':>6} {'enc %':>6} {'outside %':>9}  {'dec calls':>9} {'enc calls':>9} {'inner its':>9}"
    print(head)
    print("-" * len(head))
    result: dict[str, dict[str, float]] = {}
    for name, rs in runs.items():
        total, secs, extras = sorted(rs, key=lambda r: r[0])[len(rs) // 2]
        share = {k: 100 * sum(v for kk, v in secs.items() if kk.startswith(k)) / total for k in ("unet", "decoder", "encoder")}
        outside = 100 - sum(share.values())
        per = {k: float(v.double().mean()) for k, v in extras.items()}
        result[name] = {"ms_per_step": 1000 * total / args.steps, "outside_pct": outside, **share}
        print(f"{name:<18} {1000 * total / args.steps:8.2f} {share['unet']:7.1f} {share['decoder']:6.1f} {share['encoder']:6.1f} "
              f"{outside:9.1f}  {per.get('count_decoder_calls', 0):9.1f} {per.get('count_encoder_calls', 0):9.1f} "
              f"{per.get('count_inner_iterations', 0):9.1f}")
    print("(calls and inner iterations: per sample; the final decode of the result is timed but not counted)")
    return result


if __name__ == "__main__":
    main()
