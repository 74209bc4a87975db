"""Images from a folder, for users' own data: ``(N, C, H, W)`` float32 in [-1, 1].

Files with the extensions in `EXTENSIONS` are read in sorted order (recursively with
``recursive=True``), converted to grey (``channels=1``) or RGB (``channels=3``), centre-cropped to
a square and resized to ``size`` (bilinear, antialiased). Unreadable files raise a `ValueError`
naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def list_images(root: str | Path, recursive: bool = False) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in root.glob(pattern) if p.is_file() and p.suffix.lower() in EXTENSIONS)


def load_image_folder(root: str | Path, *, size: int = 32, channels: int = 1, recursive: bool = False,
                      limit: int | None = None) -> torch.Tensor:
    """Load, square-crop and resize every image of ``root``; raises if there is none."""
    from PIL import Image, UnidentifiedImageError

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    paths = list_images(root, recursive)[:limit]
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(EXTENSIONS)}) in {root}")
    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                w, h = im.size
                s = min(w, h)
                im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
                im = im.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
                arr = np.asarray(im, dtype=np.float32)
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot read image {p}: {e}") from e
        arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
        out.append(torch.from_numpy(arr.copy()) / 127.5 - 1.0)
    return torch.stack(out)
