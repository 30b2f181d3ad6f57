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


def save_cache(path: str | Path, cache: list[KVCache], metadata: dict[str, str] | None = None) -> None:
    """Write the valid part of a cache to a .safetensors file, atomically."""
    path = Path(path)
    arrays: dict[str, mx.array] = {}
    for i, layer in enumerate(cache):
        if layer.state:
            arrays[f"layers.{i}.keys"], arrays[f"layers.{i}.values"] = layer.state
    meta = {"nesso_mlx.num_layers": str(len(cache)), "nesso_mlx.offset": str(cache[0].offset)}
    meta.update({f"user.{k}": str(v) for k, v in (metadata or {}).items()})
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.safetensors")
    try:
        mx.save_safetensors(str(tmp), arrays, metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_cache(path: str | Path) -> tuple[list[KVCache], dict[str, str]]:
    """Read a cache written by `save_cache`; returns the cache and the user metadata."""
    path = Path(path)
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
        num_layers = int(meta["nesso_mlx.num_layers"])
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise NessoError(f"{path}: not a nesso-mlx cache file ({e})") from None
    cache = make_cache(num_layers)
    for i, layer in enumerate(cache):
        if f"layers.{i}.keys" in arrays:
            layer.set_state(arrays[f"layers.{i}.keys"], arrays[f"layers.{i}.values"])
    user = {k[len("user.") :]: v for k, v in meta.items() if k.startswith("user.")}
    return cache, user


__all__ = ["KVCache", "make_cache", "rollback_cache", "trim_cache", "save_cache", "load_cache"]
