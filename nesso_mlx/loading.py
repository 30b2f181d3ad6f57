"""`load()`: model folder or repo id -> (Model, Tokenizer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx

from .config import load_config
from .hub import resolve_model_path
from .model import Model
from .tokenizer import Tokenizer
from .weights import load_model

_DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


def load(
    path_or_repo: str | Path,
    *,
    dtype: str | mx.Dtype | None = None,
    revision: str | None = None,
    quantize: int | None = None,
    tqdm_class: Any = None,
) -> tuple[Model, Tokenizer]:
    """Load a Llama model and its tokenizer from a local folder or a Hugging Face repo id.

    Weights keep their stored precision unless `dtype` ("bfloat16", "float16", "float32") is
    given; quantized MLX checkpoints (as written by mlx-lm or nesso-mlx) load as they are, except
    that on the CPU their scales and activations default to float32. `quantize` (4 or 8)
    quantizes float weights on load, in groups of 64.
    """
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        dtype = _DTYPES[dtype]
    path = resolve_model_path(path_or_repo, revision=revision, tqdm_class=tqdm_class)
    args = load_config(path)
    if quantize is not None and args.quantization is not None:
        quantize = None  # already quantized: use it as it is
    if dtype is None and (args.quantization or quantize) and mx.default_device() == mx.cpu:
        # MLX's CPU backend runs quantized matmuls with bf16 activations about 10x slower and
        # with ~3% error (an 8-bit SmolLM2 stops answering "Paris"); float32 is fast and exact.
        dtype = mx.float32
    model = load_model(path, args, dtype)
    if quantize is not None:
        from .quantize import quantize_model

        args.quantization = quantize_model(model, bits=quantize, group_size=64)
    tokenizer = Tokenizer.from_folder(path, eos_token_ids=args.eos_token_id)
    model.path = path  # where it came from, for the CLI and converters
    return model, tokenizer
