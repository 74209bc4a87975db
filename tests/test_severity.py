"""Severity encoder: architecture, loss, training loop (resume, DDP), checkpoints, evaluation, CLI.

Everything runs on tiny random diffusers models (a 2-block `AutoencoderKL`, 1x16x16 images ->
4x8x8 latents, normalised per channel) and a stand-in operator family (additive noise whose
level grows with the severity), so the file runs in well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from flash_plugin.data import write_idx
from flash_plugin.errors import CheckpointError, FlashInputError, LatentSpaceMismatchError
from flash_plugin.protocols import SeverityEstimator
from flash_plugin.severity.encoder import CONFIG_NAME, WEIGHTS_NAME, SeverityEncoder
from flash_plugin.severity.evaluate import calibration, evaluate_severity_encoder, ordering_accuracy, spearman
from flash_plugin.metrics import _ranks, pearson
from flash_plugin.severity.train import (
    TrainConfig,
    compute_losses,
    severity_loss,
    train_severity_encoder,
    training_step,
)
from flash_plugin.types import SeverityEstimate

REPO = Path(__file__).resolve().parent.parent
THIS_FILE = Path(__file__).resolve()


# ----------------------------------------------------------------------------------------------
# Helpers (also imported by path from the subprocess scripts below)
# ----------------------------------------------------------------------------------------------
class _NoiseOperator:
    def __init__(self, t: torch.Tensor, lo: float, hi: float):
        self.sigma = lo + (hi - lo) * t

    def measure(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        n = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        return x + self.sigma.to(x).view(-1, 1, 1, 1) * n


class ToyNoiseFamily:
    """Stand-in operator family: ``y = x + σ(t) n``, ``σ(t) = lo + (hi − lo) t``."""

    name = "toy-noise"
    severity_range = (0.0, 1.0)

    def __init__(self, lo: float = 0.05, hi: float = 1.0):
        self.lo, self.hi = lo, hi
        self.noise_std = lo

    def make(self, t: torch.Tensor, generator=None) -> _NoiseOperator:
        return _NoiseOperator(torch.as_tensor(t, dtype=torch.float64), self.lo, self.hi)


class _MaskOperator:
    def __init__(self, t: torch.Tensor):
        self.t = t

    def measure(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        n = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        keep = (u >= 0.9 * self.t.to(x).view(-1, 1, 1, 1)).to(x.dtype)
        return x * keep + 0.02 * n


class ToyMaskFamily:
    """Stand-in inpainting family: a fraction ``0.9 t`` of the pixels is zeroed, plus noise 0.02.
    (Lost information keeps the error growing with ``t`` even after the mean branch has learnt.)"""

    name = "toy-mask"
    severity_range = (0.0, 1.0)
    noise_std = 0.02

    def make(self, t: torch.Tensor, generator=None) -> _MaskOperator:
        return _MaskOperator(torch.as_tensor(t, dtype=torch.float64))


def make_images(n: int, seed: int = 0, size: int = 16) -> torch.Tensor:
    """Smooth random images in [-1, 1]: 4x4 noise upsampled bilinearly."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def make_tiny_model(seed: int = 0, size: int = 16):
    from diffusers import AutoencoderKL, UNet2DModel

    from flash_plugin.models.architectures import ldm_alphas_cumprod
    from flash_plugin.models.latent_diffusion import LatentDiffusion

    torch.manual_seed(seed)
    ae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                       latent_channels=4, norm_num_groups=8, sample_size=size)
    unet = UNet2DModel(sample_size=size // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    with torch.no_grad():  # per-channel normalisation of the *scaled* latent, so errors are O(1)
        h = ae.encode(make_images(64, seed=seed + 100, size=size)).latent_dist.mode() * ae.config.scaling_factor
    return LatentDiffusion(ae, unet, ldm_alphas_cumprod(), latent_mean=h.mean((0, 2, 3)), latent_std=h.std((0, 2, 3)), name="tiny")


def tiny_config(**kw) -> TrainConfig:
    base = dict(epochs=3, steps_per_epoch=3, batch_size=4, lr=1e-3, val_batch_size=8, progress=False, log_every=1,
                head_channels=8, patience=None)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: identical float reduction order in this process and its subprocesses
    (the resume test compares weights across processes), and less contention on 2 cores."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny_model():
    return make_tiny_model(0)


@pytest.fixture(scope="module")
def saved_tiny_model(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("tiny-model")
    tiny_model.save_pretrained(d)
    return d


# ----------------------------------------------------------------------------------------------
# Architecture and the SeverityEstimator protocol
# ----------------------------------------------------------------------------------------------
def test_encoder_starts_as_the_autoencoder_encoding(tiny_model):
    enc = SeverityEncoder.from_latent_diffusion(tiny_model, init_variance=0.05, head_channels=8)
    y = make_images(3, seed=1)
    z, var = enc(y)
    assert torch.equal(z, tiny_model.encode(y)), "ẑ must live in the LatentDiffusion latent space (scaling + normalisation)"
    assert z.shape == (3, *tiny_model.latent_shape)
    assert var.shape == (3,) and torch.allclose(var, torch.full((3,), 0.05))
    # the copy is trainable and independent of the model's autoencoder
    assert all(p.requires_grad for p in enc.parameters())
    assert enc.encoder is not tiny_model.autoencoder.encoder
    assert enc.encoder.conv_in.weight.data_ptr() != tiny_model.autoencoder.encoder.conv_in.weight.data_ptr()


def test_estimate_satisfies_the_protocol(tiny_model):
    enc = SeverityEncoder.from_latent_diffusion(tiny_model, operator="toy-noise", severity_range=(0, 1), noise_std=0.05,
                                                training_data="random", head_channels=8)
    assert isinstance(enc, SeverityEstimator)
    est = enc.estimate(make_images(2, seed=2))
    assert isinstance(est, SeverityEstimate)
    assert est.latent.shape == (2, 4, 8, 8) and est.variance.shape == (2,)
    assert not est.latent.requires_grad and not est.variance.requires_grad
    assert torch.all(est.variance > 0)
    md = enc.metadata
    assert md["latent_id"] == tiny_model.latent_id
    assert md["operator"] == "toy-noise" and md["severity_range"] == [0, 1] and md["noise_std"] == 0.05
    assert md["training_data"] == "random"
    assert md["architecture"]["autoencoder_class"] == "AutoencoderKL" and md["architecture"]["head"]["channels"] == 8


@pytest.mark.parametrize(
    "y, match",
    [
        (torch.zeros(2, 3, 16, 16), "channel"),
        (torch.zeros(1, 16, 16), "rank 4"),
        (torch.zeros(2, 1, 12, 12), "16x16"),
        (torch.zeros(2, 1, 16, 16, dtype=torch.int64), "floating"),
        (torch.full((2, 1, 16, 16), float("nan")), "NaN"),
        (torch.zeros(0, 1, 16, 16), "empty"),
        ("not a tensor", "torch.Tensor"),
    ],
    ids=["channels", "rank", "size", "dtype", "nan", "empty", "type"],
)
def test_bad_measurements_are_refused(tiny_model, y, match):
    enc = SeverityEncoder.from_latent_diffusion(tiny_model, head_channels=8)
    with pytest.raises(FlashInputError, match=match) as info:
        enc.estimate(y)
    assert str(info.value).startswith("y ")


def test_estimate_moves_the_input_to_the_encoder_device_and_dtype(tiny_model):
    enc = SeverityEncoder.from_latent_diffusion(tiny_model, head_channels=8)
    est = enc.estimate(make_images(2, seed=3).double())
    assert est.latent.dtype == torch.float32 and est.latent.device == enc.device


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------
def test_loss_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    z_hat, z0 = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    x, x_hat = torch.randn(3, 1, 16, 16, generator=g), torch.randn(3, 1, 16, 16, generator=g)
    var_hat = torch.tensor([0.5, 1.0, 2.0])
    e = (z_hat - z0).flatten(1)
    mse = (e**2).mean(1)
    sbar = ((e - e.mean(1, keepdim=True)) ** 2).sum(1) / (e.shape[1] - 1)
    img = ((x_hat - x) ** 2).flatten(1).mean(1)
    official = severity_loss(z_hat, var_hat, z0, x=x, x_hat=x_hat, lambda_sigma=2.0, lambda_img=3.0, variance_loss="official")
    torch.testing.assert_close(official.total, mse + 2.0 * (sbar - var_hat) ** 2 + 3.0 * img)
    torch.testing.assert_close(official.target_variance, sbar)
    logl = severity_loss(z_hat, var_hat, z0, x=x, x_hat=x_hat, variance_loss="log")
    torch.testing.assert_close(logl.variance, (var_hat.log() - sbar.log()) ** 2)
    rel = severity_loss(z_hat, var_hat, z0, x=x, x_hat=x_hat, variance_loss="relative", variance_reference=0.5)
    torch.testing.assert_close(rel.variance, ((sbar - var_hat) / 0.5) ** 2)
    # per-sample: a sample's loss does not depend on the rest of the batch (image term: per-sample mean)
    one = severity_loss(z_hat[:1], var_hat[:1], z0[:1], x=x[:1], x_hat=x_hat[:1], variance_loss="official", lambda_sigma=2.0, lambda_img=3.0)
    torch.testing.assert_close(one.total, official.total[:1])
    with pytest.raises(FlashInputError, match="variance_reference"):
        severity_loss(z_hat, var_hat, z0, lambda_img=0.0, variance_loss="relative")
    with pytest.raises(FlashInputError, match="variance_loss"):
        severity_loss(z_hat, var_hat, z0, lambda_img=0.0, variance_loss="nope")


@pytest.mark.parametrize("detach", [True, False])
def test_detach_target_variance_stops_the_gradient_into_the_mean(detach):
    g = torch.Generator().manual_seed(1)
    z_hat = torch.randn(2, 4, 8, 8, generator=g).requires_grad_(True)
    z0 = torch.randn(2, 4, 8, 8, generator=g)
    var_hat = torch.tensor([0.3, 3.0], requires_grad=True)
    terms = severity_loss(z_hat, var_hat, z0, lambda_img=0.0, detach_target_variance=detach)
    gz, gv = torch.autograd.grad(terms.variance.sum(), [z_hat, var_hat], allow_unused=True)
    assert gv.abs().min() > 0  # the head always learns
    assert (gz is None) == detach  # with the stop-gradient the variance term never reaches ẑ
    if not detach:
        assert gz.abs().max() > 0


@pytest.mark.parametrize("detach", [True, False])
def test_detach_head_features_keeps_the_head_out_of_the_trunk(tiny_model, detach):
    enc = SeverityEncoder.from_latent_diffusion(tiny_model, head_channels=8)
    with torch.no_grad():
        enc.head.out.weight.normal_(0, 0.1)  # the zero-initialised output layer would hide the path
    z, var = enc(make_images(2, seed=20), detach_head_features=detach)
    z_ref, var_ref = enc(make_images(2, seed=20))
    assert torch.equal(z, z_ref) and torch.equal(var, var_ref)  # same outputs, only the gradient differs
    var.sum().backward()
    assert enc.head.conv1.weight.grad.abs().max() > 0
    trunk_grad = enc.encoder.mid_block.resnets[0].conv1.weight.grad
    assert (trunk_grad is None) == detach


def test_one_training_step_lowers_the_loss_on_a_fixed_batch(tiny_model):
    enc = SeverityEncoder.from_latent_diffusion(tiny_model, head_channels=8)
    cfg = tiny_config(lr=1e-3)
    x = make_images(8, seed=4)
    y = ToyNoiseFamily().make(torch.linspace(0, 1, 8)).measure(x, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(enc.parameters(), lr=cfg.lr)
    tiny_model.requires_grad_(False)
    try:
        before = training_step(enc, tiny_model, x, y, opt, cfg, 0.1).total.mean().item()
        with torch.no_grad():
            after = compute_losses(enc, tiny_model, x, y, cfg, 0.1).total.mean().item()
    finally:
        tiny_model.requires_grad_(True)
    assert after < before, (before, after)


def test_head_learning_rate_is_its_own_parameter_group(tiny_model):
    from flash_plugin.severity.train import make_optimizer

    enc = SeverityEncoder.from_latent_diffusion(tiny_model, head_channels=8)
    assert len(make_optimizer(enc, tiny_config()).param_groups) == 1
    opt = make_optimizer(enc, tiny_config(lr=1e-4, head_lr=1e-2))
    trunk, head = opt.param_groups
    assert (trunk["lr"], head["lr"]) == (1e-4, 1e-2)
    head_ids = {id(p) for p in head["params"]}
    assert head_ids == {id(p) for p in enc.head.parameters()} | {id(enc.log_variance_offset)}
    assert len(trunk["params"]) + len(head["params"]) == len(list(enc.parameters()))


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
def test_save_load_round_trip_gives_identical_outputs(tmp_path, tiny_model):
    enc = SeverityEncoder.from_latent_diffusion(tiny_model, operator="toy-noise", severity_range=(0.0, 1.0), noise_std=0.05,
                                                training_data={"dataset": "random"}, head_channels=8)
    with torch.no_grad():  # make the head non-trivial
        for p in enc.head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    enc.save_pretrained(tmp_path / "enc", metrics={"spearman": 0.9})
    assert sorted(os.listdir(tmp_path / "enc")) == [CONFIG_NAME, WEIGHTS_NAME]
    loaded = SeverityEncoder.from_pretrained(tmp_path / "enc", model=tiny_model)
    y = make_images(4, seed=5) + 0.2 * torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    a, b = enc.estimate(y), loaded.estimate(y)
    assert torch.equal(a.latent, b.latent) and torch.equal(a.variance, b.variance)
    assert loaded.metadata == enc.metadata
    assert loaded.metadata["metrics"] == {"spearman": 0.9}
    # loading without a model works too (the architecture is in the config)
    c = SeverityEncoder.from_pretrained(tmp_path / "enc").estimate(y)
    assert torch.equal(a.variance, c.variance)
    # no pickle: the weights file is safetensors, the config plain JSON
    assert json.loads((tmp_path / "enc" / CONFIG_NAME).read_text())["latent_id"] == tiny_model.latent_id


def test_loading_refuses_bad_checkpoints(tmp_path, tiny_model):
    enc = SeverityEncoder.from_latent_diffusion(tiny_model, head_channels=8)
    good = enc.save_pretrained(tmp_path / "good")
    other = make_tiny_model(seed=1)
    with pytest.raises(LatentSpaceMismatchError, match="latent space"):
        SeverityEncoder.from_pretrained(good, model=other)
    # truncated weights
    bad = tmp_path / "truncated"
    shutil.copytree(good, bad)
    data = (bad / WEIGHTS_NAME).read_bytes()
    (bad / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        SeverityEncoder.from_pretrained(bad, model=tiny_model)
    # unknown config field
    unk = tmp_path / "unknown"
    shutil.copytree(good, unk)
    cfg = json.loads((unk / CONFIG_NAME).read_text())
    cfg["temperature"] = 1.0
    (unk / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown fields.*temperature"):
        SeverityEncoder.from_pretrained(unk)
    # truncated config
    (unk / CONFIG_NAME).write_text(json.dumps(cfg)[:40])
    with pytest.raises(CheckpointError, match="JSON"):
        SeverityEncoder.from_pretrained(unk)
    # weights that do not match the architecture (a wider head)
    wide = SeverityEncoder.from_latent_diffusion(tiny_model, head_channels=16).save_pretrained(tmp_path / "wide")
    shutil.copy(wide / WEIGHTS_NAME, tmp_path / "good" / WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match="shapes"):
        SeverityEncoder.from_pretrained(good)
    with pytest.raises(CheckpointError, match="not a flash-plugin severity encoder"):
        SeverityEncoder.from_pretrained(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------
# Training loop: resume after a kill, time budget, early stop, refusing to overwrite
# ----------------------------------------------------------------------------------------------
_SCRIPT = textwrap.dedent(
    """
    import importlib.util, os, signal, sys
    import torch
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("severity_test_helpers", {test_file!r})
    h = importlib.util.module_from_spec(spec); spec.loader.exec_module(h)
    from flash_plugin.models.latent_diffusion import LatentDiffusion
    from flash_plugin.severity.train import train_severity_encoder
    from flash_plugin.utils.checkpoint import load_safetensors
    model = LatentDiffusion.from_pretrained({model_dir!r})
    data = load_safetensors({data!r})
    kill_at = {kill_at}

    def callback(step, rec):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    train_severity_encoder(model, h.ToyNoiseFamily(), data["train"], data["val"], {out!r}, h.tiny_config(),
                           callback=callback)
    """
)


def _weights(enc) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in enc.state_dict().items()}


def test_resume_after_a_kill_reaches_the_weights_of_an_uninterrupted_run(tmp_path, saved_tiny_model):
    from flash_plugin.models.latent_diffusion import LatentDiffusion
    from flash_plugin.utils.checkpoint import atomic_save_safetensors

    model = LatentDiffusion.from_pretrained(saved_tiny_model)
    train, val = make_images(24, seed=6), make_images(8, seed=7)
    atomic_save_safetensors({"train": train, "val": val}, tmp_path / "data.safetensors")
    cfg = tiny_config()  # 3 epochs x 3 steps

    full = train_severity_encoder(model, ToyNoiseFamily(), train, val, tmp_path / "full", cfg)
    assert full.step == 9 and full.stop_reason == "epochs"
    full_state = json.loads(_state_meta(tmp_path / "full"))

    # kill -9 in the middle of epoch 2 (after the epoch-1 checkpoint, at step 5)
    script = _SCRIPT.format(test_file=str(THIS_FILE), model_dir=str(saved_tiny_model), data=str(tmp_path / "data.safetensors"),
                            kill_at=5, out=str(tmp_path / "killed"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    killed_state = json.loads(_state_meta(tmp_path / "killed"))
    assert killed_state["step"] == 3, "the last checkpoint is the end of epoch 1"
    log = [json.loads(line) for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in log) == 5  # steps 4, 5 were logged but never checkpointed

    with pytest.raises(CheckpointError, match="resume"):
        train_severity_encoder(model, ToyNoiseFamily(), train, val, tmp_path / "killed", cfg)
    with pytest.raises(CheckpointError, match="lr"):
        train_severity_encoder(model, ToyNoiseFamily(), train, val, tmp_path / "killed", tiny_config(lr=5e-4), resume=True)
    resumed = train_severity_encoder(model, ToyNoiseFamily(), train, val, tmp_path / "killed", cfg, resume=True)
    assert resumed.step == 9 and resumed.stop_reason == "epochs"
    wf, wr = _weights(full.encoder), _weights(resumed.encoder)
    for k in wf:
        torch.testing.assert_close(wr[k], wf[k], rtol=0, atol=1e-6, msg=k)
    # the log was cut back to the checkpoint and then continued: one record per step, no duplicates
    log = [json.loads(line) for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log if "loss" in r]
    assert steps == list(range(1, 10))
    assert [r["epoch"] for r in log if "val_loss" in r] == [0, 1, 2, 3]  # 0: the untrained baseline
    assert resumed.best_val_loss == pytest.approx(full.best_val_loss, rel=1e-5)
    assert full_state["step"] == 9
    # the best encoder on disk loads and belongs to the model's latent space
    enc = SeverityEncoder.from_pretrained(tmp_path / "killed" / "encoder", model=model)
    assert enc.metadata["operator"] == "toy-noise" and "val_loss" in enc.metadata["metrics"]


def _state_meta(out: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(out / "state.safetensors"), framework="pt") as f:
        return f.metadata()["training_state"]


def test_time_budget_early_stop_and_max_steps(tmp_path, tiny_model):
    train, val = make_images(16, seed=8), make_images(8, seed=9)
    r = train_severity_encoder(tiny_model, ToyNoiseFamily(), train, val, tmp_path / "budget", tiny_config(max_minutes=1e-6))
    assert r.stop_reason == "time_budget" and r.step == 1
    r = train_severity_encoder(tiny_model, ToyNoiseFamily(), train, val, tmp_path / "budget", tiny_config(max_steps=4), resume=True)
    assert r.stop_reason == "max_steps" and r.step == 4 and r.epochs_completed == 1
    # lr so small that nothing improves after epoch 1 -> early stop after `patience` epochs
    r = train_severity_encoder(tiny_model, ToyNoiseFamily(), train, val, tmp_path / "early",
                               tiny_config(lr=1e-12, patience=1, epochs=10, steps_per_epoch=1))
    assert r.stop_reason == "early_stop" and r.epochs_completed <= 3
    # the model's weights were never touched and its parameters got no gradient
    assert all(p.grad is None for p in tiny_model.parameters())
    assert all(p.requires_grad for p in tiny_model.autoencoder.parameters())


def test_the_variance_head_learns(tmp_path, tiny_model):
    """160 steps on the tiny model: σ̂² starts constant and learns to rank the severity."""
    train, val = make_images(256, seed=10), make_images(32, seed=11)
    cfg = tiny_config(epochs=4, steps_per_epoch=40, batch_size=16, lr=2e-3, lambda_img=0.0, log_every=20)
    r = train_severity_encoder(tiny_model, ToyMaskFamily(), train, val, tmp_path / "learn", cfg)
    start, last = r.history[0], r.history[-1]
    assert start["epoch"] == 0 and not start["val_spearman_t"] > 0.1  # constant σ̂²: no ranking (NaN)
    assert last["val_variance_term"] < 0.5 * start["val_variance_term"]
    assert last["val_spearman_t"] > 0.5
    rep = evaluate_severity_encoder(r.encoder, tiny_model, ToyMaskFamily(), make_images(48, seed=12), n_ordering=16,
                                    plot=tmp_path / "scatter.png")
    assert rep.metrics["spearman_severity"] > 0.6, rep.metrics
    assert rep.metrics["ordering_accuracy"] > 0.85, rep.metrics
    assert rep.metrics["calibration"]["log_pearson"] > 0.4, rep.metrics
    assert 0.8 < rep.metrics["calibration"]["ratio_of_means"] < 1.2, rep.metrics
    assert (tmp_path / "scatter.png").stat().st_size > 10_000


# ----------------------------------------------------------------------------------------------
# Evaluation metrics
# ----------------------------------------------------------------------------------------------
def test_metrics_on_known_inputs():
    assert ordering_accuracy(torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])) == 0.5
    assert ordering_accuracy(torch.arange(10.0).repeat(4, 1)) == 1.0
    assert ordering_accuracy(torch.tensor([[1.0, 1.0]])) == 0.5  # a tie counts one half
    a = torch.tensor([0.3, 0.1, 0.5, 0.5, 2.0])
    b = torch.tensor([1.0, 0.0, 3.0, 2.0, 9.0])
    from scipy.stats import spearmanr

    assert spearman(a, b) == pytest.approx(spearmanr(a.numpy(), b.numpy()).statistic)
    assert pearson(_ranks(a), _ranks(b)) == pytest.approx(spearman(a, b))  # the scipy-free fallback
    assert _ranks(a).tolist() == [1.0, 0.0, 2.5, 2.5, 4.0]
    cal = calibration(torch.tensor([0.1, 0.2, 0.4, 0.8]), torch.tensor([0.1, 0.2, 0.4, 0.8]) * 2)
    assert cal["slope"] == pytest.approx(2.0) and cal["log_slope"] == pytest.approx(1.0)
    assert cal["pearson"] == pytest.approx(1.0) and cal["ratio_of_means"] == pytest.approx(0.5)


def test_evaluate_reports_start_steps_on_the_model_schedule(tiny_model):
    from flash_plugin.schedule import select_start_step
    from flash_plugin.solvers.base import train_timesteps
    from flash_plugin.types import NoiseSchedule

    enc = SeverityEncoder.from_latent_diffusion(tiny_model, head_channels=8, init_variance=0.155)
    fam = ToyNoiseFamily()
    fam.severity_range = (0.5, 1.0)  # a task range -> an extra block of numbers
    rep = evaluate_severity_encoder(enc, tiny_model, fam, make_images(8, seed=13), n_ordering=4, num_steps=1000)
    m = rep.metrics
    sched = NoiseSchedule.from_train_alphas(tiny_model.alphas_cumprod, train_timesteps(1000, 1000))
    k = select_start_step(sched, torch.tensor([0.155]))
    # the paper's table: σ̂² = 0.155 -> i_start 78 (0-based alphas_cumprod index) = our k 79 (k counts steps)
    assert m["start_step"]["min"] == m["start_step"]["max"] == k.item() == 79
    assert rep.ordering_variances.shape == (4, 10) and m["n_ordering_images"] == 4
    assert m["task_range"]["severity_range"] == [0.5, 1.0]
    json.dumps(rep.to_dict(), allow_nan=False)  # strict JSON


# ----------------------------------------------------------------------------------------------
# CLI (train-severity, eval-severity) on a tiny model and tiny IDX files
# ----------------------------------------------------------------------------------------------
def _fake_fashion_mnist(d: Path, n_train: int = 48, n_test: int = 24) -> Path:
    """12x12 IDX images: the loader pads them by 2 px to the tiny model's 16x16."""
    d.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("t10k", n_test)):
        imgs = ((make_images(n, seed=n, size=12)[:, 0].numpy() + 1) * 127.5).round()
        write_idx(d / f"{name}-images-idx3-ubyte.gz", imgs)
        write_idx(d / f"{name}-labels-idx1-ubyte.gz", np.zeros(n))
    return d


def _parse(module, argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    module.add_parser(sub)
    return parser.parse_args(argv)


def test_cli_train_then_eval(tmp_path, saved_tiny_model):
    from flash_plugin.commands import eval_severity, train_severity

    data = _fake_fashion_mnist(tmp_path / "fmnist")
    out = tmp_path / "run"
    args = _parse(train_severity, ["train-severity", "--model", str(saved_tiny_model), "--operator", "gblur-varying",
                                   "--data", str(data), "--epochs", "2", "--steps-per-epoch", "2", "--batch-size", "4",
                                   "--val-size", "8", "--eval-size", "8", "--out", str(out), "--quiet", "--lr", "1e-3",
                                   "--head-channels", "8", "--export", str(tmp_path / "exported")])
    assert args.func is train_severity.run
    assert args.func(args) == 0
    for name in ("state.safetensors", "log.jsonl", "train_config.json", "report.json", "severity_scatter.png", "encoder"):
        assert (out / name).exists(), name
    enc = SeverityEncoder.from_pretrained(tmp_path / "exported")
    md = enc.metadata
    assert md["operator"] == "gblur-varying" and md["noise_std"] == 0.1 and md["severity_range"] == [0.0, 1.0]
    assert md["training"]["config"]["lr"] == 1e-3 and md["training"]["stop_reason"] == "epochs"
    assert "spearman_severity" in md["metrics"]["test"] and md["training_data"]["dataset"] == "fashion-mnist"
    assert md["operator_kwargs"] == {"std_range": [0.3, 8.0]}

    # --init-from: a warm start from a trained encoder (recorded); its trunk is where training starts
    warm = tmp_path / "warm"
    args = _parse(train_severity, ["train-severity", "--model", str(saved_tiny_model), "--operator", "gblur-varying",
                                   "--data", str(data), "--max-steps", "0", "--batch-size", "4", "--val-size", "8",
                                   "--eval-size", "0", "--out", str(warm), "--quiet", "--head-channels", "8",
                                   "--init-from", str(tmp_path / "exported"), "--export", str(warm / "final")])
    assert args.func(args) == 0
    started = SeverityEncoder.from_pretrained(warm / "final")
    assert started.metadata["training_data"]["init_from"]["path"] == str(tmp_path / "exported")
    before, after = enc.state_dict(), started.state_dict()
    trunk = [k for k in before if "log_variance_offset" not in k]
    assert trunk and all(torch.equal(before[k], after[k]) for k in trunk)
    with pytest.raises(FlashInputError, match="head channels"):
        args = _parse(train_severity, ["train-severity", "--model", str(saved_tiny_model), "--data", str(data),
                                       "--val-size", "8", "--eval-size", "0", "--out", str(tmp_path / "warm2"),
                                       "--init-from", str(tmp_path / "exported"), "--quiet"])
        args.func(args)

    args = _parse(eval_severity, ["eval-severity", "--encoder", str(out / "encoder"), "--model", str(saved_tiny_model),
                                  "--data", str(data), "--n-images", "8", "--n-ordering", "2", "--out", str(tmp_path / "eval"),
                                  "--write-metrics"])
    assert args.func(args) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["operator"] == "gblur-varying" and report["metrics"]["n_images"] == 8
    assert "test" in SeverityEncoder.read_config(out / "encoder")["metrics"]

    # an encoder of another latent space is refused by eval-severity
    other = tmp_path / "other-model"
    make_tiny_model(seed=3).save_pretrained(other)
    args = _parse(eval_severity, ["eval-severity", "--encoder", str(out / "encoder"), "--model", str(other), "--data", str(data)])
    with pytest.raises(LatentSpaceMismatchError):
        args.func(args)


# ----------------------------------------------------------------------------------------------
# DDP: torchrun with 2 processes (gloo) equals one process with the same global batch
# ----------------------------------------------------------------------------------------------
_DDP_SCRIPT = textwrap.dedent(
    """
    import importlib.util, os, sys
    import torch
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("severity_test_helpers", {test_file!r})
    h = importlib.util.module_from_spec(spec); spec.loader.exec_module(h)
    from flash_plugin.models.latent_diffusion import LatentDiffusion
    from flash_plugin.severity.train import train_severity_encoder
    from flash_plugin.utils.checkpoint import load_safetensors
    model = LatentDiffusion.from_pretrained({model_dir!r})
    data = load_safetensors({data!r})
    r = train_severity_encoder(model, h.ToyNoiseFamily(), data["train"], data["val"], sys.argv[1],
                               h.tiny_config(epochs=2, steps_per_epoch=2))
    print("RANK", os.environ.get("RANK"), "WORLD", torch.distributed.is_initialized(), r.step, r.stop_reason)
    """
)


@pytest.mark.slow  # two torchrun workers each import torch + diffusers: 15-40 s on 2 busy cores
def test_ddp_with_two_processes_matches_one_process(tmp_path, saved_tiny_model):
    from flash_plugin.models.latent_diffusion import LatentDiffusion
    from flash_plugin.utils.checkpoint import atomic_save_safetensors

    train, val = make_images(16, seed=14), make_images(8, seed=15)
    atomic_save_safetensors({"train": train, "val": val}, tmp_path / "data.safetensors")
    script = tmp_path / "ddp_train.py"
    script.write_text(_DDP_SCRIPT.format(test_file=str(THIS_FILE), model_dir=str(saved_tiny_model), data=str(tmp_path / "data.safetensors")))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path / "ddp")], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "RANK 0" in proc.stdout and "RANK 1" in proc.stdout and " 4 epochs" in proc.stdout
    model = LatentDiffusion.from_pretrained(saved_tiny_model)
    single = train_severity_encoder(model, ToyNoiseFamily(), train, val, tmp_path / "single", tiny_config(epochs=2, steps_per_epoch=2))
    ddp = SeverityEncoder.from_pretrained(tmp_path / "ddp" / "encoder", model=model)
    # Compare outputs, not raw weights: the gradient average over ranks differs from the one-process
    # mean by float rounding, and Adam turns the ~1e-10 gradient of a bias that GroupNorm cancels
    # (true gradient 0) into a ±lr step either way, without effect on the output.
    y = ToyNoiseFamily().make(torch.linspace(0, 1, 6)).measure(make_images(6, seed=16), torch.Generator().manual_seed(1))
    a, b = single.encoder.estimate(y), ddp.estimate(y)
    torch.testing.assert_close(b.latent, a.latent, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.variance, a.variance, rtol=1e-4, atol=0)
    base = SeverityEncoder.from_latent_diffusion(model, head_channels=8).estimate(y)
    assert (a.latent - base.latent).abs().max() > 1e-3  # training did move the encoder
    cfg = json.loads((tmp_path / "ddp" / "train_config.json").read_text())
    assert cfg["world_size"] == 2
