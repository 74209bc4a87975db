"""The bkse adapter (`flash_plugin.adapters.kernel_wizard`): the KernelWizard port's GoPro
architecture (on the meta device, no memory), a tiny random-weight model for shapes, checkpoints,
determinism and gradients, and its registration as a plugin."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from flash_plugin.errors import CheckpointError, FlashInputError
from flash_plugin.adapters.kernel_wizard import (
    GOPRO_WVAE_CONFIG,
    KernelWizard,
    KernelWizardBlur,
    KernelWizardConfig,
    convert_bkse_checkpoint,
)

TINY = KernelWizardConfig(nf=4, front_blocks=1, back_blocks=1, kernel_dim=32, extractor_blocks=1, recon_nf=8)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def tiny_model() -> KernelWizard:
    torch.manual_seed(0)
    return KernelWizard(TINY).eval().requires_grad_(False)


def test_gopro_architecture_matches_bkse_state_dict():
    """Key count, parameter count and sample shapes of bkse's KernelWizard for
    options/kernel_encoding/GOPRO/wVAE.yml (checked once against bkse's own module)."""
    with torch.device("meta"):
        model = KernelWizard(GOPRO_WVAE_CONFIG)
    sd = model.state_dict()
    assert len(sd) == 159
    assert sum(v.numel() for v in sd.values()) == 115_265_475
    expected = {
        "feature_extractor.0.weight": (64, 3, 3, 3),
        "feature_extractor.15.conv2.bias": (64,),
        "kernel_extractor.model.1.weight": (64, 128, 7, 7),
        "kernel_extractor.model.16.weight": (1024, 1024, 3, 3),
        "kernel_extractor.model.22.conv_block.5.weight": (1024, 1024, 3, 3),
        "adapter.model.down.0.weight": (64, 64, 4, 4),
        "adapter.model.up.1.bias": (64,),
        "adapter.model.submodule.submodule.submodule.submodule.up.1.weight": (1024, 512, 4, 4),
        "recon_trunk.19.conv1.weight": (64, 64, 3, 3),
        "recon_trunk.23.weight": (256, 64, 3, 3),
        "recon_trunk.28.weight": (3, 64, 3, 3),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert model.code_shape(256, 256) == (512, 2, 2)


def test_config_from_bkse_options_and_validation():
    opt = {
        "input_nc": 3, "nf": 64, "front_RBs": 10, "back_RBs": 20, "kernel_dim": 512, "use_vae": True,
        "KernelExtractor": {"norm": "none", "use_sharp": True, "n_blocks": 4, "padding_type": "reflect"},
        "Adapter": {"norm": "none"},
    }
    assert KernelWizardConfig.from_bkse(opt) == GOPRO_WVAE_CONFIG
    with pytest.raises(CheckpointError, match="norm"):
        KernelWizardConfig.from_bkse({**opt, "Adapter": {"norm": "batch"}})
    with pytest.raises(CheckpointError, match="kernel_dim"):
        KernelWizardConfig(nf=4, kernel_dim=16)


def test_operator_shapes_and_determinism(tiny_model):
    op = KernelWizardBlur.from_model(tiny_model, 2, gen(0), work_size=128, channels=1, noise_std=0.1)
    assert op.codes.shape == (2, 32, 1, 1) and op.work_size == (128, 128)
    assert abs(op.codes.std().item() - 1.2) < 0.4
    x = torch.rand(2, 1, 32, 32, generator=gen(1)) * 2 - 1
    y = op.measure(x, gen(2))
    assert y.shape == x.shape
    again = KernelWizardBlur.from_model(tiny_model, 2, gen(0), work_size=128, channels=1, noise_std=0.1)
    assert torch.equal(again.measure(x, gen(2)), y)
    other = KernelWizardBlur.from_model(tiny_model, 2, gen(1), work_size=128, channels=1)
    assert not torch.equal(other.codes, op.codes)
    y0 = op.forward(x)
    assert not torch.allclose(other.forward(x), y0)
    torch.testing.assert_close(op.select([1]).forward(x[1:]), y0[1:], atol=1e-5, rtol=0)  # batch = per sample
    rgb = KernelWizardBlur(tiny_model, op.codes[:1])
    assert rgb.forward(torch.zeros(1, 3, 128, 128)).shape == (1, 3, 128, 128)  # native size, no resizing
    assert "KernelWizardBlur(B=2, severity=None" in repr(op)


def test_operator_validates_input(tiny_model):
    op = KernelWizardBlur.from_model(tiny_model, 1, gen(0), work_size=128, channels=1)
    with pytest.raises(FlashInputError, match="x must have 1 channel"):
        op.forward(torch.zeros(1, 3, 32, 32))
    with pytest.raises(FlashInputError, match="x has batch length 2"):
        op.forward(torch.zeros(2, 1, 32, 32))
    with pytest.raises(FlashInputError, match="multiples of 128"):
        KernelWizardBlur.from_model(tiny_model, 1, work_size=100)
    with pytest.raises(FlashInputError, match="codes"):
        KernelWizardBlur(tiny_model, torch.zeros(1, 7, 1, 1))


def test_gradcheck_float64(tiny_model):
    op = KernelWizardBlur.from_model(tiny_model, 1, gen(0), work_size=128, channels=1).to(dtype=torch.float64)
    assert next(tiny_model.parameters()).dtype == torch.float32  # the shared model was not changed
    x = (torch.rand(1, 1, 8, 8, generator=gen(1), dtype=torch.float64) * 0.2 - 0.1).requires_grad_()
    assert torch.autograd.gradcheck(op.forward, (x,), fast_mode=True)


def test_save_load_round_trip(tiny_model, tmp_path):
    path = tmp_path / "kw.safetensors"
    tiny_model.save_pretrained(path)
    op = KernelWizardBlur.from_pretrained(path, 2, gen(0), work_size=128, channels=1)  # config from metadata
    assert op.model.config == TINY and not op.model.training
    ref = KernelWizardBlur.from_model(tiny_model, 2, gen(0), work_size=128, channels=1)
    x = torch.rand(2, 1, 32, 32, generator=gen(3)) * 2 - 1
    assert torch.equal(op.forward(x), ref.forward(x))


def test_checkpoint_errors(tiny_model, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        KernelWizard.from_pretrained(tmp_path / "missing.safetensors")
    good = tmp_path / "kw.safetensors"
    tiny_model.save_pretrained(good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        KernelWizard.from_pretrained(truncated)
    sd = dict(tiny_model.state_dict())
    sd.pop("adapter.model.down.0.weight")
    sd["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    with pytest.raises(CheckpointError, match=r"1 missing keys \['adapter.model.down.0.weight'\].*1 unexpected keys"):
        KernelWizard.from_pretrained(bad, TINY)
    with pytest.raises(CheckpointError, match="missing keys"):
        KernelWizard.from_pretrained(good, GOPRO_WVAE_CONFIG)  # tiny weights for the GoPro model


def test_convert_bkse_pth(tiny_model, tmp_path):
    pth = tmp_path / "GOPRO_wVAE.pth"
    torch.save({"module." + k: v for k, v in tiny_model.state_dict().items()}, pth)  # DataParallel-style keys
    out = convert_bkse_checkpoint(pth, tmp_path / "kw.safetensors", TINY)
    loaded = KernelWizard.from_pretrained(out)
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    with pytest.raises(CheckpointError, match="missing keys"):
        convert_bkse_checkpoint(pth, tmp_path / "gopro.safetensors")  # wrong config
    with pytest.raises(CheckpointError, match="not found"):
        convert_bkse_checkpoint(tmp_path / "nope.pth", tmp_path / "x.safetensors")


def test_registered_as_an_adapter_plugin_through_the_entry_point():
    """``"kernel-wizard"`` comes from the adapter plugin (entry point ``kernel_wizard``), like the
    other adapters, no longer from the built-in operators."""
    import flash_plugin.adapters.kernel_wizard as plugin
    from flash_plugin import plugins, registry
    from flash_plugin.operators import OPERATOR_CLASSES
    from flash_plugin.operators import flash_register_operators as builtin_hook

    registered = {}
    plugin.flash_register_operators(registered.__setitem__)
    assert registered == {"kernel-wizard": KernelWizardBlur} and KernelWizardBlur.operator_family == "kernel-wizard"
    builtin = {}
    builtin_hook(builtin.__setitem__)
    assert "kernel-wizard" not in builtin and "kernel-wizard" not in OPERATOR_CLASSES
    pm = plugins.make_plugin_manager(load_external=True, allow=["kernel_wizard"])
    entry = registry.get_registration("operators", "kernel-wizard", pm=pm)
    assert (entry.factory, entry.plugin) == (KernelWizardBlur, "kernel_wizard")


def test_old_import_paths_warn_and_still_work():
    import importlib
    import sys

    import flash_plugin.operators as operators

    for name in ("KernelWizard", "KernelWizardBlur", "KernelWizardConfig", "convert_bkse_checkpoint"):
        with pytest.warns(DeprecationWarning, match="flash_plugin.adapters.kernel_wizard"):
            assert getattr(operators, name) is globals()[name]
    sys.modules.pop("flash_plugin.operators.kernel_wizard", None)
    with pytest.warns(DeprecationWarning, match="flash_plugin.adapters.kernel_wizard"):
        old = importlib.import_module("flash_plugin.operators.kernel_wizard")
    assert old.KernelWizardBlur is KernelWizardBlur and old.GOPRO_WVAE_CONFIG is GOPRO_WVAE_CONFIG
