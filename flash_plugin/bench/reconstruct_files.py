"""Flash reconstructions of your own files: a folder of images or a file of measurements.

`reconstruct_files` reads the inputs (images are converted to the model's channels, centre-cropped
and resized to its image size, then degraded with a task preset; measurements need the operator
they were taken with), reconstructs them with Flash(solver) and writes ``NAME.png``,
``measurements/NAME.png`` and ``results.json`` (start step, NFE, σ̂², wall time and seeds per
image). Every image draws its own seeds from the run's seed and its name (`image_seed`), so its
result does not depend on the batch it lands in. Outputs are written atomically after every batch,
and a run into a directory holding results of the same configuration solves only what is missing,
in the batches an uninterrupted run would have used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import io
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flash_plugin.errors import FlashInputError

MEASUREMENT_SUFFIXES = (".safetensors", ".npy")
RESULTS = "results.json"

OPERATOR_TASK = {"gaussian-blur": "gblur-varying", "motion-blur": "nonlinear-blur", "inpainting": "random-inpainting"}
"""The task preset whose tuned settings and bundled estimator serve a registered operator family."""


@dataclass
class FilesRun:
    """What `reconstruct_files` did: ``record`` is what ``results.json`` holds, ``names`` the
    inputs in order, ``solved`` how many of them this call reconstructed (0: all were done)."""

    record: dict
    names: list[str]
    solved: int


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


def build_operator(name: str, params: Mapping[str, float], batch: int):
    """The registered operator family ``name`` for ``batch`` images with the same ``params``
    (a per-sample parameter, e.g. a blur's std, gets the value for every image). Parameters the
    factory does not take raise its `TypeError`."""
    import torch

    from flash_plugin.registry import get_operator

    factory = get_operator(name)
    per_sample = set(getattr(factory, "_per_sample", ()))
    kwargs: dict[str, Any] = {k: (torch.full((batch,), v, dtype=torch.float64) if k in per_sample else v) for k, v in params.items()}
    return factory(**kwargs)


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
    """The per-image results of an earlier run into ``out`` with the same configuration (``{}`` if
    none); an earlier run with another configuration is an error, never mixed in."""
    import json

    path = out / RESULTS
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text())
        old_config, images = old["config"], old["images"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FlashInputError(f"{path} is not a results file of flash-plugin reconstruct ({exc}); write to another directory") from None
    diff = {k: (old_config.get(k), v) for k, v in config.items() if old_config.get(k) != v}
    if diff:
        shown = "; ".join(f"{k}: {a!r} then, {b!r} now" for k, a, b in ((k, *v) for k, v in diff.items()))
        raise FlashInputError(f"{out} holds results of another run ({shown}); write to another directory, or delete {path} to start over")
    return {name: rec for name, rec in images.items() if (out / f"{Path(name).stem}.png").is_file()}


def load_estimator(spec: str | None, model_set, tuned_for: str):
    """The severity estimator: a save_pretrained directory, a bundled encoder name, or a registered name
    (``None``: the bundled encoder of the task ``tuned_for``)."""
    from flash_plugin.bench.reconstruct import ENCODER_FOR_TASK
    from flash_plugin.errors import UnknownPluginNameError

    if spec is None:
        if tuned_for not in ENCODER_FOR_TASK:
            raise FlashInputError(f"no bundled severity encoder for {tuned_for!r}; name an estimator")
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
        raise FlashInputError(f"estimator {spec!r}: not a directory, not a bundled encoder ({', '.join(model_set.severity_families())}), "
                              f"and {exc}") from None
    try:
        takes_model = "model" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        takes_model = False
    return factory(model=model_set.latent_diffusion) if takes_model else factory()


def run_config(input: str | Path, *, task: str | None = None, severity: float | None = None, operator: str | None = None,
               operator_args: Mapping[str, float] | None = None, measured: bool = False, tuned_for: str | None = None,
               solver: str = "latent-dps", solver_args: Mapping[str, float] | None = None, num_steps: int | None = None,
               model: str | Path | None = None, estimator: str | None = None, seed: int = 0, goal: str = "fidelity",
               start_policy: str = "snr") -> dict:
    """The configuration a run records and a resumed run must match, with the defaults filled in:
    a measurement file or ``measured`` folder has no task; clean images default to
    ``gblur-varying``; ``tuned_for`` defaults to the task, else to the operator family's preset."""
    src = Path(input)
    measured = src.is_file() or measured
    task = None if measured else (task or "gblur-varying")
    return {
        "input": str(src.resolve()), "measured": measured, "task": task, "severity": severity,
        "operator": operator, "operator_args": dict(operator_args or {}), "tuned_for": tuned_for or task or OPERATOR_TASK.get(operator or ""),
        "solver": solver, "solver_args": dict(solver_args or {}), "num_steps": num_steps,
        "model": str(Path(model).resolve()) if model else "bundled fashion-mnist-32",
        "estimator": (str(Path(estimator).resolve()) if estimator and Path(estimator).exists() else estimator),
        "seed": seed, "goal": goal, "start_policy": start_policy,
    }


def _measure_batch(config: dict, preset, inputs, names: list[str]):
    """``(y, operator, clean, severity)`` of one batch: ``inputs`` are the measurements (clean and
    severity ``None``), or clean images degraded by the preset with each image's own seeds."""
    import torch

    device = inputs.device
    if config["measured"]:
        operator = build_operator(config["operator"], config["operator_args"], len(inputs))
        return inputs, (operator.to(device) if hasattr(operator, "to") else operator), None, None
    seed = config["seed"]
    if config["severity"] is not None:
        severity = torch.full((len(inputs),), float(config["severity"]), dtype=torch.float64)
    else:
        severity = torch.cat([preset.sample_severity(1, torch.Generator().manual_seed(image_seed(seed, n, "severity")))
                              for n in names]).to(torch.float64)
    gens = [torch.Generator().manual_seed(image_seed(seed, n, "degrade")) for n in names]
    operator = preset.make(severity.to(device), generator=gens)
    y = operator.measure(inputs, generator=gens)
    return y, (operator.to(device) if hasattr(operator, "to") else operator), inputs, severity


def reconstruct_files(input: str | Path, out: str | Path, *, batch_size: int = 8, device: str = "cpu", progress: bool = False,
                      log: Callable[[str], None] | None = None, **settings) -> FilesRun:
    """Reconstruct the images or measurements at ``input`` into ``out`` (``results.json`` is the
    returned run's ``record``). ``settings`` are the keyword arguments of `run_config` (task,
    severity, operator, operator_args, measured, tuned_for, solver, solver_args, num_steps, model,
    estimator, seed). ``log`` receives the start line and, without ``progress`` bars, one line
    per batch. Under ``torchrun`` the batches are shared out over the processes and the merged
    ``results.json`` equals a one-process run's."""
    from flash_plugin.bench.distributed import Shard
    from flash_plugin.bench.reconstruct import build_solver
    from flash_plugin.flash import flash
    from flash_plugin.models import load_default_model
    from flash_plugin.registry import get_operator
    from flash_plugin.utils import checkpoint

    config = run_config(input, **settings)
    shard = Shard.from_env(device)
    device = shard.device
    say = (log if shard.is_main else None) or (lambda line: None)
    progress = progress and shard.is_main
    src, out = Path(input), Path(out)
    seed, measured_file = config["seed"], src.is_file()
    names = list_inputs(src, measured_file)
    done = read_results(out, config)
    model_set = load_default_model(settings.get("model"), device=device)
    model = model_set.latent_diffusion
    shape = tuple(model.image_shape)
    if measured_file:
        names, y_all = load_measurements(src)
    todo = [i for i, name in enumerate(names) if name not in done]
    say(f"{len(names)} input(s), {len(names) - len(todo)} done already; outputs go to {out.resolve()}/")
    results = dict(done)
    if not todo:
        return FilesRun({"config": config, "images": results}, names, 0)
    if not measured_file:
        from flash_plugin.data.image_folder import load_image_folder

        if shape[1] != shape[2]:
            raise FlashInputError(f"the model's images are {shape[1]}x{shape[2]}; folder input needs a square image size")
        # Loaded in the folder's sorted order, the order of `names`.
        images = load_image_folder(src, size=shape[1], channels=shape[0])
    elif tuple(y_all.shape[1:]) != shape:
        raise FlashInputError(f"{src}: measurements of shape {tuple(y_all.shape[1:])} per image; the model's images are {shape}")
    overrides = {**config["solver_args"], **({} if config["num_steps"] is None else {"num_steps": config["num_steps"]})}
    solver, flash_config, solver_settings = build_solver(config["solver"], model, config["tuned_for"], overrides=overrides, goal=config["goal"],
                                                        start_policy=config["start_policy"])
    flashed = flash(solver, load_estimator(config["estimator"], model_set, config["tuned_for"]), flash_config)
    preset = None if config["task"] is None else get_operator(config["task"])

    record = {"config": config, "solver_settings": solver_settings, "flash_config": dataclasses.asdict(flash_config), "images": results}
    (out / "measurements").mkdir(parents=True, exist_ok=True)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(names), initial=len(names) - len(todo), desc="reconstruct", unit="image")
    t_start = time.perf_counter()
    # Batches are cut from the whole input list, not from the images left: a run resumed with the
    # same batch size solves the very batches the uninterrupted run would, bit for bit.
    pending = set(todo)
    batches = [[i for i in range(s, min(s + batch_size, len(names))) if i in pending] for s in range(0, len(names), batch_size)]
    # Under torchrun the batches are dealt out round by round; each process writes its own images
    # and the first writes results.json after every round.
    for batch in shard.rounds([b for b in batches if b]):
        new = {} if batch is None else _solve_batch(batch, names, seed, measured_file, y_all if measured_file else images,
                                                    config, preset, flashed, device, out)
        for part in shard.gather(new):
            results.update(part)
        record["images"] = dict(sorted(results.items()))
        if shard.is_main:
            checkpoint.atomic_write_json(out / RESULTS, record)
        if bar is not None:
            bar.update(len(results) - bar.n)
        else:
            say(f"{len(results)}/{len(names)} images ({time.perf_counter() - t_start:.0f} s)")
    if bar is not None:
        bar.close()
    shard.barrier()
    return FilesRun(record, names, len(todo))


def _solve_batch(batch: list[int], names: list[str], seed: int, measured_file: bool, inputs_all, config: dict, preset,
                 flashed, device: str, out: Path) -> dict:
    """Reconstruct one batch, write its PNGs, and return its records by name."""
    import torch

    from flash_plugin.metrics import psnr, ssim
    from flash_plugin.utils import checkpoint

    results = {}
    bnames = [names[i] for i in batch]
    t0 = time.perf_counter()
    solve_gens = [torch.Generator().manual_seed(image_seed(seed, n, "solve")) for n in bnames]
    inputs = inputs_all[batch]
    y, operator, clean, severity = _measure_batch(config, preset, inputs.to(device), bnames)
    sol = flashed(y, operator, generator=solve_gens)
    wall = (time.perf_counter() - t0) / len(batch)
    scores = (psnr(sol.x, clean), ssim(sol.x, clean), psnr(y.clamp(-1, 1), clean)) if clean is not None and y.shape == clean.shape else None
    for j, name in enumerate(bnames):
        stem = Path(name).stem
        checkpoint.atomic_write_bytes(out / "measurements" / f"{stem}.png", png_bytes(y[j]))
        checkpoint.atomic_write_bytes(out / f"{stem}.png", png_bytes(sol.x[j]))
        rec = {"start_step": int(sol.start_step[j]), "nfe": int(sol.nfe[j]), "sigma2": float(sol.severity[j]),
               "wall_s": wall, "batch_size": len(batch), "output": f"{stem}.png",
               "seeds": {p: image_seed(seed, name, p) for p in (("solve",) if clean is None else ("severity", "degrade", "solve"))}}
        if severity is not None:
            rec["severity"] = float(severity[j])
        if scores is not None:
            rec.update(psnr=float(scores[0][j]), ssim=float(scores[1][j]), measurement_psnr=float(scores[2][j]))
        results[name] = rec
    return results
