"""Batched decoding: the decode steps of several sequences in one forward pass.

A 0.4B model's decode step is bound by reading the weights and launching kernels, not by
arithmetic, so B sequences stepped together cost little more than one. `BatchDecoder` is
continuous batching: sequences join (with their prefilled cache) and leave (when finished)
between steps. Each keeps its own sampler, logits processors and grammar constraint.

The batch's KV cache (`BatchKVCache`) is left-padded: every row ends at the same physical
position, row b's keys start at `starts[b]`, and attention masks the padding. Rotary positions are
per row (`mx.fast.rope` takes an offset per row), so each row sees exactly the positions it would
see alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from .cache import KVCache
from .errors import NessoError
from .generation import (
    CLEAR_CACHE_EVERY,
    GenerationChunk,
    GenerationResult,
    generation_stream,
    prefill,
    prepare_decoding,
    prompt_tokens,
    verify_draft,
)
from .sampling import LogitsProcessor, Sampler, greedy, log_softmax, reads_history


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
    if not left and not right:
        return x
    B, H, _, D = x.shape
    parts = [mx.zeros((B, H, left, D), dtype=x.dtype)] if left else []
    parts.append(x)
    if right:
        parts.append(mx.zeros((B, H, right, D), dtype=x.dtype))
    return mx.concatenate(parts, axis=2)


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


@dataclass(eq=False)  # rows are told apart by identity: two greedy rows may hold equal fields
class BatchSequence:
    """One row of a `BatchDecoder`: how its next token is chosen, and its history."""

    sampler: Sampler
    processors: Sequence[LogitsProcessor] = ()
    history: mx.array | None = None  # prompt and generated ids, for the processors
    constraint: Any = None  # a `generation.TokenConstraint`
    top_logprobs: int | None = None
    lookup: Any = None  # a `speculative.PromptLookup`: prompt-lookup decoding while the row is alone
    data: Any = None  # the caller's own state


@dataclass(eq=False)
class BatchToken:
    """A token `BatchDecoder.step` produced for a sequence, with its log-probabilities if asked;
    or the `error` that sequence's processors, sampler or grammar raised (then `token` is -1 and
    the sequence must be removed: the other sequences are not affected)."""

    sequence: BatchSequence
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    error: Exception | None = None


class BatchDecoder:
    """Continuous batching: `add` a prefilled sequence, `step` all of them, `remove` finished ones.

    Each `step` samples every sequence's next token from the logits it holds, queues the forward
    pass of those tokens (one pass for the whole batch) and returns the tokens while the pass
    runs. A sequence's grammar constraint is advanced before its next token is sampled, so masks
    always see the latest token. The cache of each sequence runs one token ahead of what `step`
    returned (the queued pass), as in `generation.decode`. A sequence with a `lookup` that is
    alone in the batch may get several tokens from one step (prompt-lookup decoding); callers
    take the tokens in order and ignore those after the sequence's reply has ended.

    An error in one sequence's processors, sampler or grammar while it is sampled comes back as
    that sequence's `BatchToken.error`. An exception that escapes `step` (an interrupt, a failed
    evaluation, an error inside a verify pass) leaves the decoder in an undefined state: discard it.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.sequences: list[BatchSequence] = []
        self.cache: list[BatchKVCache] | None = None
        self._logits: mx.array | None = None  # (B, vocab), row i for sequences[i]
        self.steps = 0

    def __len__(self) -> int:
        return len(self.sequences)

    def add(self, sequence: BatchSequence, cache: Sequence[KVCache], logits: mx.array) -> None:
        """Join a sequence whose `cache` holds its prompt and whose `logits` ((1, vocab) or
        (vocab,)) give its first token. On an error the decoder is unchanged."""
        joined = merge_caches([cache])
        logits = logits.reshape(1, -1)
        if self.cache is None:
            self.cache, self._logits = joined, logits
        else:
            new_logits = mx.concatenate([self._logits, logits.astype(self._logits.dtype)])
            extend_caches(self.cache, joined)
            self._logits = new_logits
        self.sequences.append(sequence)

    def remove(self, sequence: BatchSequence, copy: bool = False) -> list[KVCache]:
        """Take a sequence out; returns its cache: the prompt and every token `step` returned for
        it (the last one's pass still queued). `copy` as in `row_cache`."""
        return self.remove_many([sequence], copy)[0]

    def remove_many(self, sequences: Sequence[BatchSequence], copy: bool = False) -> list[list[KVCache]]:
        """`remove` for several sequences at once (one copy of the batch, not one per sequence)."""
        gone = [next(i for i, row in enumerate(self.sequences) if row is seq) for seq in sequences]
        singles = [row_cache(self.cache, i, copy) for i in gone]
        keep = [j for j in range(len(self.sequences)) if j not in gone]
        if keep:
            select_rows(self.cache, keep)
            self._logits = self._logits[mx.array(keep, dtype=mx.int32)]
        else:
            self.cache, self._logits = None, None
        self.sequences = [self.sequences[j] for j in keep]
        return singles

    @staticmethod
    def _plain_greedy(seq: BatchSequence) -> int | None:
        """For a greedy row with no grammar, logprobs or processors but the vocabulary limit: the
        number of leading vocabulary entries (logits columns) its argmax is over (0: all); None for any other row."""
        if seq.sampler is not greedy or seq.constraint is not None or seq.top_logprobs is not None:
            return None
        limits = [getattr(p, "vocab_limit", None) for p in seq.processors]
        if None in limits:
            return None
        return min(limits, default=0)

    def _sample(self, seq: BatchSequence, row: mx.array) -> tuple[mx.array, list[mx.array]]:
        """One sequence's next token (1,) from its logits row (1, vocab), and its log-probabilities."""
        for processor in seq.processors:
            row = processor(seq.history, row)
        masked = row
        if seq.constraint is not None and seq.constraint.active:
            masked = mx.where(seq.constraint.mask(), row, -mx.inf)
        token = seq.sampler(masked).astype(mx.int32)
        if token.shape != (1,):
            raise ValueError(f"a sampler or logits processor gave tokens of shape {token.shape}, not (1,)")
        extra: list[mx.array] = []
        if seq.top_logprobs is not None:
            scores = log_softmax(row)
            extra = [mx.take_along_axis(scores, token[:, None], axis=-1)[0, 0]]
            if seq.top_logprobs > 0:
                best = mx.argpartition(-scores, seq.top_logprobs - 1, axis=-1)[0, : seq.top_logprobs]
                extra += [best, scores[0, best]]
        return token, extra

    def step(self) -> list[BatchToken]:
        """One token for every sequence (in order); the forward pass of these tokens is queued.

        A sequence alone in the batch with a `lookup` may get several tokens (prompt-lookup
        decoding: the draft verified in the same step); the pass of the last one is queued."""
        if not self.sequences:
            return []
        self.steps += 1
        if self.steps % CLEAR_CACHE_EVERY == 0:
            mx.clear_cache()
        if len(self.sequences) == 1 and self._drafts(self.sequences[0]):
            speculated = self._lookup_step(self.sequences[0])
            if speculated is not None:
                return speculated
        elif len(self.sequences) > 1:
            self.reset_clocks()  # a batched step is no plain step of one row
        out = self._step()
        for item in out:
            if item.sequence.lookup is not None and item.error is None:
                item.sequence.lookup.index.append(item.token)
        return out

    @staticmethod
    def _drafts(seq: BatchSequence) -> bool:
        """Whether `seq` uses prompt lookup when alone: not with logprobs (a verify pass gives
        none), nor with a seeded sampler (its draws would depend on when it was alone)."""
        return seq.lookup is not None and seq.top_logprobs is None and getattr(seq.sampler, "key_state", None) is None

    def reset_clocks(self) -> None:
        """The time until the next step is not a decode step's (for the rows' prompt lookup)."""
        for seq in self.sequences:
            if seq.lookup is not None:
                seq.lookup.controller.reset_clock()

    def _lookup_step(self, seq: BatchSequence) -> list[BatchToken] | None:
        """The step of a row alone, with prompt lookup: its next token, and if it confirms the
        draft's first token, the rest of the draft verified in one pass. None when there is no
        draft (the usual step then runs)."""
        lookup, constraint = seq.lookup, seq.constraint
        try:  # the row's grammar, processors and sampler: an error there is the row's, as in `_step`
            draft, n_forced = lookup.next_draft(constraint)
            if not draft:
                return None
            with mx.stream(generation_stream):
                token, _ = self._sample(seq, self._logits)
        except Exception as e:
            return [BatchToken(seq, -1, error=e)]
        # A failure from here to the queued pass (the model, the device, or the verify pass's
        # processors and grammar) escapes: the cache may hold a partial pass.
        first = token.item()  # the host waits for it: it decides whether the draft goes on
        if not lookup.confirms(first, draft, n_forced):
            kept, following = [], None
        else:
            history = None if seq.history is None else mx.concatenate([seq.history, token.astype(seq.history.dtype)])
            kept, following = verify_draft(
                self.model,
                self.cache,
                first,
                draft[1:],
                lookup,
                seq.processors,
                history,
                constraint,
                max(n_forced - 1, 0),
                after_forced=n_forced > 0,
            )
        values = [first, *kept] + ([] if following is None else [following])
        last = mx.array([values[-1]], dtype=mx.int32)
        with mx.stream(generation_stream):
            self._logits = self.model(last[:, None], self.cache)[:, -1, :]
        mx.async_eval(self._logits)
        try:  # the verify pass advanced the constraint over `first` and the kept tokens
            if constraint is not None:
                for value in values[len(values) - 1 if following is not None else 0 :]:
                    constraint.advance(value)
        except Exception as e:
            return [BatchToken(seq, -1, error=e)]
        if seq.history is not None:
            seq.history = mx.concatenate([seq.history, mx.array(values, dtype=seq.history.dtype)])
        for value in values:
            lookup.index.append(value)
        return [BatchToken(seq, value) for value in values]

    def _step(self) -> list[BatchToken]:
        """The usual step: one token for every sequence, one forward pass for all."""
        errors: dict[int, Exception] = {}
        tokens, extras = [], []
        with mx.stream(generation_stream):
            # Plain greedy rows (no grammar or logprobs, no processors but the vocabulary limit)
            # take one argmax together, over the rows the limit leaves.
            groups: dict[int, list[int]] = {}
            for i, seq in enumerate(self.sequences):
                if (limit := self._plain_greedy(seq)) is not None:
                    groups.setdefault(limit, []).append(i)
            where = {}
            for limit, rows in groups.items():
                if len(rows) > 1:
                    logits = self._logits[mx.array(rows, dtype=mx.int32)]
                    together = greedy(logits[:, :limit] if limit else logits).astype(mx.int32)
                    where.update({i: together[j : j + 1] for j, i in enumerate(rows)})
            for i, seq in enumerate(self.sequences):
                if i in where:
                    tokens.append(where[i])
                    extras.append([])
                    continue
                try:
                    token, extra = self._sample(seq, self._logits[i : i + 1])
                except Exception as e:  # this sequence's processor, grammar or sampler
                    errors[i], token, extra = e, mx.zeros((1,), dtype=mx.int32), []
                tokens.append(token)
                extras.append(extra)
            batch_tokens = mx.concatenate(tokens)
        # The tokens (and log-probabilities) first, then the forward pass that feeds them back: the
        # host waits below only for the sampling, while the pass runs.
        mx.async_eval(batch_tokens, *(a for extra in extras for a in extra))
        with mx.stream(generation_stream):
            self._logits = self.model(batch_tokens[:, None], self.cache)[:, -1, :]
        mx.async_eval(self._logits)
        values = batch_tokens.tolist()
        out = []
        for i, (seq, value, extra) in enumerate(zip(self.sequences, values, extras, strict=True)):
            if i in errors:
                out.append(BatchToken(seq, -1, error=errors[i]))
                continue
            try:
                if seq.constraint is not None:
                    seq.constraint.advance(value)
            except Exception as e:
                out.append(BatchToken(seq, -1, error=e))
                continue
            if seq.history is not None:
                seq.history = mx.concatenate([seq.history, mx.array([value], dtype=seq.history.dtype)])
            item = BatchToken(seq, value)
            if extra:
                item.logprob = extra[0].item()
                if len(extra) > 1:
                    item.top = sorted(zip(extra[1].tolist(), extra[2].tolist(), strict=True), key=lambda t: -t[1])
                else:
                    item.top = []
            out.append(item)
        return out


# Per-request options `batch_generate` takes: `generate`'s, less those that need a cache of one's own.
REQUEST_OPTIONS = {
    "prompt",
    "messages",
    "tools",
    "tool_choice",
    "response_format",
    "constrain",
    "max_tokens",
    "sampling",
    "stop",
    "logits_processors",
}


def batch_generate(
    model: Any,
    tokenizer: Any,
    requests: Sequence[str | Sequence[int] | dict[str, Any]],
    *,
    batch_size: int = 8,
    prefill_chunk_size: int = 512,
    progress: Any = None,
    **defaults: Any,
) -> list[Any]:
    """Generate replies for many requests, decoding up to `batch_size` of them together.

    A request is a prompt (text or token ids) or a dict of `generate`'s keyword arguments
    (`prompt` or `messages`, `tools`, `tool_choice`, `response_format`, `max_tokens`,
    `sampling`, `stop`, ...); `defaults` apply to every request. Returns one `GenerationResult` per
    request, in order: the same reply `generate` gives for it alone (greedy: the same tokens up to
    kernel numerics; with a `seed`, the same draws), produced in fewer forward passes. A finished
    sequence's slot goes to the next request at once (continuous batching). `progress(done, total)`
    is called as replies finish.
    """
    from .tools import tool_schemas

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    unknown = set(defaults) - REQUEST_OPTIONS
    if unknown:
        raise TypeError(f"batch_generate() got unexpected options: {', '.join(sorted(unknown))}")
    items = []
    for request in requests:
        options = dict(defaults)
        if isinstance(request, dict):
            if bad := set(request) - REQUEST_OPTIONS:
                raise TypeError(f"unexpected request options: {', '.join(sorted(bad))}")
            options.update(request)
        else:
            options["prompt"] = request
        items.append(options)

    results: list[Any] = [None] * len(items)
    decoder = BatchDecoder(model)
    waiting = list(range(len(items)))[::-1]

    def start(index: int) -> None:
        options = dict(items[index])
        prompt, messages = options.pop("prompt", None), options.pop("messages", None)
        options["tools"] = tool_schemas(options.get("tools"))
        ids = prompt_tokens(tokenizer, prompt, messages, options["tools"])
        plan = prepare_decoding(model, tokenizer, ids, **options)
        cache = model.make_cache()
        tokens = mx.array(plan.ids, dtype=mx.int32)
        logits = prefill(model, tokens, cache, prefill_chunk_size)
        history = tokens if reads_history(plan.processors) else None
        sequence = BatchSequence(plan.sampler, plan.processors, history, plan.constraint)
        sequence.data = (index, plan.reply, [])
        if plan.max_tokens <= 0:
            finish(sequence, [GenerationChunk("", None, "length", len(ids), 0)])
        else:
            decoder.add(sequence, cache, logits)

    def finish(sequence: BatchSequence, chunks: list[Any]) -> None:
        index, reply = sequence.data[:2]
        results[index] = GenerationResult.from_chunks(chunks, reply.t_first - reply.t0 if reply.t_first else 0.0)
        if progress:
            progress(sum(r is not None for r in results), len(items))

    while waiting or len(decoder):
        while waiting and len(decoder) < batch_size:
            start(waiting.pop())
        finished = []
        for item in decoder.step():
            if item.error is not None:
                raise item.error
            _, reply, chunks = item.sequence.data
            if chunks and chunks[-1].finish_reason:
                continue  # a token after the reply ended (a step may give a row several)
            chunks.append(reply.add(item.token))
            if chunks[-1].finish_reason:
                finished.append(item.sequence)
        if finished:
            decoder.remove_many(finished)
            for sequence in finished:
                finish(sequence, sequence.data[2])
    return results
