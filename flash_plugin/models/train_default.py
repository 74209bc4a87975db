"""Train the bundled default model: the autoencoder, then the latent UNet.

Reproduce the shipped weights (seeds and step counts are in the model card)::

    python -m flash_plugin.models.train_default ae   --out runs/default --device cuda --steps 10000 --batch-size 256 --max-minutes 2.6
    python -m flash_plugin.models.train_default unet --out runs/default --device cuda --steps 30000 --batch-size 512 --max-minutes 4.8
    python -m flash_plugin.models.train_default export --out runs/default --dest flash_plugin/weights/fashion-mnist-32

Every stage checkpoints to ``<out>/<stage>/state.safetensors`` (atomic) every ``--ckpt-every``
steps and on exit, and resumes from it when started again with the same arguments. The data
order depends only on ``(seed, epoch)``, so a resumed run sees the same batches as an
uninterrupted one, and the noise of step ``s`` comes from a generator seeded by ``(seed, s)``, so
a resumed run's weights equal an uninterrupted run's (on the same device; the shipped weights
predate this: their noise came from one generator per run). ``--max-minutes`` stops cleanly early (the step reached is logged).
A JSON log with the losses goes to ``<out>/<stage>/log.jsonl``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from flash_plugin.data.fashion_mnist import load_fashion_mnist
from flash_plugin.models import architectures as arch
from flash_plugin.utils.random import stream_seed
from flash_plugin.utils.checkpoint import atomic_write_json, load_training_state, save_training_state


def _progress(iterable, total, desc, enabled=True):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency of diffusers
        return iterable
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, mininterval=5.0, file=sys.stderr)


class _Batches:
    """Deterministic shuffled mini-batches: the permutation of epoch e comes from seed*1000+e."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size

    def indices(self, step: int) -> torch.Tensor:
        epoch, pos = divmod(step, self.per_epoch)
        g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        perm = torch.randperm(self.n, generator=g)
        return perm[pos * self.batch_size : (pos + 1) * self.batch_size]


def _log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _cosine(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


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
    out = Path(args.out) / "ae"
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    train, _ = load_fashion_mnist("train", args.data)
    test, _ = load_fashion_mnist("test", args.data)
    train = train.to(device)
    ae = arch.make_autoencoder().to(device)
    opt = torch.optim.Adam(ae.parameters(), lr=args.lr)
    state_path = out / "state.safetensors"
    step = 0
    if state_path.exists():
        step, _, _ = load_training_state(state_path, model=ae, optimizer=opt)
        print(f"[ae] resumed at step {step}", file=sys.stderr)
    batches = _Batches(len(train), args.batch_size, args.seed)
    noise_gen = torch.Generator(device=device)
    t_start = time.time()
    ae.train()
    pbar = _progress(range(step, args.steps), args.steps - step, "autoencoder", not args.quiet)
    for step in pbar:
        for group in opt.param_groups:
            group["lr"] = _cosine(step, args.steps, args.lr, 200)
        x = train[batches.indices(step).to(device)]
        noise_gen.manual_seed(stream_seed(args.seed, "ae-noise", step))  # per step: a resumed run draws the same
        post = ae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=noise_gen, device=device)
        rec = ae.decode(z).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            rec_ = {"step": done, "loss": loss.item(), "kl": kl.item(), "lr": opt.param_groups[0]["lr"], "elapsed_s": time.time() - t_start}
            _log(out / "log.jsonl", rec_)
        if done % args.ckpt_every == 0 or done == args.steps or time.time() - t_start > args.max_minutes * 60:
            save_training_state(state_path, model=ae, optimizer=opt, step=done)
            if time.time() - t_start > args.max_minutes * 60:
                print(f"[ae] time budget reached at step {done}", file=sys.stderr)
                break
    final_step = step + 1 if args.steps > 0 else 0
    save_training_state(state_path, model=ae, optimizer=opt, step=final_step)
    ae.eval()
    psnr = psnr_ae(ae, test, device)
    # Per-channel statistics of the latent (posterior mode) over the training set: the
    # LatentDiffusion normalises with them so that every channel has unit variance and one
    # scalar σ̂² means the same noise level in every channel.
    with torch.no_grad():
        zs = torch.cat([ae.encode(train[i : i + 1000]).latent_dist.mode() for i in range(0, len(train), 1000)])
    mean = zs.mean(dim=(0, 2, 3))
    std = zs.std(dim=(0, 2, 3))
    ae.save_pretrained(out / "model")
    summary = {"step": final_step, "test_psnr_db": psnr, "latent_mean": mean.tolist(), "latent_std": std.tolist(),
               "seed": args.seed, "batch_size": args.batch_size, "lr": args.lr, "kl_weight": args.kl_weight,
               "train_minutes": (time.time() - t_start) / 60, "device": str(device)}
    atomic_write_json(out / "summary.json", summary)
    print(json.dumps(summary), file=sys.stderr)


def train_unet(args) -> None:
    from diffusers import AutoencoderKL

    out = Path(args.out) / "unet"
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    ae_dir = Path(args.out) / "ae"
    summary = json.loads((ae_dir / "summary.json").read_text())
    ae = AutoencoderKL.from_pretrained(ae_dir / "model", low_cpu_mem_usage=False).to(device).eval().requires_grad_(False)
    mean = torch.tensor(summary["latent_mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(summary["latent_std"], device=device).view(1, -1, 1, 1)
    train, _ = load_fashion_mnist("train", args.data)
    with torch.no_grad():
        latents = torch.cat([ae.encode(train[i : i + 1000].to(device)).latent_dist.mode() for i in range(0, len(train), 1000)])
    latents = (latents - mean) / std
    del ae
    unet = arch.make_unet().to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    state_path = out / "state.safetensors"
    step = 0
    if state_path.exists():
        step, _, _ = load_training_state(state_path, model=unet, optimizer=opt, ema=ema)
        print(f"[unet] resumed at step {step}", file=sys.stderr)
    acp = arch.ldm_alphas_cumprod().float().to(device)
    batches = _Batches(len(latents), args.batch_size, args.seed)
    gen = torch.Generator(device=device)
    t_start = time.time()
    unet.train()
    pbar = _progress(range(step, args.steps), args.steps - step, "unet", not args.quiet)
    for step in pbar:
        for group in opt.param_groups:
            group["lr"] = _cosine(step, args.steps, args.lr, 500)
        z0 = latents[batches.indices(step).to(device)]
        gen.manual_seed(stream_seed(args.seed, "unet-noise", step))  # per step: a resumed run draws the same
        t = torch.randint(0, len(acp), (len(z0),), generator=gen, device=device)
        eps = torch.randn(z0.shape, generator=gen, device=device)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        loss = F.mse_loss(unet(zt, t).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(ema.parameters()), list(unet.parameters()), 1 - decay)
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            _log(out / "log.jsonl", {"step": done, "loss": loss.item(), "lr": opt.param_groups[0]["lr"], "elapsed_s": time.time() - t_start})
        over = time.time() - t_start > args.max_minutes * 60
        if done % args.ckpt_every == 0 or done == args.steps or over:
            save_training_state(state_path, model=unet, optimizer=opt, step=done, ema=ema)
            if over:
                print(f"[unet] time budget reached at step {done}", file=sys.stderr)
                break
    final_step = step + 1 if args.steps > 0 else 0
    save_training_state(state_path, model=unet, optimizer=opt, step=final_step, ema=ema)
    ema.save_pretrained(out / "model_ema")
    # Held-out denoising loss of the EMA weights on test latents (fixed seed), a cheap quality number.
    test, _ = load_fashion_mnist("test", args.data)
    ae = AutoencoderKL.from_pretrained(ae_dir / "model", low_cpu_mem_usage=False).to(device).eval()
    g = torch.Generator(device=device).manual_seed(1234)
    with torch.no_grad():
        zt_test = (ae.encode(test[:2000].to(device)).latent_dist.mode() - mean) / std
        t = torch.randint(0, len(acp), (len(zt_test),), generator=g, device=device)
        eps = torch.randn(zt_test.shape, generator=g, device=device)
        a = acp[t].view(-1, 1, 1, 1)
        test_loss = F.mse_loss(ema.eval()(a.sqrt() * zt_test + (1 - a).sqrt() * eps, t).sample, eps).item()
    s = {"step": final_step, "test_eps_mse_ema": test_loss, "seed": args.seed, "batch_size": args.batch_size,
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
