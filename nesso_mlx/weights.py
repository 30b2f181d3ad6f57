"""Read (possibly sharded, possibly quantized) safetensors into a `Model`, with validation."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelArgs
from .errors import WeightsError
from .model import Model

_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model folder (from the shard index when there is one)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, AttributeError) as e:
            raise WeightsError(f"{index}: not a valid safetensors index ({e})") from None
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise WeightsError(f"{path / missing[0]}: shard listed in the index is missing; download the model again")
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise WeightsError(
            f"{path}: only PyTorch pickle weights found; nesso-mlx loads safetensors only "
            "(pick a repo with .safetensors, or convert them with transformers' save_pretrained)"
        )
    raise WeightsError(f"{path}: no .safetensors weight files found")


def read_header(file: Path) -> dict[str, Any]:
    """Parse and check a safetensors header: returns {name: {"dtype", "shape", ...}}."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise WeightsError(f"{file}: truncated (no safetensors header); download it again")
            (n,) = struct.unpack("<Q", prefix)
            if n > size - 8 or n > 100_000_000:
                raise WeightsError(f"{file}: corrupt or truncated safetensors header; download it again")
            header = json.loads(f.read(n))
    except OSError as e:
        raise WeightsError(f"{file}: cannot be read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise WeightsError(f"{file}: corrupt safetensors header; download it again") from None
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        try:
            start, stop = info["data_offsets"]
            count = 1
            for d in info["shape"]:
                count *= d
            expected = count * _DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{file}: corrupt entry for tensor {name!r}; download it again") from None
        if stop - start != expected:
            raise WeightsError(f"{file}: tensor {name!r} has inconsistent size; download it again")
        end = max(end, stop)
    if 8 + n + end > size:
        raise WeightsError(f"{file}: truncated ({size} bytes, header says {8 + n + end}); download it again")
    return header


def load_safetensors(path: Path) -> dict[str, mx.array]:
    """All tensors of a model folder, validated, as lazily loaded MLX arrays."""
    weights: dict[str, mx.array] = {}
    for file in weight_files(path):
        read_header(file)
        try:
            weights.update(mx.load(str(file)))
        except Exception as e:  # mlx raises RuntimeError/ValueError with C++ messages
            raise WeightsError(f"{file}: cannot be loaded ({e}); download it again") from None
    return weights


def _quantization_predicate(quantization: dict[str, Any], weights: dict[str, mx.array]):
    def predicate(name: str, module: nn.Module) -> bool | dict[str, Any]:
        if name in quantization:  # per-layer entry written by mlx-lm style converters
            return quantization[name]
        return hasattr(module, "to_quantized") and f"{name}.scales" in weights

    return predicate


def apply_quantization(model: Model, quantization: dict[str, Any], weights: dict[str, mx.array]) -> None:
    """Swap in quantized layers for those the checkpoint stores quantized."""
    try:
        nn.quantize(
            model,
            group_size=quantization.get("group_size", 64),
            bits=quantization.get("bits", 4),
            mode=quantization.get("mode", "affine"),
            class_predicate=_quantization_predicate(quantization, weights),
        )
    except (ValueError, TypeError) as e:
        raise WeightsError(f"config.json: quantization {quantization} cannot be applied ({e})") from None


def load_model(path: Path, args: ModelArgs, dtype: mx.Dtype | None = None) -> Model:
    """Build a `Model` for `args` and fill it with the folder's weights, checking every tensor."""
    weights = load_safetensors(path)
    weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
    if args.tie_word_embeddings is None:
        args.tie_word_embeddings = "lm_head.weight" not in weights
    if args.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
        weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
    model = Model(args)
    if args.quantization is not None:
        apply_quantization(model, args.quantization, weights)
    expected = dict(tree_flatten(model.parameters()))
    for name, param in expected.items():
        if name not in weights:
            raise WeightsError(f"{path}: tensor {name!r} is missing from the weights")
        if tuple(weights[name].shape) != tuple(param.shape):
            raise WeightsError(
                f"{path}: tensor {name!r} has shape {tuple(weights[name].shape)}, config.json implies {tuple(param.shape)}"
            )
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise WeightsError(f"{path}: unexpected tensor {unexpected[0]!r} (does config.json match the weights?)")
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=True)
    try:
        mx.eval(model.parameters())
    except Exception as e:
        raise WeightsError(f"{path}: weights cannot be read ({e}); download them again") from None
    model.eval()
    return model
