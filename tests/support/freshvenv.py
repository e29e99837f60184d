"""For tests that install greenpool into a throwaway virtualenv outside the checkout
(tests/test_wheel.py, tests/test_django_versions.py)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def find_uv() -> str | None:
    """uv from this environment's bin directory (the dev extras install it), or PATH."""
    return shutil.which("uv", path=os.path.dirname(sys.executable)) or shutil.which("uv")


def copy_source(workdir: Path) -> Path:
    """What the package is built from, copied into ``workdir/src``, so the checkout gets
    no build/ and concurrent installs do not build in one directory."""
    src = workdir / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.orig")
    for name in ("greenpool", "examples"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    return src
