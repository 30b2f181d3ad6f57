"""Find a model: a local folder, or a Hugging Face repo id downloaded into the normal HF cache."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .errors import HubError
from .registry import conversions_dir, resolve_alias

# Only what nesso-mlx reads: no pickle weights, no remote code.
MODEL_FILE_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.jinja",
    "tokenizer.model",
    "*.txt",
    "README.md",
]
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def resolve_model_path(path_or_repo: str | Path, revision: str | None = None, tqdm_class: Any = None) -> Path:
    """Return a local folder for `path_or_repo`, downloading from the Hub when needed.

    `path_or_repo` is a folder, a repo id, an alias of a known model (`nesso-instruct`), or the
    name of a local conversion in `~/.nesso-mlx/models`.
    A repo id already in the HF cache is used as is when offline (`HF_HUB_OFFLINE=1`).
    """
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise HubError(f"{path}: is a file; pass the model's folder")
        return path
    local = conversions_dir() / str(path_or_repo)
    if str(path_or_repo) and "/" not in str(path_or_repo) and (local / "config.json").exists():
        return local  # a conversion made with `nesso-mlx convert`
    name = resolve_alias(str(path_or_repo))
    if not _REPO_ID.match(name) or name.startswith((".", "/", "~")):
        raise HubError(f"{name}: no such folder, and not a Hugging Face repo id (owner/name)")
    return download(name, revision=revision, tqdm_class=tqdm_class)


def download(repo_id: str, revision: str | None = None, tqdm_class: Any = None) -> Path:
    """Download the files nesso-mlx needs from `repo_id` (or find them in the HF cache)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = is_offline()
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=MODEL_FILE_PATTERNS,
            local_files_only=offline,
            tqdm_class=tqdm_class,
        )
    except GatedRepoError:
        raise HubError(f"{repo_id}: gated repo; accept its terms on the Hub and log in with `hf auth login`") from None
    except RepositoryNotFoundError:
        raise HubError(f"{repo_id}: no such repo on the Hugging Face Hub (check the id, or log in for private repos)") from None
    except RevisionNotFoundError:
        raise HubError(f"{repo_id}: revision {revision!r} not found") from None
    except LocalEntryNotFoundError:
        if offline:
            raise HubError(
                f"{repo_id}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                "download it on a connected machine or pass a local folder"
            ) from None
        raise HubError(
            f"{repo_id}: the Hugging Face Hub cannot be reached and the model is not cached; "
            "connect to the internet or pass a local folder"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise HubError(f"{repo_id}: download failed ({reason})") from None
    return Path(folder)
