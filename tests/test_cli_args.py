"""Bad command-line input: one clear line, exit status 1, and no model loaded first.

Every case runs with model loading replaced by a function that fails the test, so a check that
happens only after the model load (seconds to minutes of work lost) is caught too.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flash_plugin import cli

MODEL_LOADED = "the model was loaded before the bad argument was reported"


@pytest.fixture
def no_model(monkeypatch):
    """Loading any model fails the test; CUDA is reported absent (as on the CPU-only torch of CI)."""
    from flash_plugin.models.latent_diffusion import LatentDiffusion

    def refuse(*args, **kwargs):
        raise AssertionError(MODEL_LOADED)

    monkeypatch.setattr(LatentDiffusion, "from_pretrained", classmethod(lambda cls, *a, **k: refuse()))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def files(tmp_path):
    """Paths the cases refer to: a tiny Fashion-MNIST layout (3 test images), an empty folder, a
    non-JSON file, a text file posing as measurements and a folder of one PNG."""
    from PIL import Image

    from flash_plugin.data import write_idx

    rng = np.random.default_rng(0)
    data = tmp_path / "fmnist"
    data.mkdir()
    write_idx(data / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (2, 28, 28)))
    write_idx(data / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, (2,)))
    write_idx(data / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (3, 28, 28)))
    write_idx(data / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, (3,)))
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not json")
    (tmp_path / "broken.json").write_text("{")
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(pngs / "a.png")
    np.save(tmp_path / "y.npy", np.zeros((2, 32, 32), np.float32))
    return tmp_path


# (argv with {tmp} for the files fixture's folder, the exact error line after "flash-plugin: error: ")
CASES = [
    # bench
    ("bench --n-images -5", "--n-images must be an integer >= 2, got -5 (the paired standard errors and the Fréchet distance need two images)"),
    ("bench --n-images 0", "--n-images must be an integer >= 2, got 0 (the paired standard errors and the Fréchet distance need two images)"),
    ("bench --n-images 1", "--n-images must be an integer >= 2, got 1 (the paired standard errors and the Fréchet distance need two images)"),
    ("bench --data /nonexistent", "--data /nonexistent: no such directory"),
    ("bench --data {tmp}/empty", "--data {tmp}/empty: holds no Fashion-MNIST IDX files (train/t10k-images-idx3-ubyte[.gz] and labels)"),
    ("bench --data {tmp}/fmnist --offset 2 --n-images 2",
     "--offset 2 + --n-images 2 go past the 3 images of Fashion-MNIST test split"),
    ("bench --offset -1", "--offset must be an integer >= 0, got -1"),
    ("bench --batch-size 0", "--batch-size must be a positive integer, got 0"),
    ("bench --reuse-baseline {tmp}/missing.json", "--reuse-baseline {tmp}/missing.json: no such file"),
    ("bench --reuse-baseline {tmp}/broken.json", None),  # "not a bench JSON (...)": checked below, after the model load
    ("bench --reuse-baseline {tmp}/notes.txt --methods flash ae",
     "--reuse-baseline needs --methods to include baseline and ae (AE-only checks the measurements)"),
    ("bench --device cuda", "--device cuda: CUDA is not available ({build}, torch {version}); use --device cpu"),
    ("bench --device gpu0", "--device 'gpu0' is not a device (use cpu, cuda, cuda:N or mps)"),
    ("bench --solver plain-ddim", "--solver: unknown solver name 'plain-ddim'; registered solvers: gml-dps, latent-dps, psld, resample, sampler"),
    ("bench --task gaussian-blur",
     "--task 'gaussian-blur' is an operator family, not a task preset (a preset has a severity range); use one of the presets, e.g. gblur-varying"),
    ("bench --solver-arg zeta", "--solver-arg 'zeta': expected NAME=VALUE, e.g. zeta=1.0"),
    ("bench --solver-arg zeta=big", "--solver-arg 'zeta=big': 'big' is not a number"),
    ("bench --solver-arg gamma_rs=5", "--solver-arg 'gamma_rs=5': expected NAME=VALUE with NAME one of ['zeta'] for latent-dps on gblur-varying"),
    ("bench --threads 0", "--threads must be a positive integer, got 0"),
    ("bench --num-steps 0", "--num-steps must be a positive integer, got 0"),
    ("bench --methods flash flash", "--methods names a method twice: flash flash"),
    ("bench --out {tmp}/notes.txt", "--out {tmp}/notes.txt: exists and is not a directory"),
    # demo
    ("demo --images-per-task 0", "--images-per-task must be a positive integer, got 0"),
    ("demo --images-per-task -3", "--images-per-task must be a positive integer, got -3"),
    ("demo --images-per-task 20", "--images-per-task 20 x 4 tasks needs 80 images; the bundle has 64 (at most 16 per task)"),
    ("demo --baseline-images 5", "--baseline-images must be an integer in 0..4, got 5 (it runs on images of the --images-per-task 4)"),
    ("demo --full --baseline-images 1", "--full runs the solver on every image; give --full or --baseline-images, not both"),
    ("demo --device cuda", "--device cuda: CUDA is not available ({build}, torch {version}); use --device cpu"),
    ("demo --solver nope", "--solver: unknown solver name 'nope'; registered solvers: gml-dps, latent-dps, psld, resample, sampler"),
    ("demo --num-steps 0", "--num-steps must be a positive integer, got 0"),
    ("demo --out {tmp}/notes.txt", "--out {tmp}/notes.txt: exists and is not a directory"),
    # reconstruct
    ("reconstruct {tmp}/nowhere", "input {tmp}/nowhere: no such file or folder"),
    ("reconstruct {tmp}/notes.txt", "input {tmp}/notes.txt: expected a folder of images or a .safetensors / .npy file of measurements"),
    ("reconstruct {tmp}/empty", "{tmp}/empty: no images (.png, .jpg, .jpeg, .bmp, .tif, .tiff, .webp) in this folder"),
    ("reconstruct {tmp}/y.npy",
     "a measurement file needs --operator NAME with --operator-arg values (the parameters the measurements were taken with); "
     "a preset draws its own random kernels and masks"),
    ("reconstruct {tmp}/pngs --operator gaussian-blur",
     "--operator is for measurements (a .safetensors / .npy file, or a folder with --measured); clean images are degraded by a --task preset"),
    ("reconstruct {tmp}/pngs --task gblur-varying --operator gaussian-blur",
     "give --task (a preset that degrades clean images) or --operator (for measurements), not both"),
    ("reconstruct {tmp}/pngs --severity 1.5", "--severity must be a number in [0, 1], got 1.5"),
    ("reconstruct {tmp}/y.npy --operator swirl",
     "--operator: unknown operator name 'swirl'; registered operators: gaussian-blur, gaussian-noise, gblur-fixed, gblur-varying, "
     "inpainting, kernel-wizard, motion-blur, nonlinear-blur, random-inpainting"),
    ("reconstruct {tmp}/y.npy --operator kernel-wizard",
     "--operator kernel-wizard has no tuned settings; give --tuned-for PRESET (the preset whose solver settings and bundled estimator fit it)"),
    ("reconstruct {tmp}/y.npy --operator gaussian-blur --operator-arg std", "--operator-arg 'std': expected NAME=VALUE, e.g. zeta=1.0"),
    ("reconstruct {tmp}/pngs --solver-arg gamma_rs=5",
     "--solver-arg 'gamma_rs=5': expected NAME=VALUE with NAME one of ['zeta'] for latent-dps on gblur-varying"),
    ("reconstruct {tmp}/pngs --batch-size 0", "--batch-size must be a positive integer, got 0"),
    ("reconstruct {tmp}/pngs --solver nope", "--solver: unknown solver name 'nope'; registered solvers: gml-dps, latent-dps, psld, resample, sampler"),
    ("reconstruct {tmp}/pngs --model {tmp}/nowhere", "--model {tmp}/nowhere: no such directory"),
    ("reconstruct {tmp}/pngs --estimator {tmp}/nowhere/enc", "--estimator {tmp}/nowhere/enc: no such directory"),
    ("reconstruct {tmp}/pngs --out {tmp}/pngs", "--out must not be the input folder"),
    ("reconstruct {tmp}/pngs --device cuda", "--device cuda: CUDA is not available ({build}, torch {version}); use --device cpu"),
    # train-severity, eval-severity
    ("train-severity --epochs 0", "--epochs must be a positive integer, got 0"),
    ("train-severity --batch-size 0", "--batch-size must be a positive integer, got 0"),
    ("train-severity --lr 0", "--lr must be a number > 0, got 0.0"),
    ("train-severity --data /nonexistent", "--data /nonexistent: no such directory"),
    ("train-severity --resume --out {tmp}/fresh", "--resume: {tmp}/fresh/state.safetensors does not exist (nothing to resume; drop --resume)"),
    ("train-severity --operator gaussian-blur",
     "--operator 'gaussian-blur' is an operator family, not a task preset (a preset has a severity range); use one of the presets, e.g. gblur-varying"),
    ("train-severity --device cuda", "--device cuda: CUDA is not available ({build}, torch {version}); use --device cpu"),
    ("eval-severity --encoder {tmp}/nowhere", "--encoder {tmp}/nowhere: no such directory"),
    ("eval-severity --encoder {tmp}/empty --n-images 1", "--n-images must be an integer >= 2, got 1 (Spearman and calibration need two images)"),
    ("eval-severity --encoder {tmp}/empty --batch-size -1", "--batch-size must be a positive integer, got -1"),
    # check (its own validation)
    ("check nocolon", "target must be module:attr (e.g. my_pkg.solvers:make_solver), got 'nocolon'"),
]


@pytest.mark.parametrize("argv, message", [c for c in CASES if c[1] is not None], ids=[c[0] for c in CASES if c[1] is not None])
def test_bad_argument_is_one_line_before_any_model_load(argv, message, files, no_model, capsys):
    tmp = str(files)
    build = "a CPU-only torch build" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}, but no GPU is visible"
    expected = message.format(tmp=tmp, build=build, version=torch.__version__)
    assert cli.main(argv.format(tmp=tmp).split()) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"flash-plugin: error: {expected}"
    assert "Traceback" not in err


def test_broken_reuse_baseline_file_is_one_line(files, capsys):
    assert cli.main(["bench", "--n-images", "2", "--num-steps", "2", "--methods", "baseline", "flash", "ae",
                     "--reuse-baseline", str(files / "broken.json"), "--out", str(files / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"flash-plugin: error: --reuse-baseline {files / 'broken.json'}: not a bench JSON (")
    assert not (files / "out").exists()


def test_measurements_of_another_shape_and_missing_operator_parameters(files, capsys):
    np.save(files / "y64.npy", np.zeros((2, 1, 64, 64), np.float32))
    assert cli.main(["reconstruct", str(files / "y64.npy"), "--operator", "gaussian-blur", "--operator-arg", "std=1",
                     "--out", str(files / "o1")]) == 1
    assert capsys.readouterr().err.strip() .endswith("measurements of shape (1, 64, 64) per image; the model's images are (1, 32, 32)")
    assert cli.main(["reconstruct", str(files / "y.npy"), "--operator", "gaussian-blur", "--out", str(files / "o2")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("flash-plugin: error: --operator gaussian-blur: cannot build it from --operator-arg {}") and "missing" in err


def test_every_option_of_every_command_has_help_without_doc_markup():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        text = p.format_help()
        assert "`" not in text, f"doc markup in `flash-plugin {name} --help`"
        for action in p._actions:
            if action.dest != "help":
                assert action.help, f"flash-plugin {name}: {action.option_strings or action.dest} has no help text"


def test_progress_is_a_bar_on_a_terminal_and_stage_lines_otherwise(monkeypatch):
    from flash_plugin.commands import _args

    class Tty:
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stderr", Tty())
    assert _args.progress_bars(None) is True and _args.progress_bars(False) is False
    monkeypatch.undo()
    assert _args.progress_bars(None) is False and _args.progress_bars(True) is True  # pytest's stderr is no terminal


def test_bench_results_json_is_untouched_by_a_rejected_rerun(tmp_path, no_model, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "bench_gblur-varying_latent-dps.json").write_text(json.dumps({"kept": True}))
    assert cli.main(["bench", "--n-images", "1", "--out", str(out)]) == 1
    assert json.loads((out / "bench_gblur-varying_latent-dps.json").read_text()) == {"kept": True}
