"""nesso-mlx: run the Nesso-0.4B family (and other Llama models) with Apple's MLX.

from nesso_mlx import load, generate, stream_generate
model, tokenizer = load("mii-llm/nesso-0.4B-instruct")
print(generate(model, tokenizer, messages=[{"role": "user", "content": "Ciao!"}]).text)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Heavy modules (mlx, tokenizers) load on first use, so `import nesso_mlx` and the CLI start fast.
_EXPORTS = {
    "load": "loading",
    "generate": "api",
    "stream_generate": "api",
    "batch_generate": "api",
    "GenerationChunk": "reply",
    "GenerationResult": "reply",
    "Model": "model",
    "ModelArgs": "config",
    "KVCache": "cache",
    "make_cache": "cache",
    "save_cache": "cache",
    "load_cache": "cache",
    "trim_cache": "cache",
    "rollback_cache": "cache",
    "Tokenizer": "tokenizer",
    "make_sampler": "sampling",
    "SamplingOptions": "sampling",
    "NessoError": "errors",
}

if TYPE_CHECKING:
    from .api import batch_generate, generate, stream_generate
    from .cache import KVCache, load_cache, make_cache, rollback_cache, save_cache, trim_cache
    from .config import ModelArgs
    from .errors import NessoError
    from .loading import load
    from .model import Model
    from .reply import GenerationChunk, GenerationResult
    from .sampling import SamplingOptions, make_sampler
    from .tokenizer import Tokenizer


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'nesso_mlx' has no attribute {name!r}")


__all__ = [
    "GenerationChunk",
    "GenerationResult",
    "KVCache",
    "Model",
    "ModelArgs",
    "NessoError",
    "SamplingOptions",
    "Tokenizer",
    "batch_generate",
    "generate",
    "load",
    "load_cache",
    "make_cache",
    "make_sampler",
    "rollback_cache",
    "save_cache",
    "stream_generate",
    "trim_cache",
]
