"""The benchmark as a library (`flash_plugin.bench`): called with keyword arguments, no CLI involved,
and the names the commands used to define still importable from there."""

from __future__ import annotations

import json

import pytest

from flash_plugin.errors import FlashInputError


def test_the_commands_re_export_what_moved_to_the_library():
    from flash_plugin.bench import demo, paired, reconstruct_files
    from flash_plugin.commands import bench as bench_cmd
    from flash_plugin.commands import demo as demo_cmd
    from flash_plugin.commands import reconstruct as reconstruct_cmd

    assert bench_cmd.summarize is paired.summarize and bench_cmd.reusable_baseline is paired.reusable_baseline
    for name in ("TASKS", "QUICK_TASKS", "BUNDLED_IMAGES", "severities_for", "baseline_subset"):
        assert getattr(demo_cmd, name) is getattr(demo, name), name
    for name in ("MEASUREMENT_SUFFIXES", "RESULTS", "OPERATOR_TASK", "image_seed", "list_inputs", "load_measurements",
                 "build_operator", "png_bytes", "read_results", "load_estimator"):
        assert getattr(reconstruct_cmd, name) is getattr(reconstruct_files, name), name
    assert callable(bench_cmd.parse_solver_args)  # CLI parsing stays with the CLI


def test_run_paired_refuses_bad_arguments_before_any_work(monkeypatch):
    from flash_plugin.bench import paired
    from flash_plugin.models.latent_diffusion import LatentDiffusion

    monkeypatch.setattr(LatentDiffusion, "from_pretrained", classmethod(lambda cls, *a, **k: pytest.fail("model loaded before the check")))
    with pytest.raises(FlashInputError, match="methods must be distinct"):
        paired.run_paired(methods=("flash", "dps"))
    with pytest.raises(FlashInputError, match=r"solver arguments \['gamma_rs'\]: latent-dps on gblur-varying takes \['zeta'\]"):
        paired.run_paired(solver_args={"gamma_rs": 5.0})
    with pytest.raises(FlashInputError, match="needs the methods baseline and ae"):
        paired.run_paired(methods=("flash", "ae"), reuse_baseline="earlier.json")
    with pytest.raises(FlashInputError, match="n_images must be at least 2"):
        paired.run_paired(n_images=1)


def test_run_paired_returns_what_it_writes(tmp_path):
    from flash_plugin.bench import paired

    lines: list[str] = []
    res = paired.run_paired("gblur-varying", "latent-dps", n_images=2, batch_size=2, num_steps=4, methods=("flash", "ae"),
                            out=tmp_path, log=lines.append)
    path = paired.result_path(tmp_path, "gblur-varying", "latent-dps")
    assert json.loads(path.read_text()) == json.loads(json.dumps(res))
    assert set(res["methods"]) == {"flash", "ae"} and res["num_steps"] == 4
    assert len(lines) == 1 and lines[0].startswith("2/2 images (")  # one line per batch
    assert set(res["paired"]) == {"flash-ae:psnr", "flash-ae:ssim"} and "speedup_wall" not in res
