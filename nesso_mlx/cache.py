"""Preallocated key/value cache, one per layer, with rollback and safetensors persistence."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx

from .errors import NessoError


class CacheRollbackError(NessoError, ValueError):
    """A bounded cache (`max_kv_size`) was asked to go back to a position whose attention window it
    has already dropped. `rollback_cache` empties the cache (offset 0) before raising it."""


def _arrays(buffer) -> tuple:
    """The arrays of a buffer: a plain array, a quantized (weights, scales, biases) tuple, or None."""
    if buffer is None:
        return ()
    return (buffer,) if isinstance(buffer, mx.array) else tuple(buffer)


class KVCache:
    """Key/value buffers of shape (batch, kv_heads, capacity, head_dim) written in place.

    Capacity grows in blocks of `step` positions, so appending a token is a slice update,
    not a concatenation. `offset` is the number of valid positions.
    """

    step = 256
    dropped = 0  # positions before the buffers' first slot (a bounded cache drops old ones)

    def __init__(self, capacity: int = 0) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0
        self._initial_capacity = capacity

    @property
    def capacity(self) -> int:
        # Both buffers: an interrupt between the two assignments in `_grow` must not be fatal.
        if self.keys is None or self.values is None:
            return 0
        return min(_arrays(self.keys)[0].shape[2], _arrays(self.values)[0].shape[2])

    def _grow(self, keys: mx.array, values: mx.array, needed: int, kept: int | None = None) -> None:
        """New buffers for `needed` positions (rounded up to `step`), with the first `kept`
        (default: `offset`) positions copied over."""
        kept = self.offset if kept is None else kept
        size = max(needed, self._initial_capacity)
        size = (size + self.step - 1) // self.step * self.step
        B, H, _, D = keys.shape
        new_keys = mx.zeros((B, H, size, D), dtype=keys.dtype)
        new_values = mx.zeros((B, H, size, values.shape[3]), dtype=values.dtype)
        if self.keys is not None and kept:
            new_keys[..., :kept, :] = self.keys[..., :kept, :]
            new_values[..., :kept, :] = self.values[..., :kept, :]
        self.keys, self.values = new_keys, new_values

    def _write(self, keys: mx.array, values: mx.array, start: int) -> tuple[mx.array, mx.array]:
        """Store `keys`/`values` at buffer slots [start, start + L); return slots [0, start + L).
        (For this class a slot is a position; a bounded cache maps positions to slots.)"""
        end = start + keys.shape[2]
        if self.keys is None or end > self.capacity:
            self._grow(keys, values, end, start)
        self.keys[..., start:end, :] = keys
        self.values[..., start:end, :] = values
        return self.keys[..., :end, :], self.values[..., :end, :]

    def _attention(self, queries: mx.array, keys, values, scale: float, mask) -> mx.array:
        """Attention over what `_write` returned; `mask` is None, "causal" or a boolean (L, slots) array."""
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the keys and values (the whole capacity, not only the valid positions)."""
        return sum(a.nbytes for a in _arrays(self.keys) + _arrays(self.values))

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Append `keys`/`values` (B, H, L, D) and return all valid positions (as `_write` stores them)."""
        fetched = self._write(keys, values, self.offset)
        self.offset += keys.shape[2]
        return fetched

    @property
    def rope_offset(self) -> int | mx.array:
        """The rotary position of the next key: `offset` (a batch cache gives one per row)."""
        return self.offset

    def attend(self, queries: mx.array, keys: mx.array, values: mx.array, scale: float) -> mx.array:
        """Append the new `keys`/`values` and attend `queries` (B, heads, L, D) over every valid
        position, causally among the new ones ("causal" aligns the last query with the last key,
        so chunked prefill works as is)."""
        keys, values = self.update_and_fetch(keys, values)
        return self._attention(queries, keys, values, scale, "causal" if queries.shape[2] > 1 else None)

    def trim(self, n: int) -> int:
        """Forget the last `n` positions; returns how many were removed."""
        n = max(0, min(n, self.offset))
        self.offset -= n
        return n

    @property
    def state(self) -> tuple:
        """The valid positions' arrays: (keys, values), or a quantized cache's six (see `QuantizedKVCache`)."""
        used = self.offset - self.dropped
        if self.keys is None or used == 0:
            return ()
        return tuple(a[..., :used, :] for a in _arrays(self.keys) + _arrays(self.values))

    def set_state(self, keys: mx.array, values: mx.array) -> None:
        self.keys, self.values, self.offset = None, None, 0
        self.update_and_fetch(keys, values)


def quantized_attention(
    queries: mx.array, keys: tuple, values: tuple, scale: float, mask, group_size: int, bits: int
) -> mx.array:
    """Scaled dot-product attention over quantized keys and values (`mx.quantize` triples).

    `queries` (B, heads, L, D); keys/values (B, kv_heads, N, ...). Grouped-query attention without
    repeating the keys: the queries are viewed as (B, kv_heads, heads // kv_heads, L, D). `mask` is
    None, "causal" (the last query aligned with the last key) or a boolean array broadcastable to
    (L, N). Scores and softmax are computed in float32.
    """
    B, heads, L, D = queries.shape
    kv_heads = keys[0].shape[1]
    q = (queries * scale).reshape(B, kv_heads, heads // kv_heads, L, D)
    keys = tuple(mx.expand_dims(a, 2) for a in keys)
    values = tuple(mx.expand_dims(a, 2) for a in values)
    scores = mx.quantized_matmul(q, *keys, transpose=True, group_size=group_size, bits=bits).astype(mx.float32)
    if isinstance(mask, str):
        N = scores.shape[-1]
        mask = mx.arange(N - L, N)[:, None] >= mx.arange(N)[None]
    if mask is not None:
        scores = mx.where(mask, scores, -mx.inf)
    weights = mx.softmax(scores, axis=-1).astype(queries.dtype)
    out = mx.quantized_matmul(weights, *values, transpose=False, group_size=group_size, bits=bits)
    return out.reshape(B, heads, L, -1)


class QuantizedKVCache(KVCache):
    """A `KVCache` whose keys and values are stored quantized (`mx.quantize`, 4 or 8 bits per value
    plus a scale and a bias per group of `group_size` values, in the model's dtype).

    Each buffer is a (weights, scales, biases) triple, preallocated in blocks of `step` positions.
    New keys and values are quantized as they are written; attention runs on the quantized buffers
    with `mx.quantized_matmul` (see `quantized_attention`). `offset`, `trim` and rollback work as
    for `KVCache`. `state` gives the six quantized arrays; `set_state(keys, values)` takes
    full-precision keys and values (a `KVCache`'s state) and quantizes them, or the six arrays.
    """

    def __init__(self, capacity: int = 0, bits: int = 8, group_size: int | None = None) -> None:
        if bits not in (4, 8):
            raise ValueError(f"kv_bits must be 4 or 8, got {bits}")
        super().__init__(capacity)
        self.bits, self.group_size = bits, group_size

    def _group_size(self, dims: int) -> int:
        if self.group_size is None:  # 64 (mlx-lm's) when the head dimension allows it
            self.group_size = 64 if dims % 64 == 0 else 32
        if dims % self.group_size:
            raise ValueError(f"kv_bits needs a head dimension divisible by 32, got {dims}")
        return self.group_size

    def _grow(self, keys: mx.array, values: mx.array, needed: int, kept: int | None = None) -> None:
        kept = self.offset if kept is None else kept
        size = max(needed, self._initial_capacity)
        size = (size + self.step - 1) // self.step * self.step
        per_word = 32 // self.bits

        def allocate(x: mx.array, old) -> tuple:
            B, H, _, D = x.shape
            group = self._group_size(D)
            new = (
                mx.zeros((B, H, size, D // per_word), dtype=mx.uint32),
                mx.zeros((B, H, size, D // group), dtype=x.dtype),
                mx.zeros((B, H, size, D // group), dtype=x.dtype),
            )
            if old is not None and kept:
                for a, b in zip(new, old, strict=True):
                    a[..., :kept, :] = b[..., :kept, :]
            return new

        self.keys, self.values = allocate(keys, self.keys), allocate(values, self.values)

    def _write(self, keys: mx.array, values: mx.array, start: int) -> tuple[tuple, tuple]:
        end = start + keys.shape[2]
        if self.keys is None or end > self.capacity:
            self._grow(keys, values, end, start)
        for buffer, new in ((self.keys, keys), (self.values, values)):
            quantized = mx.quantize(new, group_size=self._group_size(new.shape[-1]), bits=self.bits)
            for a, q in zip(buffer, quantized, strict=True):
                a[..., start:end, :] = q
        return tuple(a[..., :end, :] for a in self.keys), tuple(a[..., :end, :] for a in self.values)

    def _attention(self, queries: mx.array, keys, values, scale: float, mask) -> mx.array:
        return quantized_attention(queries, keys, values, scale, mask, self.group_size, self.bits)

    def set_state(self, *arrays: mx.array) -> None:
        self.keys, self.values, self.offset = None, None, 0
        if len(arrays) == 2:
            self.update_and_fetch(*arrays)
        elif len(arrays) == 6:
            self.keys, self.values = tuple(arrays[:3]), tuple(arrays[3:])
            self.offset = arrays[0].shape[2]
        else:
            raise ValueError("set_state takes (keys, values) in full precision, or the six arrays of `state`")


class _Bounded:
    """A bounded window (`max_kv_size`) over a cache's storage: attention sinks plus the most recent
    positions, as mlx-lm's RotatingKVCache.

    Each query attends to the first `keep` positions of the sequence and to the most recent
    `max_size - keep` positions up to itself, so at most `max_size` positions in all, however long
    the sequence grows. Positions stay in order in the buffers (no ring): when the buffers would
    exceed `max_size + slack` positions, the positions before the window are dropped in one copy
    (`dropped` counts them), except `reserve` of them, so that the decode loop (which runs a step
    ahead, and verifies drafts of prompt lookup) can still roll back a little. Memory is therefore
    bounded by about `max_size + slack` positions (plus one prefill chunk while prefilling).

    `offset` stays the absolute position (the rotary position of the next token). Going back to a
    position whose window was dropped is impossible: `min_offset` is the lowest position it can go
    back to, and `rollback_cache` below it empties the cache and raises `CacheRollbackError`.
    """

    keep = 4  # attention sinks
    reserve = 64  # positions kept before the window, for rollbacks
    slack = 256  # growth between two compactions

    def __init__(self, max_size: int, *args, **kwargs) -> None:
        if max_size <= 2 * self.keep:
            raise ValueError(f"max_kv_size must be more than {2 * self.keep}, got {max_size}")
        self.max_size, self.dropped, self._offset = max_size, 0, 0
        super().__init__(*args, **kwargs)
        self._initial_capacity = min(self._initial_capacity, max_size + self.slack)

    @property
    def offset(self) -> int:
        return self._offset

    @offset.setter
    def offset(self, value: int) -> None:
        if value < self._offset and value < self.min_offset:
            raise CacheRollbackError(
                f"the bounded KV cache (max_kv_size={self.max_size}) cannot go back to position {value}: "
                f"it dropped what that position attends to (it can go back to {self.min_offset})"
            )
        self._offset = value

    @property
    def min_offset(self) -> int:
        """The lowest position this cache can roll back to (0 until it has dropped positions)."""
        return self.dropped + self.max_size - 1 if self.dropped else 0

    def clear(self) -> None:
        """Forget everything (offset 0); the buffers are kept for reuse."""
        self.dropped, self._offset = 0, 0

    def trim(self, n: int) -> int:
        n = max(0, min(n, self._offset - self.min_offset))
        self._offset -= n
        return n

    def _compact(self) -> None:
        used = self._offset - self.dropped
        excess = used - (self.max_size - 1 + self.reserve)
        if excess <= 0:
            return
        keep = self.keep

        def move(buffer):
            moved = tuple(
                mx.concatenate([a[..., :keep, :], a[..., keep + excess :, :], a[..., keep : keep + excess, :]], axis=2)
                for a in _arrays(buffer)
            )
            return moved[0] if isinstance(buffer, mx.array) else moved

        keys, values = move(self.keys), move(self.values)
        # One statement of plain attribute stores: no interrupt can fall between them.
        self.keys, self.values, self.dropped = keys, values, self.dropped + excess

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        if self._offset - self.dropped + keys.shape[2] > self.max_size + self.slack:
            self._compact()
        fetched = self._write(keys, values, self._offset - self.dropped)
        self._offset += keys.shape[2]
        return fetched

    def _mask(self, length: int):
        end = self._offset
        if not self.dropped and end <= self.max_size:
            return "causal" if length > 1 else None
        slots = mx.arange(end - self.dropped)
        positions = mx.where(slots < self.keep, slots, slots + self.dropped)[None]
        queries = mx.arange(end - length, end)[:, None]
        return (positions <= queries) & ((positions < self.keep) | (positions > queries - (self.max_size - self.keep)))

    def attend(self, queries: mx.array, keys: mx.array, values: mx.array, scale: float) -> mx.array:
        keys, values = self.update_and_fetch(keys, values)
        return self._attention(queries, keys, values, scale, self._mask(queries.shape[2]))

    def set_state(self, keys: mx.array, values: mx.array) -> None:
        """Start from full-precision `keys`/`values` (positions 0..L-1; dropped as they would be)."""
        self.keys, self.values, self.dropped, self._offset = None, None, 0, 0
        self.update_and_fetch(keys, values)


class BoundedKVCache(_Bounded, KVCache):
    """`KVCache` with a bounded window (see `_Bounded`): `BoundedKVCache(max_size, capacity=0)`."""


class BoundedQuantizedKVCache(_Bounded, QuantizedKVCache):
    """`QuantizedKVCache` with a bounded window: `BoundedQuantizedKVCache(max_size, capacity, bits)`."""


def make_cache(
    num_layers: int, capacity: int = 0, *, kv_bits: int | None = None, max_kv_size: int | None = None
) -> list[KVCache]:
    """One cache per layer, optionally preallocated for `capacity` positions: a `KVCache`, or with
    `kv_bits` (4 or 8) a `QuantizedKVCache`, and with `max_kv_size` a bounded one (attention sinks
    and a sliding window; see `BoundedKVCache`)."""
    if kv_bits is not None and kv_bits not in (4, 8):
        raise ValueError(f"kv_bits must be 4 or 8, got {kv_bits}")
    if max_kv_size is not None and max_kv_size <= 2 * _Bounded.keep:
        raise ValueError(f"max_kv_size must be more than {2 * _Bounded.keep}, got {max_kv_size}")
    if max_kv_size is not None:
        if kv_bits is not None:
            return [BoundedQuantizedKVCache(max_kv_size, capacity, kv_bits) for _ in range(num_layers)]
        return [BoundedKVCache(max_kv_size, capacity) for _ in range(num_layers)]
    if kv_bits is not None:
        return [QuantizedKVCache(capacity, kv_bits) for _ in range(num_layers)]
    return [KVCache(capacity) for _ in range(num_layers)]


def trim_cache(cache: list[KVCache], n: int) -> int:
    """Roll every layer back by `n` positions (a bounded cache only as far as it can: see
    `min_offset`); returns how many were removed."""
    return min((c.trim(n) for c in cache), default=0)


def rollback_cache(cache: list[KVCache], offset: int) -> None:
    """Set every layer to hold exactly its first `offset` positions.

    An interrupted forward pass can leave layers at different offsets (the first layers appended
    the new keys, the rest did not), so rollbacks name an absolute position, never a count
    read off one layer.

    A bounded cache (`max_kv_size`) that has dropped what position `offset` attends to cannot go
    back there: then every layer is emptied (offset 0, always consistent) and `CacheRollbackError`
    is raised; the caller prefills again from the start.
    """
    for layer in cache:
        if layer.offset < offset:
            raise ValueError(f"cannot roll a cache layer forward (it holds {layer.offset} positions, asked for {offset})")
    lowest = max((getattr(layer, "min_offset", 0) for layer in cache), default=0)
    if offset < lowest:
        for layer in cache:
            if hasattr(layer, "clear"):
                layer.clear()
            else:
                layer.offset = 0
        if offset:
            raise CacheRollbackError(
                f"the bounded KV cache (--max-kv-size) cannot go back to position {offset}: it dropped what that "
                f"position attends to (it could go back to {lowest}); it was emptied, prefill again"
            )
        return
    for layer in cache:
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
    for layer in cache:
        if isinstance(layer, QuantizedKVCache):
            raise NessoError(
                f"{path}: a quantized KV cache (kv_bits={layer.bits}) is not saved; save a full-precision one "
                "(model.make_cache()) and load it with load_cache(path, model, kv_bits=...)"
            )
        if getattr(layer, "dropped", 0):
            raise NessoError(
                f"{path}: this bounded KV cache (max_kv_size={layer.max_size}) has dropped positions, so it no longer "
                "holds the token prefix a cache file must hold; save a cache that has not (or a full one)"
            )
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


def load_cache(path: str | Path, model=None, *, kv_bits: int | None = None, max_kv_size: int | None = None) -> LoadedCache:
    """Read a cache written by `save_cache`: `cache, metadata = load_cache(path, model)`.

    Files hold full-precision keys and values; `kv_bits` and `max_kv_size` load them into a
    quantized and/or bounded cache (as `make_cache` makes).

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
    cache = make_cache(num_layers, kv_bits=kv_bits, max_kv_size=max_kv_size)
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


__all__ = [
    "KVCache",
    "QuantizedKVCache",
    "BoundedKVCache",
    "BoundedQuantizedKVCache",
    "CacheRollbackError",
    "make_cache",
    "quantized_attention",
    "rollback_cache",
    "trim_cache",
    "save_cache",
    "load_cache",
    "common_prefix",
]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common prefix of two token sequences: how many of a cache's
    positions a new prompt can keep (the server's prompt cache, the lm-eval backend)."""
    import numpy as np

    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n
