"""Quality-vs-compute curves (flash_plugin.bench.curves): the equal-NFE comparison and a tiny run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from flash_plugin.bench.curves import _interp_weights, compare_at_equal_nfe, run_curves, setting_label


def _setting(kind, label, nfe, psnr, ssim=None):
    psnr = list(psnr)
    return {"label": label, "kind": kind, "mean_nfe": float(np.mean(nfe)), "psnr": float(np.mean(psnr)),
            "per_image": {"psnr": psnr, "ssim": list(ssim if ssim is not None else psnr), "nfe": list(nfe)}}


def test_labels_name_the_setting():
    assert setting_label("fixed", k=25) == "fixed:25"
    assert setting_label("budget", b=12.5) == "budget:12.5"
    assert setting_label("flash", c=0.0, v=2.0) == "flash:c=0,v=2"
    assert setting_label("ae") == "ae"


def test_interpolation_is_linear_in_log_nfe():
    i, j, w = _interp_weights(np.array([40.0, 10.0, 20.0]), math.sqrt(10 * 20))
    assert (i, j) == (1, 2) and w == pytest.approx(0.5)
    assert _interp_weights(np.array([10.0, 20.0]), 20.0) == (1, 1, 0.0)
    with pytest.raises(ValueError, match="outside the fixed-start grid"):
        _interp_weights(np.array([10.0, 20.0]), 25.0)


def test_comparison_against_the_fixed_curve_is_paired():
    # Fixed curve: 10 dB at 10 NFE, 20 dB at 100 NFE for every image; the point at NFE sqrt(1000)
    # sits halfway in log NFE, so the curve gives 15 dB there; the point is 1 dB above on every image
    # but the last, so the difference is 0.75 with the paired standard error of (1, 1, 1, 0).
    fixed10 = _setting("fixed", "fixed:10", [10] * 4, [10] * 4)
    fixed100 = _setting("fixed", "fixed:100", [100] * 4, [20] * 4)
    nfe = math.sqrt(1000)
    point = _setting("flash", "flash:c=0,v=1", [nfe] * 4, [16, 16, 16, 15])
    res = {"settings": {s["label"]: s for s in (fixed10, fixed100, point)}}
    c = compare_at_equal_nfe(res, "flash:c=0,v=1")
    assert c["between"] == ["fixed:10", "fixed:100"]
    assert c["psnr"]["fixed_curve"] == pytest.approx(15.0)
    assert c["psnr"]["diff"] == pytest.approx(0.75)
    assert c["psnr"]["se"] == pytest.approx(np.std([1, 1, 1, 0], ddof=1) / 2)
    assert "fd_fmnist" not in c


def test_fd_comparison_has_a_bootstrap_error():
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(40, 3))
    near, far = clean + 0.1 * rng.normal(size=(40, 3)), clean + 2.0 + rng.normal(size=(40, 3))
    fixed10 = _setting("fixed", "fixed:10", [10] * 40, [10] * 40)
    fixed100 = _setting("fixed", "fixed:100", [100] * 40, [20] * 40)
    point = _setting("flash", "p", [30] * 40, [15] * 40)
    res = {"settings": {s["label"]: s for s in (fixed10, fixed100, point)}}
    c = compare_at_equal_nfe(res, "p", {"clean": clean, "fixed:10": far, "fixed:100": far, "p": near}, n_boot=50)
    assert c["fd_fmnist"]["diff"] < -3 * c["fd_fmnist"]["se"] < 0


def test_a_tiny_run_resumes_and_compares(tmp_path):
    kw = dict(n_images=2, fixed=(1, 3), budgets=(2,), out=tmp_path, batch_size=1, n_boot=5)
    res = run_curves("gblur-varying", "latent-dps", **kw)
    s = res["settings"]
    assert set(s) == {"ae", "fixed:1", "fixed:3", "budget:2", "flash:c=0,v=2"}
    assert s["fixed:3"]["per_image"]["nfe"] == [3, 3] and s["budget:2"]["mean_nfe"] == 2.0
    assert s["ae"]["mean_nfe"] == 0 and all(math.isfinite(v["fd_fmnist"]) for v in s.values())
    assert "psnr" in res["compare"]["budget:2"]
    stored = json.loads((tmp_path / "curves_gblur-varying_latent-dps.json").read_text())
    assert stored["settings"]["fixed:1"]["per_image"] == s["fixed:1"]["per_image"]
    # A second run finds every setting done and solves nothing.
    lines = []
    again = run_curves("gblur-varying", "latent-dps", **kw, log=lines.append)
    assert lines == [] and again["settings"]["fixed:3"]["per_image"] == s["fixed:3"]["per_image"]
    # Another image set in the same place is refused, not mixed in.
    with pytest.raises(Exception, match="holds a run of other images"):
        run_curves("gblur-varying", "latent-dps", **{**kw, "offset": 5})


def test_a_record_without_its_image_cache_reruns_or_keeps_its_settings(tmp_path):
    """A committed record in a fresh checkout has no image cache: by default its settings run again
    (and reproduce their numbers); with keep_uncached they stay as recorded, FD comparisons included,
    and only the new setting runs, its FD comparisons left out where the old images are missing."""
    kw = dict(n_images=2, fixed=(1, 4), out=tmp_path, batch_size=1, n_boot=5, include_tuned=False)
    cache = tmp_path / "curves_gblur-varying_latent-dps.images.safetensors"
    first = run_curves("gblur-varying", "latent-dps", **kw, budgets=(2,))
    assert "fd_fmnist" in first["compare"]["budget:2"]
    cache.unlink()
    lines = []
    kept = run_curves("gblur-varying", "latent-dps", **kw, budgets=(2, 3), keep_uncached=True, log=lines.append)
    assert len(lines) == 1 and "budget:3" in lines[0]
    for label, s in first["settings"].items():
        assert kept["settings"][label] == s
    assert kept["compare"]["budget:2"] == first["compare"]["budget:2"]
    assert math.isfinite(kept["settings"]["budget:3"]["fd_fmnist"])
    assert "psnr" in kept["compare"]["budget:3"] and "fd_fmnist" not in kept["compare"]["budget:3"]
    cache.unlink()
    lines = []
    rerun = run_curves("gblur-varying", "latent-dps", **kw, budgets=(2,), log=lines.append)
    assert len(lines) == len(first["settings"])  # budget:3, recorded but not asked for, is kept as it is
    assert rerun["settings"]["budget:3"] == kept["settings"]["budget:3"]
    for label, s in first["settings"].items():
        assert rerun["settings"][label]["per_image"] == s["per_image"], label


# --- start policies (flash_plugin.bench.policy) ------------------------------------------------

from flash_plugin.bench.policy import (  # noqa: E402
    adaptivity_report, cross_fitted_at_nfe, fit_monotone_policy, fit_start_policy, policy_steps, score_policy, write_policies,
)
from flash_plugin.schedule import StartPolicy  # noqa: E402


def _curves_result(table, ks, sigma2, tuned=None):
    settings = {f"fixed:{k}": {"kind": "fixed", "mean_nfe": float(k), "params": {"k": int(k)},
                               "per_image": {"psnr": list(table[:, j])}} for j, k in enumerate(ks)}
    if tuned is not None:  # (per-image PSNR, mean NFE) of the tuned SNR rule
        settings["flash:c=0,v=2"] = {"kind": "flash", "mean_nfe": float(tuned[1]), "params": {"c": 0.0, "v": 2.0, "tuned": True},
                                     "per_image": {"psnr": list(tuned[0])}}
    return {"settings": settings, "sigma2": list(sigma2)}


def test_policy_maps_sigma2_to_steps_by_thresholds():
    pol = StartPolicy((0.1, 0.2), (10, 50, 100))
    assert policy_steps(pol, np.array([0.05, 0.1, 0.15, 0.3])).tolist() == [10, 10, 50, 100]


def test_monotone_policy_is_the_exhaustive_optimum():
    rng = np.random.default_rng(1)
    ks = np.array([10, 25, 50])
    sigma2 = rng.uniform(size=6)
    table = rng.normal(size=(6, 3))
    order = np.argsort(sigma2)
    for price in (0.0, 0.01, 0.05):
        pol = fit_monotone_policy(sigma2, table, ks, price)
        got = policy_steps(pol, sigma2)
        assert np.all(np.diff(got[order]) >= 0)
        value = table[np.arange(6), np.searchsorted(ks, got)].sum() - price * got.sum()
        # every non-decreasing level sequence over the sorted images
        import itertools
        best = max(sum(table[order[i], lv[i]] - price * ks[lv[i]] for i in range(6))
                   for lv in itertools.combinations_with_replacement(range(3), 6))
        assert value == pytest.approx(best)


def test_monotone_policy_keeps_tied_sigma2_together():
    ks = np.array([10, 50])
    sigma2 = np.array([1.0, 1.0, 1.0, 2.0])
    # alone, image 0 would want 10 and images 1-2 would want 50; tied, the group goes where its sum says
    table = np.array([[5.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 9.0]])
    assert fit_monotone_policy(sigma2, table, ks, 0.0) == StartPolicy((1.5,), (10, 50))
    assert fit_monotone_policy(np.ones(4), table, ks, 0.0) == StartPolicy((), (50,))


def test_report_finds_a_real_dependence_on_sigma2_and_none_in_noise():
    rng = np.random.default_rng(0)
    ks = np.array([10, 25, 50, 100, 200])
    n = 200
    sigma2 = rng.uniform(size=n)
    # Easy images (small σ̂²) lose with many steps, hard ones gain: a policy that follows σ̂² wins.
    slope = (sigma2 - 0.5)[:, None] * np.log(ks)[None, :]
    table = 20 + 2 * slope + 0.1 * rng.normal(size=(n, len(ks)))
    rep = adaptivity_report(_curves_result(table, ks, sigma2), prices=(0.0,))
    assert rep["cross_fitted"][0]["vs_fixed"]["diff"] > 5 * rep["cross_fitted"][0]["vs_fixed"]["se"]
    # PSNR that does not depend on σ̂² (pure per-image noise): cross-fitting shows no gain.
    noise = 20 + rng.normal(size=(n, len(ks)))
    rep = adaptivity_report(_curves_result(noise, ks, sigma2), prices=(0.0,),
                            replicate=_curves_result(20 + rng.normal(size=(n, len(ks))), ks, sigma2))
    assert abs(rep["cross_fitted"][0]["vs_fixed"]["diff"]) < 3 * rep["cross_fitted"][0]["vs_fixed"]["se"] + 0.05
    assert rep["oracle"]["vs_fixed_in_sample"]["diff"] > 0.5  # the in-sample oracle is flattered by noise
    assert abs(rep["oracle"]["vs_fixed_replicate"]["diff"]) < 0.3


def test_beyond_range_levels_and_a_replicate_share_measurements(tmp_path):
    from flash_plugin.bench.curves import beyond_range

    assert beyond_range("gblur-varying", 1.5)["family_kwargs"]["std_range"] == [12.0, 12.0]
    assert beyond_range("random-inpainting", 0.9)["family_kwargs"] == {"max_missing": 0.9}
    with pytest.raises(Exception, match="missing fraction"):
        beyond_range("random-inpainting", 1.2)
    kw = dict(n_images=2, fixed=(2, 3), include_tuned=False, out=tmp_path, n_boot=5,
              severity_override=beyond_range("random-inpainting", 0.9))
    a = run_curves("random-inpainting", "latent-dps", **kw, name="a")
    b = run_curves("random-inpainting", "latent-dps", **kw, name="b", solve_seed=7)
    assert a["meta"]["severities"] == [pytest.approx(1.0)] * 2
    # Same measurements (AE-only and σ̂² equal), other solver noise (the solves differ).
    assert a["settings"]["ae"]["per_image"] == b["settings"]["ae"]["per_image"] and a["sigma2"] == b["sigma2"]
    assert a["settings"]["fixed:3"]["per_image"]["psnr"] != b["settings"]["fixed:3"]["per_image"]["psnr"]


def _dependent_table(rng, n, ks, strength):
    """PSNR per image and grid step: hard images (large σ̂²) gain from steps, easy ones lose, by ``strength``."""
    sigma2 = rng.uniform(0.05, 1.0, size=n)
    slope = (sigma2 - 0.5)[:, None] * np.log(ks)[None, :]
    return sigma2, 20 + strength * slope + 0.1 * rng.normal(size=(n, len(ks)))


def test_fitted_policy_matches_the_target_compute_and_wins_only_where_sigma2_matters():
    rng = np.random.default_rng(3)
    ks = np.array([10, 25, 50, 100, 200])
    sigma2, table = _dependent_table(rng, 160, ks, 2.0)
    train = _curves_result(table[:80], ks, sigma2[:80], tuned=(table[:80, 2], 50.0))
    pol, info = fit_start_policy(train)
    assert abs(info["mean_nfe"] - 50.0) < 10 and info["target_mean_nfe"] == 50.0 and len(set(pol.steps)) > 1
    # Held out: at the same compute, the policy beats both the fixed curve and a constant start.
    test = _curves_result(table[80:], ks, sigma2[80:], tuned=(table[80:, 2], 50.0))
    r = score_policy(pol, test)
    assert r["vs_fixed"]["diff"] > 5 * r["vs_fixed"]["se"] and r["vs_tuned"]["diff"] > 0
    cf = cross_fitted_at_nfe(test, sigma2[80:], 50.0, n_splits=3)
    assert cf["diff"] > 5 * cf["se"]
    # No dependence on σ̂²: held out, the policy is level with the fixed curve.
    flat = 20 + rng.normal(size=(160, len(ks)))
    pol, _ = fit_start_policy(_curves_result(flat[:80], ks, sigma2[:80], tuned=(flat[:80, 2], 50.0)))
    r = score_policy(pol, _curves_result(flat[80:], ks, sigma2[80:], tuned=(flat[80:, 2], 50.0)))
    assert abs(r["vs_fixed"]["diff"]) < 3 * r["vs_fixed"]["se"] + 0.05
    cf = cross_fitted_at_nfe(_curves_result(flat, ks, sigma2), sigma2, 50.0, n_splits=3)
    assert abs(cf["diff"]) < 3 * cf["se"] + 0.05


def test_policy_fit_and_score_refuse_what_they_cannot_use(tmp_path):
    ks = np.array([10, 50])
    res = _curves_result(np.zeros((4, 2)), ks, [0.1, 0.2, 0.3, 0.4], tuned=([0.0] * 4, 30.0))
    with pytest.raises(Exception, match="outside the grid"):
        fit_start_policy(res, target_nfe=300)
    with pytest.raises(Exception, match="no tuned Flash setting"):
        fit_start_policy(_curves_result(np.zeros((4, 2)), ks, [0.1, 0.2, 0.3, 0.4]))
    with pytest.raises(Exception, match="lacks"):
        score_policy(StartPolicy((), (25,)), res)
    res["meta"] = {"split": "test", "solver": "latent-dps", "task": "gblur-varying"}
    with pytest.raises(Exception, match="fit start policies on training images"):
        write_policies([("r.json", res)], tmp_path / "p.json")


def test_stored_policies_load_by_pair_and_fail_clearly(tmp_path):
    from flash_plugin.solvers.hparams import get_start_policy

    ks = np.array([10, 50])
    res = _curves_result(np.array([[1.0, 0.0], [0.0, 1.0]] * 4), ks, np.linspace(0.1, 0.8, 8), tuned=([0.0] * 8, 30.0))
    res["meta"] = {"split": "train", "solver": "latent-dps", "task": "gblur-varying", "offset": 0, "n_images": 8, "seed": 0, "hparams": {}}
    doc = write_policies([("r.json", res)], tmp_path / "p.json")
    pol = get_start_policy("latent-dps", "gblur-varying", tmp_path / "p.json")
    assert pol.to_dict() == {k: doc["entries"][0][k] for k in ("thresholds", "steps")}
    with pytest.raises(Exception, match="calibrated pairs: latent-dps/gblur-varying"):
        get_start_policy("psld", "gblur-varying", tmp_path / "p.json")
    with pytest.raises(Exception, match="no calibrated start policies"):
        get_start_policy("psld", "gblur-varying", tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(Exception, match="not a readable start-policy file"):
        get_start_policy("psld", "gblur-varying", tmp_path / "bad.json")


def test_the_bundled_policies_cover_their_pairs_and_stay_in_the_schedule():
    from flash_plugin.solvers.hparams import START_POLICIES_PATH, get_start_policy

    doc = json.loads(START_POLICIES_PATH.read_text())
    assert doc["entries"], "no calibrated start policy is bundled"
    for e in doc["entries"]:
        pol = get_start_policy(e["solver"], e["task"])
        assert set(pol.steps) <= set(e["fit"]["grid"]) and pol.max_step <= 1000
        assert abs(e["fit"]["mean_nfe"] - e["fit"]["target_mean_nfe"]) < 0.25 * e["fit"]["target_mean_nfe"]


def test_the_calibrated_setting_equals_its_grid_lookup(tmp_path, monkeypatch):
    """`score_policy` looks a policy up in the fixed-start grid; running Flash with it must give the
    same images up to float rounding."""
    import flash_plugin.solvers.hparams as hparams

    kw = dict(n_images=2, fixed=(1, 3), include_tuned=False, out=tmp_path, batch_size=2, n_boot=5)
    first = run_curves("gblur-varying", "latent-dps", **kw)
    s2 = sorted(first["sigma2"])
    pol = StartPolicy(((s2[0] + s2[1]) / 2,), (1, 3))
    monkeypatch.setattr(hparams, "get_start_policy", lambda solver, task: pol)
    res = run_curves("gblur-varying", "latent-dps", **kw, calibrated=True)
    got = res["settings"]["policy:calibrated"]["per_image"]
    steps = policy_steps(pol, np.asarray(res["sigma2"]))
    assert sorted(got["start_step"]) == [1, 3] and got["start_step"] == steps.tolist()
    lookup = [res["settings"][f"fixed:{k}"]["per_image"]["psnr"][i] for i, k in enumerate(steps)]
    assert got["psnr"] == pytest.approx(lookup, abs=1e-4)  # same draws; a mixed-start batch rounds differently


def test_the_report_tables_and_figure_of_a_curves_folder(tmp_path, capsys, monkeypatch):
    import flash_plugin.solvers.hparams as hparams
    from flash_plugin.bench import report

    rng = np.random.default_rng(5)
    ks = np.array([10, 25, 50, 100, 200])
    n = 40
    sigma2, table = _dependent_table(rng, n, ks, 2.0)
    res = _curves_result(table, ks, sigma2, tuned=(table[:, 2], 50.0))
    for label, s in res["settings"].items():
        s.update(label=label, psnr=float(np.mean(s["per_image"]["psnr"])), ssim=0.5, fd_fmnist=10.0, wall_s=1.0)
        s["per_image"]["ssim"] = [0.5] * n
    res["settings"]["ae"] = {"label": "ae", "kind": "ae", "mean_nfe": 0.0, "psnr": 15.0, "ssim": 0.4, "fd_fmnist": 50.0, "wall_s": 0.1,
                             "params": {}, "per_image": {"psnr": list(15 + sigma2), "ssim": [0.4] * n}}
    res["meta"] = {"task": "gblur-varying", "solver": "latent-dps", "n_images": n, "offset": 0, "seed": 0, "split": "test",
                   "severities": list(sigma2 + 0.01 * rng.normal(size=n))}
    res["compare"] = {"flash:c=0,v=2": compare_at_equal_nfe(res, "flash:c=0,v=2")}
    (tmp_path / "curves_gblur-varying_latent-dps.json").write_text(json.dumps(res))
    train = {**res, "meta": {**res["meta"], "split": "train", "hparams": {}}}
    write_policies([("train.json", train)], tmp_path / "policies.json")
    monkeypatch.setattr(hparams, "START_POLICIES_PATH", tmp_path / "policies.json")
    assert report.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| gblur-varying")}
    assert "fixed:200" in out and "flash:c=0,v=2 (tuned)" in out
    # σ̂² decides here, so the policy table shows a clear cross-fitted gain for it
    policy_row = [line for line in out.split("## Start policies")[1].splitlines() if line.startswith("| gblur-varying")][0]
    gain, se = (float(x) for x in policy_row.split("|")[5].replace("dB", "").split("±"))
    assert gain > 3 * se and rows
    calibrated = out.split("## Calibrated start policies on held-out images")[1]
    assert "| gblur-varying | latent-dps |" in calibrated and "not run" in calibrated
    assert (tmp_path / "curves_gblur-varying_latent-dps.png").stat().st_size > 10_000
