"""Find a model: a local folder, or a Hugging Face repo id downloaded into the normal HF cache.

Offline first: a repo id whose files are all in the HF cache is used from there without any
request to the Hub; only a model that is missing, or cached partially (an interrupted download),
is fetched. `download` (what `nesso-mlx pull` runs) always asks the Hub, so it also updates.
"""

from __future__ import annotations

import json
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
PARTIAL = "only partly in the local Hugging Face cache (an interrupted download?)"
OFFLINE_HINT = "download it on a connected machine (`nesso-mlx pull`) or pass a local folder"


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def resolve_model_path(path_or_repo: str | Path, revision: str | None = None, tqdm_class: Any = None) -> Path:
    """Return a local folder for `path_or_repo`, downloading from the Hub when needed.

    `path_or_repo` is a folder, a repo id, an alias of a known model (`nesso-instruct`), or the
    name of a local conversion in `~/.nesso-mlx/models`.
    A repo id whose snapshot in the HF cache is complete is used without asking the Hub (so a
    cached model starts with no network and no wait); otherwise it is downloaded, unless
    `HF_HUB_OFFLINE=1`.
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
    cached = cached_snapshot(name, revision)
    if cached is not None:
        return cached
    return download(name, revision=revision, tqdm_class=tqdm_class)


def is_complete(folder: Path) -> bool:
    """Whether `folder` holds everything `load` reads: config.json, tokenizer.json,
    tokenizer_config.json (the chat template and EOS) and all the weights.

    A snapshot interrupted mid-download has only some of its files (huggingface_hub links a file
    into the snapshot once it is complete), so the files are checked, not the folder.
    """
    if not all((folder / name).is_file() for name in ("config.json", "tokenizer.json", "tokenizer_config.json")):
        return False
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        return bool(shards) and all((folder / shard).is_file() for shard in shards)
    return any(f.is_file() for f in folder.glob("*.safetensors"))


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The complete cached snapshot of `repo_id` (at `revision`), or None; never touches the network."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=MODEL_FILE_PATTERNS, local_files_only=True)
    except (OSError, ValueError):  # LocalEntryNotFoundError (not cached, or known to be partial) is an OSError
        return None
    folder = Path(folder)
    return folder if is_complete(folder) else None


def is_downloaded(repo_id: str) -> bool:
    """Whether the Hugging Face cache holds all of this repo's model files (no network).

    A partial download (interrupted) counts as not downloaded: loading it would go online.
    """
    return cached_snapshot(repo_id) is not None


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
    except LocalEntryNotFoundError as e:
        # huggingface-hub 1.x raises IncompleteSnapshotError (a LocalEntryNotFoundError) for a partial snapshot.
        where = PARTIAL if type(e).__name__ == "IncompleteSnapshotError" else "not in the local Hugging Face cache"
        if offline:
            raise HubError(f"{repo_id}: {where} and HF_HUB_OFFLINE is set; {OFFLINE_HINT}") from None
        raise HubError(
            f"{repo_id}: the Hugging Face Hub cannot be reached and the model is {where}; "
            "connect to the internet or pass a local folder"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise HubError(f"{repo_id}: download failed ({reason})") from None
    if offline and not is_complete(Path(folder)):
        raise HubError(f"{repo_id}: {PARTIAL} and HF_HUB_OFFLINE is set; {OFFLINE_HINT}")
    return Path(folder)
