"""convert/release.py: the release matrix, its summary, and the (mocked) upload."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import huggingface_hub
import mlx.core as mx
import pytest
from conftest import TINY_CONFIG, write_model_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def release():
    spec = importlib.util.spec_from_file_location("nesso_release", ROOT / "convert" / "release.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def source(tmp_path):
    config = {**TINY_CONFIG, "hidden_size": 128, "intermediate_size": 256}
    return write_model_folder(tmp_path / "tiny-nesso", config, dtype=mx.bfloat16)


def test_release_matrix_with_summary(release, source, tmp_path, capsys):
    out = tmp_path / "releases"
    code = release.main(["--out", str(out), "--models", str(source), "--eval-tokens", "16"])
    assert code == 0
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == ["tiny-nesso-4bit", "tiny-nesso-8bit", "tiny-nesso-bf16", "tiny-nesso-mixed"]
    summary = json.loads((out / "summary.json").read_text())
    by_variant = {row["variant"]: row for row in summary}
    assert by_variant["bf16"]["quality"] is None
    kl = {v: by_variant[v]["quality"]["mean_kl"] for v in ("8bit", "4bit", "mixed")}
    assert kl["8bit"] < kl["mixed"] < kl["4bit"], kl
    bpw = {v: row["bits_per_weight"] for v, row in by_variant.items()}
    assert bpw["bf16"] > bpw["8bit"] > bpw["mixed"] > bpw["4bit"]
    table = (out / "SUMMARY.md").read_text()
    assert table.count("| tiny-nesso |") == 4 and "mixed_4_6 (group size 64)" in table
    assert table in capsys.readouterr().out
    card = (out / "tiny-nesso-mixed" / "README.md").read_text()
    assert f"{by_variant['mixed']['quality']['mean_kl']:.5f}" in card


def test_upload_uses_the_repo_template(release, source, tmp_path, monkeypatch):
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, exist_ok=False):
            calls.append(("create", repo_id))

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload", repo_id, Path(folder_path).name, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = tmp_path / "releases"
    code = release.main(
        [
            "--out",
            str(out),
            "--models",
            str(source),
            "--variants",
            "8bit",
            "--no-eval",
            "--upload-repo",
            "mlx-community/{model}-{variant}-mlx",
        ]
    )
    assert code == 0
    assert calls[0] == ("create", "mlx-community/tiny-nesso-8bit-mlx")
    assert calls[1][:3] == ("upload", "mlx-community/tiny-nesso-8bit-mlx", "tiny-nesso-8bit")
    assert "model.safetensors" in calls[1][3] and "README.md" in calls[1][3]


def test_release_error_is_one_line(release, tmp_path, capsys):
    code = release.main(["--out", str(tmp_path / "r"), "--models", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert code == 1 and err.strip().startswith("error:") and len(err.strip().splitlines()) == 1
