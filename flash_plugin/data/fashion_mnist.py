"""Fashion-MNIST from the standard IDX files, padded to 32x32 and scaled to [-1, 1].

Where the files are looked for: the ``root`` argument when one is given; otherwise the
``FLASH_PLUGIN_FASHION_MNIST`` environment variable when it is set (non-empty); otherwise Debian's
``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``). Only one place is
searched: a directory the caller named that lacks the files is an error, never a silent fall-back
to another copy. So ``FLASH_PLUGIN_FASHION_MNIST=/some/empty/dir`` hides the installed data
(CI runs the tests that way to catch tests that silently depend on it).

Nothing is downloaded unless the caller asks for it with ``download=True``.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch

ENV_VAR = "FLASH_PLUGIN_FASHION_MNIST"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
# Zalando's public mirror of the IDX files, used only when the user passes download=True.
_MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


class FashionMNISTNotFound(FileNotFoundError):
    """The IDX files are in none of the places searched."""


def _candidates(root: str | os.PathLike | None) -> list[Path]:
    if root is not None:
        return [Path(root)]
    if os.environ.get(ENV_VAR):
        return [Path(os.environ[ENV_VAR])]
    return [DEBIAN_DIR]


def _locate(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def find_fashion_mnist(root: str | os.PathLike | None = None) -> Path:
    """The directory holding all four IDX files (see the module docstring for the one place
    searched), or raise `FashionMNISTNotFound` naming it."""
    searched = _candidates(root)
    for d in searched:
        if all(_locate(d, stem) for pair in _FILES.values() for stem in pair):
            return d
    raise FashionMNISTNotFound(
        "Fashion-MNIST IDX files (all four: train and t10k images and labels) not found in: "
        + ", ".join(str(d) for d in searched)
        + f". Install Debian's package (`apt-get install dataset-fashion-mnist`), set {ENV_VAR} to a "
        "directory holding train-images-idx3-ubyte(.gz) etc., or call load_fashion_mnist(download=True, root=DIR) "
        "on a machine with network access."
    )


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = struct.unpack(">I", data[:4])[0]
    ndim = magic & 0xFF
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte
        raise ValueError(f"{path}: not a uint8 IDX file (magic {magic:#x})")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated IDX file ({arr.size} values for shape {shape})")
    return arr.reshape(shape)


def write_idx(path: str | os.PathLike, arr: np.ndarray) -> Path:
    """Write ``arr`` (values 0..255) as a gzipped uint8 IDX file, the format `load_fashion_mnist`
    reads (e.g. to lay out your own images like Fashion-MNIST's files, or to make test data)."""
    arr = np.asarray(arr)
    header = struct.pack(">I", 0x0800 | arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    path = Path(path)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())
    return path


def _download(root: Path) -> None:
    import urllib.request

    root.mkdir(parents=True, exist_ok=True)
    for pair in _FILES.values():
        for stem in pair:
            target = root / (stem + ".gz")
            if not target.exists():
                urllib.request.urlretrieve(_MIRROR + stem + ".gz", target)  # noqa: S310 (user asked for it)


def to_model_range(images_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 32, 32) in [-1, 1], padded with -1 (black) by 2 pixels."""
    x = torch.as_tensor(np.array(images_uint8), dtype=torch.float32) / 127.5 - 1.0
    x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    return x.unsqueeze(1)


def load_fashion_mnist(
    split: str = "train",
    root: str | os.PathLike | None = None,
    *,
    download: bool = False,
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a split as ``(images, labels)``: images float32 ``(N, 1, 32, 32)`` in [-1, 1], labels int64 ``(N,)``."""
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    if download:
        if root is None:
            raise ValueError("download=True needs a root directory to write to")
        _download(Path(root))
    directory = find_fashion_mnist(root)
    img_stem, lab_stem = _FILES[split]
    images = _read_idx(_locate(directory, img_stem))
    labels = _read_idx(_locate(directory, lab_stem))
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return to_model_range(images), torch.as_tensor(labels.astype(np.int64))
