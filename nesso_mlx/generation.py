"""Text generation: chunked prefill, a pipelined decode loop, stop handling and statistics."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import mlx.core as mx

from .cache import CacheRollbackError, KVCache, rollback_cache
from .errors import ContextLengthError
from .model import Model
from .sampling import (
    LogitsProcessor,
    Sampler,
    SamplingOptions,
    log_softmax,
    reads_history,
    vocab_limit_processor,
)
from .speculative import PromptLookup
from .tokenizer import Tokenizer
from .tools import ToolCall, ToolCallDelta, ToolCallStream, ToolSpec, parse_tool_calls, tool_schemas

# A dedicated stream lets the next decode step be queued while Python handles the current one.
generation_stream = mx.new_stream(mx.default_device())
CLEAR_CACHE_EVERY = 256  # decode steps between releases of MLX's buffer cache


@dataclass
class TokenLogprobs:
    """A generated token's log-probability and the most likely alternatives at its position
    (the model's distribution after logits processors, before temperature and constraints)."""

    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class GenerationChunk:
    """One step of `stream_generate`: the new text and the statistics so far."""

    text: str
    token: int | None
    finish_reason: str | None = None  # "stop", "length" or None while generating
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory: float = 0.0  # GB
    tool_calls: list[ToolCall] | None = None  # on the last chunk, when tools were given
    tool_call_deltas: list[ToolCallDelta] | None = None  # with tools: call pieces completed by this chunk
    logprobs: TokenLogprobs | None = None  # with `top_logprobs`: this chunk's token


@dataclass
class GenerationResult:
    """What `generate` returns: the text, any tool calls, the tokens and the run's statistics.

    With tools, `text` is the reply without its `<tool_call>` blocks (`raw_text` keeps them),
    `tool_calls` lists the calls in order, and `finish_reason` is "tool_calls" when there are any.
    """

    text: str
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory: float = 0.0
    time_to_first_token: float = 0.0
    tool_calls: list[ToolCall] = field(default_factory=list)
    raw_text: str = ""

    @classmethod
    def from_chunks(cls, chunks: Sequence[GenerationChunk], time_to_first_token: float = 0.0) -> GenerationResult:
        """The result of a whole `stream_generate` run."""
        last = chunks[-1]
        raw = "".join(c.text for c in chunks)
        content, calls = parse_tool_calls(raw) if last.tool_calls is not None else (raw, [])
        return cls(
            content,
            [c.token for c in chunks if c.token is not None],
            last.finish_reason,
            last.prompt_tokens,
            last.generation_tokens,
            last.prompt_tps,
            last.generation_tps,
            last.peak_memory,
            time_to_first_token,
            calls,
            raw,
        )

    def __str__(self) -> str:
        """The reply's text, so `print(generate(...))` prints it (mlx-lm's `generate` returns a string)."""
        return self.text

    @property
    def message(self) -> dict[str, Any]:
        """The reply as an assistant message, ready to append to `messages`."""
        message: dict[str, Any] = {"role": "assistant", "content": self.text}
        if self.tool_calls:
            message["tool_calls"] = [c.to_message() for c in self.tool_calls if c.ok]
        return message


def prefill(model: Model, tokens: mx.array, cache: list[KVCache], chunk_size: int = 512) -> mx.array:
    """Run the prompt through the model in chunks; returns the last position's logits (1, vocab)."""
    with mx.stream(generation_stream):
        while tokens.size > chunk_size:
            model(tokens[None, :chunk_size], cache)
            mx.eval([c.state for c in cache])  # the LM head of these positions is never computed
            tokens = tokens[chunk_size:]
            mx.clear_cache()
        return model(tokens[None], cache, last_only=True)[:, -1, :]


class TokenConstraint(Protocol):
    """A constraint the decode loop drives token by token (see `constrained.GrammarProcessor`)."""

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


def decode(
    model: Model,
    logits: mx.array,
    cache: list[KVCache],
    sampler: Sampler,
    processors: Sequence[LogitsProcessor] = (),
    history: mx.array | None = None,
    constraint: TokenConstraint | None = None,
    top_logprobs: int | None = None,
    lookup: PromptLookup | None = None,
) -> Iterator[int] | Iterator[tuple[int, TokenLogprobs]]:
    """Yield sampled tokens forever, starting from `logits`; the caller decides when to stop.

    Step n+1 is queued with `mx.async_eval` before token n is handed to Python, so the
    accelerator never waits for the caller. The cache therefore runs one token ahead; callers
    roll it back when they stop.

    With a `constraint`, while it is inactive (free text) the loop is the same. While it is
    active, the forward pass of step n+1 is dispatched first, then the host waits for token n and
    computes the mask while the accelerator runs the model; only the masked sampling waits for
    the mask. When token n switches the constraint on (a trigger), the unmasked sample already
    queued for step n+1 is discarded and drawn again, masked, from the same logits.

    With `top_logprobs` (k >= 0), yields `(token, TokenLogprobs)` with the k best alternatives.
    With `lookup`, prompt-lookup speculative decoding (see `speculative.py`): after token n, if
    the text so far predicts what follows and step n+1 confirms the first predicted token, the
    rest of the prediction is verified in one forward pass. Under an active constraint, where the
    controller finds it pays (`LookupController.merges_forced`), the loop instead waits for token
    n before queuing its step, and the tokens the grammar forces after it go into that same pass.
    """
    if lookup is not None and top_logprobs is not None:
        raise ValueError("prompt lookup gives no log-probabilities for the tokens it verifies: not with top_logprobs")
    history = history if history is not None else mx.array([], dtype=mx.int32)
    track = reads_history(processors)  # keep the history only for processors that read it

    def process(logits: mx.array, history: mx.array) -> mx.array:
        for processor in processors:
            logits = processor(history, logits)
        return logits

    def sample(logits: mx.array, history: mx.array, mask: mx.array | None) -> tuple[mx.array, mx.array, list[mx.array]]:
        logits = process(logits, history)
        token = sampler(logits if mask is None else mx.where(mask, logits, -mx.inf))
        extra = []
        if top_logprobs is not None:
            scores = log_softmax(logits)
            extra = [mx.take_along_axis(scores, token[:, None], axis=-1)[0]]
            if top_logprobs > 0:
                best = mx.argpartition(-scores, top_logprobs - 1, axis=-1)[0, :top_logprobs]
                extra += [best, scores[0, best]]
        return token, grow(history, token), extra

    def grow(history: mx.array, token: mx.array) -> mx.array:
        return mx.concatenate([history, token.astype(history.dtype)]) if track else history

    def output(token: mx.array, extra: list[mx.array]):
        value = token.item()
        if top_logprobs is None:
            return value
        top = sorted(zip(extra[1].tolist(), extra[2].tolist(), strict=True), key=lambda t: -t[1]) if len(extra) > 1 else []
        return value, TokenLogprobs(extra[0].item(), top)

    with mx.stream(generation_stream):
        first_mask = None
        if constraint is not None and constraint.active:
            mx.async_eval(logits)
            first_mask = constraint.mask()
        token, history, extra = sample(logits, history, first_mask)
    mx.async_eval(token, *extra)
    # A seeded sampler's key sequence (see make_sampler): a position drawn again after a trigger
    # reuses its key, so each position takes one key, as in the batch decoder.
    keys = getattr(sampler, "key_state", None)

    def plain_step(token: mx.array, extra: list[mx.array], history: mx.array, known: int | None = None, started: float = 0.0):
        """One pipelined step: queue step n+1, hand out token n; returns token n's value and
        step n+1's token, extras and history. `known`: token n's value, already waited for and
        fed to the constraint (since `started`, for the host-time count)."""
        before = history
        saved = dict(keys) if keys is not None else None
        built = time.perf_counter()
        with mx.stream(generation_stream):
            next_logits = model(token[:, None], cache)[:, -1, :]
            built_at = time.perf_counter()
            built = built_at - built
            if constraint is None or not constraint.active:
                next_token, history, next_extra = sample(next_logits, history, None)
        if constraint is None or not constraint.active:
            mx.async_eval(next_token, *next_extra)
            value = token.item() if known is None else known
            if known is None and constraint is not None and constraint.advance(value):
                if saved is not None:
                    keys.update(saved)
                with mx.stream(generation_stream):
                    next_token, history, next_extra = sample(next_logits, before, constraint.mask())
                mx.async_eval(next_token, *next_extra)
        else:
            mx.async_eval(next_logits)
            if known is None:
                value = token.item()
                started = time.perf_counter()
                constraint.advance(value)
                host = time.perf_counter() - started + built
            else:  # waited for before the step was queued: the host's work then idled the accelerator
                value, host = known, built_at - started
            if lookup is not None:
                lookup.controller.host_time(host)
            with mx.stream(generation_stream):
                mask = constraint.mask() if constraint.active else None
                next_token, history, next_extra = sample(next_logits, history, mask)
            mx.async_eval(next_token, *next_extra)
        yield output(token, extra)
        return value, next_token, next_extra, history

    while True:
        if lookup is not None and constraint is not None and constraint.active and lookup.controller.merges_forced:
            # Wait for token n, then put the tokens the grammar forces after it into its own pass.
            value = token.item()
            started = time.perf_counter()
            constraint.advance(value)
            lookup.index.append(value)
            draft, n_forced = lookup.merged_draft(constraint) if constraint.active else ([], 0)
            if draft:
                yield value
                seen = history if track else None
                kept, following = verify_draft(
                    model, cache, value, draft, lookup, processors, seen, constraint, n_forced, advanced=True
                )
                history = grow(history, mx.array([*kept, following]))  # `history` already ended with `value`
                for value in kept:
                    yield value
                    lookup.index.append(value)
                token = mx.array([following], dtype=mx.int32)
                continue
            value, token, extra, history = yield from plain_step(token, extra, history, value, started)
            draft, n_forced = lookup.next_draft(constraint, forced=False)
        else:
            value, token, extra, history = yield from plain_step(token, extra, history)
            if lookup is None:
                continue
            lookup.index.append(value)
            # Tokens a grammar forces (a JSON key, a tool's name) are drafted even while n-gram
            # drafting is paused: they are almost always kept.
            draft, n_forced = lookup.next_draft(constraint)
        if not draft:
            continue
        first = token.item()  # wait for step n+1: it confirms the draft's first token or not
        if not lookup.confirms(first, draft, n_forced):
            continue
        seen, rest = history if track else None, max(n_forced - 1, 0)
        kept, following = verify_draft(
            model, cache, first, draft[1:], lookup, processors, seen, constraint, rest, after_forced=n_forced > 0
        )
        history = grow(history, mx.array([*kept, following]))  # `history` already ended with `first`
        for value in (first, *kept):
            yield value
            lookup.index.append(value)
        token = mx.array([following], dtype=mx.int32)


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


class _StopMatcher:
    """Finds user stop strings in streamed text, holding back a possible partial match."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        self.pending += text
        hits = [i for s in self.stop if (i := self.pending.find(s)) != -1]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        if not self.stop:
            out, self.pending = self.pending, ""
            return out, False
        cut = len(self.pending)
        for k in range(min(self.hold, len(self.pending)), 0, -1):
            tail = self.pending[-k:]
            if any(s.startswith(tail) for s in self.stop):
                cut = len(self.pending) - k
                break
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class ReplyStream:
    """A reply as its tokens arrive, as `GenerationChunk`s: detokenized text cut at a stop string,
    the finish (EOS, a stop string or `max_tokens`), tool-call deltas and the statistics."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_tokens: int,
        max_tokens: int,
        stop: str | Sequence[str] | None = None,
        tools: Sequence[Any] | None = None,
        tool_choice: Any = "auto",
        parse_calls: bool = True,
    ) -> None:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if tools and tool_choice == "none":
            stops.append("<tool_call>")
        self.matcher = _StopMatcher(stops)
        # Special tokens other than EOS stay in the text (tool-call markers may be special tokens).
        self.detokenizer = tokenizer.detokenizer(skip_special_tokens=False)
        self.eos = set(tokenizer.eos_token_ids)
        self.prompt_tokens, self.max_tokens, self.count = prompt_tokens, max_tokens, 0
        self.calls = ToolCallStream() if tools and parse_calls else None  # off where the caller parses them itself
        self.emitted: list[str] = []
        self.t0 = time.perf_counter()  # when the request began (its prefill)
        self.t_first = 0.0

    def text(self, token: int) -> tuple[str, str | None]:
        """The text `token` completes, and the finish reason ("stop", "length") if it ends the reply."""
        self.count += 1
        if token in self.eos:
            text, hit = self.matcher.feed(self.detokenizer.finalize())
            return (text if hit else text + self.matcher.flush()), "stop"
        text, hit = self.matcher.feed(self.detokenizer.add_token(token))
        if hit:
            return text, "stop"
        if self.count >= self.max_tokens:
            rest, hit = self.matcher.feed(self.detokenizer.finalize())
            return text + (rest if hit else rest + self.matcher.flush()), "stop" if hit else "length"
        return text, None

    def add(self, token: int, logprobs: TokenLogprobs | None = None) -> GenerationChunk:
        """The chunk of the next generated token; its `finish_reason` is set when the reply ends."""
        now = time.perf_counter()
        if not self.count:
            self.t_first = now
        text, finish = self.text(token)
        self.emitted.append(text)
        calls = deltas = None
        if self.calls is not None:
            deltas = self.calls.feed(text)[1]
            if finish:
                deltas += self.calls.finish()[1]
                calls = parse_tool_calls("".join(self.emitted))[1]
                finish = "tool_calls" if calls and finish == "stop" else finish
        n = self.count
        prompt_tps = self.prompt_tokens / max(self.t_first - self.t0, 1e-9)
        tps = (n / (now - self.t_first)) if n > 1 and now > self.t_first else 0.0
        peak = mx.get_peak_memory() / 1e9
        return GenerationChunk(text, token, finish, self.prompt_tokens, n, prompt_tps, tps, peak, calls, deltas, logprobs)


@dataclass
class Decoding:
    """How one request's tokens are chosen and turned into chunks (see `prepare_decoding`)."""

    ids: list[int]  # the prompt's token ids (those not already in the cache)
    max_tokens: int
    sampler: Sampler
    processors: list[LogitsProcessor]
    constraint: TokenConstraint | None
    reply: ReplyStream


def prepare_decoding(
    model: Model,
    tokenizer: Tokenizer,
    ids: Sequence[int],
    cached: int = 0,
    *,
    tools: Sequence[dict[str, Any]] | None = None,
    tool_choice: str | dict[str, Any] | None = "auto",
    response_format: dict[str, Any] | None = None,
    constrain: bool = True,
    max_tokens: int = 256,
    sampling: SamplingOptions | None = None,
    stop: str | Sequence[str] | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    parse_calls: bool = True,
) -> Decoding:
    """Check a prompt of `ids` after `cached` positions already in the cache, and build its
    sampler, logits processors, grammar constraint and reply stream (`stream_generate`'s options).
    `parse_calls=False`: the chunks carry no tool calls or call deltas (for a caller that parses
    the reply's text itself, as the server's `ChatReply` does)."""
    ids = list(ids)
    if not ids:
        raise ValueError("the prompt is empty")
    if max(ids) >= model.args.vocab_size or min(ids) < 0:
        bad = max(ids) if max(ids) >= model.args.vocab_size else min(ids)
        raise ValueError(
            f"token id {bad} is outside the model's {model.args.vocab_size} embedding rows "
            "(does the tokenizer belong to this model?)"
        )
    context = model.args.max_position_embeddings
    if cached + len(ids) >= context:
        raise ContextLengthError(
            f"the prompt has {cached + len(ids)} tokens but the context window is {context}; "
            "shorten the prompt or the conversation"
        )
    max_tokens = min(max_tokens, context - cached - len(ids))
    sampling = sampling or SamplingOptions()
    sampler = sampling.sampler()
    processors = sampling.processors(logits_processors)
    if model.args.vocab_size > tokenizer.vocab_size:  # the model's padding rows past the tokenizer
        processors.append(vocab_limit_processor(tokenizer.vocab_size, model.args.vocab_size))
    constraint = None
    if tools or response_format is not None:
        from .constrained import build_processor

        constraint = build_processor(
            tokenizer, model.args.vocab_size, tools, tool_choice, response_format, constrain, max_tokens=max_tokens
        )
    reply = ReplyStream(tokenizer, len(ids), max_tokens, stop, tools, tool_choice, parse_calls)
    return Decoding(ids, max_tokens, sampler, processors, constraint, reply)


def prompt_tokens(
    tokenizer: Tokenizer,
    prompt: str | Sequence[int] | None = None,
    messages: list[dict[str, Any]] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Token ids for a raw prompt (string or ids) or for chat `messages` (+ `tools`)."""
    if (prompt is None) == (messages is None):
        raise ValueError("pass exactly one of prompt= or messages=")
    if messages is not None:
        return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
    if isinstance(prompt, str):
        return tokenizer.encode_prompt(prompt)
    return [int(t) for t in prompt]


def stream_generate(
    model: Model,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int] | None = None,
    *,
    messages: list[dict[str, Any]] | None = None,
    tools: Sequence[ToolSpec] | None = None,
    tool_choice: str | dict[str, Any] | None = "auto",
    response_format: dict[str, Any] | None = None,
    constrain: bool = True,
    max_tokens: int = 256,
    sampling: SamplingOptions | None = None,
    stop: str | Sequence[str] | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    cache: list[KVCache] | None = None,
    cached_ids: Sequence[int] | None = None,
    top_logprobs: int | None = None,
    prompt_lookup: bool = False,
    prefill_chunk_size: int = 512,
    **loose_sampling: Any,
) -> Iterator[GenerationChunk]:
    """Generate text token by token from `prompt` (str or ids) or chat `messages`.

    Yields a `GenerationChunk` per token; the last has `finish_reason` "stop" (EOS or a stop
    string, which is not included in the text) or "length". Pass `cache` to continue from the
    tokens it already holds; on return (also when interrupted or on error) every layer holds
    the prompt and all generated tokens but the last, or, if no token was generated, exactly
    what it held before the call (a bounded cache, `max_kv_size`, that already dropped positions
    it would need for that is emptied instead: offset 0). For a quantized or bounded cache, pass
    `cache=model.make_cache(kv_bits=8, max_kv_size=...)`.

    `tools` (schemas or Python functions) go into the chat template; calls are parsed at the end.
    With `constrain`, every call's JSON is forced to name a tool and match its parameters
    (`tool_choice`: "auto", "required", "none" or a tool name). `response_format`
    ({"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}}) makes
    the whole reply valid JSON.

    `sampling` chooses the tokens (default: greedy). `cached_ids`, the token ids `cache` already
    holds, give the whole context to every logits processor that reads the tokens so far (the
    repetition penalty, your own) and to prompt lookup, so a cached turn is decoded as it would
    be from scratch.

    `top_logprobs` (k >= 0) adds each token's log-probability and its k best alternatives to
    its chunk (`chunk.logprobs`). `prompt_lookup` turns on prompt-lookup speculative decoding
    (same output greedy, same distribution sampling; see `speculative.py`); it is not combined
    with `top_logprobs`.

    mlx-lm's loose keywords (`temp`, `temperature`, `top_p`, `top_k`, `min_p`,
    `repetition_penalty`, `repetition_context_size`, `seed`) are accepted instead of `sampling`
    (see `SamplingOptions.merged`).
    """
    sampling = SamplingOptions.merged(sampling, loose_sampling, "stream_generate")
    tools = tool_schemas(tools)
    ids = prompt_tokens(tokenizer, prompt, messages, tools)
    if cache is None:
        cache = model.make_cache()
    start = cache[0].offset
    if cached_ids is not None and len(cached_ids) != start:
        raise ValueError(f"cached_ids has {len(cached_ids)} ids but the cache holds {start} positions")
    plan = prepare_decoding(
        model,
        tokenizer,
        ids,
        start,
        tools=tools,
        tool_choice=tool_choice,
        response_format=response_format,
        constrain=constrain,
        max_tokens=max_tokens,
        sampling=sampling,
        stop=stop,
        logits_processors=logits_processors,
    )
    reply, processors = plan.reply, plan.processors
    n = 0
    wired = _wire_memory()
    try:
        prompt = mx.array(ids, dtype=mx.int32)
        logits = prefill(model, prompt, cache, prefill_chunk_size)
        context = [*cached_ids, *ids] if cached_ids is not None else ids  # what the processors and lookup see
        history = mx.array(context, dtype=mx.int32) if reads_history(processors) else None
        if plan.max_tokens <= 0:
            yield GenerationChunk("", None, "length", len(ids), 0)
            return
        logprobs = None
        lookup = None
        # Not with the caller's own logits processors: they may keep state from call to call,
        # which a verify pass (several positions at once, some rolled back) would corrupt.
        if prompt_lookup and top_logprobs is None and not logits_processors:
            lookup = PromptLookup(context, sampling, max_tokens=plan.max_tokens, stop_ids=reply.eos, words=tokenizer)
        tokens = decode(model, logits, cache, plan.sampler, processors, history, plan.constraint, top_logprobs, lookup)
        for token in tokens:
            if top_logprobs is not None:
                token, logprobs = token
            n += 1
            if n % CLEAR_CACHE_EVERY == 0:
                mx.clear_cache()  # return freed buffers to the system now and then, as mlx-lm does
            chunk = reply.add(token, logprobs)
            yield chunk
            if chunk.finish_reason:
                return
    finally:
        # Every layer to one absolute position, whatever was interrupted: the prompt and the
        # tokens handed out but the last (decode runs a step ahead), or nothing of this call
        # when no token was handed out (an interrupted prefill leaves no partial prompt).
        try:
            rollback_cache(cache, start + len(ids) + n - 1 if n else start)
        except CacheRollbackError:
            pass  # a bounded cache (max_kv_size) that dropped positions before `start`: now empty (offset 0)
        if wired:
            _unwire_memory()


_WIRED = {"users": 0, "previous": 0}
_code = stream_generate.__code__
_STREAM_OPTIONS = set(_code.co_varnames[: _code.co_argcount + _code.co_kwonlyargcount])  # its named parameters


def _wire_memory() -> bool:
    """On Metal, keep the weights and caches wired while generating (as mlx-lm does). Counted, so
    generations interleaved on one thread (the server's) restore the old limit only when the last ends."""
    if not mx.metal.is_available():
        return False
    if _WIRED["users"] == 0:
        _WIRED["previous"] = mx.set_wired_limit(mx.metal.device_info()["max_recommended_working_set_size"])
    _WIRED["users"] += 1
    return True


def _unwire_memory() -> None:
    _WIRED["users"] -= 1
    if _WIRED["users"] == 0:
        mx.synchronize()
        mx.set_wired_limit(_WIRED["previous"])


def generate(
    model: Model,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int] | None = None,
    verbose: bool = False,
    **kwargs: Any,
) -> GenerationResult:
    """Generate a complete reply; takes the same arguments as `stream_generate`.

    The call mlx-lm users write works as it is: `generate(model, tokenizer, prompt=prompt,
    verbose=True, temp=0.3, max_tokens=256)`. `verbose` streams the text to stdout as it comes,
    then prints the prompt and generation speeds and the peak memory (mlx-lm's format); `temp`,
    `temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty`, `repetition_context_size`
    and `seed` may be passed loose instead of `sampling=SamplingOptions(...)`. `str()` of the
    result is its text, so `print(generate(...))` prints the reply.
    """
    loose = {k: kwargs.pop(k) for k in list(kwargs) if k not in _STREAM_OPTIONS}
    kwargs["sampling"] = SamplingOptions.merged(kwargs.get("sampling"), loose, "generate")  # bad keywords: before any output
    chunks = []
    t0 = time.perf_counter()
    ttft = 0.0
    if verbose:
        print("=" * 10)
    for chunk in stream_generate(model, tokenizer, prompt, **kwargs):
        if not ttft and chunk.token is not None:
            ttft = time.perf_counter() - t0
        chunks.append(chunk)
        if verbose:
            print(chunk.text, end="", flush=True)
    result = GenerationResult.from_chunks(chunks, ttft)
    if verbose:
        print()
        print("=" * 10)
        if not result.raw_text:
            print("No text generated for this prompt")
        print(f"Prompt: {result.prompt_tokens} tokens, {result.prompt_tps:.3f} tokens-per-sec")
        print(f"Generation: {result.generation_tokens} tokens, {result.generation_tps:.3f} tokens-per-sec")
        print(f"Peak memory: {result.peak_memory:.3f} GB")
    return result
