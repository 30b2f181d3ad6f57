"""The decoder: one loop that steps a set of sequences, from the sampled logits to the cache and back.

Every caller drives `Decoder`: `api.stream_generate` (a lone row), `api.batch_generate` and the
server's scheduler (continuous batching: rows join and leave between steps). A `Row` carries
how its tokens are chosen: its sampler, logits processors and history, grammar constraint,
log-probabilities request, prompt-lookup state and the caller's data.

A step, for all rows at once:
1. the forward pass of every row's pending token (sampled by the step before) is queued;
2. the next token of every row whose grammar is not active is sampled from those logits and
   queued too (plain greedy rows take one argmax together), before the host reads anything;
3. the host reads the pending tokens (long since computed) and hands them out, advancing each
   row's grammar: a row whose grammar that token switches on (a trigger) draws its next token
   again, masked, from the same logits (a seeded sampler reusing its key); a row whose grammar
   is active draws it now, masked, while the accelerator runs the next rows' work.
So the accelerator never waits for the caller; each row's cache runs one token ahead of what
the decoder handed out (the pending token's pass is queued next step), and `remove` rolls it back
to where the docs promise.

A row alone keeps its own cache (quantized, bounded: whatever `make_cache` made) and may use
prompt lookup (see `speculative.py`): a draft that the next token confirms is verified in one
pass (`verify_draft`), and under a grammar the tokens it forces may go into their predecessor's
own pass (`LookupController.merges_forced`): then the predecessor is handed out alone first,
its pass not yet queued (the cache one token behind, not ahead), and the next step runs that pass.
When a second row joins, the caches are merged into a left-padded `batch.BatchKVCache` (plain
caches only).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import mlx.core as mx

from .batch import BatchKVCache, extend_caches, merge_caches, row_cache, select_rows
from .cache import CacheRollbackError, KVCache, rollback_cache
from .model import Model
from .sampling import LogitsProcessor, Sampler, greedy, log_softmax, reads_history
from .speculative import PromptLookup

# A dedicated stream lets the next decode step be queued while Python handles the current one.
generation_stream = mx.new_stream(mx.default_device())
CLEAR_CACHE_EVERY = 256  # decode steps between releases of MLX's buffer cache


@dataclass
class TokenLogprobs:
    """A generated token's log-probability and the most likely alternatives at its position
    (the model's distribution after logits processors, before temperature and constraints)."""

    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


class TokenConstraint(Protocol):
    """A constraint the decoder drives token by token (see `constrained.GrammarProcessor`)."""

    @property
    def active(self) -> bool:
        """Whether the next token must be masked."""

    def advance(self, token: int) -> bool:
        """Feed a sampled token; True when it switched the constraint on."""

    def mask(self) -> mx.array:
        """Boolean (vocab,) array of the tokens allowed next."""

    def forced(self) -> list[int]:
        """Tokens that are the only way on from here, as a draft (prompt lookup)."""

    def lookahead(self, tokens: Sequence[int]) -> list[mx.array]:
        """The masks after each leading token of `tokens` the constraint takes; no state change."""

    def free_prefix(self, tokens: Sequence[int]) -> int:
        """How many of `tokens` are free text that would not switch the constraint on."""


def prefill_steps(model: Model, tokens: mx.array, cache: list[KVCache], chunk_size: int = 512) -> Iterator[None]:
    """Run the prompt `tokens` through the model in chunks, yielding after each chunk but the last
    (a scheduling point); returns (StopIteration's value) the last position's logits (1, vocab).

    Interrupted, failing or closed before it returns, every layer holds the chunks done (what the
    cache held before, and each whole chunk evaluated since): a consistent prefix to reuse."""
    done = cache[0].offset if cache else 0
    try:
        with mx.stream(generation_stream):
            while tokens.size > chunk_size:
                model(tokens[None, :chunk_size], cache)
                mx.eval([c.state for c in cache])  # the LM head of these positions is never computed
                done += chunk_size
                tokens = tokens[chunk_size:]
                mx.clear_cache()
                yield
            logits = model(tokens[None], cache, last_only=True)[:, -1, :]
        done = None
        return logits
    finally:
        if done is not None:
            rollback_or_empty(cache, done)


def prefill(model: Model, tokens: mx.array, cache: list[KVCache], chunk_size: int = 512) -> mx.array:
    """`prefill_steps` run to the end: the last position's logits (1, vocab). Interrupted or
    failing, every layer goes back to what it held before."""
    start = cache[0].offset if cache else 0
    steps = prefill_steps(model, tokens, cache, chunk_size)
    try:
        while True:
            next(steps)
    except StopIteration as done:
        return done.value
    except BaseException:
        steps.close()
        rollback_or_empty(cache, start)
        raise


def rollback_or_empty(cache: list[KVCache], offset: int) -> None:
    """`rollback_cache`, where a bounded cache that cannot go back is left empty (offset 0); a
    cache already at or before `offset` (emptied by an earlier rollback) is left as it is."""
    if all(layer.offset <= offset for layer in cache):
        return
    try:
        rollback_cache(cache, offset)
    except CacheRollbackError:
        pass


@dataclass(eq=False)  # rows are told apart by identity: two greedy rows may hold equal fields
class Row:
    """One sequence of a `Decoder`: how its next token is chosen, and its history."""

    sampler: Sampler
    processors: Sequence[LogitsProcessor] = ()
    history: mx.array | None = None  # the context's ids (prompt, earlier turns), for processors that read it
    constraint: TokenConstraint | None = None
    top_logprobs: int | None = None  # k >= 0: each token's log-probability and its k best alternatives
    lookup: PromptLookup | None = None  # prompt-lookup decoding, while the row is alone (not with top_logprobs)
    data: Any = None  # the caller's own state
    # The decoder's: the sampled token whose pass is queued next step, its log-probabilities, where
    # the caller's prompt began and ended in the row's cache; an error that ended the row; a draft
    # the pending token may confirm.
    token: mx.array | None = None
    extra: tuple = ()
    start: int = 0
    joined: int = 0
    error: Exception | None = None
    draft: tuple[list[int], int] | None = None
    handed: float | None = None  # when the pending token was handed out ahead of its pass, if it was


@dataclass(eq=False)
class RowToken:
    """A token `Decoder.step` produced for a row, with its log-probabilities if asked; or the
    `error` that row's processors, sampler or grammar raised (then `token` is -1 and the row must
    be removed: the other rows are not affected)."""

    row: Row
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    error: Exception | None = None

    @property
    def logprobs(self) -> TokenLogprobs | None:
        return TokenLogprobs(self.logprob, self.top or []) if self.logprob is not None else None


class Decoder:
    """Continuous batching: `add` a prefilled row, `step` all of them, `remove` finished ones.

    Each `step` hands out one token for every row, except that a lone row with prompt lookup may
    get several or, the step after a token handed out ahead of its pass, none (callers take the
    tokens in order and ignore those after the row's reply ended). An error in one row's
    processors, sampler or grammar comes back as that row's `RowToken.error`; inside a lone row's
    verify pass it escapes `step`, with the model's. An exception that escapes `step` (an
    interrupt, a failed evaluation) leaves the rows' grammars and samplers undefined: remove the
    rows (their caches still end where `remove` promises) and discard it.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.rows: list[Row] = []
        self.cache: list[KVCache] | None = None  # the lone row's own, or a BatchKVCache's layers
        self.steps = 0

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, row: Row, cache: list[KVCache], logits: mx.array, prompt: int = 0) -> None:
        """Join `row`, whose `cache` holds its prompt (the last `prompt` positions: what `remove`
        takes back when no token was taken) and whose `logits` ((1, vocab) or (vocab,)) give its
        first token. Alone, the row decodes in `cache` itself; with others, a copy joins the batch
        (plain caches only). On an error joining, the decoder is unchanged."""
        if row.lookup is not None and row.top_logprobs is not None:
            raise ValueError("prompt lookup gives no log-probabilities for the tokens it verifies: not with top_logprobs")
        if self.rows and len(cache) != len(self.cache):
            raise ValueError(f"a cache of {len(cache)} layers cannot join a batch of {len(self.cache)}")
        if not self.rows:
            joined = cache
        elif isinstance(self.cache[0], BatchKVCache):
            joined = self.cache
            extend_caches(joined, merge_caches([cache]))
        else:
            joined = merge_caches([self.cache, cache])
        self.cache = joined
        tracked = reads_history(row.processors)  # the history is kept only for processors that read it
        row.history = (row.history if row.history is not None else mx.array([], dtype=mx.int32)) if tracked else None
        row.joined, row.error, row.draft, row.handed = cache[0].offset, None, None, None
        row.start = row.joined - prompt
        self.rows.append(row)
        try:
            with mx.stream(generation_stream):
                logits = logits.reshape(1, -1)
                mask = None
                if row.constraint is not None and row.constraint.active:
                    mx.async_eval(logits)
                    mask = row.constraint.mask()
                row.token, row.extra, row.history = self._sample(row, logits, mask, row.history)
            mx.async_eval(row.token, *row.extra)
        except BaseException as e:  # its processors, sampler or grammar: the row's error, handed out next step
            row.token, row.error = mx.zeros((1,), dtype=mx.int32), e
            if not isinstance(e, Exception):
                raise  # an interrupt: the row stays joined (with its error), for the caller to `remove`

    def remove(self, row: Row, used: int | None = None, copy: bool = False) -> list[KVCache]:
        """Take `row` out; returns its cache holding its prompt and the first `used - 1` tokens the
        caller took (its last one is fed again with what follows), or, with `used` 0, what it held
        before the prompt (see `add`); with `used` None, every token whose pass ran. This holds after
        an interrupted step too (a bounded cache that dropped what that needs is emptied: offset 0).
        A row alone gives back its own cache; one from a batch views of the batch's buffers, or
        with `copy` arrays of its own (see `batch.row_cache`)."""
        return self.remove_many([row], [used], copy)[0]

    def remove_many(
        self, rows: Sequence[Row], used: Sequence[int | None] | None = None, copy: bool = False
    ) -> list[list[KVCache]]:
        """`remove` for several rows at once (one copy of the batch, not one per row)."""
        gone = [next(i for i, r in enumerate(self.rows) if r is row) for row in rows]
        batched = isinstance(self.cache[0], BatchKVCache)
        caches = [row_cache(self.cache, i, copy) if batched else self.cache for i in gone]
        for row, cache, n in zip(rows, caches, used or [None] * len(rows), strict=True):
            if n is not None:
                rollback_or_empty(cache, row.joined + n - 1 if n else row.start)
        keep = [j for j in range(len(self.rows)) if j not in gone]
        if keep and batched:
            select_rows(self.cache, keep)
        elif not keep:
            self.cache = None
        self.rows = [self.rows[j] for j in keep]
        return caches

    def reset_clocks(self) -> None:
        """The time until the next step is not a decode step's (for the rows' prompt lookup)."""
        for row in self.rows:
            if row.lookup is not None:
                row.lookup.controller.reset_clock()

    def step(self) -> list[RowToken]:
        """The next token of every row (in order); see the module's docstring."""
        if not self.rows:
            return []
        self.steps += 1
        if self.steps % CLEAR_CACHE_EVERY == 0:
            mx.clear_cache()  # return freed buffers to the system now and then, as mlx-lm does
        if len(self.rows) > 1:
            self.reset_clocks()  # a batched step is no plain step of one row
            for row in self.rows:
                row.draft = None
        elif self.rows[0].lookup is not None and self.rows[0].error is None:
            return self._lookup_step(self.rows[0])
        return self._plain_step()

    def _lookup_step(self, row: Row) -> list[RowToken]:
        """A lone row with prompt lookup: the draft its pending token confirms, verified in one
        pass; or under a grammar, the tokens it forces after the pending token, in that token's
        own pass; else the plain step, then the next draft."""
        lookup, constraint = row.lookup, row.constraint
        passing = False  # in the model's pass or its evaluation: a failure there is not the row's
        try:
            if row.draft is not None:
                (draft, n_forced), row.draft = row.draft, None
                passing = True
                first = row.token.item()  # the step before: it confirms the draft's first token or not
                passing = False
                if lookup.confirms(first, draft, n_forced):
                    passing = True
                    kept, following = verify_draft(
                        self.model, self.cache, first, draft[1:], lookup, row.processors, row.history, constraint,
                        max(n_forced - 1, 0), after_forced=n_forced > 0,
                    )  # fmt: skip
                    return self._verified(row, [first, *kept], following, 0)
            if row.handed is not None or (constraint is not None and constraint.active and lookup.controller.merges_forced):
                # Wait for the pending token and hand it out at once; the next step puts the tokens
                # the grammar forces after it into its pass (the caller sees it one pass sooner).
                passing = True
                value = row.token.item()
                passing = False
                if row.handed is None:
                    row.handed = time.perf_counter()
                    return [RowToken(row, value)]
                started = time.perf_counter()
                constraint.advance(value)
                lookup.index.append(value)
                draft, n_forced = lookup.merged_draft(constraint) if constraint.active else ([], 0)
                passing = True
                if draft:
                    kept, following = verify_draft(
                        self.model, self.cache, value, draft, lookup, row.processors, row.history, constraint, n_forced,
                        advanced=True,
                    )  # fmt: skip
                    row.handed = None
                    return self._verified(row, [value, *kept], following, 1)[1:]
                out = self._plain_step(value, started)  # `value`, handed out already, is left out
                passing = False
                if not out:
                    draft = lookup.next_draft(constraint, forced=False)
                    row.draft = draft if draft[0] else None
                return out
        except Exception as e:
            if passing:  # the model, the device, or a verify pass: escapes, as a plain pass's failure does
                raise
            row.error = e  # the row's grammar or drafting: in place of this step's token
            return [RowToken(row, -1, error=e)]
        out = self._plain_step()
        if out[0].error is None:
            lookup.index.append(out[0].token)
            try:
                # Tokens a grammar forces (a JSON key, a tool's name) are drafted even while
                # n-gram drafting is paused: they are almost always kept.
                draft = lookup.next_draft(constraint)
            except Exception as e:  # the grammar's: in place of this step's token, as in a plain step
                row.error = e
                return [RowToken(row, -1, error=e)]
            row.draft = draft if draft[0] else None
        return out

    def _verified(self, row: Row, values: list[int], following: int, indexed: int) -> list[RowToken]:
        """After a verify pass: hand out `values` (in the cache now; the first `indexed` of them
        already in the lookup's index), with `following` pending (its pass queued next step)."""
        if row.history is not None:  # it already ends with values[0]
            row.history = mx.concatenate([row.history, mx.array([*values[1:], following], dtype=row.history.dtype)])
        for value in values[indexed:]:
            row.lookup.index.append(value)
        row.token, row.extra = mx.array([following], dtype=mx.int32), ()
        return [RowToken(row, value) for value in values]

    def _plain_step(self, known: int | None = None, started: float = 0.0) -> list[RowToken]:
        """The pipelined step of every row (see the module's docstring). `known`: a lone row's
        pending token, already waited for and fed to its grammar (since `started`, for the
        host-time count)."""
        rows = self.rows
        alone = len(rows) == 1
        keys = [getattr(row.sampler, "key_state", None) for row in rows]
        saved = [dict(k) if k is not None else None for k in keys]  # a trigger draws its position again
        before = [row.history for row in rows]
        tokens = rows[0].token if alone else mx.concatenate([row.token for row in rows])
        built = time.perf_counter()
        drawn: dict[int, tuple | Exception] = {}  # next tokens drawn before this step's are read
        with mx.stream(generation_stream):
            logits = self.model(tokens[:, None], self.cache)[:, -1, :]
            built_at = time.perf_counter()
            free = [i for i, r in enumerate(rows) if r.error is None and not (r.constraint is not None and r.constraint.active)]
            self._draw(free, logits, drawn)
        mx.async_eval(*(a for d in drawn.values() if not isinstance(d, Exception) for a in (d[0], *d[1])))
        if len(free) < len(rows):
            mx.async_eval(logits)
        values = [known] if known is not None else tokens.tolist()
        out, redrawn = [], []
        for i, (row, value) in enumerate(zip(rows, values, strict=True)):
            if row.error is not None:
                out.append(RowToken(row, -1, error=row.error))
                continue
            item, handed, row.handed = RowToken(row, value), row.handed is not None, None
            if row.extra:
                item.logprob = row.extra[0].item()
                pairs = zip(row.extra[1].tolist(), row.extra[2].tolist(), strict=True) if len(row.extra) > 1 else ()
                item.top = sorted(pairs, key=lambda t: -t[1])
            try:
                drew = drawn.get(i)
                if isinstance(drew, Exception):
                    raise drew
                constraint = row.constraint
                if drew is not None:
                    if known is None and constraint is not None and constraint.advance(value):
                        if saved[i] is not None:  # the trigger: the same position, masked, with the same key
                            keys[i].update(saved[i])
                        with mx.stream(generation_stream):
                            drew = self._sample(row, logits[i : i + 1], constraint.mask(), before[i])
                        redrawn.append(drew)
                else:  # an active grammar: its mask needs this token
                    if known is None:
                        started = time.perf_counter()
                        constraint.advance(value)
                        host = time.perf_counter() - started + built_at - built
                    else:  # waited for before the step was queued: the host's work then idled the accelerator
                        host = built_at - started
                    if alone and row.lookup is not None:
                        row.lookup.controller.host_time(host)
                    with mx.stream(generation_stream):
                        drew = self._sample(row, logits[i : i + 1], constraint.mask() if constraint.active else None, before[i])
                    redrawn.append(drew)
            except Exception as e:  # this row's processors, sampler or grammar
                row.error, row.token = e, mx.zeros((1,), dtype=mx.int32)
                out.append(RowToken(row, -1, error=e))
                continue
            row.token, row.extra, row.history = drew
            if not alone and row.lookup is not None:
                row.lookup.index.append(value)
            if not handed:  # one handed out ahead of its pass is not handed out again
                out.append(item)
        if redrawn:
            mx.async_eval(*(a for d in redrawn for a in (d[0], *d[1])))
        return out

    def _draw(self, free: list[int], logits: mx.array, drawn: dict[int, tuple | Exception]) -> None:
        """Draw the next token of the rows `free` (no active grammar) from `logits`; plain greedy
        rows (no grammar, logprobs or processors but the vocabulary limit) take one argmax together,
        over the columns the limit leaves."""
        groups: dict[int, list[int]] = {}
        for i in free:
            if (limit := _plain_greedy(self.rows[i])) is not None:
                groups.setdefault(limit, []).append(i)
        for limit, rows in groups.items():
            if len(rows) > 1:
                picked = logits[mx.array(rows, dtype=mx.int32)]
                together = greedy(picked[:, :limit] if limit else picked).astype(mx.int32)
                drawn.update({i: (together[j : j + 1], (), None) for j, i in enumerate(rows)})
        for i in free:
            if i not in drawn:
                try:
                    drawn[i] = self._sample(self.rows[i], logits[i : i + 1], None, self.rows[i].history)
                except Exception as e:
                    drawn[i] = e

    @staticmethod
    def _sample(row: Row, logits: mx.array, mask: mx.array | None, history: mx.array | None) -> tuple:
        """A row's next token (1,) from its logits (1, vocab) after `history`: the token, its
        log-probabilities (if asked) and the history grown by it."""
        for processor in row.processors:
            logits = processor(history, logits)
        token = row.sampler(logits if mask is None else mx.where(mask, logits, -mx.inf)).astype(mx.int32)
        if token.shape != (1,):
            raise ValueError(f"a sampler or logits processor gave tokens of shape {token.shape}, not (1,)")
        extra: tuple = ()
        if row.top_logprobs is not None:
            scores = log_softmax(logits)
            extra = (mx.take_along_axis(scores, token[:, None], axis=-1)[0],)
            if row.top_logprobs > 0:
                best = mx.argpartition(-scores, row.top_logprobs - 1, axis=-1)[0, : row.top_logprobs]
                extra += (best, scores[0, best])
        return token, extra, history if history is None else mx.concatenate([history, token.astype(history.dtype)])


def _plain_greedy(row: Row) -> int | None:
    """For a greedy row with no grammar, logprobs or processors but the vocabulary limit: the
    number of leading vocabulary entries (logits columns) its argmax is over (0: all); None for any other row."""
    if row.sampler is not greedy or row.constraint is not None or row.top_logprobs is not None:
        return None
    limits = [getattr(p, "vocab_limit", None) for p in row.processors]
    return None if None in limits else min(limits, default=0)


def verify_draft(
    model: Model,
    cache: list[KVCache],
    first: int,
    draft: list[int],
    lookup: PromptLookup,
    processors: Sequence[LogitsProcessor] = (),
    history: mx.array | None = None,
    constraint: TokenConstraint | None = None,
    forced: int = 0,
    advanced: bool = False,
    after_forced: bool = False,
) -> tuple[list[int], int]:
    """Check `draft` (its first `forced` tokens forced by the grammar) after the confirmed token
    `first` in one forward pass; returns the kept draft tokens and the token that follows them.

    `history` (None when no processor reads it) ends with `first`. Afterwards the cache holds
    `first` and the kept tokens (the following token's pass is the caller's), and `constraint`
    has advanced over them (not over the following token); with `advanced`, it had already
    advanced over `first` (a draft that follows `first` in its own pass: nothing confirmed it).
    `after_forced`: `first` was forced (the draft continues forced tokens), for the counts."""
    t0 = time.perf_counter()  # the pass's cost includes the masks it needs
    masks: list[mx.array] = []
    if constraint is not None:
        if not advanced:
            constraint.advance(first)
        if constraint.active:
            masks = [constraint.mask(), *constraint.lookahead(draft)]
            draft = draft[: len(masks) - 1]
        else:
            draft = draft[: constraint.free_prefix(draft)]
    # Drafted positions where the grammar allows one token only decide nothing: no logits for
    # them (the last position, which gives the next token, always has its row). A draft token
    # its mask does not allow (llguidance takes other spellings of forced bytes, but its mask
    # has the usual one only) ends the draft: that position gives the next token.
    sole: list[int | None] = []
    offered = len(draft)  # a token cut here is a rejected one, for the counts
    for i, mask in enumerate(masks[: len(draft)]):
        token = _sole_token(mask)
        if token is not None and token != draft[i]:
            draft = draft[:i]
            offered = i + 1
            break
        sole.append(token)
    if not masks:
        sole = [None] * len(draft)
    # The grammar took none of it: a miss, so such drafts pause (counted once: the pass then
    # records nothing more). Follow-ups of a confirmed forced token count as rejected follow-ups.
    missed = not draft and not advanced and not (after_forced and not forced)
    if missed:
        lookup.controller.missed(forced=forced > 0)
    open_rows = [i for i, token in enumerate(sole) if token is None] + [len(draft)]
    start = cache[0].offset
    with mx.stream(generation_stream):
        every = len(open_rows) == len(draft) + 1
        logits = model(mx.array([[first, *draft]], dtype=mx.int32), cache, rows=None if every else open_rows)[0]
        rows = []
        for i in range(len(draft) + 1):
            if i == len(draft) or sole[i] is None:
                row = logits[len(rows) : len(rows) + 1]
                for processor in processors:
                    row = processor(history, row)
                rows.append(mx.where(masks[i], row, -mx.inf) if masks else row)
            if i < len(draft) and history is not None:
                history = mx.concatenate([history, mx.array([draft[i]], dtype=history.dtype)])
        # The open positions in order, with their draft tokens (sole ones are kept for sure).
        kept_open, following = lookup.accept(mx.concatenate(rows), [draft[i] for i in open_rows[:-1]])
        accepted = open_rows[kept_open]  # rejected there (or, all kept, the end)
    # For the cost line, a position without logits costs its layers only.
    skipped = len(draft) + 1 - len(open_rows)
    computed = len(draft) - skipped * _lm_head_share(model)
    seconds = time.perf_counter() - t0
    lookup.controller.verified(0 if missed else offered, accepted, seconds, forced, after_forced, computed=computed)
    rollback_cache(cache, start + 1 + accepted)
    kept = draft[:accepted]
    if constraint is not None:
        for token in kept:
            constraint.advance(token)
    return kept, following


def _lm_head_share(model: Model) -> float:
    """The LM head's share of a position's weights (what a position without logits saves)."""
    args = getattr(model, "args", None)
    if args is None:
        return 0.0
    h, q, kv = args.hidden_size, args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
    head = args.vocab_size * h
    return head / (head + args.num_hidden_layers * (2 * h * q + 2 * h * kv + 3 * h * args.intermediate_size))


def _sole_token(mask: mx.array) -> int | None:
    """The only token `mask` allows, or None when it allows several (or none)."""
    import numpy as np  # here, not at import: plain chat never needs it (55 ms of start-up)

    allowed = np.asarray(mask).reshape(-1)
    # Counted, not listed: inside a string nearly all 128k tokens are allowed (~5 us, not ~100).
    return int(allowed.argmax()) if np.count_nonzero(allowed) == 1 else None
