"""``flash-plugin bench``: paired comparison of a solver, Flash(solver) and AE-only on the
Fashion-MNIST test split (the model-card numbers).

For ``--n-images`` test images (from ``--offset``), each degraded at a severity drawn from the
task preset's evaluation range with a per-image seed, reports per method the mean PSNR, SSIM and
NFE, the paired differences Flash − baseline and Flash − AE-only with standard errors, and the
Fréchet distance in the features of flash-plugin's own Fashion-MNIST classifier ("FD-FMNIST",
not Inception FID) of each method's reconstructions vs. the clean images. Writes
``bench_<task>_<solver>.json`` to ``--out``. ``--solver-arg zeta=1.0`` runs with a solver argument
other than the table's (recorded under "hparams"; the file name stays the same, so give another
``--out``). Finished batches are kept in ``--out``/.parts, so a stopped run continues where it
stopped. On several processes: ``torchrun --nproc_per_node=P -m flash_plugin.cli bench ...``
shares the batches out (gloo on CPU, one GPU each with ``--device cuda``) and writes one result,
equal image for image to a one-process run with the same ``--batch-size``.
"""

from __future__ import annotations

import argparse

from flash_plugin.bench import paired
from flash_plugin.bench.distributed import is_main_process
from flash_plugin.bench.paired import reusable_baseline, summarize  # noqa: F401 - their former home, re-exported
from flash_plugin.commands import _args
from flash_plugin.errors import FlashInputError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="paired benchmark: solver vs Flash(solver) vs AE-only", description=_args.plain(__doc__),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="gblur-varying", help="task preset (default gblur-varying)")
    p.add_argument("--solver", default="latent-dps", help="registered solver name (default latent-dps)")
    p.add_argument("--n-images", type=int, default=100, help="number of test images, at least 2 (default 100)")
    p.add_argument("--offset", type=int, default=0, help="index of the first test image (default 0)")
    p.add_argument("--batch-size", type=int, default=50, help="images per solve (default 50; it changes the seeds)")
    p.add_argument("--num-steps", type=int, default=None, help="override the solver's N (default: its paper setting)")
    p.add_argument("--solver-arg", action="append", default=[], metavar="NAME=VALUE",
                   help="override a numeric solver argument of the table, e.g. zeta=1.0 (repeatable; recorded in the JSON); "
                        "for a solver a plugin registers, a keyword argument of its factory")
    p.add_argument("--reuse-baseline", default=None, metavar="JSON",
                   help="take the baseline from this earlier bench JSON instead of running it again (only when the "
                        "solver arguments, images, severities and measurements are the same; checked through AE-only)")
    p.add_argument("--methods", nargs="+", default=["baseline", "flash", "ae"], choices=["baseline", "flash", "ae"],
                   help="methods to run (default: all three)")
    p.add_argument("--data", default=None,
                   help="directory with the Fashion-MNIST IDX files (default: search the usual places; the 64 bundled images if absent)")
    p.add_argument("--seed", type=int, default=0, help="seed of the severities, measurements and solvers (default 0)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N or mps (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--goal", default="fidelity", choices=["fidelity", "perceptual"],
                   help="Flash settings: fidelity (tuned for PSNR, default) or perceptual (later starts, lower FD-FMNIST)")
    p.add_argument("--start-policy", default="snr", choices=["snr", "calibrated"],
                   help="how Flash picks start steps: snr (the paper's SNR match of σ̂², default) or calibrated "
                        "(the σ̂² → k map fitted on training images and stored with the bundled model; fidelity goal only)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="keep finished batches in OUT/.parts and continue a stopped run from them (default: on)")
    p.add_argument("--out", default="flash-bench", help="output directory (default ./flash-bench)")
    _args.add_progress_option(p)
    p.set_defaults(func=run)


def parse_solver_args(items: list[str], solver: str, task: str) -> dict[str, float]:
    """``["zeta=1.0"]`` -> ``{"zeta": 1.0}``; for a reference solver only the arguments the table has
    for this (solver, task); a plugin's solver takes what its factory takes (checked when built)."""
    out = _args.parse_name_values("--solver-arg", items)
    allowed = paired.allowed_solver_args(solver, task)
    for name in out if allowed is not None else ():
        if name not in allowed:
            item = next(i for i in items if i.partition("=")[0].strip() == name)
            raise FlashInputError(f"--solver-arg {item!r}: expected NAME=VALUE with NAME one of {sorted(allowed)} for {solver} on {task}")
    return out


def validate(args: argparse.Namespace) -> dict[str, float]:
    """Check every argument before any image is solved; returns the parsed ``--solver-arg`` values."""
    _args.check_int("--n-images", args.n_images, minimum=2,
                    hint=" (the paired standard errors and the Fréchet distance need two images)")
    _args.check_int("--offset", args.offset, minimum=0)
    _args.check_int("--batch-size", args.batch_size, minimum=1)
    _args.check_int("--num-steps", args.num_steps, minimum=1)
    _args.check_threads("--threads", args.threads)
    _args.check_device("--device", args.device)
    _args.check_data_dir("--data", args.data)
    _args.check_file("--reuse-baseline", args.reuse_baseline)
    _args.check_out_dir("--out", args.out)
    if len(set(args.methods)) != len(args.methods):
        raise FlashInputError(f"--methods names a method twice: {' '.join(args.methods)}")
    if args.reuse_baseline and not {"ae", "baseline"} <= set(args.methods):
        raise FlashInputError("--reuse-baseline needs --methods to include baseline and ae (AE-only checks the measurements)")
    _args.check_preset("--task", args.task)
    _args.check_solver("--solver", args.solver)
    overrides = parse_solver_args(args.solver_arg, args.solver, args.task)
    images, source = paired.benchmark_images(args.data)
    if args.offset + args.n_images > len(images):
        raise FlashInputError(f"--offset {args.offset} + --n-images {args.n_images} go past the {len(images)} images of {source}")
    if args.reuse_baseline:
        try:
            paired.read_bench_json(args.reuse_baseline)
        except FlashInputError as exc:
            raise FlashInputError(f"--reuse-baseline {exc}") from None
    return overrides


def run(args: argparse.Namespace) -> int:
    overrides = validate(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    summary = paired.run_paired(
        args.task, args.solver, n_images=args.n_images, offset=args.offset, batch_size=args.batch_size, num_steps=args.num_steps,
        solver_args=overrides, reuse_baseline=args.reuse_baseline, methods=args.methods, data=args.data, seed=args.seed,
        device=args.device, out=args.out, progress=_args.progress_bars(args.progress) and is_main_process(),
        log=lambda line: _args.stage("bench", line), resume=args.resume, goal=args.goal,
        start_policy=args.start_policy)
    if not is_main_process():
        return 0
    print(f"{'method':<10} {'PSNR':>7} {'SSIM':>7} {'NFE':>8} {'FD-FMNIST':>10} {'wall s':>8}")
    for m, s in summary["methods"].items():
        print(f"{m:<10} {s['psnr']:7.2f} {s['ssim']:7.3f} {s['mean_nfe']:8.1f} {s.get('fd_fmnist', float('nan')):10.2f} {s['wall_s']:8.1f}")
    for k, v in summary["paired"].items():
        print(f"{k:<22} {v['mean']:+.3f} ± {v['se']:.3f} (n={v['n']})")
    print(f"wrote {paired.result_path(args.out, args.task, args.solver)}")
    return 0
