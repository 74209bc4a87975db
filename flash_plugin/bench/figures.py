"""Figures of the demo and the benchmark (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _img(x: torch.Tensor):
    return ((x.detach().cpu().float().clamp(-1, 1) + 1) / 2)[0].numpy()


def reconstruction_figure(runs, path: str | Path, *, baseline_name: str = "Latent-DPS") -> None:
    """Columns: images of all tasks; rows: clean / measurement / baseline / Flash (/ AE-only).

    A method that did not run on an image (the demo runs the baseline on a subset) leaves its
    panel blank with the note "not run"."""
    plt = _plt()
    cols = [(r, i) for r in runs for i in range(len(r.clean))]
    methods = [m for m in ("baseline", "flash", "ae") if any(r.by_method(m) for r in runs)]
    rows = ["clean", "measurement", *methods]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.6 * len(cols) + 1, 1.75 * len(rows)), squeeze=False)
    names = {"baseline": baseline_name, "flash": "Flash", "ae": "AE-only"}
    for c, (r, i) in enumerate(cols):
        image = r.image_ids[i] if getattr(r, "image_ids", None) is not None else i
        recs = {m: next((x for x in r.by_method(m) if x.image == image), None) for m in methods}
        panels = [("clean", r.clean[i], f"{r.task}\nt={float(r.severities[i]):.2f}"),
                  ("measurement", r.measurement[i], "")]
        for m in methods:
            rec = recs[m]
            if rec is None:
                panels.append((m, None, "not run"))
                continue
            label = f"{rec.psnr:.1f} dB, NFE {rec.nfe}"
            if m == "flash":
                label = f"{rec.psnr:.1f} dB\nσ̂²={rec.sigma2:.3f} k*={rec.start_step}"
            panels.append((m, rec.x, label))
        for rr, (_, img, title) in enumerate(panels):
            ax = axes[rr, c]
            if img is not None:
                ax.imshow(_img(img), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if title:
                ax.set_title(title, fontsize=7)
            if c == 0:
                ax.set_ylabel(names.get(rows[rr], rows[rr]), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def severity_scatter(model_set, families, images: torch.Tensor, path: str | Path, *, seed: int = 0, levels: int = 10) -> dict:
    """σ̂² vs severity on ``images`` at ``levels`` severities per encoder (the poster's plot)."""
    from flash_plugin.operators import get_preset
    from flash_plugin.bench.reconstruct import degrade

    plt = _plt()
    fig, axes = plt.subplots(1, len(families), figsize=(4 * len(families), 3.4), squeeze=False)
    data = {}
    for ax, fam in zip(axes[0], families):
        preset, enc = get_preset(fam), model_set.severity_encoder(fam)
        ts, vs = [], []
        for t in torch.linspace(0, 1, levels):
            sev = torch.full((len(images),), float(t), device=images.device)
            _, y = degrade(preset, images, sev, seed)
            vs.append(enc.estimate(y).variance.cpu())
            ts.append(sev.cpu())
        t_all, v_all = torch.cat(ts), torch.cat(vs)
        ax.scatter(t_all.numpy(), v_all.numpy(), s=5, alpha=0.4)
        ax.set_yscale("log")
        ax.set_xlabel("severity t")
        ax.set_ylabel("σ̂²")
        ax.set_title(fam)
        data[fam] = (t_all, v_all)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return data
