"""Atomic, pickle-free checkpoint files: safetensors weights, JSON configs and resumable training state.

Writes go to a temporary file that replaces the target (``os.replace``), so a killed process
never leaves a half-written file. A training checkpoint holds the model weights, optional EMA
weights, the optimizer's tensors (as ``opt.<param index>.<name>``), the step and a JSON ``meta``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from flash_plugin.errors import CheckpointError


_FILE_MODE = 0o644


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[str]:
    """A temporary file next to ``path`` that replaces it when the block succeeds (removed otherwise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _FILE_MODE)  # mkstemp creates 0600; weights and configs must stay readable once installed
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with _replacing(Path(path)) as tmp:
        Path(tmp).write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    with _replacing(Path(path)) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)


def load_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning every failure into a `CheckpointError` that names the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:  # truncated / corrupt header
        raise CheckpointError(f"cannot read {path} as safetensors (truncated or corrupt?): {e}") from e


def read_json_config(
    path: str | os.PathLike,
    known_fields: Iterable[str],
    *,
    missing: str,
    required: Iterable[str] = (),
    format_version: int | None = None,
) -> dict[str, Any]:
    """The JSON object in ``path``, refusing what a loader cannot trust.

    Raises `CheckpointError` with the message ``missing`` when the file does not exist, and one
    naming the file when it is not a JSON object (e.g. truncated), has fields outside
    ``known_fields``, lacks one of ``required``, or (when given) another ``format_version``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(missing)
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON (truncated?): {e}") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
    known = set(known_fields)
    unknown = set(cfg) - known
    if unknown:
        raise CheckpointError(f"{path} has unknown fields {sorted(unknown)}; known: {sorted(known)}")
    lacking = set(required) - set(cfg)
    if lacking:
        raise CheckpointError(f"{path} lacks the fields {sorted(lacking)}")
    if format_version is not None and cfg.get("format_version") != format_version:
        raise CheckpointError(f"{path}: format_version {cfg.get('format_version')!r} is not {format_version}")
    return cfg


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"opt.{idx}.{name}"] = t
    return tensors, {"param_groups": sd["param_groups"]}


def save_training_state(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    ema: torch.nn.Module | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    meta: dict[str, Any] | None = None,
) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    tensors.update(opt_tensors)
    for k, v in (extra_tensors or {}).items():
        tensors[f"extra.{k}"] = v
    info = {"step": int(step), "optimizer": opt_meta, "meta": meta or {}}
    atomic_save_safetensors(tensors, path, metadata={"training_state": json.dumps(info)})


def load_training_state(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: torch.nn.Module | None = None,
) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    """Restore model/optimizer(/EMA) in place; return ``(step, extra_tensors, meta)``."""
    from safetensors import safe_open

    tensors = load_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        info = json.loads((f.metadata() or {}).get("training_state", "null") or "null")
    if info is None:
        raise CheckpointError(f"{path} is not a training checkpoint (no 'training_state' metadata)")
    device = next(model.parameters()).device

    def sub(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    model.load_state_dict(sub("model."))
    if ema is not None:
        ema.load_state_dict(sub("ema."))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in sub("opt.").items():
        idx, name = k.split(".", 1)
        state.setdefault(int(idx), {})[name] = v.to(device) if name != "step" else v
    optimizer.load_state_dict({"state": state, "param_groups": info["optimizer"]["param_groups"]})
    return info["step"], sub("extra."), info.get("meta", {})
