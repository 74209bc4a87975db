"""``flash-plugin train-severity``: train a severity encoder for one operator family.

Trains `flash_plugin.severity.SeverityEncoder` for a `LatentDiffusion` (default: the bundled
``fashion-mnist-32``) on Fashion-MNIST train images degraded by a task preset at severities
``t ~ U(0, 1)``, validates on the last ``--val-size`` test images (fixed seeds), then evaluates
the best encoder on the first ``--eval-size`` test images (Spearman, ordering accuracy,
calibration, start steps; ``report.json`` and ``severity_scatter.png``). Output in ``--out``:
``encoder/`` (the best encoder, loadable with ``SeverityEncoder.from_pretrained``),
``state.safetensors`` (resumable state), ``log.jsonl``, ``train_config.json``, ``report.json``,
``severity_scatter.png``. ``--export DIR`` copies the final encoder there, e.g.
``flash_plugin/weights/fashion-mnist-32/severity/gblur-varying``.

Examples::

    flash-plugin train-severity --operator gblur-varying --out runs/severity/gblur-varying --device cuda --max-minutes 20
    flash-plugin train-severity --operator gblur-varying --out runs/severity/gblur-varying --resume
    torchrun --nproc_per_node 4 -m flash_plugin.commands.train_severity --operator random-inpainting --device cuda --out ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from flash_plugin.commands import _args
from flash_plugin.errors import FlashInputError

HELP = "train a severity encoder (ẑ, σ̂²) for a latent diffusion model and an operator family"


def default_model_dir() -> Path:
    """The bundled ``fashion-mnist-32`` model directory inside the installed package."""
    import flash_plugin

    return Path(flash_plugin.__file__).resolve().parent / "weights" / "fashion-mnist-32"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="LatentDiffusion directory (default: the bundled fashion-mnist-32)")
    p.add_argument("--operator", default="gblur-varying", help="task preset name (gblur-varying, random-inpainting, nonlinear-blur, ...)")
    p.add_argument("--noise-std", type=float, default=None, help="override the preset's σ_y ([-1, 1] scale)")
    p.add_argument("--data", default=None, help="Fashion-MNIST IDX directory (default: $FLASH_PLUGIN_FASHION_MNIST or Debian's package)")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--val-size", type=int, default=512, help="validation images (the last of the test split)")
    p.add_argument("--eval-size", type=int, default=1000, help="evaluation images (the first of the test split; 0: skip)")
    p.add_argument("--epochs", type=int, default=100, help="maximum number of epochs (default 100)")
    p.add_argument("--steps-per-epoch", type=int, default=None, help="default: one pass over the training images")
    p.add_argument("--batch-size", type=int, default=32, help="global batch (over all DDP processes)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4)")
    p.add_argument("--head-lr", type=float, default=None, help="learning rate of the variance head (default: --lr)")
    p.add_argument("--lambda-sigma", type=float, default=1.0, help="weight of the variance loss (default 1)")
    p.add_argument("--lambda-img", type=float, default=1.0, help="weight of the decoded-image loss (default 1)")
    p.add_argument("--variance-loss", default="log", choices=("log", "relative", "official"),
                   help="form of the variance loss (default log)")
    p.add_argument("--no-detach-target-variance", dest="detach_target_variance", action="store_false",
                   help="let the variance term back-propagate through σ̄² (the official code)")
    p.add_argument("--detach-head-features", action="store_true",
                   help="the variance head does not back-propagate into the shared encoder trunk")
    p.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm to this value (default: no clipping)")
    p.add_argument("--head-channels", type=int, default=64, help="channels of the variance head (default 64)")
    p.add_argument("--patience", type=int, default=10, help="epochs without improvement before stopping (0: never)")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-time budget of this run (stops cleanly, resumable)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (default: no limit; 0 trains nothing)")
    p.add_argument("--log-every", type=int, default=50, help="log every N steps (default 50)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="runs/severity", help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order, severities and noise (default 0)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/state.safetensors")
    p.add_argument("--init-from", default=None,
                   help="start from this trained encoder (same latent space; e.g. one trained for a narrower severity range) "
                        "instead of a copy of the autoencoder's encoder")
    p.add_argument("--export", default=None, help="also save the final encoder to this directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train-severity", help=HELP, description=_args.plain(__doc__),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def load_preset(name: str, model, noise_std: float | None = None):
    """The task preset ``name``, adapted to the model's image shape (and ``noise_std`` if given)."""
    from flash_plugin.operators import get_preset

    preset = get_preset(name)
    kwargs = dict(preset.family_kwargs)
    if "image_shape" in kwargs and tuple(kwargs["image_shape"]) != tuple(model.image_shape):
        preset = preset.replace(family_kwargs={**kwargs, "image_shape": tuple(model.image_shape)})
    if noise_std is not None:
        preset = preset.replace(noise_std=noise_std)
    return preset


def load_images(data: str | None, model, *, train_limit: int | None, val_size: int, eval_size: int):
    """Fashion-MNIST ``(train, val, eval)``: val = the last ``val_size`` test images, eval = the first
    ``eval_size`` (disjoint)."""
    from flash_plugin.data.fashion_mnist import load_fashion_mnist
    from flash_plugin.errors import FlashInputError

    train, _ = load_fashion_mnist("train", data, limit=train_limit)
    test, _ = load_fashion_mnist("test", data)
    if tuple(train.shape[1:]) != tuple(model.image_shape):
        raise FlashInputError(f"the data's images are {tuple(train.shape[1:])} but the model's are {tuple(model.image_shape)}")
    if val_size + eval_size > len(test):
        raise FlashInputError(f"--val-size {val_size} + --eval-size {eval_size} exceed the {len(test)} test images")
    return train, test[len(test) - val_size :], test[:eval_size]


def validate(args: argparse.Namespace) -> None:
    """Check every argument before the model and the data are loaded."""
    check = _args.check_int
    check("--train-limit", args.train_limit, minimum=1)
    check("--val-size", args.val_size, minimum=1, hint=" (the best encoder is chosen on the validation images)")
    check("--eval-size", args.eval_size, minimum=0)
    check("--epochs", args.epochs, minimum=1)
    check("--steps-per-epoch", args.steps_per_epoch, minimum=1)
    check("--batch-size", args.batch_size, minimum=1)
    check("--head-channels", args.head_channels, minimum=1)
    check("--patience", args.patience, minimum=0)
    check("--max-steps", args.max_steps, minimum=0)  # 0: no training step, e.g. to export an --init-from encoder
    check("--log-every", args.log_every, minimum=1)
    _args.check_float("--lr", args.lr, minimum=0, strict_minimum=True)
    _args.check_float("--head-lr", args.head_lr, minimum=0, strict_minimum=True)
    _args.check_float("--lambda-sigma", args.lambda_sigma, minimum=0)
    _args.check_float("--lambda-img", args.lambda_img, minimum=0)
    _args.check_float("--grad-clip", args.grad_clip, minimum=0, strict_minimum=True)
    _args.check_float("--max-minutes", args.max_minutes, minimum=0, strict_minimum=True)
    _args.check_float("--noise-std", args.noise_std, minimum=0)
    _args.check_threads("--threads", args.threads)
    _args.check_device("--device", args.device)
    _args.check_dir("--model", args.model)
    _args.check_data_dir("--data", args.data)
    _args.check_dir("--init-from", args.init_from)
    _args.check_out_dir("--out", args.out)
    if args.export is not None:
        _args.check_out_dir("--export", args.export)
    if args.resume and not (Path(args.out) / "state.safetensors").is_file():
        raise FlashInputError(f"--resume: {Path(args.out) / 'state.safetensors'} does not exist (nothing to resume; drop --resume)")
    _args.check_preset("--operator", args.operator)


def train_config(args: argparse.Namespace):
    """The `TrainConfig` the arguments describe."""
    from flash_plugin.severity.train import TrainConfig

    return TrainConfig(
        epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size, lr=args.lr, head_lr=args.head_lr,
        lambda_sigma=args.lambda_sigma, lambda_img=args.lambda_img, variance_loss=args.variance_loss,
        detach_target_variance=args.detach_target_variance, detach_head_features=args.detach_head_features,
        grad_clip=args.grad_clip, head_channels=args.head_channels, seed=args.seed, patience=args.patience or None,
        max_minutes=args.max_minutes, max_steps=args.max_steps, device=args.device, progress=not args.quiet,
        log_every=args.log_every,
    )


def run(args: argparse.Namespace) -> int:
    validate(args)

    import torch

    from flash_plugin.models.latent_diffusion import LatentDiffusion
    from flash_plugin.severity.evaluate import evaluate_severity_encoder, format_report
    from flash_plugin.severity.train import train_severity_encoder
    from flash_plugin.utils.checkpoint import atomic_write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    if str(args.device).startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model_dir = Path(args.model) if args.model else default_model_dir()
    model = LatentDiffusion.from_pretrained(model_dir)
    preset = load_preset(args.operator, model, args.noise_std)
    train, val, ev = load_images(args.data, model, train_limit=args.train_limit, val_size=args.val_size, eval_size=args.eval_size)
    config = train_config(args)
    training_data = {"dataset": "fashion-mnist", "split": "train", "images": len(train),
                     "validation": f"test[{10000 - len(val)}:]" if len(val) else None, "model": model_dir.name}
    encoder = None
    if args.init_from:
        from flash_plugin.errors import FlashInputError
        from flash_plugin.severity.encoder import SeverityEncoder

        encoder = SeverityEncoder.from_pretrained(args.init_from, model=model)  # refuses another latent space
        if encoder.head_channels != args.head_channels:
            raise FlashInputError(f"--init-from {args.init_from} has head channels {encoder.head_channels}, "
                                  f"not --head-channels {args.head_channels}")
        training_data["init_from"] = {"path": str(args.init_from), "operator": encoder.metadata.get("operator"),
                                      "severity_range": encoder.metadata.get("severity_range"),
                                      "operator_kwargs": encoder.metadata.get("operator_kwargs"),
                                      "training": encoder.metadata.get("training")}
    result = train_severity_encoder(model, preset, train, val, args.out, config, encoder=encoder, resume=args.resume,
                                    training_data=training_data)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    out = Path(args.out)
    encoder = result.encoder
    summary = {"step": result.step, "epochs_completed": result.epochs_completed, "stop_reason": result.stop_reason,
               "best_val_loss": result.best_val_loss}
    if len(ev):
        report = evaluate_severity_encoder(encoder, model.to(encoder.device), preset, ev, seed=args.seed + 1,
                                           plot=out / "severity_scatter.png")
        print(format_report(report), file=sys.stderr)
        metrics = {**encoder.metadata["metrics"], "test": report.metrics}
        encoder.update_metadata(metrics=metrics, training={**encoder.metadata["training"], **summary})
        encoder.save_pretrained(out / "encoder")
        atomic_write_json(out / "report.json", {**report.to_dict(), "training": summary})
    if args.export:
        encoder.save_pretrained(args.export)
        print(f"exported the encoder to {args.export}", file=sys.stderr)
    print(json.dumps(summary))
    return 0


def main(argv=None) -> int:
    """``python -m flash_plugin.commands.train_severity`` (e.g. under ``torchrun``)."""
    p = argparse.ArgumentParser(prog="train-severity", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
