"""Packaging: the wheel holds every module and data file of the source tree (the bundled sample included),
with an SPDX license; and (heavy) ``pip install .`` into a fresh venv, then ``streamwavlm stream --seconds 3``.

The wheel is built from a copy of the sources in a temporary directory, so the checkout gets no build/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "streamwavlm", "kernels")


def _copy_sources(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(src, dest / name)
    return dest


def _expected_files() -> set[str]:
    """What the wheel must hold: every file of the package (kernels/ installs as streamwavlm/kernels)."""
    files = {f"streamwavlm/{p.relative_to(ROOT / 'streamwavlm')}" for p in (ROOT / "streamwavlm").rglob("*")
             if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    files |= {f"streamwavlm/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    return files


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    src = _copy_sources(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return next(out.glob("streamwavlm-*.whl")), proc.stdout + proc.stderr


def test_wheel_holds_every_module_and_the_sample(wheel: tuple[Path, str]) -> None:
    path, _ = wheel
    names = set(zipfile.ZipFile(path).namelist())
    missing = sorted(_expected_files() - names)
    assert not missing, f"not in the wheel (add the package to pyproject.toml): {missing}"
    assert "streamwavlm/data/sample.wav" in names


def test_no_packaging_warnings_and_an_spdx_license(wheel: tuple[Path, str]) -> None:
    path, log = wheel
    for warning in ("is absent from the `packages` configuration", "License classifiers are deprecated",
                    "`project.license` as a TOML table is deprecated"):
        assert warning not in log
    metadata = next(n for n in zipfile.ZipFile(path).namelist() if n.endswith("/METADATA"))
    assert "License-Expression: MIT" in zipfile.ZipFile(path).read(metadata).decode()


@pytest.mark.heavy
def test_pip_install_then_stream_in_a_fresh_venv(tmp_path: Path) -> None:
    """The user's path: a fresh venv, torch's CPU wheel, ``pip install .``, the main job on the bundled sample."""
    src = _copy_sources(tmp_path / "src")
    venv = tmp_path / "venv"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True, timeout=900)  # the CPU wheel, before anything pulls CUDA
    subprocess.run([*pip, str(src)], check=True, timeout=900)
    installed = time.perf_counter() - start
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run([str(venv / "bin" / "streamwavlm"), "stream", "--seconds", "3"], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env=env)
    print(f"fresh venv + pip install: {installed:.0f} s; stream: exit {proc.returncode}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "published" in proc.stdout and "sample:" in proc.stdout
