"""Convert Hugging Face safetensors checkpoints into MLX folders, optionally quantized.

The output is built in a hidden temporary folder beside the destination and renamed into place
only when complete, so an error, Ctrl-C or kill never leaves a partial model at the destination.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from ..config import load_config, read_json
from ..errors import NessoError
from ..hub import resolve_model_path
from ..quality import QualityReport, Reference, evaluate_quality, reference_logprobs
from ..quantize import RECIPES, bits_per_weight, dequantize_model, layer_plan, quantize_model
from ..tokenizer import Tokenizer
from ..weights import load_model, read_header, weight_files
from .card import model_card

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
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return [*names, "model.safetensors.index.json"]


def _source_dtype(model) -> mx.Dtype:
    return model.model.norm.weight.dtype


def _check_destination(dest: Path, force: bool) -> None:
    if dest.exists() and not force:
        raise ConvertError(f"{dest}: already exists; pass --force to replace it")
    if dest.exists() and not dest.is_dir():
        raise ConvertError(f"{dest}: exists and is not a folder")
    if not dest.parent.exists():
        raise ConvertError(f"{dest.parent}: folder does not exist; create it first")
    for stale in dest.parent.glob(f".{dest.name}.partial-*"):  # left by a killed conversion
        shutil.rmtree(stale, ignore_errors=True)


def _replace(tmp: Path, dest: Path) -> None:
    if dest.exists():
        backup = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dest, backup)
        os.replace(tmp, dest)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(tmp, dest)


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

    tmp = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        files = save_weights(tmp, model, int(max_shard_gb * 1e9), progress)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
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
            sum(f.stat().st_size for f in tmp.iterdir()),
            bpw,
            0.0,
            quality,
            files,
        )
        result.seconds = time.perf_counter() - t0
        (tmp / "README.md").write_text(model_card(result, q_recipe))
        result.files.append("README.md")
        _replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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
