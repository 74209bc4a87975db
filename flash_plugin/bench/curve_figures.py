"""Figures of quality-vs-compute curves and robustness runs (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(result: dict, path: str | Path) -> None:
    """PSNR, SSIM and FD-FMNIST against mean NFE: the fixed-start curve as a line, Flash settings,
    the calibrated start policy and the budget curve as points, AE-only as a horizontal line."""
    plt = _plt()
    s = result["settings"]
    meta = result["meta"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    kinds = {"fixed": ("fixed start (every image at k)", "k-", "o"), "budget": ("Flash, compute budget", "C1--", "s"),
             "flash": ("Flash (σ̂² rule), one point per c, v", None, "D"),
             "policy": ("Flash, calibrated start policy", None, "*")}
    for ax, metric, name in zip(axes, ("psnr", "ssim", "fd_fmnist"), ("PSNR (dB)", "SSIM", "FD-FMNIST (lower is better)")):
        for kind, (label, line, marker) in kinds.items():
            pts = sorted((v for v in s.values() if v["kind"] == kind and metric in v), key=lambda v: v["mean_nfe"])
            if not pts:
                continue
            x = [v["mean_nfe"] for v in pts]
            y = [v[metric] for v in pts]
            if line:
                ax.plot(x, y, line, marker=marker, label=label)
            else:
                ax.scatter(x, y, marker=marker, color="C3" if kind == "flash" else "C4", s=60, zorder=3, label=label)
                for v in pts if kind == "flash" else ():
                    ax.annotate(f"c={v['params']['c']:g}, v={v['params']['v']:g}", (v["mean_nfe"], v[metric]),
                                fontsize=7, xytext=(3, 3), textcoords="offset points")
        if "ae" in s and metric in s["ae"]:
            ax.axhline(s["ae"][metric], color="C2", ls=":", label="AE-only (0 NFE)")
        ax.set_xscale("log")
        ax.set_xlabel("mean NFE per image")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{meta['task']} · {meta['solver']} · {meta['n_images']} {meta.get('split', 'test')} images "
                 f"(offset {meta['offset']}, seed {meta['seed']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_robustness(rows: list[dict], path: str | Path, *, title: str, level_name: str, train_max: float) -> None:
    """PSNR (± 1 SE) against severity level per method; ``rows`` hold ``level``, ``method``,
    ``psnr``, ``se``. A dashed line marks the end of the encoder's training range."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["level"])
        ax.errorbar([r["level"] for r in pts], [r["psnr"] for r in pts], yerr=[r["se"] for r in pts],
                    marker="o", capsize=3, label=method)
    ax.axvline(train_max, color="grey", ls="--", lw=1, label="end of the training range")
    ax.set_xlabel(level_name)
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
