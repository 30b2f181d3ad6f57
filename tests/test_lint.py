"""The code base passes ruff (lint and import order), as configured in pyproject.toml."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed")
    folders = [d for d in ("nesso_mlx", "tests", "benchmarks", "convert", "examples") if (ROOT / d).is_dir()]
    result = subprocess.run([ruff, "check", *folders], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_is_light():
    """`import nesso_mlx` must not pull in mlx, tokenizers or huggingface_hub (CLI start-up)."""
    code = "import sys, nesso_mlx; print(sorted(m for m in ('mlx', 'tokenizers', 'huggingface_hub') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
