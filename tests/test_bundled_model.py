"""The bundled default model: integrity, metadata, an end-to-end Flash reconstruction, the demo."""

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from flash_plugin.models import DEFAULT_MODEL_DIR, load_default_model, load_test_images

FAMILIES = ["gblur-varying", "nonlinear-blur", "random-inpainting"]


def test_weights_match_the_manifest():
    manifest = (DEFAULT_MODEL_DIR / "MANIFEST.sha256").read_text().split("\n")
    entries = [line.split() for line in manifest if line.strip()]
    assert len(entries) >= 8
    for digest, rel in entries:
        data = (DEFAULT_MODEL_DIR / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest, f"{rel} differs from MANIFEST.sha256"


def test_the_manifest_lists_every_safetensors_file():
    listed = {line.split()[1].removeprefix("./") for line in (DEFAULT_MODEL_DIR / "MANIFEST.sha256").read_text().splitlines() if line.strip()}
    assert listed == {p.relative_to(DEFAULT_MODEL_DIR).as_posix() for p in DEFAULT_MODEL_DIR.rglob("*.safetensors")}


def test_model_card_links_resolve_in_the_repository():
    """The cards link their records in the repository's results/ folder (outside the package)."""
    cards = sorted(DEFAULT_MODEL_DIR.rglob("MODEL_CARD.md"))
    assert len(cards) == 7
    links = 0
    for card in cards:
        for target in re.findall(r"\]\(([^)#]+)\)", card.read_text()):
            if "://" not in target:
                links += 1
                assert (card.parent / target).exists(), f"{card.relative_to(DEFAULT_MODEL_DIR)} links to a missing {target}"
    assert links >= 20


def test_bundle_metadata_and_latent_space():
    bundle = load_default_model()
    ld = bundle.latent_diffusion
    assert ld.latent_shape == (4, 8, 8) and ld.image_shape == (1, 32, 32)
    assert len(ld.alphas_cumprod) == 1000
    assert bundle.severity_families() == FAMILIES
    for fam in FAMILIES:
        enc = bundle.severity_encoder(fam)
        assert enc.metadata["latent_id"] == ld.latent_id
        assert enc.metadata["operator"] == fam
    # each encoder was trained for the operator parameters the presets use now
    from flash_plugin.operators.gaussian_blur import DEFAULT_STD_RANGE
    from flash_plugin.operators.nonlinear_blur import DEFAULT_LENGTH_RANGE

    want = {"gblur-varying": {"std_range": list(DEFAULT_STD_RANGE)}, "nonlinear-blur": {"length_range": list(DEFAULT_LENGTH_RANGE)},
            "random-inpainting": {}}
    assert {fam: bundle.severity_encoder(fam).metadata["operator_kwargs"] for fam in FAMILIES} == want
    total = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.rglob("*.safetensors"))
    assert total < 30 * 2**20, f"bundled weights are {total / 2**20:.1f} MiB (limit 30)"


def test_the_unet_is_stored_in_float16_and_computes_in_float32():
    from safetensors import safe_open

    with safe_open(str(DEFAULT_MODEL_DIR / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F16"}  # see unet/MODEL_CARD.md, "Storage"
    unet = load_default_model().latent_diffusion.unet
    assert {p.dtype for p in unet.parameters()} == {torch.float32}


def test_registry_loads_the_bundle():
    from flash_plugin.registry import get_model

    assert get_model("fashion-mnist-32") is load_default_model


def test_readme_quick_example_runs_and_flash_is_adaptive():
    """The README's quick example, verbatim, with a check of what it promises."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Quick example\s+```python\n(.*?)```", readme, re.S).group(1)
    ns: dict = {}
    exec(compile(block, "README quick example", "exec"), ns)  # noqa: S102 - our own README
    sol, x = ns["solution"], ns["x"]
    assert sol.x.shape == x.shape and torch.all(torch.isfinite(sol.x))
    assert torch.equal(sol.nfe, sol.start_step)
    assert sol.start_step.max() < 1000 and sol.start_step.min() >= 1
    # more blur -> larger σ̂² and no earlier start (severities 0.1 ... 1.0 in the example)
    assert sol.severity[-1] > sol.severity[0] and sol.start_step[-1] >= sol.start_step[0]


def test_flash_end_to_end_beats_the_measurement():
    from flash_plugin import FlashConfig, flash
    from flash_plugin.metrics import psnr
    from flash_plugin.operators import get_preset
    from flash_plugin.solvers import LatentDPS

    bundle = load_default_model()
    x, _ = load_test_images()
    x = x[8:12]
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    op = get_preset("random-inpainting").make(torch.full((4,), 0.9), gens)
    y = op.measure(x, gens)
    solver = flash(LatentDPS(bundle.latent_diffusion, zeta=7.0), bundle.severity_encoder("random-inpainting"), FlashConfig(noise_correction=1.2))
    sol = solver(y, op, generator=gens)
    assert psnr(sol.x, x).mean() > psnr(y.clamp(-1, 1), x).mean() + 5.0


def test_demo_quick_writes_its_files(tmp_path):
    from flash_plugin.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--num-steps", "40"]) == 0
    for name in ("reconstructions.png", "severity_scatter.png", "results.json"):
        assert (out / name).stat().st_size > 1000 or name == "results.json"
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"baseline", "flash", "ae"}
    assert all(r["mean_nfe"] == 40 for r in rows if r["method"] == "baseline")


@pytest.mark.slow
def test_demo_quick_with_default_steps(tmp_path):
    from flash_plugin.cli import main

    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0


def test_bench_reports_paired_differences(tmp_path, capsys):
    from flash_plugin.cli import main

    assert main(["bench", "--n-images", "3", "--batch-size", "3", "--num-steps", "10", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "bench_gblur-varying_latent-dps.json").read_text())
    assert set(res["methods"]) == {"baseline", "flash", "ae"}
    assert res["methods"]["baseline"]["mean_nfe"] == 10 and res["methods"]["ae"]["mean_nfe"] == 0
    assert res["methods"]["flash"]["mean_nfe"] == sum(res["start_steps"]) / 3
    d = res["paired"]["flash-baseline:psnr"]
    per = res["per_image"]
    expected = sum(f["psnr"] - b["psnr"] for f, b in zip(per["flash"], per["baseline"])) / 3
    assert d["n"] == 3 and abs(d["mean"] - expected) < 1e-9
    assert all(v >= 0 for v in (res["methods"][m]["fd_fmnist"] for m in res["methods"]))
    from dataclasses import asdict

    from flash_plugin.solvers.hparams import get_hparams

    assert res["hparams"] == asdict(get_hparams("latent-dps", "gblur-varying")) and res["num_steps"] == 10  # what it ran with
    # A solver argument overridden on the command line is used and recorded (here: ζ of the baseline).
    out2 = tmp_path / "zeta"
    assert main(["bench", "--n-images", "3", "--batch-size", "3", "--num-steps", "10", "--methods", "baseline",
                 "--solver-arg", "zeta=3", "--out", str(out2)]) == 0
    res2 = json.loads((out2 / "bench_gblur-varying_latent-dps.json").read_text())
    assert res2["hparams"]["zeta"] == 3.0 and res2["hparams"]["noise_correction"] == res["hparams"]["noise_correction"]
    assert res2["methods"]["baseline"]["psnr"] != res["methods"]["baseline"]["psnr"]  # ζ = 3 is another reconstruction
    # Reusing the baseline of the first run: the same per-image baseline, a fresh Flash, the origin recorded.
    out3 = tmp_path / "reuse"
    first = str(tmp_path / "bench_gblur-varying_latent-dps.json")
    common = ["bench", "--n-images", "3", "--batch-size", "3", "--num-steps", "10"]
    assert main(common + ["--reuse-baseline", first, "--out", str(out3)]) == 0
    res3 = json.loads((out3 / "bench_gblur-varying_latent-dps.json").read_text())
    assert res3["per_image"]["baseline"] == res["per_image"]["baseline"] and res3["baseline_from"]["file"] == first
    assert res3["per_image"]["flash"] == res["per_image"]["flash"] and res3["paired"] == res["paired"]
    assert res3["methods"]["baseline"]["fd_fmnist"] == res["methods"]["baseline"]["fd_fmnist"]
    from flash_plugin.errors import FlashInputError

    capsys.readouterr()
    # the baseline would be another one:
    assert main(common + ["--solver-arg", "zeta=3", "--reuse-baseline", first, "--out", str(out3)]) != 0
    assert re.search("differs in .*solver arguments", capsys.readouterr().err)
    # other batches: other seeds, other measurements:
    assert main(["bench", "--n-images", "3", "--batch-size", "1", "--num-steps", "10", "--reuse-baseline", first, "--out", str(out3)]) != 0
    assert "AE-only differs" in capsys.readouterr().err
    from flash_plugin.commands.bench import parse_solver_args

    with pytest.raises(FlashInputError, match="NAME one of"):
        parse_solver_args(["gamma_rs=5"], "latent-dps", "gblur-varying")
    with pytest.raises(FlashInputError, match="not a number"):
        parse_solver_args(["zeta=big"], "latent-dps", "gblur-varying")


def test_tune_records_the_settings_it_held_and_drops_stale_sweeps(tmp_path, monkeypatch):
    import numpy as np

    from flash_plugin.bench import tune
    from flash_plugin.data import write_idx

    # A complete fake dataset (all four IDX files): the sweep never reads the installed one.
    rng = np.random.default_rng(0)
    data = tmp_path / "fmnist"
    data.mkdir()
    for split in ("train", "t10k"):
        write_idx(data / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (1, 28, 28)))
        write_idx(data / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (1,)))
    monkeypatch.setenv("FLASH_PLUGIN_FASHION_MNIST", str(data))
    out = tmp_path / "out"
    args = ["--solver", "latent-dps", "--tasks", "gblur-varying", "--param", "variance_scale", "--n-images", "1", "--out", str(out)]
    path = out / "tune_latent-dps_variance_scale.json"

    def results():
        return json.loads(path.read_text())["results"]["gblur-varying"]

    assert tune.main(args + ["--values", "1"]) == 0
    rec = json.loads(path.read_text())
    assert (rec["solver"], rec["param"]) == ("latent-dps", "variance_scale")
    assert rec["at"]["gblur-varying"] == tune.settings_at("latent-dps", "gblur-varying", "variance_scale")
    assert "variance_scale" not in rec["at"]["gblur-varying"] and list(results()) == ["1.0"]
    assert tune.main(args + ["--values", "0.5"]) == 0  # same settings: the grid is extended
    assert set(results()) == {"1.0", "0.5"}
    rec["at"]["gblur-varying"]["zeta"] = 99.0  # as if measured at another ζ: dropped by the next run
    path.write_text(json.dumps(rec))
    assert tune.main(args + ["--values", "0.5"]) == 0
    assert list(results()) == ["0.5"]
    with pytest.raises(SystemExit, match="sweeps"):
        tune.read_record(path, "latent-dps", "zeta")
    assert tune.record_path(out, "resample", "gamma_rs").name == "tune_resample.json"
    # A sweep of the baseline from noise goes to its own record and never into the Flash one.
    assert tune.record_path(out, "latent-dps", "zeta", "baseline").name == "tune_latent-dps_baseline.json"
    with pytest.raises(SystemExit, match="flash 'latent-dps', not 'variance_scale' of baseline"):
        tune.read_record(path, "latent-dps", "variance_scale", "baseline")
    with pytest.raises(SystemExit, match="Flash setting"):
        tune.main(args + ["--values", "1", "--method", "baseline"])


def _fake_bench(solver: str, task: str, d_psnr: float) -> dict:
    """A bench JSON as `flash-plugin bench` writes it (only the fields the suite reads)."""
    methods = {m: {"psnr": 20.0 + (d_psnr if m == "flash" else 0.0), "ssim": 0.7, "mean_nfe": {"baseline": 1000, "flash": 50, "ae": 0}[m],
                   "fd_fmnist": 10.0, "wall_s": 1.0} for m in ("baseline", "flash", "ae")}
    paired = {f"flash-baseline:{q}": {"mean": d_psnr if q == "psnr" else 0.01, "se": 0.1, "n": 2} for q in ("psnr", "ssim")}
    return {"solver": solver, "task": task, "n_images": 2, "offset": 0, "seed": 0, "device": "cuda", "methods": methods,
            "paired": paired, "start_steps": [10, 90]}


def test_suite_covers_the_table_resumes_and_reports_failures(tmp_path, monkeypatch):
    from flash_plugin.bench import paired, suite
    from flash_plugin.errors import FlashInputError
    from flash_plugin.solvers.hparams import TUNED_HPARAMS

    all_pairs = suite.pairs()
    assert set(all_pairs) == set(TUNED_HPARAMS) and ("psld", "nonlinear-blur") not in all_pairs
    assert suite.pairs(["psld"], ["nonlinear-blur"]) == []
    with pytest.raises(FlashInputError, match="unknown solver"):
        suite.pairs(["dps-typo"])
    # One pair already measured (on another device): kept, not re-run. The other one breaks: reported, exit 1.
    (tmp_path / "bench_gblur-varying_psld.json").write_text(json.dumps(_fake_bench("psld", "gblur-varying", 0.5)))
    calls = []

    def broken(task, solver, **kwargs):
        calls.append((solver, task, kwargs["device"]))
        raise RuntimeError("solver exploded")

    monkeypatch.setattr(paired, "run_paired", broken)
    common = ["--out", str(tmp_path), "--n-images", "2", "--solvers", "psld", "--tasks", "gblur-varying", "random-inpainting"]
    assert suite.main(common + ["--report-only"]) == 0 and calls == []
    assert suite.main(common) == 1
    assert calls == [("psld", "random-inpainting", "cpu")]
    rows = json.loads((tmp_path / "suite.json").read_text())
    assert [(r["solver"], r["task"], r["d_psnr"], r["device"]) for r in rows] == [("psld", "gblur-varying", 0.5, "cuda")]
    table = (tmp_path / "suite.md").read_text()
    assert "| gblur-varying | psld | 20.00 / 0.700 (1000) | 20.50 / 0.700 (50.0) | +0.50 ± 0.10" in table
    assert "10 / 90 / 90" in table and "(cuda)" in table
    # Other images (n = 3): the stored result no longer counts, so the pair is run again.
    calls.clear()
    assert suite.main(["--out", str(tmp_path), "--n-images", "3", "--solvers", "psld", "--tasks", "gblur-varying"]) == 1
    assert calls == [("psld", "gblur-varying", "cpu")]
