"""Hyperparameters of the reference solvers per task: ONE table, and `make_solver`.

`PAPER_HPARAMS` holds the values of the official Flash-Diffusion configs for FFHQ
(``flash_configs/reconstruction_configs/``, flash-algorithm.md §9; CelebA-HQ VQ-f4 LDM, 256²):

====================  =====================  ==============================  ==============================  ==================
task                  Latent-DPS (ζ, c)       GML-DPS (ζ, γ, c)               PSLD (ζ, γ, c)                  ReSample (γ_rs, c)
====================  =====================  ==============================  ==============================  ==================
gblur-varying         1.0, 1.2               3.0, 0.05, 1.2                  2.0, 0.2, 1.0                   400, 1.2
gblur-fixed           3.0, 1.2               2.0, 0.05, 1.0                  2.0, 0.1, 1.0                   2000, 1.2
nonlinear-blur        1.0, 1.0               3.0, 0.05, 1.2                  – (no adjoint)                  200, 1.2
random-inpainting     7.0, 1.2               10.0, 0.05, 1.0                 10.0, 0.5, 1.0                  200, 1.2
====================  =====================  ==============================  ==============================  ==================

ζ = ``dc_step`` (step size of the measurement term), γ = ``ae_weight`` (GML / gluing term),
c = ``corr_mult`` (the Flash noise correction, a `flash_plugin.flash.FlashConfig` setting, not a
solver argument), γ_rs = ``resample_step``. The residuals are measured on the ``[-1, 1]`` image
scale in both the Flash code and here, so ζ carries over unchanged. Every other setting (DDPM-1000
with ``η = 1`` for the DPS family; DDIM-500, ``η = 1``, DC every 10 steps, λ = 1, 100 inner Adam
steps at lr 0.1 for ReSample) is the solver classes' default.

`TUNED_HPARAMS` holds the values re-tuned on our default model (the bundled Fashion-MNIST LDM,
whose 8×8 latent and operators differ from the paper's), `make_solver`'s default. Each value was
swept with `python -m flash_plugin.bench.tune` for Flash(solver) on 24 training images, the
other settings held at the table's (one coordinate at a time, re-swept until none moved): ζ for
Latent-DPS, GML-DPS and PSLD, γ_rs for ReSample, and the Flash settings c (``noise_correction``)
for all four and v (``variance_scale``, the official code's ``var_mult``) for Latent-DPS and
GML-DPS (GML-DPS not on gblur-fixed). γ stays
the paper's. The sweeps are recorded in
``flash_plugin/weights/fashion-mnist-32/benchmarks/tune_<solver>[_<param>].json``:

====================  ======================  ===================  ===================  ==================
task                  Latent-DPS ζ, c, v      GML-DPS ζ (γ), c, v  PSLD ζ (γ), c        ReSample γ_rs, c
====================  ======================  ===================  ===================  ==================
gblur-varying         0.5, 0, 2               0.5 (0.05), 0, 2     0.5 (0.2), 0         25600, 0
gblur-fixed           4.0, 0, 2               7.0 (0.05), 0, 1     7.0 (0.1), 0         6400, 0
nonlinear-blur        0.5, 0, 4               0.5 (0.05), 0, 4     –                    25600, 0
random-inpainting     0.35, 0, 2              0.35 (0.05), 0, 2    0.35 (0.5), 0        25600, 0
====================  ======================  ===================  ===================  ==================

With c = 0 Flash starts from ẑ itself at the SNR-matched step: for every solver and task the
paper's c = 1–1.2 was worse (by 0.1–0.7 dB); on this model the injected noise costs more than it
washes out. v > 1 (start as if σ̂² were v times larger, i.e. with more guided steps) helps
Latent-DPS by 0.1–0.4 dB at c = 0 (it lost 0.2 dB at c = 1.2) and GML-DPS by 0.14–0.29 dB (grid
1, 2, 4); PSLD and ReSample were not swept in v and keep v = 1.

The step sizes come out 2–30x smaller than the paper's FFHQ values, except on the fixed blur
(1.3–3.5x larger); ReSample's γ_rs ends far above the paper's 200–2000, where PSNR is flat.

The values are tuned for Flash(solver), and the benchmarks run the baseline (the solver from
noise) with the same values. Fairness check on gblur-varying, the same 24 training images
(``tune --method baseline``, ``tune_<solver>_baseline.json``): Latent-DPS from noise is also best
at ζ = 0.5 (19.72 dB; 19.40 at 0.25, 19.15 at 1, 18.37 at 2), and ReSample from noise is flat in
γ_rs (17.99 dB at 3200 and at 25600, 17.67 at the paper's 400).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from flash_plugin.errors import FlashInputError, UnknownPluginNameError
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
    ("latent-dps", "gblur-varying"): _H(zeta=1.0, noise_correction=1.2),
    ("latent-dps", "gblur-fixed"): _H(zeta=3.0, noise_correction=1.2),
    ("latent-dps", "nonlinear-blur"): _H(zeta=1.0, noise_correction=1.0),
    ("latent-dps", "random-inpainting"): _H(zeta=7.0, noise_correction=1.2),
    ("gml-dps", "gblur-varying"): _H(zeta=3.0, gamma=0.05, noise_correction=1.2),
    ("gml-dps", "gblur-fixed"): _H(zeta=2.0, gamma=0.05, noise_correction=1.0),
    ("gml-dps", "nonlinear-blur"): _H(zeta=3.0, gamma=0.05, noise_correction=1.2),
    ("gml-dps", "random-inpainting"): _H(zeta=10.0, gamma=0.05, noise_correction=1.0),
    ("psld", "gblur-varying"): _H(zeta=2.0, gamma=0.2, noise_correction=1.0),
    ("psld", "gblur-fixed"): _H(zeta=2.0, gamma=0.1, noise_correction=1.0),
    # ("psld", "nonlinear-blur"): none -- the nonlinear blur has no adjoint.
    ("psld", "random-inpainting"): _H(zeta=10.0, gamma=0.5, noise_correction=1.0),
    ("resample", "gblur-varying"): _H(gamma_rs=400.0, noise_correction=1.2),
    ("resample", "gblur-fixed"): _H(gamma_rs=2000.0, noise_correction=1.2),
    ("resample", "nonlinear-blur"): _H(gamma_rs=200.0, noise_correction=1.2),
    ("resample", "random-inpainting"): _H(gamma_rs=200.0, noise_correction=1.2),
}
"""The paper's official FFHQ values (flash-algorithm.md §9). Do not edit: tune in `TUNED_HPARAMS`."""

TUNED_HPARAMS: dict[tuple[str, str], SolverHparams] = {
    **PAPER_HPARAMS,
    # Re-tuned for Flash(solver) on the bundled fashion-mnist-32 model: best mean PSNR on the first 24
    # Fashion-MNIST *training* images, severities spread over each task's range, one setting at a
    # time at the others' table values (coordinate descent until none moved), e.g.
    #   python -m flash_plugin.bench.tune --solver gml-dps --tasks gblur-varying --values 0.35 0.5 1
    #   python -m flash_plugin.bench.tune --solver latent-dps --tasks gblur-varying --param variance_scale --values 1 2 3
    # Every sweep is recorded in flash_plugin/weights/fashion-mnist-32/benchmarks/tune_<solver>[_<param>].json
    # (grids, PSNR and SSIM per value, the settings held fixed); a test holds this table to those records.
    # The comments give the best PSNR and the paper's c at otherwise the same settings.
    ("latent-dps", "gblur-varying"): _H(zeta=0.5, noise_correction=0.0, variance_scale=2.0),  # 20.15 dB (c=1.2: 19.44)
    ("latent-dps", "gblur-fixed"): _H(zeta=4.0, noise_correction=0.0, variance_scale=2.0),  # 17.53 dB (c=0.5: 17.15)
    ("latent-dps", "nonlinear-blur"): _H(zeta=0.5, noise_correction=0.0, variance_scale=4.0),  # 25.18 dB (c=1: 25.08; v=3: 25.16)
    ("latent-dps", "random-inpainting"): _H(zeta=0.35, noise_correction=0.0, variance_scale=2.0),  # 22.00 dB (c=1.2: 21.34)
    ("gml-dps", "gblur-varying"): _H(zeta=0.5, gamma=0.05, noise_correction=0.0, variance_scale=2.0),  # 20.21 dB (v=1: 20.07)
    ("gml-dps", "gblur-fixed"): _H(zeta=7.0, gamma=0.05, noise_correction=0.0),  # 17.35 dB (c=1: 16.84)
    ("gml-dps", "nonlinear-blur"): _H(zeta=0.5, gamma=0.05, noise_correction=0.0, variance_scale=4.0),  # 25.26 dB (v=1: 25.00)
    ("gml-dps", "random-inpainting"): _H(zeta=0.35, gamma=0.05, noise_correction=0.0, variance_scale=2.0),  # 22.16 dB (v=1, ζ=0.5: 21.82)
    ("psld", "gblur-varying"): _H(zeta=0.5, gamma=0.2, noise_correction=0.0),  # 20.08 dB (c=1: 19.84)
    ("psld", "gblur-fixed"): _H(zeta=7.0, gamma=0.1, noise_correction=0.0),  # 17.38 dB (c=1: 16.95)
    ("psld", "random-inpainting"): _H(zeta=0.35, gamma=0.5, noise_correction=0.0),  # 20.72 dB (c=1: 20.29)
    # ReSample: PSNR is flat in γ_rs from 6400 up (<= 0.04 dB; it rose up to 25600 at c = 1.2): the
    # resampled latent then sits at the data-consistent z0*.
    ("resample", "gblur-varying"): _H(gamma_rs=25600.0, noise_correction=0.0),  # 19.30 dB (c=1.2: 19.01)
    ("resample", "gblur-fixed"): _H(gamma_rs=6400.0, noise_correction=0.0),  # 16.42 dB (25600: 16.41)
    ("resample", "nonlinear-blur"): _H(gamma_rs=25600.0, noise_correction=0.0),  # 23.91 dB (c=1.2: 23.73)
    ("resample", "random-inpainting"): _H(gamma_rs=25600.0, noise_correction=0.0),  # 20.46 dB (c=1.2: 20.05)
}
"""Values re-tuned on our default model (the comments give the best mean PSNR and a reference point)."""

HparamSource = Literal["tuned", "paper"]


def _check_solver_name(name: str) -> None:
    if name not in SOLVERS:
        raise UnknownPluginNameError(f"unknown solver {name!r}; the reference solvers are {', '.join(SOLVERS)}")


def get_hparams(solver: str, task: str, *, source: HparamSource = "tuned") -> SolverHparams:
    """The table entry of ``solver`` for ``task`` (``source="paper"`` for the paper's values)."""
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
