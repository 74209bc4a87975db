"""Argument checks and progress display shared by the subcommands.

Each subcommand checks its arguments with these at the start of ``run``, before loading a model,
so that a bad argument costs seconds and ends in one line (``flash-plugin: error: ...``) naming the
option as typed (``"--n-images"``), not in a traceback or a silently different run.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flash_plugin.errors import FlashInputError


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None,
              hint: str = "") -> int | None:
    """``value`` (``None`` passes) as an int within ``[minimum, maximum]``, else a `FlashInputError`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise FlashInputError(f"{name} must be an integer, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        if maximum is None:
            want = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        elif minimum is None:
            want = f"an integer <= {maximum}"
        else:
            want = f"an integer in {minimum}..{maximum}"
        raise FlashInputError(f"{name} must be {want}, got {value}{hint}")
    return value


def check_float(name: str, value: Any, *, minimum: float | None = None, maximum: float | None = None,
                strict_minimum: bool = False) -> float | None:
    """``value`` (``None`` passes) as a finite float within the bounds (``> minimum`` with ``strict_minimum``)."""
    if value is None:
        return None
    v = float(value)
    low_bad = minimum is not None and (v <= minimum if strict_minimum else v < minimum)
    if not math.isfinite(v) or low_bad or (maximum is not None and v > maximum):
        if minimum is not None and maximum is not None:
            want = f"a number in [{minimum:g}, {maximum:g}]"
        elif minimum is not None:
            want = f"a number {'>' if strict_minimum else '>='} {minimum:g}"
        elif maximum is not None:
            want = f"a number <= {maximum:g}"
        else:
            want = "a finite number"
        raise FlashInputError(f"{name} must be {want}, got {value}")
    return v


def _existing(name: str, path: Any, is_kind: Callable[[Path], bool], noun: str) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        raise FlashInputError(f"{name} {path}: no such {noun}")
    if not is_kind(p):
        raise FlashInputError(f"{name} {path}: not a {noun}")
    return p


def check_dir(name: str, path: Any) -> Path | None:
    """An existing directory (``None`` passes)."""
    return _existing(name, path, Path.is_dir, "directory")


def check_file(name: str, path: Any) -> Path | None:
    """An existing regular file (``None`` passes)."""
    return _existing(name, path, Path.is_file, "file")


def check_out_dir(name: str, path: Any) -> Path:
    """A directory to write into: it may not exist yet, but it must not be a file."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise FlashInputError(f"{name} {path}: exists and is not a directory")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise FlashInputError(f"{name} {path}: {parent} is a file, not a directory")
            break
    return p


def check_data_dir(name: str, path: Any) -> Path | None:
    """A directory that itself holds the Fashion-MNIST IDX files (``None`` passes: search the
    default places). A directory without them is an error, never a silent fallback to other data."""
    p = check_dir(name, path)
    if p is None:
        return None
    from flash_plugin.data.fashion_mnist import FashionMNISTNotFound, find_fashion_mnist

    try:
        found = find_fashion_mnist(p)
    except FashionMNISTNotFound:
        found = None
    if found is None or found.resolve() != p.resolve():
        raise FlashInputError(f"{name} {path}: holds no Fashion-MNIST IDX files (train/t10k-images-idx3-ubyte[.gz] and labels)")
    return p


def check_device(name: str, device: Any) -> str:
    """A device string torch understands and that exists here: ``cuda`` on a torch without CUDA, or
    ``cuda:3`` on a machine with two GPUs, is one line saying so."""
    import torch

    try:
        d = torch.device(str(device))
    except (RuntimeError, ValueError):
        raise FlashInputError(f"{name} {device!r} is not a device (use cpu, cuda, cuda:N or mps)") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}, but no GPU is visible"
            raise FlashInputError(f"{name} {device}: CUDA is not available ({build}, torch {torch.__version__}); use {name} cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise FlashInputError(f"{name} {device}: there are only {torch.cuda.device_count()} CUDA device(s)")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise FlashInputError(f"{name} {device}: MPS is not available on this machine; use {name} cpu")
    elif d.type not in ("cpu", "cuda", "mps"):
        raise FlashInputError(f"{name} {device!r}: only cpu, cuda and mps are supported")
    return str(device)


def check_threads(name: str, threads: Any) -> int | None:
    return check_int(name, threads, minimum=1)


def check_registered(name: str, kind: str, value: str) -> Any:
    """What a plugin (the built-ins included) registered as ``value`` in registry ``kind``; else
    the registry's error, which lists the registered names, prefixed with the option."""
    from flash_plugin.errors import UnknownPluginNameError
    from flash_plugin.registry import get_registration

    try:
        return get_registration(kind, value).factory
    except UnknownPluginNameError as exc:
        raise UnknownPluginNameError(f"{name}: {exc}") from None


def check_solver(name: str, solver: str) -> str:
    """A registered solver name."""
    check_registered(name, "solvers", solver)
    return solver


def check_preset(name: str, task: str):
    """The task preset registered as ``task`` (a built-in preset or one a plugin registers)."""
    obj = check_registered(name, "operators", task)
    if not all(callable(getattr(obj, a, None)) for a in ("make", "sample_severity")):
        raise FlashInputError(f"{name} {task!r} is an operator family, not a task preset (a preset has a severity range); "
                              "use one of the presets, e.g. gblur-varying")
    return obj


def parse_name_values(name: str, items: list[str]) -> dict[str, float]:
    """``["zeta=1.0", "std=2"]`` -> ``{"zeta": 1.0, "std": 2.0}``; every value must be a number."""
    out: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise FlashInputError(f"{name} {item!r}: expected NAME=VALUE, e.g. zeta=1.0")
        try:
            v = float(value)
        except ValueError:
            raise FlashInputError(f"{name} {item!r}: {value!r} is not a number") from None
        if not math.isfinite(v):
            raise FlashInputError(f"{name} {item!r}: the value must be finite")
        out[key] = v
    return out


def plain(doc: str | None) -> str:
    """A docstring as ``--help`` text: without the reST markup (double backticks, roles, ``::``)."""
    text = doc or ""
    text = re.sub(r":\w+:`([^`]*)`", r"\1", text)
    text = text.replace("``", "").replace("`", "").replace("::\n", ":\n")
    return text


# --- progress display -------------------------------------------------------------------------


def add_progress_option(parser) -> None:
    import argparse

    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars (default: on when stderr is a terminal; otherwise one line per finished stage)")


def progress_bars(flag: bool | None) -> bool:
    """Whether to draw progress bars: ``--progress``/``--no-progress``, else only on a terminal."""
    if flag is not None:
        return bool(flag)
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def stage(command: str, message: str) -> None:
    """One line on stderr for a finished stage (what pipes and CI logs see)."""
    print(f"[{command}] {message}", file=sys.stderr, flush=True)
