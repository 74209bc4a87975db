"""Hyperparameters of the reference solvers per task: the paper's, ours, and `make_solver`.

`PAPER_HPARAMS` holds the official Flash-Diffusion configs for FFHQ (``flash_configs/
reconstruction_configs/``; CelebA-HQ VQ-f4 LDM, 256²). `TUNED_HPARAMS` holds ours, re-tuned for
Flash(solver) on the bundled fashion-mnist-32 model; it is `make_solver`'s default. The evidence
for every tuned value (the tuning record that chose it and the mean PSNR of each value swept) is
data next to the bundled model, ``weights/fashion-mnist-32/hparams.json`` (`load_evidence`), and a
test holds both tables to it. How the values were tuned and what they say: docs/solvers.md,
"Hyperparameters".

Symbols, with the Flash code's names: ζ = ``zeta`` (``dc_step``, step size of the measurement
term), γ = ``gamma`` (``ae_weight``, the GML / gluing term), γ_rs = ``gamma_rs``
(``resample_step``), c = ``noise_correction`` (``corr_mult``) and v = ``variance_scale``
(``var_mult``), the last two `flash_plugin.flash.FlashConfig` settings rather than solver
arguments. Residuals are measured on the ``[-1, 1]`` image scale in both codes, so ζ carries
over unchanged; every other setting is the solver class's default.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from flash_plugin.errors import FlashInputError, UnknownPluginNameError
from flash_plugin.schedule import StartPolicy
from flash_plugin.solvers.base import ReverseDiffusionSolver, Sampler
from flash_plugin.solvers.gml_dps import GMLDPS
from flash_plugin.solvers.latent_dps import LatentDPS
from flash_plugin.solvers.psld import PSLD
from flash_plugin.solvers.resample import ReSample

TASKS: tuple[str, ...] = ("gblur-varying", "gblur-fixed", "nonlinear-blur", "random-inpainting")

SOLVERS: dict[str, type[ReverseDiffusionSolver]] = {
    "sampler": Sampler,
    "latent-dps": LatentDPS,
    "gml-dps": GMLDPS,
    "psld": PSLD,
    "resample": ReSample,
}
"""The reference solvers by registry name (registered through ``flash_register_solvers``)."""


@dataclass(frozen=True)
class SolverHparams:
    """One (solver, task) entry. ``None`` = the solver has no such parameter.

    Attributes:
        zeta: step size ``ζ`` of the measurement term (``dc_step``).
        gamma: weight ``γ`` of the autoencoder / gluing term (``ae_weight``).
        gamma_rs: ReSample's resampling variance multiplier (``resample_step``).
        noise_correction: the Flash start-latent constant ``c`` (``corr_mult``), for `FlashConfig`.
        variance_scale: the Flash calibration factor ``v`` on ``σ̂²`` (``var_mult``), for `FlashConfig`.
    """

    zeta: float | None = None
    gamma: float | None = None
    gamma_rs: float | None = None
    noise_correction: float = 1.0
    variance_scale: float = 1.0

    def solver_kwargs(self) -> dict[str, float]:
        """The constructor arguments of the solver (``noise_correction`` and ``variance_scale`` belong to Flash)."""
        return {k: v for k, v in asdict(self).items() if k not in FLASH_PARAMS and v is not None}

    def flash_kwargs(self) -> dict[str, float]:
        """The `flash_plugin.flash.FlashConfig` arguments of the entry."""
        return {k: getattr(self, k) for k in FLASH_PARAMS}


FLASH_PARAMS: tuple[str, ...] = ("noise_correction", "variance_scale")
"""The entries of `SolverHparams` that configure the Flash wrapper, not the solver."""


_H = SolverHparams
PAPER_HPARAMS: dict[tuple[str, str], SolverHparams] = {
    ("latent-dps", "gblur-varying"):     _H(zeta=1.0, noise_correction=1.2),
    ("latent-dps", "gblur-fixed"):       _H(zeta=3.0, noise_correction=1.2),
    ("latent-dps", "nonlinear-blur"):    _H(zeta=1.0, noise_correction=1.0),
    ("latent-dps", "random-inpainting"): _H(zeta=7.0, noise_correction=1.2),
    ("gml-dps", "gblur-varying"):        _H(zeta=3.0, gamma=0.05, noise_correction=1.2),
    ("gml-dps", "gblur-fixed"):          _H(zeta=2.0, gamma=0.05, noise_correction=1.0),
    ("gml-dps", "nonlinear-blur"):       _H(zeta=3.0, gamma=0.05, noise_correction=1.2),
    ("gml-dps", "random-inpainting"):    _H(zeta=10.0, gamma=0.05, noise_correction=1.0),
    ("psld", "gblur-varying"):           _H(zeta=2.0, gamma=0.2, noise_correction=1.0),
    ("psld", "gblur-fixed"):             _H(zeta=2.0, gamma=0.1, noise_correction=1.0),
    # no ("psld", "nonlinear-blur"): the nonlinear blur has no adjoint
    ("psld", "random-inpainting"):       _H(zeta=10.0, gamma=0.5, noise_correction=1.0),
    ("resample", "gblur-varying"):       _H(gamma_rs=400.0, noise_correction=1.2),
    ("resample", "gblur-fixed"):         _H(gamma_rs=2000.0, noise_correction=1.2),
    ("resample", "nonlinear-blur"):      _H(gamma_rs=200.0, noise_correction=1.2),
    ("resample", "random-inpainting"):   _H(gamma_rs=200.0, noise_correction=1.2),
}  # fmt: skip
"""The paper's official FFHQ values. Do not edit: tune in `TUNED_HPARAMS`."""

TUNED_HPARAMS: dict[tuple[str, str], SolverHparams] = {
    ("latent-dps", "gblur-varying"):     _H(zeta=0.5, noise_correction=0.0, variance_scale=2.0),
    ("latent-dps", "gblur-fixed"):       _H(zeta=4.0, noise_correction=0.0, variance_scale=2.0),
    ("latent-dps", "nonlinear-blur"):    _H(zeta=0.5, noise_correction=0.0, variance_scale=4.0),
    ("latent-dps", "random-inpainting"): _H(zeta=0.35, noise_correction=0.0, variance_scale=2.0),
    ("gml-dps", "gblur-varying"):        _H(zeta=0.5, gamma=0.05, noise_correction=0.0, variance_scale=2.0),
    ("gml-dps", "gblur-fixed"):          _H(zeta=7.0, gamma=0.05, noise_correction=0.0),
    ("gml-dps", "nonlinear-blur"):       _H(zeta=0.5, gamma=0.05, noise_correction=0.0, variance_scale=4.0),
    ("gml-dps", "random-inpainting"):    _H(zeta=0.35, gamma=0.05, noise_correction=0.0, variance_scale=2.0),
    ("psld", "gblur-varying"):           _H(zeta=0.5, gamma=0.2, noise_correction=0.0),
    ("psld", "gblur-fixed"):             _H(zeta=7.0, gamma=0.1, noise_correction=0.0),
    ("psld", "random-inpainting"):       _H(zeta=0.35, gamma=0.5, noise_correction=0.0),
    ("resample", "gblur-varying"):       _H(gamma_rs=25600.0, noise_correction=0.0),
    ("resample", "gblur-fixed"):         _H(gamma_rs=6400.0, noise_correction=0.0),
    ("resample", "nonlinear-blur"):      _H(gamma_rs=409600.0, noise_correction=0.0, variance_scale=16.0),
    ("resample", "random-inpainting"):   _H(gamma_rs=25600.0, noise_correction=0.0),
}  # fmt: skip
"""Ours, re-tuned on the bundled model (evidence: `load_evidence`); γ is the paper's throughout."""

EVIDENCE_PATH = Path(__file__).resolve().parent.parent / "weights" / "fashion-mnist-32" / "hparams.json"
"""Our values, the paper's and the tuning record behind each of ours (records under ``results/fashion-mnist-32/tuning/``)."""


def load_evidence(path: str | Path = EVIDENCE_PATH) -> dict[tuple[str, str], dict[str, Any]]:
    """The evidence entries by ``(solver, task)``: ``{"ours": {...}, "paper": {...}, "evidence": {param: {...}}}``."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return {(e["solver"], e["task"]): e for e in data["entries"]}


HparamSource = Literal["tuned", "paper"]
Goal = Literal["fidelity", "perceptual"]
GOALS: tuple[str, ...] = ("fidelity", "perceptual")

PERCEPTUAL_VARIANCE_FACTOR = 4.0
"""The ``perceptual`` goal multiplies the entry's ``v`` by this: every image starts later and runs
about 2.5 times the steps, which lowers FD-FMNIST and costs no PSNR on most pairs of this model
(not on ReSample's camera shake, whose ``v`` is already 16); a larger ``c`` lowers FD less and
costs PSNR (measurements: BENCHMARKS.md, "Perception and distortion")."""


START_POLICIES: tuple[str, ...] = ("snr", "calibrated")
"""How Flash picks start steps: ``snr``, the paper's SNR match of ``σ̂²`` (default), or
``calibrated``, the σ̂² → k map fitted per solver and task on training images and stored with the
model (`get_start_policy`)."""

START_POLICIES_PATH = EVIDENCE_PATH.with_name("start_policies.json")
"""The calibrated start policies of the bundled model (written by ``python -m flash_plugin.bench.policy fit``)."""


def get_start_policy(solver: str, task: str, path: str | Path = START_POLICIES_PATH) -> StartPolicy:
    """The calibrated start policy stored for ``(solver, task)``; it was fitted at the compute of
    the SNR rule with the settings its entry records (``fit.hparams``: the table's when it was
    fitted; BENCHMARKS.md, "Start policies")."""
    _check_solver_name(solver)
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FlashInputError(f"no calibrated start policies at {path}") from None
    except (OSError, ValueError) as exc:
        raise FlashInputError(f"{path} is not a readable start-policy file: {exc}") from None
    entries = {(e.get("solver"), e.get("task")): e for e in data.get("entries", []) if isinstance(e, dict)}
    if (solver, task) not in entries:
        have = ", ".join(f"{s}/{t}" for s, t in sorted(entries)) or "none"
        raise FlashInputError(f"no calibrated start policy for {solver} on {task} in {path}; calibrated pairs: {have}")
    return StartPolicy.from_dict(entries[(solver, task)])


def _check_solver_name(name: str) -> None:
    if name not in SOLVERS:
        raise UnknownPluginNameError(f"unknown solver {name!r}; the reference solvers are {', '.join(SOLVERS)}")


def get_hparams(solver: str, task: str, *, source: HparamSource = "tuned", goal: Goal = "fidelity") -> SolverHparams:
    """The table entry of ``solver`` for ``task`` (``source="paper"`` for the paper's values).

    ``goal="fidelity"`` is the entry as tuned for PSNR; ``goal="perceptual"`` trades compute for
    lower FD-FMNIST (its ``v`` times `PERCEPTUAL_VARIANCE_FACTOR`).
    """
    if goal not in GOALS:
        raise FlashInputError(f"goal must be one of {', '.join(GOALS)}, got {goal!r}")
    hp = _entry(solver, task, source)
    if goal == "perceptual":
        hp = replace(hp, variance_scale=hp.variance_scale * PERCEPTUAL_VARIANCE_FACTOR)
    return hp


def _entry(solver: str, task: str, source: str) -> SolverHparams:
    _check_solver_name(solver)
    if task not in TASKS:
        raise FlashInputError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    if source not in ("tuned", "paper"):
        raise FlashInputError(f"source must be 'tuned' or 'paper', got {source!r}")
    if solver == "sampler":
        return SolverHparams()
    table = TUNED_HPARAMS if source == "tuned" else PAPER_HPARAMS
    try:
        return table[(solver, task)]
    except KeyError:
        raise FlashInputError(
            f"{solver} has no configuration for {task} (the paper has none: the operator has no adjoint); "
            f"tasks with one: {', '.join(t for s, t in table if s == solver)}"
        ) from None


def make_solver(name: str, model: Any, task: str | None = None, *, source: HparamSource = "tuned", **overrides: Any) -> ReverseDiffusionSolver:
    """Build the reference solver ``name`` on ``model`` with the table's values for ``task``.

    Args:
        name: ``"sampler"``, ``"latent-dps"``, ``"gml-dps"``, ``"psld"`` or ``"resample"``.
        model: the latent model.
        task: one of `TASKS`; ``None`` keeps the constructor defaults.
        source: ``"tuned"`` (default; `TUNED_HPARAMS`) or ``"paper"`` (`PAPER_HPARAMS`).
        **overrides: constructor arguments that win over the table (e.g. ``num_steps=50``).

    The Flash noise correction ``c`` of the entry is ``get_hparams(name, task).noise_correction``.
    """
    _check_solver_name(name)
    kwargs: dict[str, Any] = {} if task is None else get_hparams(name, task, source=source).solver_kwargs()
    kwargs.update(overrides)
    return SOLVERS[name](model, **kwargs)
