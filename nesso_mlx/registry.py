"""The Nesso family: short aliases, Hugging Face repo ids and what each model is for."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KnownModel:
    alias: str
    repo_id: str
    purpose: str
    parameters: str = "0.4B"


KNOWN_MODELS = [
    KnownModel("nesso-instruct", "mii-llm/nesso-0.4B-instruct", "chat (Italian/English)"),
    KnownModel("nesso-agentic", "mii-llm/nesso-0.4B-agentic", "function calling, structured JSON"),
    KnownModel("zagreus", "mii-llm/zagreus-0.4B-ita", "base model (Italian)"),
    KnownModel("open-zagreus", "mii-llm/open-zagreus-0.4B", "base model"),
]
DEFAULT_CHAT_MODEL = "nesso-instruct"
_BY_ALIAS = {m.alias: m for m in KNOWN_MODELS}


def resolve_alias(name: str) -> str:
    """A short alias such as `nesso-agentic` becomes its repo id; anything else is returned as is."""
    known = _BY_ALIAS.get(name)
    return known.repo_id if known else name


def home() -> Path:
    """nesso-mlx's own folder: chat history and local conversions (`$NESSO_MLX_HOME`)."""
    return Path(os.environ.get("NESSO_MLX_HOME", Path.home() / ".nesso-mlx")).expanduser()


def conversions_dir() -> Path:
    return home() / "models"


@dataclass(frozen=True)
class LocalConversion:
    name: str
    path: Path
    base_model: str
    precision: str
    size_bytes: int


def local_conversions() -> list[LocalConversion]:
    """MLX folders under `conversions_dir()` (where `nesso-mlx convert` writes by default)."""
    found = []
    for folder in sorted(conversions_dir().glob("*")):
        config_file = folder / "config.json"
        if not folder.is_dir() or folder.name.startswith(".") or not config_file.exists():
            continue
        try:
            config = json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        q = config.get("quantization")
        precision = f"{q['bits']}-bit" if isinstance(q, dict) and "bits" in q else str(config.get("torch_dtype", "?"))
        card = folder / "README.md"
        base = ""
        if card.exists():
            base = next(
                (line.split(":", 1)[1].strip() for line in card.read_text().splitlines() if line.startswith("base_model:")), ""
            )
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        found.append(LocalConversion(folder.name, folder, base, precision, size))
    return found
