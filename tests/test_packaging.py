"""Packaging: pyproject lists every package, the wheel installs `flash_plugin.adapters` /
`flash_plugin.conformance` (never top-level `adapters` / `conformance`), README and CI agree."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
MAPPED = {"flash_plugin.adapters": "adapters", "flash_plugin.conformance": "conformance"}
SKIP_DIRS = {"__pycache__", ".git", ".data", ".whl", "runs", "build", "dist", ".venv", "out", ".pytest_cache", ".hypothesis"}


def package_dir(package: str) -> Path:
    """Source directory of ``package`` under pyproject's package-dir mapping (longest prefix wins)."""
    mapping = SETUPTOOLS["package-dir"]
    parts = package.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in mapping:
            return REPO / mapping[prefix] / Path(*parts[i:])
    return REPO / Path(*parts)


def source_packages(repo: Path = REPO) -> dict[str, Path]:
    """Every directory holding Python files under flash_plugin/, adapters/, conformance/."""
    found = {}
    for package, root in [("flash_plugin", repo / "flash_plugin"), *((p, repo / d) for p, d in MAPPED.items())]:
        for directory, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
            if any(f.endswith(".py") for f in filenames):
                rel = Path(directory).relative_to(root)
                found[".".join([package, *rel.parts])] = Path(directory)
    return found


def test_pyproject_lists_every_package():
    listed = set(SETUPTOOLS["packages"])
    missing = sorted(set(source_packages()) - listed)
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml (a wheel would lack them)"
    absent = sorted(p for p in listed if not package_dir(p).is_dir())
    assert not absent, f"pyproject.toml lists packages without a directory: {absent}"
    assert {p: SETUPTOOLS["package-dir"][p] for p in MAPPED} == MAPPED


def test_no_top_level_adapters_or_conformance_imports():
    pattern = re.compile(r"^\s*(from|import)\s+(adapters|conformance)\b", re.MULTILINE)
    offenders = []
    for directory, dirnames, filenames in os.walk(REPO):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(directory) / name
                if pattern.search(path.read_text(encoding="utf-8", errors="replace")):
                    offenders.append(str(path.relative_to(REPO)))
    assert not offenders, f"import flash_plugin.adapters / flash_plugin.conformance instead, in {offenders}"


def test_the_library_never_imports_the_command_line():
    # The CLI (flash_plugin/commands, flash_plugin/cli.py) parses and prints; everything else is
    # library code that must not import it (the benchmark logic lives in flash_plugin.bench).
    import ast

    offenders = []
    for root in ("flash_plugin", "adapters", "conformance"):
        for path in sorted((REPO / root).rglob("*.py")):
            rel = path.relative_to(REPO)
            if rel.parts[:2] == ("flash_plugin", "commands") or rel.as_posix() == "flash_plugin/cli.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
                else:
                    continue
                if any(n in ("flash_plugin.commands", "flash_plugin.cli") or n.startswith("flash_plugin.commands.") for n in names):
                    offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, f"library modules import the command line: {offenders}"


def test_docs_the_code_cites_are_in_the_repository():
    # Docstrings cite docs/architecture.md by section ("docs/architecture.md, \"Conventions\""): every
    # cited section exists, and no module points at a path outside the repository.
    headings = set(re.findall(r"^## (.+)$", (REPO / "docs" / "architecture.md").read_text(encoding="utf-8"), re.MULTILINE))
    cited, outside = {}, []
    for root in ("flash_plugin", "adapters", "conformance", "tests"):
        for path in (REPO / root).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            for section in re.findall(r'docs/architecture\.md,\s+"([^"]+)"', text):
                cited.setdefault(section, []).append(path.name)
            if ("/work/shared" in text or "DESIGN.md" in text) and path.name != "test_packaging.py":
                outside.append(str(path.relative_to(REPO)))
    assert cited, "no module cites docs/architecture.md"
    assert not {s: f for s, f in cited.items() if s not in headings}, f"cited sections missing from docs/architecture.md: {cited}"
    assert not outside, f"modules cite paths outside the repository: {outside}"
    assert (REPO / "flash_plugin" / "py.typed").is_file() and "py.typed" in SETUPTOOLS["package-data"]["flash_plugin"]


def test_pytest_plugin_entry_point_matches_the_module():
    module_exists = (REPO / "conformance" / "pytest_plugin.py").is_file()
    declared = PYPROJECT["project"].get("entry-points", {}).get("pytest11", {})
    if module_exists:
        assert "flash_plugin.conformance.pytest_plugin" in declared.values(), (
            "conformance/pytest_plugin.py exists: declare it under [project.entry-points.pytest11] in pyproject.toml"
        )
    else:
        assert not declared, "pytest11 entry point declared but conformance/pytest_plugin.py does not exist"


def test_console_script_and_extras():
    assert PYPROJECT["project"]["scripts"] == {"flash-plugin": "flash_plugin.cli:main"}
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {"pytest", "hypothesis"} <= {re.split(r"[<>=!~ \[]", r)[0] for r in extras["test"]}


def test_readme_shows_the_command_ci_runs():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    [command] = re.findall(r"^TEST_COMMAND='(.+)'$", ci, re.MULTILINE)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert f"\n{command}\n" in readme, f"README.md must show the test command CI runs: {command}"
    assert command.startswith("pip install torch==2.13.0 && ")
    assert os.access(REPO / ".ci" / "run", os.X_OK)
    assert "set -euo pipefail" in ci and '"$status" -eq 5' in ci


def test_ci_runs_the_suite_again_with_the_data_hidden():
    # A test that silently needs Fashion-MNIST must fail in CI, not on a user's machine without it:
    # after the README's command, CI runs pytest with the loader pointed at an empty directory.
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    first = ci.index('bash -c "set -euo pipefail; $TEST_COMMAND"')
    [empty] = re.findall(r'^(\w+)="\$\(mktemp -d\)"$', ci, re.MULTILINE)
    second = ci.index(f'FLASH_PLUGIN_FASHION_MNIST="${empty}" pytest\n')
    assert first < second


# --- build and install --------------------------------------------------------------------------

WEIGHTS_ARC = "flash_plugin/weights/fashion-mnist-32/"
SHIPPED_WEIGHTS = sorted([
    "MANIFEST.sha256", "MODEL_CARD.md", "MODEL_CARD_METRICS.json", "hparams.json", "latent_diffusion.json", "schedule.safetensors",
    "start_policies.json",
    "test_images.safetensors",
    "autoencoder/MODEL_CARD.md", "autoencoder/config.json", "autoencoder/diffusion_pytorch_model.safetensors",
    "autoencoder/training_summary.json",
    "unet/MODEL_CARD.md", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/training_summary.json",
    "classifier/MODEL_CARD.md", "classifier/config.json", "classifier/metrics.json", "classifier/model.safetensors",
    *(f"severity/{family}/{name}" for family in ("gblur-varying", "nonlinear-blur", "random-inpainting")
      for name in ("MODEL_CARD.md", "severity_encoder.json", "severity_encoder.safetensors")),
])
"""Every file of the bundled model the wheel ships (weights, configs, model cards and the metrics they cite)."""

CHECK_INSTALLED = r"""
import importlib, json, sys
from pathlib import Path
import flash_plugin, flash_plugin.adapters, flash_plugin.conformance, flash_plugin.cli
out = {"flash_plugin": flash_plugin.__file__, "adapters": flash_plugin.adapters.__file__,
       "conformance": flash_plugin.conformance.__file__, "top_level": {}}
for name in ("adapters", "conformance"):
    try:
        importlib.import_module(name)
        out["top_level"][name] = "importable"
    except ModuleNotFoundError:
        out["top_level"][name] = "missing"
print(json.dumps(out))
"""


def copy_source(dest: Path) -> Path:
    def ignore(directory, names):
        return [n for n in names if n in SKIP_DIRS or n.endswith(".egg-info")]

    shutil.copytree(REPO, dest, ignore=ignore)
    return dest


def make_venv(path: Path) -> tuple[Path, Path]:
    """A venv without pip that sees this interpreter's packages (torch, ...) *after* its own."""
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(path)
    python = path / "bin" / "python"
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    return python, Path(site)


def add_parent_site_packages(site: Path) -> None:
    # Lines of a .pth are appended to sys.path; .pth files *inside* those directories are not
    # executed, so this interpreter's own (editable) flash-plugin finder does not leak in.
    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "zz_parent_site.pth").write_text("\n".join(sorted(paths)) + "\n")


def run(*cmd, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stdout}\n{result.stderr}"
    return result


def pip(*args: str, python: Path) -> None:
    run(sys.executable, "-m", "pip", "--python", python, "--disable-pip-version-check", "--no-input", "-q", *args)


def run_check(python: Path, cwd: Path) -> dict:
    import json

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return json.loads(run(python, "-c", CHECK_INSTALLED, cwd=cwd, env=env).stdout)


def test_wheel_installs_packages_inside_flash_plugin(tmp_path):
    src = copy_source(tmp_path / "src")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
        "--disable-pip-version-check", "-q", "-w", tmp_path / "dist", src)
    [wheel] = (tmp_path / "dist").glob("flash_plugin-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert not top & {"adapters", "conformance"}, top
    assert {"flash_plugin/adapters/__init__.py", "flash_plugin/conformance/__init__.py"} <= set(names)
    assert "flash_plugin/py.typed" in names  # declared in package-data: type checkers read our hints
    missing = []
    for package, directory in source_packages(src).items():
        for py in directory.glob("*.py"):
            arcname = "/".join([*package.split("."), py.name])
            if arcname not in names:
                missing.append(arcname)
    for path in (src / "flash_plugin" / "weights").rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:
            arcname = path.relative_to(src).as_posix()
            if arcname not in names:
                missing.append(arcname)
    assert not missing, f"the wheel lacks {missing}"
    # The wheel carries what runs and documents the weights; records, logs and figures stay in results/.
    weights = sorted(n.removeprefix(WEIGHTS_ARC) for n in names if n.startswith(WEIGHTS_ARC))
    assert weights == SHIPPED_WEIGHTS, f"the wheel's weight files changed: {weights}"
    records = [n for n in names if n.endswith((".png", ".jsonl")) or re.search(r"/(bench_|tune_|suite64/|benchmarks/|tuning/|training/|logs/)", n)]
    assert not records, f"benchmark, tuning or training records or figures in the wheel: {records}"
    [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "flash-plugin = flash_plugin.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    python, site = make_venv(tmp_path / "venv")
    pip("install", "--no-deps", "--no-index", wheel, python=python)
    add_parent_site_packages(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = run_check(python, elsewhere)
    assert out["top_level"] == {"adapters": "missing", "conformance": "missing"}
    for key in ("flash_plugin", "adapters", "conformance"):
        assert Path(out[key]).is_relative_to(site), out
    cli = run(python.parent / "flash-plugin", "plugins", "--json", cwd=elsewhere)
    assert '"fashion-mnist-32"' in cli.stdout


def test_editable_install_maps_the_folders(tmp_path):
    src = copy_source(tmp_path / "src")
    # Build the editable wheel with this interpreter's setuptools (PEP 660), as pip would.
    build = "import sys, setuptools.build_meta as b; print(b.build_editable(sys.argv[1]))"
    name = run(sys.executable, "-c", build, tmp_path / "dist", cwd=src).stdout.strip().splitlines()[-1]
    python, site = make_venv(tmp_path / "venv")
    pip("install", "--no-deps", "--no-index", tmp_path / "dist" / name, python=python)
    add_parent_site_packages(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = run_check(python, elsewhere)
    assert out["top_level"] == {"adapters": "missing", "conformance": "missing"}
    assert Path(out["flash_plugin"]) == src / "flash_plugin" / "__init__.py"
    assert Path(out["adapters"]) == src / "adapters" / "__init__.py"
    assert Path(out["conformance"]) == src / "conformance" / "__init__.py"
