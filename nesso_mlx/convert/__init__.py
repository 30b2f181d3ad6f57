"""Convert Hugging Face safetensors checkpoints into MLX folders, optionally quantized.

Guarantees about the output folder (the destination):

- It is built in a hidden partial folder beside the destination (`.NAME.partial-PID-RANDOM`), every
  file fsynced, and renamed into place only when complete, with the parent folder fsynced before
  and after the renames; an error, Ctrl-C or kill never leaves a partial model at the destination.
- `--force` replaces only an earlier nesso-mlx conversion (see `_not_ours`); anything else at the
  destination is refused in one line and left untouched, and folders are only ever deleted file by
  file, the files the converter writes, so nothing the user did not create with nesso-mlx is removed.
- Replacing takes two renames (destination -> `.NAME.old-PID-RANDOM`, partial -> destination).
  A kill between them leaves the previous conversion, complete, in the `.old-*` folder; the next
  conversion to the same destination puts it back (or deletes it if the destination is a complete
  new conversion). At every other moment the destination is the old or the new conversion, complete.
- That clean-up touches only the leftovers of dead writers: the partial folder holds its writer's
  PID, host and process start time while it is written (`.nesso-mlx-writer`), and its name the PID.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from .. import __version__
from ..config import load_config, read_json
from ..errors import NessoError
from ..hub import resolve_model_path
from ..quality import QualityReport, Reference, evaluate_quality, reference_logprobs
from ..quantize import RECIPES, bits_per_weight, dequantize_model, layer_plan, quantize_model
from ..tokenizer import Tokenizer
from ..weights import load_model, read_header, weight_files
from .card import CARD_SIGNATURE, model_card

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
]
MARKER = ".nesso-mlx-conversion"  # written last into every output: {"format": 1, "files": {name: size}, ...}
WRITER = ".nesso-mlx-writer"  # in a partial folder while it is written: who writes it
KILL_AT = "NESSO_MLX_TEST_KILL_AT"  # test hook: the named point (see _kill_point) where the converter SIGKILLs itself
WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")
OUR_FILES = {"config.json", "README.md", "model.safetensors.index.json", MARKER, WRITER, ".DS_Store", *TOKENIZER_FILES}
Progress = Callable[[str, int, int], None]


class ConvertError(NessoError):
    """A conversion that cannot be done as asked."""


@dataclass
class ConversionResult:
    """What `convert` wrote and what it measured."""

    path: Path
    source: str
    dtype: str
    quantization: dict[str, Any] | None
    size_bytes: int
    bits_per_weight: float
    seconds: float
    quality: QualityReport | None = None
    files: list[str] = field(default_factory=list)


def _shards(weights: dict[str, mx.array], max_bytes: int) -> list[dict[str, mx.array]]:
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for name in sorted(weights):
        array = weights[name]
        if shards[-1] and size + array.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    return shards


def save_weights(folder: Path, model, max_shard_bytes: int, progress: Progress | None = None) -> list[str]:
    """Write the model's parameters as (sharded) safetensors plus an index; returns file names."""
    weights = dict(tree_flatten(model.parameters()))
    shards = _shards(weights, max_shard_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    weight_map = {}
    for i, (name, shard) in enumerate(zip(names, shards, strict=True), start=1):
        mx.save_safetensors(str(folder / name), shard, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(shard, name))
        if progress:
            progress("write", i, len(shards))
        _kill_point("shard")
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return [*names, "model.safetensors.index.json"]


def _source_dtype(model) -> mx.Dtype:
    return model.model.norm.weight.dtype


def _kill_point(name: str) -> None:
    """Test hook: with NESSO_MLX_TEST_KILL_AT=name the converter SIGKILLs itself here.

    Points: "shard" (first shard written), "before-renames" (partial folder complete),
    "between-renames" (destination moved aside), "after-renames" (new output in place, old not yet deleted).
    """
    if os.environ.get(KILL_AT) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's list of entries, to disk. Folders are best effort: Windows cannot
    open one and some file systems cannot fsync one."""
    folder = path.is_dir()
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if folder:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not folder:
            raise
    finally:
        os.close(fd)


def _started(pid: int) -> str | None:
    """When process `pid` started, as an opaque string (None if unknown): a reused PID gets another one."""
    with contextlib.suppress(OSError, IndexError):  # Linux: field 22 of /proc/PID/stat, clock ticks since boot
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    try:  # macOS and the BSDs
        ps = subprocess.run(
            ["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True, timeout=10, env={**os.environ, "LC_ALL": "C"}
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return ps.stdout.strip() or None


def _writer_stamp(pid: int) -> dict[str, Any]:
    return {"pid": pid, "host": socket.gethostname(), "started": _started(pid)}


def _writer_alive(folder: Path) -> bool:
    """Whether the writer of a `.partial-*` or `.old-*` folder may still be running (unknown counts as alive).

    The PID comes from the folder's name; a partial folder's `.nesso-mlx-writer` adds the host (a writer on
    another machine sharing the folder cannot be checked, so it counts as alive) and the start time (a
    process that now has the PID but started at another time is not the writer).
    """
    name = re.fullmatch(r"(?:partial|old)-(\d+)-[0-9a-f]+", folder.name.rpartition(".")[2])
    if name is None or os.name == "nt":  # named by another version; os.kill(pid, 0) would end a Windows process
        return True
    pid, host, stamp = int(name[1]), socket.gethostname(), {}
    with contextlib.suppress(OSError, ValueError):
        stamp = json.loads((folder / WRITER).read_text())
    if not isinstance(stamp, dict) or stamp.get("pid", pid) != pid or stamp.get("host", host) != host:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it runs, as another user
        pass
    return stamp.get("started") is None or stamp["started"] == _started(pid)


def _marker(folder: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        marker = json.loads((folder / MARKER).read_text())
        if isinstance(marker, dict) and isinstance(marker.get("files"), dict):
            return marker
    return None


def _ours(entry: Path, marker: dict[str, Any] | None) -> bool:
    """A plain file with a name the converter writes (or one its marker lists, for newer versions' files)."""
    known = entry.name in OUR_FILES or WEIGHT_FILE.fullmatch(entry.name) or (marker and entry.name in marker["files"])
    return bool(known) and entry.is_file() and not entry.is_symlink()


def _complete(folder: Path) -> bool:
    """Whether `folder` is a whole conversion: its marker, and every file the marker lists at the listed size."""
    marker = _marker(folder)
    return marker is not None and all(
        (folder / name).is_file() and (folder / name).stat().st_size == size for name, size in marker["files"].items()
    )


def _not_ours(dest: Path) -> str | None:
    """Why the existing `dest` is not an earlier nesso-mlx conversion that `--force` may replace (None if it is).

    An earlier conversion is a folder (not a symbolic link) whose entries are all plain files with the
    names the converter writes (weights, index, config.json, tokenizer and generation files, README.md,
    the marker; .DS_Store too), and which has the marker `.nesso-mlx-conversion`, or else, like the
    outputs of nesso-mlx 0.1.0 written before the marker existed, config.json, a weight file and the
    model card README.md saying "converted with nesso-mlx". An empty folder may be replaced too.
    """
    if dest.is_symlink():
        return "a symbolic link"
    if not dest.is_dir():
        return "a file"
    marker = _marker(dest)
    entries = sorted(dest.iterdir())
    foreign = [e.name for e in entries if not _ours(e, marker)]
    if foreign:
        return f"it holds {foreign[0]}" + (f" and {len(foreign) - 1} more" if len(foreign) > 1 else "")
    if marker or not entries:
        return None
    if not (dest / "config.json").exists():
        return "no config.json"
    if not any(WEIGHT_FILE.fullmatch(e.name) for e in entries):
        return "no weights"
    with contextlib.suppress(OSError):
        if CARD_SIGNATURE in (dest / "README.md").read_text(errors="replace"):
            return None
    return "no nesso-mlx model card"


def _remove(folder: Path) -> None:
    """Delete a folder the converter wrote: its files with the converter's names, then the folder if now empty.

    Anything else someone put there stays (and so does the folder)."""
    marker = _marker(folder)
    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            if _ours(entry, marker):
                entry.unlink(missing_ok=True)
        folder.rmdir()


def _recover(dest: Path) -> None:
    """Clear what killed conversions to `dest` left, touching only folders whose writer is dead.

    A partial folder is deleted. An `.old-*` folder (the previous conversion, moved aside just before
    the kill) is put back if `dest` is missing, or deleted if `dest` is a complete conversion.
    """
    prefix = f".{glob.escape(dest.name)}"
    for partial in dest.parent.glob(f"{prefix}.partial-*"):
        if not _writer_alive(partial):
            _remove(partial)
    olds = sorted(dest.parent.glob(f"{prefix}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in olds:
        if _writer_alive(old):
            continue
        with contextlib.suppress(OSError):
            if not os.path.lexists(dest):
                os.replace(old, dest)
                _fsync(dest.parent)
            elif _complete(dest):
                _remove(old)


def _check_destination(dest: Path, force: bool) -> None:
    """Refuse a destination that exists without `force`, or that is not an earlier conversion (even with it)."""
    if not os.path.lexists(dest):
        return
    reason = _not_ours(dest)
    if reason:
        raise ConvertError(
            f"{dest}: exists and is not a nesso-mlx conversion ({reason}); it was left as it is: choose another --mlx-path"
        )
    if not force:
        raise ConvertError(f"{dest}: already exists; pass --force to replace it")


def _finish(tmp: Path, files: list[str]) -> None:
    """Make the partial folder durable and mark it complete: fsync every file, write the marker last."""
    for name in files:
        _fsync(tmp / name)
    marker = {"format": 1, "writer": f"nesso-mlx {__version__}"}
    marker["files"] = {name: (tmp / name).stat().st_size for name in files}
    (tmp / MARKER).write_text(json.dumps(marker, indent=2))
    _fsync(tmp / MARKER)
    files.append(MARKER)
    (tmp / WRITER).unlink()  # the PID in the folder's name identifies the writer from here on
    _fsync(tmp)


def _replace(tmp: Path, dest: Path, force: bool) -> None:
    """Rename the finished `tmp` to `dest`; an earlier conversion there is moved aside, then deleted."""
    _check_destination(dest, force)  # again: the destination may have changed during the conversion
    _fsync(dest.parent)
    old = dest.with_name(f".{dest.name}.old-{tmp.name.rpartition('partial-')[2]}")
    if os.path.lexists(dest):
        os.replace(dest, old)
        try:
            _fsync(dest.parent)
            _kill_point("between-renames")
            os.replace(tmp, dest)
        except BaseException:
            if not os.path.lexists(dest):
                os.replace(old, dest)
            raise
    else:
        os.replace(tmp, dest)
    _fsync(dest.parent)
    _kill_point("after-renames")
    if old.exists():
        _remove(old)
        _fsync(dest.parent)


def convert(
    hf_path: str | Path,
    mlx_path: str | Path,
    *,
    dtype: str | None = None,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    q_recipe: str | None = None,
    dequantize: bool = False,
    force: bool = False,
    evaluate: bool = True,
    eval_tokens: int = 256,
    max_shard_gb: float = 5.0,
    revision: str | None = None,
    progress: Progress | None = None,
    reference: Reference | None = None,
) -> ConversionResult:
    """Convert `hf_path` (folder or repo id) into an MLX folder at `mlx_path`.

    `dtype` casts float weights (default: keep the source's). With `quantize`, linear and
    embedding layers get `q_bits` bits in groups of `q_group_size` (or a mixed `q_recipe`), and
    unless `evaluate` is False the quantized weights are compared with the source on the
    built-in Italian/English sample (pass `reference` to reuse the source's log-probabilities
    across conversions). `dequantize` turns a quantized MLX folder back into floats.
    """
    t0 = time.perf_counter()
    if quantize and dequantize:
        raise ConvertError("--quantize and --dequantize cannot be used together")
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r} is not supported (choose from {', '.join(DTYPES)})")
    if q_recipe is not None and not quantize:
        quantize = True
    dest = Path(mlx_path).expanduser().absolute()
    if not dest.parent.is_dir():
        raise ConvertError(f"{dest.parent}: folder does not exist; create it first")
    _recover(dest)
    _check_destination(dest, force)

    # Everything that can be wrong with the input is found before anything is written.
    src = resolve_model_path(hf_path, revision=revision)
    if src.resolve() == dest.resolve():
        raise ConvertError(f"{dest}: output folder is the input folder; choose another --mlx-path")
    args = load_config(src)
    for file in weight_files(src):
        read_header(file)
    if not (src / "tokenizer.json").exists():
        raise ConvertError(f"{src}: no tokenizer.json; nesso-mlx needs the model's fast tokenizer")
    if quantize and args.quantization is not None:
        raise ConvertError(f"{src}: is already quantized; pass --dequantize to get float weights first")
    if dequantize and args.quantization is None:
        raise ConvertError(f"{src}: is not quantized; --dequantize has nothing to do")
    if progress:
        progress("load", 0, 1)
    model = load_model(src, args)
    if progress:
        progress("load", 1, 1)
    source_dtype = _source_dtype(model)
    target = DTYPES[dtype] if dtype else source_dtype
    if dequantize:  # straight into the target precision, no detour through the scales' dtype
        dequantize_model(model, target)
    if target != source_dtype or dequantize:
        model.update(_cast_floats(model.parameters(), target))
    quantization = None
    if quantize:
        layer_plan(model, q_bits, q_group_size, q_recipe)  # validates before any output exists
        if progress:
            progress("quantize", 0, 1)
        quantization = quantize_model(model, q_bits, q_group_size, q_recipe)
        mx.eval(model.parameters())
        if progress:
            progress("quantize", 1, 1)

    config = read_json(src / "config.json")
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    config["torch_dtype"] = str(target).split(".")[-1]
    if quantization is not None:
        config["quantization"] = quantization
        config["quantization_config"] = quantization  # the key transformers-style tools read

    tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        (tmp / WRITER).write_text(json.dumps(_writer_stamp(os.getpid())))  # first: other conversions leave it alone
        files = save_weights(tmp, model, int(max_shard_gb * 1e9), progress)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        files.append("config.json")
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copyfile(src / name, tmp / name)
                files.append(name)
        bpw = bits_per_weight(model)
        del model
        quality = None
        if evaluate and (quantization is not None or target != source_dtype):
            quality = measure_quality(src, tmp, eval_tokens, progress, reference)
        result = ConversionResult(
            dest,
            str(hf_path),
            str(target).split(".")[-1],
            quantization,
            sum((tmp / name).stat().st_size for name in files),
            bpw,
            0.0,
            quality,
            files,
        )
        result.seconds = time.perf_counter() - t0
        (tmp / "README.md").write_text(model_card(result, q_recipe))
        result.files.append("README.md")
        _finish(tmp, result.files)
        _kill_point("before-renames")
        _replace(tmp, dest, force)
    except BaseException:
        _remove(tmp)
        raise
    return result


def _cast_floats(params: dict, dtype: mx.Dtype) -> dict:
    from mlx.utils import tree_map

    return tree_map(lambda v: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v, params)


def source_reference(source: Path, eval_tokens: int = 256) -> Reference:
    """The source model's log-probabilities on the built-in sample (float32 weights)."""
    source_model = load_model(source, load_config(source), mx.float32)
    if source_model.args.quantization is not None:
        dequantize_model(source_model, mx.float32)
    return reference_logprobs(source_model, Tokenizer.from_folder(source), eval_tokens)


def measure_quality(
    source: Path,
    converted: Path,
    eval_tokens: int = 256,
    progress: Progress | None = None,
    reference: Reference | None = None,
) -> QualityReport:
    """Compare a converted folder with its source on the built-in sample, in float32."""
    if reference is None:
        if progress:
            progress("reference", 0, 1)
        reference = source_reference(source, eval_tokens)
        if progress:
            progress("reference", 1, 1)
    candidate = load_model(converted, load_config(converted))
    dequantize_model(candidate, mx.float32)
    candidate.update(_cast_floats(candidate.parameters(), mx.float32))
    return evaluate_quality(reference, candidate, (lambda d, t: progress("evaluate", d, t)) if progress else None)


__all__ = ["convert", "ConversionResult", "ConvertError", "measure_quality", "source_reference", "RECIPES"]
