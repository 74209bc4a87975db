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
images already done and solves the same batches as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import io
import time
from pathlib import Path
from typing import Any

from flash_plugin.commands import _args
from flash_plugin.errors import FlashInputError

MEASUREMENT_SUFFIXES = (".safetensors", ".npy")
RESULTS = "results.json"

OPERATOR_TASK = {"gaussian-blur": "gblur-varying", "motion-blur": "nonlinear-blur", "inpainting": "random-inpainting"}
"""The task preset whose tuned settings and bundled estimator serve a registered operator family."""


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
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N or mps (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    _args.add_progress_option(p)
    p.set_defaults(func=run)


# --- inputs -----------------------------------------------------------------------------------


def image_seed(seed: int, name: str, purpose: str) -> int:
    """A 63-bit seed for one image and one purpose ("severity", "degrade", "solve"), from the run's
    seed and the image's name: the same image gets the same draws whatever else is in the folder."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def list_inputs(path: Path, measured_file: bool) -> list[str]:
    """The names of the inputs in a stable order: image file names, or measurement indices."""
    if measured_file:
        return []  # known after loading the file
    from flash_plugin.data.image_folder import EXTENSIONS, list_images

    files = list_images(path)
    if not files:
        raise FlashInputError(f"{path}: no images ({', '.join(EXTENSIONS)}) in this folder")
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems:
            raise FlashInputError(f"{path}: {stems[f.stem].name} and {f.name} would both be written as {f.stem}.png; rename one")
        stems[f.stem] = f
    return [f.name for f in files]


def load_measurements(path: Path):
    """``(names, y)`` from a .safetensors or .npy file: float32 ``(N, C, H, W)``."""
    import numpy as np
    import torch

    try:
        if path.suffix == ".npy":
            y = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            from flash_plugin.utils.checkpoint import load_safetensors

            tensors = load_safetensors(path)
            if "y" in tensors:
                y = tensors["y"]
            elif len(tensors) == 1:
                y = next(iter(tensors.values()))
            else:
                raise FlashInputError(f"{path}: holds tensors {sorted(tensors)}; name the measurements 'y'")
    except (ValueError, OSError) as exc:
        if isinstance(exc, FlashInputError):
            raise
        raise FlashInputError(f"{path}: cannot read the measurements ({exc})") from None
    if y.ndim == 3:
        y = y[:, None]
    if y.ndim != 4 or len(y) == 0:
        raise FlashInputError(f"{path}: measurements must have shape (N, C, H, W) or (N, H, W) with N >= 1, got {tuple(y.shape)}")
    if not y.is_floating_point():
        raise FlashInputError(f"{path}: measurements must be floats on the [-1, 1] scale, got dtype {y.dtype}")
    y = y.to(torch.float32)
    if not bool(torch.isfinite(y).all()):
        raise FlashInputError(f"{path}: measurements contain NaN or infinite values")
    width = len(str(len(y) - 1))
    return [f"{i:0{width}d}" for i in range(len(y))], y


def build_operator(name: str, params: dict[str, float], batch: int):
    """The registered operator family ``name`` for ``batch`` images with the same ``params``
    (a per-sample parameter, e.g. a blur's std, gets the value for every image)."""
    import torch

    from flash_plugin.registry import get_operator

    factory = get_operator(name)
    per_sample = set(getattr(factory, "_per_sample", ()))
    kwargs: dict[str, Any] = {k: (torch.full((batch,), v, dtype=torch.float64) if k in per_sample else v) for k, v in params.items()}
    try:
        return factory(**kwargs)
    except TypeError as exc:
        try:
            signature = f"{name}{inspect.signature(factory)}"
        except (TypeError, ValueError):
            signature = name
        raise FlashInputError(f"--operator {name}: cannot build it from --operator-arg {params} ({exc}); it takes {signature}") from None


# --- outputs ----------------------------------------------------------------------------------


def png_bytes(x) -> bytes:
    """One image ``(C, H, W)`` in [-1, 1] as PNG bytes (grey for C = 1, RGB for C = 3)."""
    import numpy as np
    import torch
    from PIL import Image

    a = ((x.detach().cpu().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    im = Image.fromarray(a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0)))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def read_results(out: Path, config: dict) -> dict:
    """The results of an earlier run into ``out`` with the same configuration (``{}`` if none); an
    earlier run with another configuration is an error, never mixed in."""
    import json

    path = out / RESULTS
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text())
        old_config, images = old["config"], old["images"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FlashInputError(f"{path} is not a results file of flash-plugin reconstruct ({exc}); use another --out") from None
    diff = {k: (old_config.get(k), v) for k, v in config.items() if old_config.get(k) != v}
    if diff:
        shown = "; ".join(f"{k}: {a!r} then, {b!r} now" for k, a, b in ((k, *v) for k, v in diff.items()))
        raise FlashInputError(f"--out {out} holds results of another run ({shown}); use another --out, or delete {path} to start over")
    return {name: rec for name, rec in images.items() if (out / f"{Path(name).stem}.png").is_file()}


# --- the command ------------------------------------------------------------------------------


def validate(args: argparse.Namespace) -> dict:
    """Check every argument before anything is loaded; returns the run's configuration."""
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
    return {
        "input": str(src.resolve()), "measured": measured, "task": task, "severity": args.severity,
        "operator": args.operator, "operator_args": operator_params, "tuned_for": tuned_for,
        "solver": args.solver, "solver_args": solver_params, "num_steps": args.num_steps,
        "model": str(Path(args.model).resolve()) if args.model else "bundled fashion-mnist-32",
        "estimator": (str(Path(args.estimator).resolve()) if args.estimator and Path(args.estimator).exists() else args.estimator),
        "seed": args.seed,
    }


def load_estimator(spec: str | None, model_set, tuned_for: str):
    """The severity estimator: a save_pretrained directory, a bundled encoder name, or a registered name."""
    from flash_plugin.bench.reconstruct import ENCODER_FOR_TASK
    from flash_plugin.errors import UnknownPluginNameError

    if spec is None:
        if tuned_for not in ENCODER_FOR_TASK:
            raise FlashInputError(f"no bundled severity encoder for {tuned_for!r}; give --estimator")
        return model_set.severity_encoder(ENCODER_FOR_TASK[tuned_for])
    if Path(spec).is_dir():
        from flash_plugin.severity import SeverityEncoder

        return SeverityEncoder.from_pretrained(spec, model=model_set.latent_diffusion)
    if spec in model_set.severity_families():
        return model_set.severity_encoder(spec)
    from flash_plugin.registry import get_severity_estimator

    try:
        factory = get_severity_estimator(spec)
    except UnknownPluginNameError as exc:
        raise FlashInputError(f"--estimator {spec!r}: not a directory, not a bundled encoder ({', '.join(model_set.severity_families())}), "
                              f"and {exc}") from None
    try:
        takes_model = "model" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        takes_model = False
    return factory(model=model_set.latent_diffusion) if takes_model else factory()


def run(args: argparse.Namespace) -> int:
    config = validate(args)
    out = Path(args.out)
    bars = _args.progress_bars(args.progress)

    import torch

    from flash_plugin.bench.reconstruct import build_solver
    from flash_plugin.flash import flash
    from flash_plugin.metrics import psnr, ssim
    from flash_plugin.models import load_default_model
    from flash_plugin.registry import get_operator
    from flash_plugin.utils.checkpoint import atomic_write_bytes, atomic_write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    src = Path(args.input)
    measured_file = src.is_file()
    names = list_inputs(src, measured_file)
    done = read_results(out, config)
    model_set = load_default_model(args.model, device=args.device)
    model = model_set.latent_diffusion
    shape = tuple(model.image_shape)
    if measured_file:
        names, y_all = load_measurements(src)
    todo = [i for i, name in enumerate(names) if name not in done]
    _args.stage("reconstruct", f"{len(names)} input(s), {len(names) - len(todo)} done already; outputs go to {out.resolve()}/")
    if not todo:
        return 0
    if not measured_file:
        from flash_plugin.data.image_folder import load_image_folder

        if shape[1] != shape[2]:
            raise FlashInputError(f"the model's images are {shape[1]}x{shape[2]}; folder input needs a square image size")
        # Loaded in the folder's sorted order, the order of `names`.
        images = load_image_folder(src, size=shape[1], channels=shape[0])
    elif tuple(y_all.shape[1:]) != shape:
        raise FlashInputError(f"{src}: measurements of shape {tuple(y_all.shape[1:])} per image; the model's images are {shape}")
    solver, flash_config, settings = build_solver(args.solver, model, config["tuned_for"],
                                                  overrides={**config["solver_args"], **({} if args.num_steps is None else {"num_steps": args.num_steps})})
    flashed = flash(solver, load_estimator(args.estimator, model_set, config["tuned_for"]), flash_config)
    preset = None if config["task"] is None else get_operator(config["task"])

    results = dict(done)
    record = {"config": config, "solver_settings": settings, "flash_config": dataclasses.asdict(flash_config),
              "images": results}
    (out / "measurements").mkdir(parents=True, exist_ok=True)
    bar = None
    if bars:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(names), initial=len(names) - len(todo), desc="reconstruct", unit="image")
    t_start = time.perf_counter()
    # Batches are cut from the whole input list, not from the images left: a run resumed with the
    # same --batch-size solves the very batches the uninterrupted run would, bit for bit.
    pending = set(todo)
    batches = [[i for i in range(s, min(s + args.batch_size, len(names))) if i in pending] for s in range(0, len(names), args.batch_size)]
    for batch in (b for b in batches if b):
        bnames = [names[i] for i in batch]
        t0 = time.perf_counter()
        solve_gens = [torch.Generator().manual_seed(image_seed(args.seed, n, "solve")) for n in bnames]
        clean = None
        severity = None
        if measured_file or args.measured:
            y = (y_all[batch] if measured_file else images[batch]).to(args.device)
            operator = build_operator(args.operator, config["operator_args"], len(batch))
        else:
            clean = images[batch].to(args.device)
            if args.severity is not None:
                severity = torch.full((len(batch),), float(args.severity), dtype=torch.float64)
            else:
                severity = torch.cat([preset.sample_severity(1, torch.Generator().manual_seed(image_seed(args.seed, n, "severity")))
                                      for n in bnames]).to(torch.float64)
            gens = [torch.Generator().manual_seed(image_seed(args.seed, n, "degrade")) for n in bnames]
            operator = preset.make(severity.to(args.device), generator=gens)
            y = operator.measure(clean, generator=gens)
        if hasattr(operator, "to"):
            operator = operator.to(args.device)
        sol = flashed(y, operator, generator=solve_gens)
        wall = (time.perf_counter() - t0) / len(batch)
        scores = (psnr(sol.x, clean), ssim(sol.x, clean), psnr(y.clamp(-1, 1), clean)) if clean is not None and y.shape == clean.shape else None
        for j, name in enumerate(bnames):
            stem = Path(name).stem
            atomic_write_bytes(out / "measurements" / f"{stem}.png", png_bytes(y[j]))
            atomic_write_bytes(out / f"{stem}.png", png_bytes(sol.x[j]))
            rec = {"start_step": int(sol.start_step[j]), "nfe": int(sol.nfe[j]), "sigma2": float(sol.severity[j]),
                   "wall_s": wall, "batch_size": len(batch), "output": f"{stem}.png",
                   "seeds": {p: image_seed(args.seed, name, p) for p in (("solve",) if clean is None else ("severity", "degrade", "solve"))}}
            if severity is not None:
                rec["severity"] = float(severity[j])
            if scores is not None:
                rec.update(psnr=float(scores[0][j]), ssim=float(scores[1][j]), measurement_psnr=float(scores[2][j]))
            results[name] = rec
        record["images"] = dict(sorted(results.items()))
        atomic_write_json(out / RESULTS, record)
        if bar is not None:
            bar.update(len(batch))
        else:
            _args.stage("reconstruct", f"{len(results)}/{len(names)} images ({time.perf_counter() - t_start:.0f} s)")
    if bar is not None:
        bar.close()
    recs = [results[n] for n in names]
    mean_nfe = sum(r["nfe"] for r in recs) / len(recs)
    line = f"{len(recs)} reconstructions, mean NFE {mean_nfe:.1f}"
    if all("psnr" in r for r in recs):
        line += f", mean PSNR {sum(r['psnr'] for r in recs) / len(recs):.2f} dB (measurements {sum(r['measurement_psnr'] for r in recs) / len(recs):.2f} dB)"
    print(f"{line}; wrote {out / RESULTS}")
    return 0
