"""Train the bundled default model: the autoencoder, then the latent UNet, then export both.

    python -m flash_plugin.models.train_default ae     --out runs/default [--device cuda --steps N --batch-size B --max-minutes M]
    python -m flash_plugin.models.train_default unet   --out runs/default [...]
    python -m flash_plugin.models.train_default export --out runs/default --dest flash_plugin/weights/fashion-mnist-32

The shipped weights' exact commands are in the model card. Each stage checkpoints to
``<out>/<stage>/state.safetensors`` every ``--ckpt-every`` steps and on exit and resumes from it
when started again with the same arguments; ``--max-minutes`` stops cleanly. A step's batch and
noise depend only on ``(seed, step)`` (`flash_plugin.utils.training`), so a resumed run ends with
the weights of an uninterrupted one on the same device. The losses go to ``<out>/<stage>/log.jsonl``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from flash_plugin.data.fashion_mnist import load_fashion_mnist
from flash_plugin.models import architectures as arch
from flash_plugin.utils.checkpoint import atomic_write_json
from flash_plugin.utils.training import SeededBatches, TimeBudget, TrainingRun, progress_bar, step_generator


def _batches(n: int, args) -> SeededBatches:
    # Whole batches per epoch, the permutation of epoch e seeded by seed * 1000 + e: the data order
    # of the shipped weights, kept so that the model card's commands still reproduce it.
    return SeededBatches(n, args.batch_size, args.seed, drop_last=True, permutation_seed=lambda e: args.seed * 1000 + e)


def _cosine(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def _train_steps(name: str, out: Path, args, model: torch.nn.Module, opt: torch.optim.Optimizer, warmup: int,
                 step_fn: Callable[[int], dict[str, torch.Tensor]], ema: torch.nn.Module | None = None) -> int:
    """Run ``step_fn(step)`` (one optimiser step, returning the losses to log) from the saved step,
    or 0, to ``args.steps`` under a cosine learning rate; log, checkpoint, stop on the time budget.
    Returns the step reached."""
    run = TrainingRun(out, model=model, optimizer=opt, ema=ema)
    step = 0
    if run.has_state():
        step, _ = run.resume()
        print(f"[{name}] resumed at step {step}", file=sys.stderr)
    budget = TimeBudget(args.max_minutes)
    bar = progress_bar(args.steps, name, enabled=not args.quiet, initial=step, mininterval=5.0)
    model.train()
    while step < args.steps:
        for group in opt.param_groups:
            group["lr"] = _cosine(step, args.steps, args.lr, warmup)
        losses = step_fn(step)
        step += 1
        bar.update(1)
        if step % args.log_every == 0 or step == args.steps:
            run.log.append({"step": step, **{k: v.item() for k, v in losses.items()}, "lr": opt.param_groups[0]["lr"],
                            "elapsed_s": budget.elapsed_s})
        over = budget.exceeded()
        if step % args.ckpt_every == 0 or step == args.steps or over:
            run.save(step)
            if over:
                print(f"[{name}] time budget reached at step {step}", file=sys.stderr)
                break
    bar.close()
    run.save(step)
    return step


@torch.no_grad()
def psnr_ae(ae, images: torch.Tensor, device, batch: int = 500) -> float:
    """Mean PSNR (dB, [0,1] scale) of AE reconstructions (posterior mode) over ``images``."""
    ae.eval()
    vals = []
    for i in range(0, len(images), batch):
        x = images[i : i + batch].to(device)
        rec = ae.decode(ae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        mse = ((rec - x) / 2).square().flatten(1).mean(1)
        vals.append(-10 * torch.log10(mse.clamp_min(1e-12)))
    ae.train()
    return torch.cat(vals).mean().item()


def train_autoencoder(args) -> None:
    """L1 + L2 reconstruction + ``kl_weight``·KL, Adam with a cosine schedule (200 warm-up steps)."""
    out = Path(args.out) / "ae"
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    train, _ = load_fashion_mnist("train", args.data)
    test, _ = load_fashion_mnist("test", args.data)
    train = train.to(device)
    ae = arch.make_autoencoder().to(device)
    opt = torch.optim.Adam(ae.parameters(), lr=args.lr)
    batches = _batches(len(train), args)

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        x = train[batches.indices(step).to(device)]
        post = ae.encode(x).latent_dist
        noise = torch.randn(post.mean.shape, generator=step_generator(args.seed, "ae-noise", step, device), device=device)
        rec = ae.decode(post.mean + post.std * noise).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.detach(), "kl": kl.detach()}

    t_start = time.time()
    step = _train_steps("autoencoder", out, args, ae, opt, 200, step_fn)
    ae.eval()
    psnr = psnr_ae(ae, test, device)
    # Per-channel statistics of the latent (posterior mode) over the training set: the
    # LatentDiffusion normalises with them so that every channel has unit variance and one
    # scalar σ̂² means the same noise level in every channel.
    with torch.no_grad():
        zs = torch.cat([ae.encode(train[i : i + 1000]).latent_dist.mode() for i in range(0, len(train), 1000)])
    ae.save_pretrained(out / "model")
    summary = {"step": step, "test_psnr_db": psnr, "latent_mean": zs.mean(dim=(0, 2, 3)).tolist(),
               "latent_std": zs.std(dim=(0, 2, 3)).tolist(), "seed": args.seed, "batch_size": args.batch_size, "lr": args.lr,
               "kl_weight": args.kl_weight, "train_minutes": (time.time() - t_start) / 60, "device": str(device)}
    atomic_write_json(out / "summary.json", summary)
    print(json.dumps(summary), file=sys.stderr)


def _normalised_latents(ae_dir: Path, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, device,
                        chunk: int = 1000) -> torch.Tensor:
    """The trained autoencoder's normalised latents (posterior mode) of ``images``, ``chunk`` at a time."""
    from diffusers import AutoencoderKL

    ae = AutoencoderKL.from_pretrained(ae_dir / "model", low_cpu_mem_usage=False).to(device).eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([ae.encode(images[i : i + chunk].to(device)).latent_dist.mode() for i in range(0, len(images), chunk)])
    return (latents - mean) / std


def train_unet(args) -> None:
    """ε-prediction MSE on the normalised latents, AdamW with a cosine schedule (500 warm-up
    steps), gradient clipping 1, EMA of the weights (the EMA is what is exported)."""
    out = Path(args.out) / "unet"
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    ae_dir = Path(args.out) / "ae"
    summary = json.loads((ae_dir / "summary.json").read_text())
    mean = torch.tensor(summary["latent_mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(summary["latent_std"], device=device).view(1, -1, 1, 1)
    latents = _normalised_latents(ae_dir, load_fashion_mnist("train", args.data)[0], mean, std, device)
    unet = arch.make_unet().to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    acp = arch.ldm_alphas_cumprod().float().to(device)
    batches = _batches(len(latents), args)

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        z0 = latents[batches.indices(step).to(device)]
        gen = step_generator(args.seed, "unet-noise", step, device)
        t = torch.randint(0, len(acp), (len(z0),), generator=gen, device=device)
        eps = torch.randn(z0.shape, generator=gen, device=device)
        a = acp[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(unet(a.sqrt() * z0 + (1 - a).sqrt() * eps, t).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(ema.parameters()), list(unet.parameters()), 1 - decay)
        return {"loss": loss.detach()}

    t_start = time.time()
    step = _train_steps("unet", out, args, unet, opt, 500, step_fn, ema=ema)
    ema.save_pretrained(out / "model_ema")
    # Held-out denoising loss of the EMA weights on test latents (fixed seed), a cheap quality number.
    zt_test = _normalised_latents(ae_dir, load_fashion_mnist("test", args.data)[0][:2000], mean, std, device, chunk=2000)
    g = torch.Generator(device=device).manual_seed(1234)
    with torch.no_grad():
        t = torch.randint(0, len(acp), (len(zt_test),), generator=g, device=device)
        eps = torch.randn(zt_test.shape, generator=g, device=device)
        a = acp[t].view(-1, 1, 1, 1)
        test_loss = F.mse_loss(ema.eval()(a.sqrt() * zt_test + (1 - a).sqrt() * eps, t).sample, eps).item()
    s = {"step": step, "test_eps_mse_ema": test_loss, "seed": args.seed, "batch_size": args.batch_size,
         "lr": args.lr, "ema": args.ema, "train_minutes": (time.time() - t_start) / 60, "device": str(device)}
    atomic_write_json(out / "summary.json", s)
    print(json.dumps(s), file=sys.stderr)
def export(args) -> None:
    """Write the trained AE + EMA UNet as a `LatentDiffusion` directory (``--dest``)."""
    from diffusers import AutoencoderKL, UNet2DModel

    from flash_plugin.models.latent_diffusion import LatentDiffusion

    ae_dir, unet_dir = Path(args.out) / "ae", Path(args.out) / "unet"
    stats = json.loads((ae_dir / "summary.json").read_text())
    ae = AutoencoderKL.from_pretrained(ae_dir / "model", low_cpu_mem_usage=False)
    unet = UNet2DModel.from_pretrained(unet_dir / "model_ema", low_cpu_mem_usage=False)
    ld = LatentDiffusion(ae, unet, arch.ldm_alphas_cumprod(), latent_mean=stats["latent_mean"], latent_std=stats["latent_std"],
                         name="fashion-mnist-32")
    ld.save_pretrained(args.dest)
    print(f"exported to {args.dest} (latent_id {ld.latent_id})", file=sys.stderr)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["ae", "unet", "export"])
    p.add_argument("--dest", default="flash_plugin/weights/fashion-mnist-32", help="export: target directory")
    p.add_argument("--out", default="runs/default")
    p.add_argument("--data", default=None, help="directory with the Fashion-MNIST IDX files")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--ema", type=float, default=0.9995)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=1000)
    p.add_argument("--max-minutes", type=float, default=float("inf"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.stage == "export":
        return export(args)
    defaults = {"ae": (15000, 128, 1e-3), "unet": (30000, 256, 3e-4)}[args.stage]
    args.steps = defaults[0] if args.steps is None else args.steps
    args.batch_size = defaults[1] if args.batch_size is None else args.batch_size
    args.lr = defaults[2] if args.lr is None else args.lr
    (train_autoencoder if args.stage == "ae" else train_unet)(args)


if __name__ == "__main__":
    main()
