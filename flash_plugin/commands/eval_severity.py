"""``flash-plugin eval-severity``: evaluate a trained severity encoder.

Loads a `SeverityEncoder` (``--encoder DIR``; it must belong to ``--model``'s latent space),
degrades the first ``--n-images`` Fashion-MNIST test images with the task preset it was trained
for (or ``--operator``), and reports Spearman(σ̂², t), the pairwise ordering accuracy (10
severities per image), calibration of σ̂² against the measured error variance σ̄², and the start
steps k* on the model's schedule. Writes ``report.json`` and ``severity_scatter.png`` to ``--out``.

Example::

    flash-plugin eval-severity --encoder runs/severity/gblur-varying/encoder --out runs/severity/gblur-varying/eval
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flash_plugin.commands import _args

HELP = "evaluate a severity encoder: Spearman, ordering accuracy, calibration, start steps, scatter plot"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval-severity", help=HELP, description=_args.plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", required=True, help="severity encoder directory (save_pretrained output)")
    p.add_argument("--model", default=None, help="LatentDiffusion directory (default: the bundled fashion-mnist-32)")
    p.add_argument("--operator", default=None, help="task preset (default: the one the encoder was trained for)")
    p.add_argument("--noise-std", type=float, default=None, help="override σ_y (default: the encoder's training noise)")
    p.add_argument("--data", default=None, help="Fashion-MNIST IDX directory")
    p.add_argument("--n-images", type=int, default=1000, help="first N test images")
    p.add_argument("--n-ordering", type=int, default=100, help="images for the ordering accuracy (x10 measurements)")
    p.add_argument("--num-steps", type=int, default=None, help="solver steps N for k* (default: all train timesteps)")
    p.add_argument("--batch-size", type=int, default=128, help="images per encoder call (default 128)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N or mps (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=1, help="seed of the severities and measurements (default 1)")
    p.add_argument("--out", default=None, help="directory for report.json and severity_scatter.png (default: print only)")
    p.add_argument("--write-metrics", action="store_true", help="store the numbers in the encoder's config (metrics.test)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=run)
    return p


def validate(args: argparse.Namespace) -> None:
    """Check every argument before the model, the encoder and the data are loaded."""
    _args.check_dir("--encoder", args.encoder)
    _args.check_dir("--model", args.model)
    _args.check_data_dir("--data", args.data)
    _args.check_int("--n-images", args.n_images, minimum=2, hint=" (Spearman and calibration need two images)")
    _args.check_int("--n-ordering", args.n_ordering, minimum=1)
    _args.check_int("--num-steps", args.num_steps, minimum=1)
    _args.check_int("--batch-size", args.batch_size, minimum=1)
    _args.check_threads("--threads", args.threads)
    _args.check_device("--device", args.device)
    _args.check_float("--noise-std", args.noise_std, minimum=0)
    if args.out is not None:
        _args.check_out_dir("--out", args.out)
    if args.operator is not None:
        _args.check_preset("--operator", args.operator)


def run(args: argparse.Namespace) -> int:
    validate(args)

    import torch

    from flash_plugin.commands.train_severity import default_model_dir, load_preset
    from flash_plugin.data.fashion_mnist import load_fashion_mnist
    from flash_plugin.errors import FlashInputError
    from flash_plugin.models.latent_diffusion import LatentDiffusion
    from flash_plugin.severity.encoder import SeverityEncoder
    from flash_plugin.severity.evaluate import evaluate_severity_encoder, format_report
    from flash_plugin.utils.checkpoint import atomic_write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model) if args.model else default_model_dir()
    model = LatentDiffusion.from_pretrained(model_dir).to(args.device)
    encoder = SeverityEncoder.from_pretrained(args.encoder, model=model, device=args.device)
    meta = encoder.metadata
    operator = args.operator or meta.get("operator")
    if not operator:
        raise FlashInputError(f"{args.encoder} does not name its operator family; pass --operator")
    noise = args.noise_std if args.noise_std is not None else meta.get("noise_std")
    preset = load_preset(operator, model, noise)
    images, _ = load_fashion_mnist("test", args.data, limit=args.n_images)
    plot = Path(args.out) / "severity_scatter.png" if args.out else None
    report = evaluate_severity_encoder(encoder, model, preset, images, seed=args.seed, batch_size=args.batch_size,
                                       n_ordering=args.n_ordering, num_steps=args.num_steps, plot=plot)
    if args.out:
        atomic_write_json(Path(args.out) / "report.json", {**report.to_dict(), "encoder": str(args.encoder), "model": str(model_dir)})
    if args.write_metrics:
        encoder.update_metadata(metrics={**meta["metrics"], "test": report.metrics})
        encoder.save_pretrained(args.encoder)
    if args.json:
        print(json.dumps(report.metrics, indent=2))
    else:
        print(format_report(report))
    if plot is not None:
        print(f"wrote {plot}", file=sys.stderr)
    return 0
