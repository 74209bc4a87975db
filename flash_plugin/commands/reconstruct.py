"""``flash-plugin reconstruct INPUT --out DIR``: Flash reconstructions of your own images.

INPUT is one of

- a folder of images (png, jpg, bmp, tif, webp): each is converted to the model's channels
  (grey for the bundled model), centre-cropped to a square and resized to the model's image size
  (32x32 for the bundled model; bilinear, antialiased), then degraded with --task at --severity
  (default: each image draws its severity from the preset's range) and reconstructed; the JSON
  then also holds PSNR and SSIM against the resized image. With --measured the images are
  measurements already and need --operator.
- a .safetensors (tensor "y", or its only tensor) or .npy file of measurements y, shape
  (N, C, H, W) or (N, H, W), on the [-1, 1] scale; it needs --operator with the parameters the
  measurements were taken with, e.g. --operator gaussian-blur --operator-arg std=2 --operator-arg
  noise_std=0.1.

The solver is any registered name (flash-plugin plugins); reference solvers run with the settings
tuned for --task (or --tuned-for). The model and the severity estimator are the bundled ones by
default, or directories written by save_pretrained (--model, --estimator).

Writes to --out: DIR/NAME.png per reconstruction, DIR/measurements/NAME.png, and DIR/results.json
with per image the start step k*, the NFE, the estimated σ̂², the wall time (its batch's time
divided by the batch's images) and its seed. Every image has its own seeds (from --seed and the
image's name), so its result does not depend on the batch it lands in (up to float rounding,
a grey level in rare pixels). The JSON and the PNGs are written atomically after every batch: a
run that is killed keeps every finished batch, and running the same command again skips the
images already done and solves the same batches as an uninterrupted run. On several processes,
torchrun --nproc_per_node=P -m flash_plugin.cli reconstruct ... shares the batches out and writes
the same results.
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

from flash_plugin.bench import reconstruct_files as files
from flash_plugin.bench.distributed import is_main_process
from flash_plugin.bench.reconstruct_files import (  # noqa: F401 - their former home, re-exported
    MEASUREMENT_SUFFIXES,
    OPERATOR_TASK,
    RESULTS,
    build_operator,
    image_seed,
    list_inputs,
    load_estimator,
    load_measurements,
    png_bytes,
    read_results,
)
from flash_plugin.commands import _args
from flash_plugin.errors import FlashInputError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("reconstruct", help="reconstruct your own images or measurements with Flash(solver)",
                              description=_args.plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="a folder of images, or a .safetensors / .npy file of measurements")
    p.add_argument("--out", default="flash-reconstruct", help="output directory (default ./flash-reconstruct)")
    p.add_argument("--task", default=None, help="task preset that degrades the images of a folder (default gblur-varying)")
    p.add_argument("--severity", type=float, default=None,
                   help="severity t in [0, 1] for every image (default: each image draws t from the preset's range)")
    p.add_argument("--operator", default=None,
                   help="registered operator family for measurements, built from --operator-arg values (instead of --task)")
    p.add_argument("--operator-arg", action="append", default=[], metavar="NAME=VALUE",
                   help="a numeric argument of --operator, e.g. std=2 or noise_std=0.1 (repeatable)")
    p.add_argument("--measured", action="store_true", help="the images of the folder are measurements already (needs --operator)")
    p.add_argument("--tuned-for", default=None,
                   help="task preset whose tuned solver settings and bundled estimator to use (default: --task, or the preset of --operator's family)")
    p.add_argument("--solver", default="latent-dps", help="registered solver name (default latent-dps)")
    p.add_argument("--solver-arg", action="append", default=[], metavar="NAME=VALUE",
                   help="override a numeric solver argument, e.g. zeta=0.5 (repeatable)")
    p.add_argument("--num-steps", type=int, default=None, help="override the solver's number of steps N (default: its paper setting)")
    p.add_argument("--model", default=None, help="model directory written by save_pretrained (default: the bundled fashion-mnist-32)")
    p.add_argument("--estimator", default=None,
                   help="severity estimator: a directory written by save_pretrained, or a name (a bundled encoder of the model, "
                        "or a registered estimator); default: the bundled encoder for the task")
    p.add_argument("--batch-size", type=int, default=8, help="images per solve (default 8; results do not depend on it)")
    p.add_argument("--seed", type=int, default=0, help="seed from which every image's own seeds derive (default 0)")
    p.add_argument("--goal", default="fidelity", choices=["fidelity", "perceptual"],
                   help="Flash settings: fidelity (tuned for PSNR, default) or perceptual (later starts, lower FD-FMNIST)")
    p.add_argument("--start-policy", default="snr", choices=["snr", "calibrated"],
                   help="how Flash picks start steps: snr (the paper's SNR match of σ̂², default) or calibrated "
                        "(the σ̂² → k map fitted on training images and stored with the bundled model; fidelity goal only)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N or mps (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    _args.add_progress_option(p)
    p.set_defaults(func=run)


# --- the command ------------------------------------------------------------------------------


def check_operator_args(name: str, params: dict[str, float]) -> None:
    """``--operator NAME`` can be built from the ``--operator-arg`` values."""
    try:
        files.build_operator(name, params, 1)
    except TypeError as exc:
        from flash_plugin.registry import get_operator

        try:
            signature = f"{name}{inspect.signature(get_operator(name))}"
        except (TypeError, ValueError):
            signature = name
        raise FlashInputError(f"--operator {name}: cannot build it from --operator-arg {params} ({exc}); it takes {signature}") from None


def validate(args: argparse.Namespace) -> dict:
    """Check every argument before anything is loaded; returns the settings of
    `flash_plugin.bench.reconstruct_files.run_config`."""
    src = Path(args.input)
    if not src.exists():
        raise FlashInputError(f"input {args.input}: no such file or folder")
    measured_file = src.is_file()
    if measured_file and src.suffix.lower() not in MEASUREMENT_SUFFIXES:
        raise FlashInputError(f"input {args.input}: expected a folder of images or a {' / '.join(MEASUREMENT_SUFFIXES)} file of measurements")
    measured = measured_file or args.measured
    if args.task is not None and args.operator is not None:
        raise FlashInputError("give --task (a preset that degrades clean images) or --operator (for measurements), not both")
    if measured and args.operator is None:
        what = "a measurement file" if measured_file else "--measured"
        raise FlashInputError(f"{what} needs --operator NAME with --operator-arg values (the parameters the measurements were "
                              "taken with); a preset draws its own random kernels and masks")
    if args.operator is not None and not measured:
        raise FlashInputError("--operator is for measurements (a .safetensors / .npy file, or a folder with --measured); "
                              "clean images are degraded by a --task preset")
    if args.operator_arg and args.operator is None:
        raise FlashInputError("--operator-arg needs --operator")
    if measured and args.severity is not None:
        raise FlashInputError("--severity sets how a preset degrades clean images; measurements are degraded already")
    task = None
    if not measured:
        task = args.task or "gblur-varying"
        _args.check_preset("--task", task)
        _args.check_float("--severity", args.severity, minimum=0.0, maximum=1.0)
    operator_params = _args.parse_name_values("--operator-arg", args.operator_arg)
    if args.operator is not None:
        _args.check_registered("--operator", "operators", args.operator)
    tuned_for = args.tuned_for or task or OPERATOR_TASK.get(args.operator or "")
    if tuned_for is None:
        raise FlashInputError(f"--operator {args.operator} has no tuned settings; give --tuned-for PRESET "
                              "(the preset whose solver settings and bundled estimator fit it)")
    _args.check_preset("--tuned-for", tuned_for)
    _args.check_int("--batch-size", args.batch_size, minimum=1)
    _args.check_int("--num-steps", args.num_steps, minimum=1)
    _args.check_threads("--threads", args.threads)
    _args.check_device("--device", args.device)
    _args.check_dir("--model", args.model)
    _args.check_out_dir("--out", args.out)
    if Path(args.out).resolve() == src.resolve():
        raise FlashInputError("--out must not be the input folder")
    _args.check_solver("--solver", args.solver)
    from flash_plugin.commands.bench import parse_solver_args

    solver_params = parse_solver_args(args.solver_arg, args.solver, tuned_for)
    if args.estimator is not None and ("/" in args.estimator or Path(args.estimator).exists()):
        _args.check_dir("--estimator", args.estimator)
    if args.operator is not None:
        check_operator_args(args.operator, operator_params)
    return {"task": task, "severity": args.severity, "operator": args.operator, "operator_args": operator_params,
            "measured": measured, "tuned_for": tuned_for, "solver": args.solver, "solver_args": solver_params,
            "num_steps": args.num_steps, "model": args.model, "estimator": args.estimator, "seed": args.seed,
            "goal": args.goal, "start_policy": args.start_policy}


def run(args: argparse.Namespace) -> int:
    settings = validate(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    done = files.reconstruct_files(args.input, args.out, batch_size=args.batch_size, device=args.device,
                                   progress=_args.progress_bars(args.progress), log=lambda line: _args.stage("reconstruct", line),
                                   **settings)
    if not done.solved or not is_main_process():
        return 0
    recs = [done.record["images"][n] for n in done.names]
    mean_nfe = sum(r["nfe"] for r in recs) / len(recs)
    line = f"{len(recs)} reconstructions, mean NFE {mean_nfe:.1f}"
    if all("psnr" in r for r in recs):
        line += f", mean PSNR {sum(r['psnr'] for r in recs) / len(recs):.2f} dB (measurements {sum(r['measurement_psnr'] for r in recs) / len(recs):.2f} dB)"
    print(f"{line}; wrote {Path(args.out) / files.RESULTS}")
    return 0
