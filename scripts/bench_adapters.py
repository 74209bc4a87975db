"""Measurements of the third-party adapters on the real upstream code (issue 12's must-show list).

Runs the upstream repositories from checkouts named by environment variables (``FLASH_PSLD_REPO``:
the PSLD repository root; ``FLASH_RESAMPLE_REPO``: the ReSample root) and writes one JSON file per
part under ``results/`` (``adapters_<part>.json``). The script contains no upstream code; it only
calls the adapters of ``flash_plugin.adapters``. Parts:

* ``resume``: per method/mode and k in {0, 1, N/3, N-1, N}: denoiser calls per sample and the max
  abs difference between a solve from the level-k latent of a full run (RNG state replayed) and
  that run's tail (analytic oracle, 3 samples, random inpainting); batch of 3 vs alone; seeds.
* ``differential``: adapter vs the project's reference solver on the 16 first bundled test images,
  gblur-varying, same ζ/γ, S, η = 0 and the same start points (Flash's, from the bundled encoder):
  mean PSNR of each, the paired difference and its standard error.
* ``flash``: ``flash(<upstream sampler>, estimator)`` end to end on the bundled model.
* ``overhead``: wall time of adapter.solve vs calling the upstream method directly, same inputs.

    FLASH_PSLD_REPO=... FLASH_RESAMPLE_REPO=... python scripts/bench_adapters.py resume differential
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from pathlib import Path

import torch

from flash_plugin.adapters.compvis import CompVisModel, cpu_safe_class, forget_upstream, import_upstream, quiet
from flash_plugin.adapters.psld import PSLDAdapter
from flash_plugin.adapters.resample import ReSampleAdapter
from flash_plugin.types import StartPoint

OUT = Path(__file__).resolve().parent.parent / "results"


def gens(n: int, base: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


def torchvision_standin() -> None:
    """ReSample imports torchvision.utils (unused on the sampling path); torchvision does not import
    next to the project's CPU torch, so a two-module stand-in takes its place in this process."""
    import diffusers  # noqa: F401  (before the stand-in: diffusers probes torchvision's spec at import)

    try:
        import torchvision.utils  # noqa: F401
    except Exception:
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        tv, tvu = types.ModuleType("torchvision"), types.ModuleType("torchvision.utils")
        tv.torch, tv.utils = torch, tvu
        sys.modules["torchvision"], sys.modules["torchvision.utils"] = tv, tvu


def upstream(name: str):
    if name == "psld":
        forget_upstream(("ldm", "ldm_inverse", "scripts"))
        return import_upstream(Path(os.environ["FLASH_PSLD_REPO"]) / "stable-diffusion", "ldm.models.diffusion.psld")
    torchvision_standin()
    forget_upstream(("ldm", "ldm_inverse", "scripts"))
    return import_upstream(os.environ["FLASH_RESAMPLE_REPO"], "ldm.models.diffusion.ddim", ("ldm", "ldm_inverse", "scripts"))


def make_adapter(kind: str, sampler, **kw):
    if kind in ("psld", "gml-dps", "latent-dps"):
        return PSLDAdapter(sampler, method=kind, **kw)
    return ReSampleAdapter(sampler, start_mode=kind, **kw)


# ---- resume ----------------------------------------------------------------------------------
def part_resume() -> dict:
    from flash_plugin.conformance.oracles import MaskOperator, make_oracle

    rows = {}
    for repo, kinds, steps in (("psld", ("psld", "gml-dps", "latent-dps"), 50),
                               ("resample", ("keep_full_run_phases", "upstream_truncation"), 100)):
        mod = upstream(repo)
        for kind in kinds:
            model = make_oracle()
            g = torch.Generator().manual_seed(0)
            x = model.sample(3, g).float()
            op = MaskOperator((torch.rand(x.shape, generator=g) > 0.5).float(), noise_std=0.0)
            y = op.measure(x, generator=g)
            eta = 1.0 if repo == "psld" else 0.0
            a = make_adapter(kind, mod.DDIMSampler(CompVisModel(model)), num_steps=steps, eta=eta)
            n = a.schedule.num_steps
            full = a.solve(y, op, generator=gens(3), trajectory=True)
            per_k = {}
            for k in sorted({0, 1, n // 3, n - 1, n}):
                lat = torch.stack([full.extras["trajectory"][i][n - k] for i in range(3)])
                st = [full.extras["rng_states"][i][n - k] for i in range(3)]
                r = a.solve(y, op, start=StartPoint(torch.full((3,), k), lat), rng_state=st)
                per_k[k] = {"nfe": r.nfe.tolist(), "max_abs_diff": (r.latent - full.latent).abs().max().item()}
            solo = torch.cat([a.solve(y[i:i + 1], op.select(torch.tensor([i])), generator=gens(1, i)).latent for i in range(3)])
            again = a.solve(y, op, generator=gens(3))
            other = a.solve(y, op, generator=gens(3, 100))
            rows[kind] = {"N": n, "eta": eta, "full_nfe": full.nfe.tolist(), "from_k": per_k,
                          "batch3_vs_alone_max_abs_diff": (solo - full.latent).abs().max().item(),
                          "same_seed_bit_identical": bool(torch.equal(again.latent, full.latent)),
                          "other_seed_differs": not torch.equal(other.latent, full.latent)}
            print(kind, json.dumps(rows[kind]), flush=True)
    return {"setting": "analytic oracle 2x4x4, random inpainting, sigma_y 0, 3 samples; PSLD S=50 eta=1, ReSample S=100 eta=0",
            "rows": rows}


# ---- differential ----------------------------------------------------------------------------
def _bundled(n_images: int):
    from flash_plugin.models import load_default_model, load_test_images
    from flash_plugin.operators.presets import get_preset

    dm = load_default_model()
    x = load_test_images()[0][:n_images]
    preset = get_preset("gblur-varying")
    g = torch.Generator().manual_seed(0)
    op = preset.make(preset.sample_severity(n_images, g), generator=g)
    y = op.measure(x, generator=g)
    return dm, x, op, y


def psnr(x, ref):
    mse = ((x.clamp(-1, 1) - ref) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse)


def part_differential(n_images: int, kinds: list[str], steps: int) -> dict:
    from flash_plugin.flash import FlashConfig, FlashSolver
    from flash_plugin.solvers import GMLDPS, PSLD, LatentDPS, ReSample
    from flash_plugin.solvers.hparams import get_hparams

    dm, x, op, y = _bundled(n_images)
    ld = dm.latent_diffusion
    enc = dm.severity_encoder("gblur-varying")
    rows = {}
    for kind in kinds:
        if kind in ("psld", "gml-dps", "latent-dps"):
            hp = get_hparams(kind, "gblur-varying")
            ours = {"psld": PSLD, "gml-dps": GMLDPS, "latent-dps": LatentDPS}[kind](ld, num_steps=steps, eta=0.0, **hp.solver_kwargs())
            adapter = PSLDAdapter(upstream("psld").DDIMSampler(CompVisModel(ld)), method=kind, num_steps=steps, eta=0.0,
                                  omega=hp.zeta, gamma=hp.gamma or 0.0)
            settings = {"zeta=omega": hp.zeta, "gamma": hp.gamma or 0.0}
        else:
            hp = get_hparams("resample", "gblur-varying")
            ours = ReSample(ld, variant="original", num_steps=steps)
            adapter = ReSampleAdapter(upstream("resample").DDIMSampler(CompVisModel(ld)), start_mode=kind, num_steps=steps)
            settings = {"variant": "original (ours) vs repository defaults"}
        fs = FlashSolver(ours, enc, FlashConfig(**hp.flash_kwargs()))
        start, _ = fs.start_point(y, generator=gens(n_images, 1000))
        t0 = time.time()
        a = adapter.solve(y, op, start=start, generator=gens(n_images))
        t1 = time.time()
        b = ours.solve(y, op, start=start, generator=gens(n_images))
        t2 = time.time()
        pa, pb = psnr(a.x, x), psnr(b.x, x)
        d = pa - pb
        rows[kind] = {"settings": settings, "N": steps, "start_steps": start.step.tolist(),
                      "adapter_psnr": pa.mean().item(), "ours_psnr": pb.mean().item(),
                      "paired_diff": d.mean().item(), "paired_se": (d.std() / len(d) ** 0.5).item(),
                      "adapter_nfe_mean": a.nfe.float().mean().item(), "ours_nfe_mean": b.nfe.float().mean().item(),
                      "adapter_s": t1 - t0, "ours_s": t2 - t1}
        print(kind, json.dumps(rows[kind]), flush=True)
    return {"setting": f"{n_images} bundled test images, gblur-varying (preset severities, seed 0), eta 0, Flash start points "
                       "from the bundled gblur-varying encoder with the tuned c/v", "rows": rows}


# ---- flash end to end and overhead -----------------------------------------------------------
def part_flash(n_images: int, steps: int) -> dict:
    from flash_plugin import flash

    dm, x, op, y = _bundled(n_images)
    ld = dm.latent_diffusion
    rows = {}
    sampler = upstream("psld").DDIMSampler(CompVisModel(ld))
    solver = flash(PSLDAdapter(sampler, num_steps=steps), estimator=dm.severity_encoder("gblur-varying"))
    t = time.time()
    sol = solver(y, op, generator=gens(n_images))
    rows["psld_adapter_explicit"] = {"psnr": psnr(sol.x, x).mean().item(), "nfe": sol.nfe.tolist(), "s": time.time() - t}
    solver = flash(sampler, estimator=dm.severity_encoder("gblur-varying"))  # the upstream object itself
    t = time.time()
    sol = solver(y[:2], op.select(torch.arange(2)), generator=gens(2))
    rows["psld_upstream_object_default_S1000"] = {"adapter": repr(solver.solver), "psnr": psnr(sol.x, x[:2]).mean().item(),
                                                   "nfe": sol.nfe.tolist(), "s": time.time() - t}
    print(json.dumps(rows), flush=True)
    return rows


def part_overhead(steps: int, repeats: int) -> dict:
    dm, x, op, y = _bundled(1)
    ld = dm.latent_diffusion
    mod = upstream("psld")
    adapter = PSLDAdapter(mod.DDIMSampler(CompVisModel(ld)), num_steps=steps)
    direct = cpu_safe_class(mod.DDIMSampler)(CompVisModel(ld))
    with quiet():
        direct.make_schedule(steps, verbose=False)
    from flash_plugin.adapters.psld import _TransposeShim, _clean

    z = torch.randn(1, *ld.latent_shape, generator=torch.Generator().manual_seed(0))
    ta, td = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        adapter.solve(y, op, start=StartPoint(torch.tensor([adapter.schedule.num_steps]), z), generator=gens(1))
        ta.append(time.perf_counter() - t)
        t = time.perf_counter()
        with quiet(), torch.enable_grad():
            zz, _ = direct.ddim_sampling(None, (1, *ld.latent_shape), x_T=z.clone(), measurements=y, operator=_TransposeShim(op, True),
                                         gamma=0.1, omega=1.0, general_inverse=True, noiser=_clean, log_every_t=10**9)
            ld.decode(zz.detach())
        td.append(time.perf_counter() - t)
    ma, md = sorted(ta)[len(ta) // 2], sorted(td)[len(td) // 2]
    res = {"S": steps, "repeats": repeats, "adapter_median_s": ma, "direct_median_s": md, "overhead_pct": 100 * (ma - md) / md,
           "adapter_all_s": ta, "direct_all_s": td}
    print(json.dumps(res), flush=True)
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("parts", nargs="+", choices=["resume", "differential", "flash", "overhead"])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--kinds", nargs="+", default=["latent-dps", "gml-dps", "psld"])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--tag", default="")
    a = p.parse_args(argv)
    OUT.mkdir(exist_ok=True)
    for part in a.parts:
        res = {"resume": lambda: part_resume(), "differential": lambda: part_differential(a.images, a.kinds, a.steps),
               "flash": lambda: part_flash(a.images, a.steps), "overhead": lambda: part_overhead(a.steps, a.repeats)}[part]()
        (OUT / f"adapters_{part}{a.tag}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
