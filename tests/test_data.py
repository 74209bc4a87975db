"""Dataset loaders: Fashion-MNIST IDX files and image folders."""

import gzip

import numpy as np
import pytest
import torch

from flash_plugin.data import FashionMNISTNotFound, load_fashion_mnist, load_image_folder, write_idx


@pytest.fixture
def fake_fmnist(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("t10k", 3)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    return tmp_path


def test_fashion_mnist_from_a_given_root(fake_fmnist):
    x, y = load_fashion_mnist("test", fake_fmnist)
    assert x.shape == (3, 1, 32, 32) and x.dtype == torch.float32 and y.shape == (3,)
    assert x.min() >= -1 and x.max() <= 1
    assert torch.all(x[:, :, :2, :] == -1) and torch.all(x[:, :, :, -2:] == -1)  # 2-pixel black padding
    assert load_fashion_mnist("train", fake_fmnist, limit=2)[0].shape[0] == 2


def test_fashion_mnist_env_var_and_missing(fake_fmnist, tmp_path, monkeypatch):
    monkeypatch.setenv("FLASH_PLUGIN_FASHION_MNIST", str(fake_fmnist))
    assert load_fashion_mnist("train")[0].shape[0] == 5
    monkeypatch.setattr("flash_plugin.data.fashion_mnist.DEBIAN_DIR", tmp_path / "nowhere")
    monkeypatch.delenv("FLASH_PLUGIN_FASHION_MNIST")
    with pytest.raises(FashionMNISTNotFound, match="dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path / "empty")
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation", fake_fmnist)


def test_a_named_place_is_the_only_place_searched(fake_fmnist, tmp_path, monkeypatch):
    # The installed copy must not stand in for a directory the user (or CI) named: an empty
    # FLASH_PLUGIN_FASHION_MNIST hides it, and an explicit root is not mixed with either.
    monkeypatch.delenv("FLASH_PLUGIN_FASHION_MNIST", raising=False)
    monkeypatch.setattr("flash_plugin.data.fashion_mnist.DEBIAN_DIR", fake_fmnist)
    assert load_fashion_mnist("test")[0].shape[0] == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("FLASH_PLUGIN_FASHION_MNIST", str(empty))
    with pytest.raises(FashionMNISTNotFound, match="not found in: .*empty"):
        load_fashion_mnist("test")
    monkeypatch.setenv("FLASH_PLUGIN_FASHION_MNIST", str(fake_fmnist))
    with pytest.raises(FashionMNISTNotFound, match="not found in: .*empty"):
        load_fashion_mnist("test", empty)
    monkeypatch.setenv("FLASH_PLUGIN_FASHION_MNIST", "")  # empty value: as if unset
    assert load_fashion_mnist("test")[0].shape[0] == 3


def test_truncated_idx_file_is_refused(fake_fmnist):
    p = fake_fmnist / "t10k-images-idx3-ubyte.gz"
    data = gzip.open(p).read()
    with gzip.open(p, "wb") as f:
        f.write(data[:-10])
    with pytest.raises(ValueError, match="truncated"):
        load_fashion_mnist("test", fake_fmnist)


def test_image_folder(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((40, 60, 3), 255, np.uint8)).save(tmp_path / "b.png")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    x = load_image_folder(tmp_path, size=16)
    assert x.shape == (2, 1, 16, 16)
    assert torch.allclose(x[0], torch.full_like(x[0], -1.0), atol=0.02)  # a.jpg (sorted first), black
    assert torch.allclose(x[1], torch.ones_like(x[1]))
    assert load_image_folder(tmp_path, size=8, channels=3).shape == (2, 3, 8, 8)
    (tmp_path / "c.png").write_bytes(b"broken")
    with pytest.raises(ValueError, match="c.png"):
        load_image_folder(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_image_folder(tmp_path / "missing")
