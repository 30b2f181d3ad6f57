"""Preallocated key/value cache, one per layer, with rollback and safetensors persistence."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx

from .errors import NessoError


class KVCache:
    """Key/value buffers of shape (batch, kv_heads, capacity, head_dim) written in place.

    Capacity grows in blocks of `step` positions, so appending a token is a slice update,
    not a concatenation. `offset` is the number of valid positions.
    """

    step = 256

    def __init__(self, capacity: int = 0) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0
        self._initial_capacity = capacity

    @property
    def capacity(self) -> int:
        # Both buffers: an interrupt between the two assignments in `_grow` must not be fatal.
        return 0 if self.keys is None or self.values is None else min(self.keys.shape[2], self.values.shape[2])

    def _grow(self, keys: mx.array, values: mx.array, needed: int) -> None:
        size = max(needed, self._initial_capacity)
        size = (size + self.step - 1) // self.step * self.step
        B, H, _, D = keys.shape
        new_keys = mx.zeros((B, H, size, D), dtype=keys.dtype)
        new_values = mx.zeros((B, H, size, values.shape[3]), dtype=values.dtype)
        if self.keys is not None and self.offset:
            new_keys[..., : self.offset, :] = self.keys[..., : self.offset, :]
            new_values[..., : self.offset, :] = self.values[..., : self.offset, :]
        self.keys, self.values = new_keys, new_values

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append `keys`/`values` (B, H, L, D) and return all valid positions."""
        start, end = self.offset, self.offset + keys.shape[2]
        if self.keys is None or end > self.capacity:
            self._grow(keys, values, end)
        self.keys[..., start:end, :] = keys
        self.values[..., start:end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    @property
    def rope_offset(self) -> int | mx.array:
        """The rotary position of the next key: `offset` (a batch cache gives one per row)."""
        return self.offset

    def attend(self, queries: mx.array, keys: mx.array, values: mx.array, scale: float) -> mx.array:
        """Append the new `keys`/`values` and attend `queries` (B, heads, L, D) over every valid
        position, causally among the new ones ("causal" aligns the last query with the last key,
        so chunked prefill works as is)."""
        keys, values = self.update_and_fetch(keys, values)
        mask = "causal" if queries.shape[2] > 1 else None
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)

    def trim(self, n: int) -> int:
        """Forget the last `n` positions; returns how many were removed."""
        n = max(0, min(n, self.offset))
        self.offset -= n
        return n

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[()]:
        if self.keys is None or self.offset == 0:
            return ()
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def set_state(self, keys: mx.array, values: mx.array) -> None:
        self.keys, self.values, self.offset = None, None, 0
        self.update_and_fetch(keys, values)


def make_cache(num_layers: int, capacity: int = 0) -> list[KVCache]:
    """One `KVCache` per layer, optionally preallocated for `capacity` positions."""
    return [KVCache(capacity) for _ in range(num_layers)]


def trim_cache(cache: list[KVCache], n: int) -> int:
    """Roll every layer back by `n` positions."""
    return min((c.trim(n) for c in cache), default=0)


def rollback_cache(cache: list[KVCache], offset: int) -> None:
    """Set every layer to hold exactly its first `offset` positions.

    An interrupted forward pass can leave layers at different offsets (the first layers appended
    the new keys, the rest did not), so rollbacks name an absolute position, never a count
    read off one layer.
    """
    for layer in cache:
        if layer.offset < offset:
            raise ValueError(f"cannot roll a cache layer forward (it holds {layer.offset} positions, asked for {offset})")
        layer.offset = offset


_IDENTITY_SKIP = {"eos_token_id", "bos_token_id", "max_position_embeddings"}  # do not change keys/values


def model_identity(model) -> str:
    """A short fingerprint of what a model's keys and values depend on; cheap and stable.

    It hashes the architecture (`model.args`, less the fields that do not change the keys and
    values), every weight's name, shape and dtype, and 16 evenly spaced values of each weight, so
    two fine-tunes of one architecture differ, as do two precisions of one model. No full hash
    of the weights: a few milliseconds for a 0.4B model.
    """
    import dataclasses
    import hashlib
    import json

    import numpy as np
    from mlx.utils import tree_flatten

    args = {k: v for k, v in dataclasses.asdict(model.args).items() if k not in _IDENTITY_SKIP}
    digest = hashlib.sha256(json.dumps(args, sort_keys=True, default=str).encode())
    params = sorted(tree_flatten(model.parameters()), key=lambda item: item[0])
    samples = [p.reshape(-1)[:: max(1, p.size // 16)][:16] for _, p in params]
    mx.eval(samples)
    for (name, p), sample in zip(params, samples, strict=True):
        digest.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
        digest.update(np.array(sample.view(mx.uint8)).tobytes())
    return digest.hexdigest()[:32]


class LoadedCache(tuple):
    """What `load_cache` returns: unpacks as `(cache, metadata)`, and also has `.tokens`
    (the token ids whose keys and values the cache holds, or None if they were not saved) and
    `.model_identity` (the `model_identity` of the model that made it, or None)."""

    cache: list[KVCache]
    metadata: dict[str, str]
    tokens: list[int] | None
    model_identity: str | None

    def __new__(cls, cache, metadata, tokens=None, identity=None):
        loaded = super().__new__(cls, (cache, metadata))
        loaded.cache, loaded.metadata, loaded.tokens, loaded.model_identity = cache, metadata, tokens, identity
        return loaded


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory
        pass
    finally:
        os.close(fd)


def save_cache(
    path: str | Path,
    cache: list[KVCache],
    metadata: dict[str, str] | None = None,
    *,
    model=None,
    tokens=None,
) -> None:
    """Write the valid part of a cache to a .safetensors file, atomically (temp file, fsync, rename).

    Pass the `model` that filled the cache, so that `load_cache` can refuse it for another model,
    and the `tokens` (ids) it holds, so that a conversation can go on from it.
    """
    path = Path(path)
    offsets = {layer.offset for layer in cache}
    if len(offsets) != 1:
        raise ValueError(f"the cache layers hold different numbers of positions ({sorted(offsets)}); roll it back first")
    offset = offsets.pop()
    arrays: dict[str, mx.array] = {}
    for i, layer in enumerate(cache):
        if layer.state:
            arrays[f"layers.{i}.keys"], arrays[f"layers.{i}.values"] = layer.state
    meta = {"nesso_mlx.num_layers": str(len(cache)), "nesso_mlx.offset": str(offset)}
    if model is not None:
        if len(cache) != model.args.num_hidden_layers:
            raise ValueError(f"the cache has {len(cache)} layers but the model has {model.args.num_hidden_layers}")
        meta["nesso_mlx.model"] = model_identity(model)
    if tokens is not None:
        tokens = [int(t) for t in tokens]
        if len(tokens) != offset:
            raise ValueError(f"{len(tokens)} tokens given for a cache that holds {offset} positions")
        arrays["nesso_mlx.tokens"] = mx.array(tokens, dtype=mx.int32)
    meta.update({f"user.{k}": str(v) for k, v in (metadata or {}).items()})
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.safetensors")
    try:
        mx.save_safetensors(str(tmp), arrays, metadata=meta)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except (OSError, RuntimeError) as e:
        raise NessoError(f"{path}: cannot write the cache ({getattr(e, 'strerror', None) or e})") from None
    finally:
        tmp.unlink(missing_ok=True)


def load_cache(path: str | Path, model=None) -> LoadedCache:
    """Read a cache written by `save_cache`: `cache, metadata = load_cache(path, model)`.

    The result also has `.tokens` (the ids the cache holds, when they were saved). With a
    `model`, a cache whose layer count or key/value shapes do not fit it, or that another model
    made (its `model_identity` differs), is refused with a NessoError naming the file. (Files
    saved without a model carry no identity; only their shapes can be checked.)
    """
    path = Path(path)
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
        num_layers, offset = int(meta["nesso_mlx.num_layers"]), int(meta["nesso_mlx.offset"])
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise NessoError(f"{path}: not a nesso-mlx cache file ({e})") from None
    identity = meta.get("nesso_mlx.model")
    tokens = arrays.pop("nesso_mlx.tokens", None)
    tokens = None if tokens is None else tokens.tolist()
    if tokens is not None and len(tokens) != offset:
        raise NessoError(f"{path}: corrupt cache file ({len(tokens)} token ids for {offset} positions)")
    if model is not None:
        args = model.args
        if num_layers != args.num_hidden_layers:
            raise NessoError(
                f"{path}: the cache has {num_layers} layers but the model has {args.num_hidden_layers}; "
                "it was saved by another model"
            )
        if identity is not None and identity != model_identity(model):
            raise NessoError(f"{path}: the cache was saved by another model (or another precision of it); it cannot be reused")
        if offset >= args.max_position_embeddings:
            raise NessoError(f"{path}: the cache holds {offset} positions, beyond the model's {args.max_position_embeddings}")
        if tokens is not None and tokens and not 0 <= min(tokens) <= max(tokens) < args.vocab_size:
            raise NessoError(f"{path}: the cache's token ids do not fit the model's {args.vocab_size} embedding rows")
    cache = make_cache(num_layers)
    for i, layer in enumerate(cache):
        keys, values = arrays.pop(f"layers.{i}.keys", None), arrays.pop(f"layers.{i}.values", None)
        if keys is None and values is None and offset == 0:
            continue
        if keys is None or values is None or keys.ndim != 4 or values.ndim != 4:
            raise NessoError(f"{path}: corrupt cache file (layer {i} lacks its keys or values)")
        if keys.shape[2] != offset or values.shape[2] != offset or keys.shape[:2] != values.shape[:2]:
            raise NessoError(f"{path}: corrupt cache file (layer {i} holds {keys.shape[2]} positions, not {offset})")
        if model is not None:
            expected = (model.args.num_key_value_heads, model.args.head_dim)
            if (keys.shape[1], keys.shape[3]) != expected or (values.shape[1], values.shape[3]) != expected:
                raise NessoError(
                    f"{path}: layer {i} has keys of shape {tuple(keys.shape)}, but the model's are "
                    f"(batch, {expected[0]}, positions, {expected[1]}); it was saved by another model"
                )
        layer.set_state(keys, values)
    if arrays:
        raise NessoError(f"{path}: not a nesso-mlx cache file (unexpected tensor {sorted(arrays)[0]!r})")
    user = {k[len("user.") :]: v for k, v in meta.items() if k.startswith("user.")}
    return LoadedCache(cache, user, tokens, identity)


__all__ = ["KVCache", "make_cache", "rollback_cache", "trim_cache", "save_cache", "load_cache"]
