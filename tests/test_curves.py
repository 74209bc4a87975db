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


# --- start policies (flash_plugin.bench.policy) ------------------------------------------------

from flash_plugin.bench.policy import Policy, adaptivity_report, fit_monotone_policy  # noqa: E402


def _curves_result(table, ks, sigma2):
    settings = {f"fixed:{k}": {"kind": "fixed", "mean_nfe": float(k), "params": {"k": int(k)},
                               "per_image": {"psnr": list(table[:, j])}} for j, k in enumerate(ks)}
    return {"settings": settings, "sigma2": list(sigma2)}


def test_policy_maps_sigma2_to_steps_by_thresholds():
    pol = Policy((0.1, 0.2), (10, 50, 100))
    assert pol(np.array([0.05, 0.1, 0.15, 0.3])).tolist() == [10, 10, 50, 100]


def test_monotone_policy_is_the_exhaustive_optimum():
    rng = np.random.default_rng(1)
    ks = np.array([10, 25, 50])
    sigma2 = rng.uniform(size=6)
    table = rng.normal(size=(6, 3))
    order = np.argsort(sigma2)
    for price in (0.0, 0.01, 0.05):
        pol = fit_monotone_policy(sigma2, table, ks, price)
        got = pol(sigma2)
        assert np.all(np.diff(got[order]) >= 0)
        value = table[np.arange(6), np.searchsorted(ks, got)].sum() - price * got.sum()
        # every non-decreasing level sequence over the sorted images
        import itertools
        best = max(sum(table[order[i], lv[i]] - price * ks[lv[i]] for i in range(6))
                   for lv in itertools.combinations_with_replacement(range(3), 6))
        assert value == pytest.approx(best)


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
