"""Evaluation of a severity estimator: ranking, ordering, calibration, start steps, a scatter plot.

`evaluate_severity_encoder` measures, on held-out images:

* **Spearman** correlation of ``σ̂²`` with the true severity ``t`` (``t ~ U(0, 1)`` per image, fixed
  seed), and with the measured error variance ``σ̄²``;
* **pairwise ordering accuracy**, the official validation metric: per image, 10 measurements at
  ``t ∈ linspace(0, 1, 10)``; the fraction of the 45 pairs whose ``σ̂²`` order agrees with the
  ``t`` order (a tie counts one half), averaged over the images;
* **calibration** of ``σ̂²`` against ``σ̄²`` (unbiased variance of ``ẑ − z0`` over the latent
  dimensions): least-squares fit ``σ̄² ≈ a + b·σ̂²`` (``b = 1, a = 0`` when ``σ̂²`` is the
  conditional mean of ``σ̄²``), the Pearson correlation, the same in log space, and the ratio of
  the means;
* the **start steps** ``k*`` the estimates select on the model's schedule (min / median / max and
  the mean, which is the Flash NFE), via `flash_plugin.schedule.select_start_step`;
* latent MSE of ``ẑ`` and PSNR of ``D(ẑ)``.

`plot_severity` draws the poster's "Severity encoding experiments" figure: ``σ̂²`` (and ``σ̄²``)
against the severity, and ``σ̂²`` against ``σ̄²``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flash_plugin.metrics import pearson, spearman
from flash_plugin.severity.train import measure
from flash_plugin.utils.random import stream_generator
from flash_plugin.utils.training import finite_or_none

__all__ = [
    "SeverityReport",
    "calibration",
    "evaluate_severity_encoder",
    "ordering_accuracy",
    "pearson",
    "plot_severity",
    "spearman",
]


def ordering_accuracy(variances: torch.Tensor) -> float:
    """Mean over rows of the fraction of pairs ``i < j`` with ``variances[r, i] < variances[r, j]``
    (columns ordered by increasing true severity; a tie counts one half)."""
    v = torch.as_tensor(variances).detach().double().cpu()
    if v.ndim != 2 or v.shape[1] < 2:
        raise ValueError(f"variances must be (N, K) with K >= 2, got {tuple(v.shape)}")
    k = v.shape[1]
    i, j = torch.triu_indices(k, k, offset=1)
    diff = v[:, j] - v[:, i]
    score = (diff > 0).double() + 0.5 * (diff == 0).double()
    return float(score.mean())


def _fit(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Least squares ``y ≈ a + b x``: ``(b, a)``."""
    x, y = x.double(), y.double()
    xc = x - x.mean()
    den = xc.square().sum()
    if den <= 0:
        return float("nan"), float("nan")
    b = float((xc * (y - y.mean())).sum() / den)
    return b, float(y.mean() - b * x.mean())


def calibration(predicted, measured) -> dict[str, float]:
    """Calibration of predicted variances against measured ones (see the module docstring)."""
    p = torch.as_tensor(predicted).detach().double().cpu().flatten()
    m = torch.as_tensor(measured).detach().double().cpu().flatten()
    slope, intercept = _fit(p, m)
    lp, lm = p.clamp_min(1e-30).log(), m.clamp_min(1e-30).log()
    log_slope, log_intercept = _fit(lp, lm)
    return {
        "slope": slope,
        "intercept": intercept,
        "pearson": pearson(p, m),
        "log_slope": log_slope,
        "log_intercept": log_intercept,
        "log_pearson": pearson(lp, lm),
        "ratio_of_means": float(p.mean() / m.mean()) if m.mean() > 0 else float("nan"),
    }


@dataclass(frozen=True)
class SeverityReport:
    """Evaluation numbers (``metrics``) and the per-sample data behind them.

    ``severity``, ``variance`` (σ̂²), ``error_variance`` (σ̄²) and ``start_step`` are ``[N]`` for the
    random-severity set; ``ordering_variances`` is ``(M, 10)`` for the ordering set.
    """

    metrics: dict[str, Any]
    severity: torch.Tensor
    variance: torch.Tensor
    error_variance: torch.Tensor
    start_step: torch.Tensor
    ordering_variances: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Info and metrics as strict JSON (NaN -> None)."""
        return finite_or_none({**self.info, "metrics": self.metrics})


def _schedule_for(model, num_steps: int | None):
    from flash_plugin.solvers.base import train_timesteps
    from flash_plugin.types import NoiseSchedule

    acp = torch.as_tensor(model.alphas_cumprod, dtype=torch.float64).cpu()
    n = len(acp) if num_steps is None else int(num_steps)
    return NoiseSchedule.from_train_alphas(acp, train_timesteps(len(acp), n))


@torch.no_grad()
def _run(estimator, model, family, x_all: torch.Tensor, t_all: torch.Tensor, seed: int, stream: str, batch_size: int, device):
    """σ̂², σ̄², latent MSE and PSNR of D(ẑ) for every (image, severity) pair, in batches with fixed seeds."""
    vh, vb, mse, psnr = [], [], [], []
    for c, i in enumerate(range(0, len(x_all), batch_size)):
        x = x_all[i : i + batch_size].to(device)
        y = measure(family, x, t_all[i : i + batch_size], stream_generator(seed, stream, c)).to(x.dtype)
        est = estimator.estimate(y)
        z0 = model.encode(x).to(est.latent.dtype)
        err = (est.latent - z0).flatten(1)
        vh.append(est.variance.double().cpu())
        vb.append(err.var(dim=1, unbiased=True).double().cpu())
        mse.append(err.square().mean(dim=1).double().cpu())
        rec = model.decode(est.latent).clamp(-1, 1)
        m = ((rec - x) / 2).square().flatten(1).mean(dim=1).double().clamp_min(1e-12)
        psnr.append((-10 * torch.log10(m)).cpu())
    return torch.cat(vh), torch.cat(vb), torch.cat(mse), torch.cat(psnr)


def _start_steps(k: torch.Tensor, schedule) -> dict[str, Any]:
    return {"min": int(k.min()), "median": int(k.median()), "max": int(k.max()), "mean": float(k.double().mean()),
            "num_steps": schedule.num_steps}


def _task_range_metrics(run, family, images: torch.Tensor, seed: int, schedule) -> dict[str, Any] | None:
    """The numbers at the family's own severity range (e.g. 70-80 % missing pixels), the start
    steps a benchmark of that task will see; ``None`` when the range is the full ``[0, 1]``."""
    from flash_plugin.schedule import select_start_step

    rng = getattr(family, "severity_range", None)
    if rng is None or tuple(float(r) for r in rng) == (0.0, 1.0):
        return None
    lo, hi = (float(r) for r in rng)
    t = lo + (hi - lo) * torch.rand(len(images), generator=stream_generator(seed, "eval-range-t", 0), dtype=torch.float64)
    var_hat, var_bar, mse, _ = run(images, t, seed, "eval-range")
    return {"severity_range": [lo, hi], "sigma_hat_mean": float(var_hat.mean()), "sigma_bar_mean": float(var_bar.mean()),
            "latent_mse": float(mse.mean()), "calibration": calibration(var_hat, var_bar),
            "start_step": _start_steps(select_start_step(schedule, var_hat), schedule)}


def evaluate_severity_encoder(
    estimator,
    model,
    family,
    images: torch.Tensor,
    *,
    seed: int = 0,
    batch_size: int = 64,
    n_ordering: int | None = 100,
    num_steps: int | None = None,
    device: str | torch.device | None = None,
    plot: str | Path | None = None,
) -> SeverityReport:
    """Evaluate ``estimator`` (anything with ``estimate(y)``, e.g. a `SeverityEncoder`) on ``images``.

    Args:
        model: the `LatentDiffusion` whose latent space ``ẑ`` lives in (``encode`` for ``z0``,
            ``decode`` for the PSNR, ``alphas_cumprod`` for the start steps).
        family: the operator family (``make(t, generator)``), as in training.
        images: ``(N, C, H, W)`` held-out images in ``[-1, 1]``.
        seed: seeds the severities, operator parameters and noise (fixed per batch).
        n_ordering: images used for the ordering accuracy (10 measurements each; ``None``: all).
        num_steps: the solver's ``N`` for the start steps (default: all train timesteps, DDPM).
        device: where to run (default: the estimator's device, else the model's).
        plot: write the scatter plot there (PNG) when given.
    """
    from flash_plugin.schedule import select_start_step

    if device is None:
        device = getattr(estimator, "device", None) or getattr(model, "device", "cpu")
    run = functools.partial(_run, estimator, model, family, batch_size=batch_size, device=torch.device(device))
    n = len(images)
    t = torch.rand(n, generator=stream_generator(seed, "eval-t", 0), dtype=torch.float64)
    var_hat, var_bar, mse, psnr = run(images, t, seed, "eval")
    schedule = _schedule_for(model, num_steps)
    k = select_start_step(schedule, var_hat)
    m = n if n_ordering is None else min(n, n_ordering)
    grid = torch.linspace(0, 1, 10, dtype=torch.float64)
    ord_hat = run(images[:m].repeat_interleave(10, dim=0), grid.repeat(m), seed, "eval-ordering")[0].view(m, 10)
    metrics = {
        "n_images": n,
        "spearman_severity": spearman(var_hat, t),
        "spearman_error": spearman(var_hat, var_bar),
        "spearman_error_severity": spearman(var_bar, t),
        "ordering_accuracy": ordering_accuracy(ord_hat),
        "n_ordering_images": m,
        "calibration": calibration(var_hat, var_bar),
        "sigma_hat": {"mean": float(var_hat.mean()), "min": float(var_hat.min()), "max": float(var_hat.max())},
        "sigma_bar": {"mean": float(var_bar.mean()), "min": float(var_bar.min()), "max": float(var_bar.max())},
        "latent_mse": float(mse.mean()),
        "decoded_psnr_db": float(psnr.mean()),
        "start_step": _start_steps(k, schedule),
    }
    task_range = _task_range_metrics(run, family, images, seed, schedule)
    if task_range is not None:
        metrics["task_range"] = task_range
    meta = getattr(estimator, "metadata", {}) or {}
    info = {"operator": getattr(family, "name", type(family).__name__), "encoder_operator": meta.get("operator"),
            "latent_id": meta.get("latent_id"), "seed": seed}
    report = SeverityReport(metrics, t, var_hat, var_bar, k, ord_hat, info)
    if plot is not None:
        plot_severity(report, plot)
    return report


def plot_severity(report: SeverityReport, path: str | Path, title: str | None = None) -> Path:
    """Scatter plots (matplotlib, Agg backend): σ̂² and σ̄² vs severity; σ̂² vs σ̄² (log-log, with y = x)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t, vh, vb = report.severity.numpy(), report.variance.numpy(), report.error_variance.numpy()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    ax = axes[0]
    ax.scatter(t, vb, s=8, alpha=0.35, color="tab:gray", label="measured σ̄²")
    ax.scatter(t, vh, s=8, alpha=0.7, color="tab:blue", label="estimated σ̂²")
    ax.set_xlabel("true severity t")
    ax.set_ylabel("latent error variance")
    ax.set_yscale("log")
    ax.set_title(f"Spearman(σ̂², t) = {report.metrics['spearman_severity']:.3f}")
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[1]
    lo = float(min(vh.min(), vb.min())) * 0.8
    hi = float(max(vh.max(), vb.max())) * 1.25
    ax.scatter(vh, vb, s=8, alpha=0.6, color="tab:blue")
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("estimated σ̂²")
    ax.set_ylabel("measured σ̄²")
    cal = report.metrics["calibration"]
    ax.set_title(f"calibration: slope {cal['slope']:.2f}, log-Pearson {cal['log_pearson']:.3f}")
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[2]
    grid = torch.linspace(0, 1, report.ordering_variances.shape[1]).numpy()
    ov = report.ordering_variances.numpy()
    for row in ov[: min(len(ov), 30)]:
        ax.plot(grid, row, color="tab:blue", alpha=0.25, lw=1)
    ax.plot(grid, ov.mean(axis=0) if len(ov) else grid * 0, color="k", lw=2, label="mean")
    ax.set_yscale("log")
    ax.set_xlabel("severity t (same image)")
    ax.set_ylabel("σ̂²")
    ax.set_title(f"ordering accuracy {report.metrics['ordering_accuracy']:.3f}")
    ax.legend(loc="upper left", fontsize=8)
    st = report.metrics["start_step"]
    from matplotlib.ticker import NullFormatter

    for a in axes:  # log axes: no labels on minor ticks (they overlap on short ranges)
        a.xaxis.set_minor_formatter(NullFormatter())
        a.yaxis.set_minor_formatter(NullFormatter())
    fig.suptitle(title or (f"Severity encoding: {report.info.get('operator')} — start steps k* {st['min']}/{st['median']}/{st['max']} "
                           f"(min/median/max of N={st['num_steps']})"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_report(report: SeverityReport) -> str:
    """A few human-readable lines."""
    m = report.metrics
    cal, st = m["calibration"], m["start_step"]
    lines = [
        f"operator {report.info.get('operator')}  images {m['n_images']}",
        f"Spearman(σ̂², t) {m['spearman_severity']:.3f}   Spearman(σ̂², σ̄²) {m['spearman_error']:.3f}   "
        f"ordering accuracy {m['ordering_accuracy']:.3f} ({m['n_ordering_images']} images x 10)",
        f"calibration σ̄² ≈ {cal['intercept']:.3g} + {cal['slope']:.3f}·σ̂²  (Pearson {cal['pearson']:.3f}; "
        f"log slope {cal['log_slope']:.3f}, log Pearson {cal['log_pearson']:.3f}; mean ratio {cal['ratio_of_means']:.3f})",
        f"σ̂² mean {m['sigma_hat']['mean']:.4g} [{m['sigma_hat']['min']:.3g}, {m['sigma_hat']['max']:.3g}]   "
        f"σ̄² mean {m['sigma_bar']['mean']:.4g} [{m['sigma_bar']['min']:.3g}, {m['sigma_bar']['max']:.3g}]",
        f"start step k* min {st['min']} median {st['median']} max {st['max']} mean {st['mean']:.1f} of N = {st['num_steps']}",
        f"latent MSE {m['latent_mse']:.4g}   PSNR of D(ẑ) {m['decoded_psnr_db']:.2f} dB",
    ]
    if "task_range" in m:
        tr = m["task_range"]
        lines.append(f"task range t ∈ {tr['severity_range']}: σ̂² mean {tr['sigma_hat_mean']:.4g} (σ̄² {tr['sigma_bar_mean']:.4g}), "
                     f"k* min {tr['start_step']['min']} median {tr['start_step']['median']} max {tr['start_step']['max']}")
    return "\n".join(lines)
