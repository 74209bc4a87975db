"""`flash-plugin reconstruct`: outputs, resume, batch independence, measurement files, plugin solvers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flash_plugin.cli import main
from flash_plugin.markers import hookimpl
from flash_plugin.models import load_test_images

STEPS = ["--num-steps", "10"]  # Flash starts at k* <= 10: seconds per image on a CPU


def write_pngs(folder: Path, n: int, start: int = 0) -> list[str]:
    """``n`` bundled test images as 32x32 grey PNGs."""
    x, _ = load_test_images()
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(start, start + n):
        a = ((x[i, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        Image.fromarray(a).save(folder / f"img{i:02d}.png")
        names.append(f"img{i:02d}.png")
    return names


def read(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def test_folder_run_writes_reconstructions_and_per_image_records(tmp_path, capsys):
    names = write_pngs(tmp_path / "in", 3)
    out = tmp_path / "out"
    assert main(["reconstruct", str(tmp_path / "in"), "--out", str(out), "--batch-size", "2", *STEPS]) == 0
    res = read(out)
    assert list(res["images"]) == names
    for name, rec in res["images"].items():
        assert pixels(out / name).shape == (32, 32) and pixels(out / "measurements" / name).shape == (32, 32)
        assert 1 <= rec["start_step"] <= 10 and rec["nfe"] == rec["start_step"]
        assert rec["sigma2"] > 0 and rec["wall_s"] > 0 and 0 <= rec["severity"] <= 1
    recs = list(res["images"].values())
    # Flash from the encoder's estimate beats the blurred, noisy measurement on average.
    assert np.mean([r["psnr"] for r in recs]) > np.mean([r["measurement_psnr"] for r in recs]) + 2
    assert res["config"]["solver"] == "latent-dps" and res["flash_config"]["variance_scale"] == 2.0  # the tuned entry
    err = capsys.readouterr().err
    assert "[reconstruct] 2/3 images" in err and "[reconstruct] 3/3 images" in err  # not a terminal: one line per batch


def test_a_killed_run_resumes_without_redoing_anything_and_matches_an_uninterrupted_one(tmp_path, monkeypatch):
    from flash_plugin.flash import FlashSolver
    from flash_plugin.utils import checkpoint

    write_pngs(tmp_path / "in", 4)
    args = ["reconstruct", str(tmp_path / "in"), "--batch-size", "2", *STEPS]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0

    solved: list[int] = []
    original_call = FlashSolver.__call__

    def counting_call(self, y, operator, *, generator=None):
        solved.append(len(y))
        return original_call(self, y, operator, generator=generator)

    monkeypatch.setattr(FlashSolver, "__call__", counting_call)
    original_write = checkpoint.atomic_write_json
    writes = []

    def killed_after_the_first_batch(path, obj):
        original_write(path, obj)
        raise KeyboardInterrupt  # as if killed right after the first batch was saved

    monkeypatch.setattr(checkpoint, "atomic_write_json", killed_after_the_first_batch)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--out", str(out)])
    assert solved == [2] and list(read(out)["images"]) == ["img00.png", "img01.png"]
    monkeypatch.setattr(checkpoint, "atomic_write_json", original_write)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    solved.clear()
    assert main([*args, "--out", str(out)]) == 0
    assert solved == [2]  # only the second batch
    assert all((out / name).stat().st_mtime_ns == t for name, t in stamp.items())  # finished outputs untouched
    whole, resumed = read(tmp_path / "whole")["images"], read(out)["images"]
    assert list(whole) == list(resumed)
    for name in whole:
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
        strip = {k: v for k, v in whole[name].items() if k != "wall_s"}
        assert strip == {k: v for k, v in resumed[name].items() if k != "wall_s"}
    solved.clear()
    assert main([*args, "--out", str(out)]) == 0 and solved == []  # all done: nothing is solved


def test_results_do_not_depend_on_the_batch(tmp_path):
    write_pngs(tmp_path / "in", 3)
    for b in ("1", "3"):
        assert main(["reconstruct", str(tmp_path / "in"), "--out", str(tmp_path / b), "--batch-size", b, *STEPS]) == 0
    one, three = read(tmp_path / "1")["images"], read(tmp_path / "3")["images"]
    for name in one:
        assert one[name]["start_step"] == three[name]["start_step"] and one[name]["seeds"] == three[name]["seeds"]
        assert one[name]["sigma2"] == pytest.approx(three[name]["sigma2"], rel=1e-5)
        assert np.abs(pixels(tmp_path / "1" / name) - pixels(tmp_path / "3" / name)).max() <= 1  # float rounding at most


def test_adding_images_to_the_folder_keeps_the_finished_ones(tmp_path):
    write_pngs(tmp_path / "in", 2)
    args = ["reconstruct", str(tmp_path / "in"), "--out", str(tmp_path / "out"), *STEPS]
    assert main(args) == 0
    first = read(tmp_path / "out")["images"]
    write_pngs(tmp_path / "in", 1, start=10)
    assert main(args) == 0
    res = read(tmp_path / "out")["images"]
    assert set(res) == {"img00.png", "img01.png", "img10.png"}
    assert all(res[n] == first[n] for n in first)  # the same records, wall time included: not redone


@pytest.mark.parametrize("fmt", ["npy", "safetensors"])
def test_measurement_file_with_an_operator_and_its_parameters(tmp_path, fmt):
    from safetensors.torch import save_file

    from flash_plugin.operators import GaussianBlur

    x, _ = load_test_images()
    op = GaussianBlur(torch.full((3,), 2.0), noise_std=0.1)
    y = op.measure(x[:3], [torch.Generator().manual_seed(i) for i in range(3)]).float()
    path = tmp_path / f"y.{fmt}"
    if fmt == "npy":
        np.save(path, y[:, 0].numpy())  # (N, H, W): one channel
    else:
        save_file({"y": y}, str(path))
    out = tmp_path / "out"
    assert main(["reconstruct", str(path), "--operator", "gaussian-blur", "--operator-arg", "std=2",
                 "--operator-arg", "noise_std=0.1", "--out", str(out), *STEPS]) == 0
    res = read(out)
    assert list(res["images"]) == ["0", "1", "2"] and res["config"]["tuned_for"] == "gblur-varying"
    assert all("psnr" not in r and r["nfe"] == r["start_step"] for r in res["images"].values())
    recon = torch.tensor(np.stack([pixels(out / f"{i}.png") for i in range(3)]), dtype=torch.float32)[:, None] / 127.5 - 1
    from flash_plugin.metrics import psnr

    assert psnr(recon, x[:3]).mean() > psnr(y.clamp(-1, 1), x[:3]).mean() + 2


class PlainDDIM:
    """A plugin that registers an unconditional DDIM sampler under its own name."""

    @hookimpl
    def flash_register_solvers(self, register):
        from flash_plugin.solvers import Sampler

        def plain_ddim(model, num_steps=None, progress=False):
            """Unconditional DDIM (eta 0), registered by a test plugin."""
            return Sampler(model, num_steps=num_steps or 50, eta=0.0, progress=progress)

        register("plain-ddim", plain_ddim)


def test_a_solver_registered_by_a_plugin_runs_in_reconstruct_demo_and_bench(tmp_path, fresh_plugin_manager):
    fresh_plugin_manager.register(PlainDDIM(), name="plain-ddim-plugin")
    write_pngs(tmp_path / "in", 2)
    assert main(["reconstruct", str(tmp_path / "in"), "--out", str(tmp_path / "rec"), "--solver", "plain-ddim", "--num-steps", "5"]) == 0
    rec = read(tmp_path / "rec")
    assert rec["config"]["solver"] == "plain-ddim" and all(r["nfe"] <= 5 for r in rec["images"].values())
    assert rec["flash_config"]["noise_correction"] == 1.0  # no tuned entry: the default FlashConfig
    assert main(["demo", "--quick", "--tasks", "gblur-varying", "--solver", "plain-ddim", "--num-steps", "5",
                 "--out", str(tmp_path / "demo")]) == 0
    rows = json.loads((tmp_path / "demo" / "results.json").read_text())["rows"]
    assert [r["mean_nfe"] for r in rows if r["method"] == "baseline"] == [5]
    assert main(["bench", "--solver", "plain-ddim", "--n-images", "2", "--batch-size", "2", "--num-steps", "5",
                 "--out", str(tmp_path / "bench")]) == 0
    res = json.loads((tmp_path / "bench" / "bench_gblur-varying_plain-ddim.json").read_text())
    assert res["methods"]["baseline"]["mean_nfe"] == 5 and res["solver"] == "plain-ddim"


def test_a_rerun_with_other_settings_into_the_same_out_is_refused(tmp_path, capsys):
    write_pngs(tmp_path / "in", 1)
    args = ["reconstruct", str(tmp_path / "in"), "--out", str(tmp_path / "out")]
    assert main([*args, *STEPS]) == 0
    before = (tmp_path / "out" / "results.json").read_bytes()
    capsys.readouterr()
    assert main([*args, "--num-steps", "12"]) == 1
    assert "holds results of another run (num_steps: 10 then, 12 now)" in capsys.readouterr().err
    assert (tmp_path / "out" / "results.json").read_bytes() == before  # nothing lost
