"""The hyperparameter table (`flash_plugin.solvers.hparams`) and the evidence stored next to the
bundled model (``weights/fashion-mnist-32/hparams.json``) agree, and the evidence agrees with the
tuning records it cites."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from flash_plugin.solvers import hparams
from flash_plugin.solvers.hparams import PAPER_HPARAMS, TUNED_HPARAMS, load_evidence

REPO = Path(__file__).resolve().parents[1]


def nonnull(h) -> dict:
    return {k: v for k, v in asdict(h).items() if v is not None}


def test_evidence_states_the_table_in_code():
    evidence = load_evidence()
    assert list(evidence) == list(TUNED_HPARAMS) and set(TUNED_HPARAMS) == set(PAPER_HPARAMS)
    for key, entry in evidence.items():
        assert entry["ours"] == nonnull(TUNED_HPARAMS[key]), key
        assert entry["paper"] == nonnull(PAPER_HPARAMS[key]), key


def test_every_tuned_value_has_the_record_that_chose_it():
    for key, entry in load_evidence().items():
        ours, paper = entry["ours"], entry["paper"]
        changed = {k for k in ours if ours[k] != paper[k]}
        assert changed <= set(entry["evidence"]), (key, changed)  # no value moved off the paper's without a sweep
        for param, ev in entry["evidence"].items():
            scores = ev["psnr_db_by_value"]
            assert ev["value"] == ours[param], (key, param)  # the table holds what the sweep chose
            assert ev["psnr_db"] == scores[str(ev["value"])] == max(scores.values()), (key, param)
            assert ev["record"].startswith("results/fashion-mnist-32/tuning/tune_"), ev["record"]


def record_file(cited: str) -> Path | None:
    """The cited record in this checkout: at its path, or where records lay before they moved to results/."""
    for path in (REPO / cited, hparams.EVIDENCE_PATH.parent / "benchmarks" / Path(cited).name):
        if path.is_file():
            return path
    return None


def test_evidence_is_what_the_records_measured():
    cited = [(key, param, ev) for key, e in load_evidence().items() for param, ev in e["evidence"].items()]
    for (solver, task), param, ev in cited:
        path = record_file(ev["record"])
        assert path is not None, f"{ev['record']} is cited but not in the repository"
        rec = json.loads(path.read_text())
        assert (rec["solver"], rec["param"], rec.get("method", "flash")) == (solver, param, "flash"), path
        scores = {k: round(v["psnr"], 2) for k, v in rec["results"][task].items()}
        assert scores == ev["psnr_db_by_value"], (solver, task, param)


def test_baseline_checks_are_what_the_records_measured():
    checks = json.loads(hparams.EVIDENCE_PATH.read_text())["baseline_checks"]
    assert {(c["solver"], c["method"]) for c in checks} == {("latent-dps", "baseline"), ("resample", "baseline")}
    for c in checks:
        rec = json.loads(record_file(c["record"]).read_text())
        res = rec["results"][c["task"]]
        assert {k: round(v["psnr"], 2) for k, v in res.items()} == c["psnr_db_by_value"]
        assert c["best_value"] == float(max(res, key=lambda v: res[v]["psnr"]))


def test_goals_are_named_presets_of_the_flash_settings():
    from flash_plugin.errors import FlashInputError
    from flash_plugin.solvers.hparams import PERCEPTUAL_VARIANCE_FACTOR, get_hparams

    for solver, task in (("latent-dps", "gblur-varying"), ("resample", "nonlinear-blur")):
        fid, per = get_hparams(solver, task), get_hparams(solver, task, goal="perceptual")
        assert get_hparams(solver, task, goal="fidelity") == fid
        assert per.variance_scale == fid.variance_scale * PERCEPTUAL_VARIANCE_FACTOR
        assert (per.zeta, per.gamma, per.gamma_rs, per.noise_correction) == (fid.zeta, fid.gamma, fid.gamma_rs, fid.noise_correction)
    with pytest.raises(FlashInputError, match="goal must be one of fidelity, perceptual"):
        get_hparams("latent-dps", "gblur-varying", goal="pretty")


def test_a_perceptual_flash_starts_later_on_the_same_measurements():
    import torch

    from flash_plugin.bench.reconstruct import run_task
    from flash_plugin.models import load_default_model, load_test_images

    images, _ = load_test_images()
    model_set = load_default_model()
    sev = torch.tensor([0.3, 0.8])
    kw = dict(methods=("flash",), solver_overrides={"num_steps": 20})
    fid = run_task("gblur-varying", model_set, images[:2], sev, **kw).by_method("flash")
    per = run_task("gblur-varying", model_set, images[:2], sev, goal="perceptual", **kw).by_method("flash")
    assert all(p.start_step > f.start_step for p, f in zip(per, fid))
    assert [p.sigma2 for p in per] == [f.sigma2 for f in fid]


def test_the_calibrated_start_policy_is_chosen_by_name():
    from flash_plugin.bench.reconstruct import build_solver
    from flash_plugin.errors import FlashInputError
    from flash_plugin.models import load_default_model
    from flash_plugin.solvers.hparams import get_start_policy

    model = load_default_model().latent_diffusion
    _, snr, _ = build_solver("latent-dps", model, "gblur-varying")
    _, cal, settings = build_solver("latent-dps", model, "gblur-varying", start_policy="calibrated")
    assert snr.start_policy is None and cal.start_policy == get_start_policy("latent-dps", "gblur-varying")
    assert (cal.noise_correction, cal.variance_scale) == (snr.noise_correction, snr.variance_scale)
    assert settings["start_policy"] == cal.start_policy.to_dict()
    with pytest.raises(FlashInputError, match="start_policy must be one of snr, calibrated"):
        build_solver("latent-dps", model, "gblur-varying", start_policy="smart")
    with pytest.raises(FlashInputError, match="does not combine with goal 'perceptual'"):
        build_solver("latent-dps", model, "gblur-varying", start_policy="calibrated", goal="perceptual")
    with pytest.raises(FlashInputError, match="calibrated pairs"):
        build_solver("sampler", model, "gblur-varying", start_policy="calibrated")
