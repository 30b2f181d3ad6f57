"""The left-padded batch KV cache that the decoder (`generation.Decoder`) steps several rows in.

A 0.4B model's decode step is bound by reading the weights and launching kernels, not by
arithmetic, so B sequences stepped together cost little more than one. A `BatchKVCache` is
left-padded: every row ends at the same physical position, row b's keys start at `starts[b]`, and
attention masks the padding. Rotary positions are per row (`mx.fast.rope` takes an offset per
row), so each row sees exactly the positions it would see alone. Rows join (`merge_caches`,
`extend_caches`) and leave (`select_rows`, `row_cache`) between steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from .cache import KVCache
from .errors import NessoError


class BatchKVCache(KVCache):
    """One layer's keys and values for a batch of rows, left-padded to a common end.

    `starts[b]` is where row b's keys begin; positions before it are padding, masked out. All the
    layers of a batch share one `BatchRows` (the starts, the per-row rotary offsets and the mask).
    """

    def __init__(self, rows: BatchRows) -> None:
        super().__init__()
        self.rows = rows

    @property
    def rope_offset(self) -> int | mx.array:
        return self.rows.rope_offset(self.offset)

    def attend(self, queries: mx.array, keys: mx.array, values: mx.array, scale: float) -> mx.array:
        keys, values = self.update_and_fetch(keys, values)
        mask = self.rows.mask(queries.shape[2], self.offset)
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)


class BatchRows:
    """The rows' start positions, and what follows from them for the current step (built once for
    all the layers): each row's rotary offset and the attention mask."""

    def __init__(self, starts: Sequence[int]) -> None:
        self.set(starts)

    def set(self, starts: Sequence[int]) -> None:
        self.start_list = [int(s) for s in starts]
        self.starts = mx.array(self.start_list, dtype=mx.int32)
        self._mask: tuple[int, int, mx.array | str | None] | None = None
        self._rope: tuple[int, int | mx.array] | None = None

    def rope_offset(self, offset: int) -> int | mx.array:
        """Each row's rotary position at physical position `offset` (an int when no row is padded)."""
        if self._rope is None or self._rope[0] != offset:
            self._rope = (offset, offset - self.starts if any(self.start_list) else offset)
        return self._rope[1]

    def mask(self, length: int, end: int) -> mx.array | str | None:
        """Boolean (B, 1, length, end) mask: causal among the new positions, padding hidden."""
        if self._mask is not None and self._mask[:2] == (length, end):
            return self._mask[2]
        if not any(self.start_list):
            mask: mx.array | str | None = "causal" if length > 1 else None
        else:
            keys = mx.arange(end)
            queries = mx.arange(end - length, end)
            mask = (keys[None, None, None, :] >= self.starts[:, None, None, None]) & (
                keys[None, None, None, :] <= queries[None, None, :, None]
            )
        self._mask = (length, end, mask)
        return mask


def _pad(x: mx.array, left: int, right: int = 0) -> mx.array:
    """`x` (B, H, N, D) with `left` and `right` zero positions added."""
    return mx.pad(x, [(0, 0), (0, 0), (left, right), (0, 0)]) if left or right else x


def _room(end: int) -> int:
    """Spare positions after `end`, up to the next whole block (at least one), so the next
    steps write in place instead of regrowing."""
    return (end // KVCache.step + 1) * KVCache.step - end


def _assign(layers: Sequence[BatchKVCache], arrays: Sequence[tuple[mx.array, mx.array]], end: int) -> None:
    """Give every layer its new buffers (holding `end` valid positions, then spare room). The arrays
    are all built before any layer changes, so a failure while building leaves the batch as it was."""
    for layer, (keys, values) in zip(layers, arrays, strict=True):
        layer.keys, layer.values, layer.offset = keys, values, end


def _plain_state(layer: KVCache) -> tuple[mx.array, mx.array]:
    if type(layer) is not KVCache and not isinstance(layer, BatchKVCache):
        raise NessoError(
            f"batched decoding takes full-precision, unbounded caches ({type(layer).__name__} given); "
            "decode quantized or bounded caches one sequence at a time"
        )
    if not layer.state:
        raise ValueError("a sequence must hold at least one position before it joins a batch")
    return layer.state


def merge_caches(caches: Sequence[Sequence[KVCache]]) -> list[BatchKVCache]:
    """A batch cache whose rows are the given single-sequence caches (each of batch 1)."""
    end = max(c[0].offset for c in caches)
    rows = BatchRows([end - c[0].offset for c in caches])
    arrays = []
    for i in range(len(caches[0])):
        states = [_plain_state(cache[i]) for cache in caches]
        keys = mx.concatenate([_pad(k, start, _room(end)) for (k, _), start in zip(states, rows.start_list, strict=True)])
        values = mx.concatenate([_pad(v, start, _room(end)) for (_, v), start in zip(states, rows.start_list, strict=True)])
        arrays.append((keys, values))
    layers = [BatchKVCache(rows) for _ in arrays]
    _assign(layers, arrays, end)
    return layers


def extend_caches(batch: list[BatchKVCache], other: list[BatchKVCache]) -> None:
    """Append `other`'s rows to `batch` (in place), padding whichever is shorter on the left."""
    a, b = batch[0].offset, other[0].offset
    end = max(a, b)
    arrays = []
    for mine, theirs in zip(batch, other, strict=True):
        (k1, v1), (k2, v2) = mine.state, theirs.state
        keys = mx.concatenate([_pad(k1, end - a, _room(end)), _pad(k2, end - b, _room(end))])
        values = mx.concatenate([_pad(v1, end - a, _room(end)), _pad(v2, end - b, _room(end))])
        arrays.append((keys, values))
    starts = [s + end - a for s in batch[0].rows.start_list] + [s + end - b for s in other[0].rows.start_list]
    _assign(batch, arrays, end)
    batch[0].rows.set(starts)


def select_rows(batch: list[BatchKVCache], keep: Sequence[int]) -> None:
    """Keep only the rows `keep` (in place), and drop the padding every remaining row has."""
    rows = batch[0].rows
    starts = [rows.start_list[i] for i in keep]
    cut = min(starts, default=0)
    index = mx.array(list(keep), dtype=mx.int32)
    end = batch[0].offset - cut
    arrays = []
    for layer in batch:
        keys, values = layer.state
        arrays.append((_pad(keys[index, :, cut:, :], 0, _room(end)), _pad(values[index, :, cut:, :], 0, _room(end))))
    _assign(batch, arrays, end)
    rows.set([s - cut for s in starts])


def row_cache(batch: Sequence[BatchKVCache], row: int, copy: bool = False) -> list[KVCache]:
    """Row `row` of a batch cache as a single-sequence cache: views of the batch's buffers, or with
    `copy` arrays of its own (to keep after the batch goes on: a view keeps the whole buffer alive;
    the copies are queued, not waited for)."""
    start = batch[0].rows.start_list[row]
    out = []
    for layer in batch:
        single = KVCache()
        keys, values = layer.state
        single.keys, single.values = keys[row : row + 1, :, start:, :], values[row : row + 1, :, start:, :]
        if copy:
            single.keys, single.values = mx.contiguous(single.keys), mx.contiguous(single.values)
        single.offset = layer.offset - start
        out.append(single)
    if copy:
        mx.async_eval([(layer.keys, layer.values) for layer in out])
    return out
