"""The MLX side of `nesso-mlx serve`: one worker thread, continuous batching and a prompt cache.

One thread does all MLX work. MLX streams belong to the thread that made them:
`generation.generation_stream` is made when `nesso_mlx.generation` is imported, and using it from
another thread fails ("There is no Stream(cpu, 0) in current thread"); arrays and KV caches are
not meant to be shared between threads either. So the worker thread imports the generation
module, loads the model, runs every forward pass and owns every cache; the asyncio side sends it
`Job`s and receives plain dicts (through `Job.sink`, `loop.call_soon_threadsafe` in the server).

Scheduling is continuous batching: up to `max_concurrency` jobs are active, the rest wait in
arrival order. Each round, every active job that is not decoding yet takes one step (one chunk of
its prompt's prefill), then all the decoding jobs take one decode step together: one forward pass
for the batch (`generation.Decoder`), each with its own sampler, penalties and grammar. A job joins
the batch when its prefill is done and leaves it the moment its reply ends. A chat job arrives
prepared (`prepare_chat`: templated, tokenized, checked against the window, its grammar compiled,
all in the server's thread pool, off this thread); a job's first step runs as soon as it arrives,
so a bad request is refused at once even when the server is busy. A cancelled job (its client went away) is closed at
its next turn: it leaves the batch, its cache is kept for reuse, and the slot is free.

The prompt cache keeps the KV caches of finished requests (prompt and reply) in an LRU with a byte
budget. A new request reuses the entry with the longest common token prefix and prefills only the
rest, so a system prompt and tool schemas shared by many requests are prefilled once. Reuse does not
copy: the new cache's layers are views of the entry's first positions (new array objects; MLX
arrays are values, and a cache write makes a new buffer), so the entry is never changed by the
request that reused it (tests/test_server.py checks it).
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .cache import common_prefix
from .errors import NessoError
from .request.completions import CompletionRequest, LegacyLogprobs, prompt_ids
from .request.core import ChatReply, ChatRequest, RequestError, chat_prompt_ids, check_context, generation_options, usage

log = logging.getLogger("nesso_mlx.server")

Event = dict[str, Any]
DEFAULT_PROMPT_CACHE_BYTES = 2**30
DEFAULT_PREFILL_STEP = 256  # prompt tokens per scheduling step: bounds how long other streams wait
PROMPT_LOGPROBS_STEP = 128  # positions per step when scoring a prompt (bounds the (positions, vocab) logits)


# --- the prompt cache ----------------------------------------------------------------------------


def cache_nbytes(cache: Sequence[Any]) -> int:
    """Bytes held by a cache's key and value buffers (whole buffers, not only the valid positions)."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache if layer.keys is not None and layer.values is not None)


def share_cache(cache: Sequence[Any], length: int) -> list[Any]:
    """New KVCache objects holding the first `length` positions of `cache` as views, without copying.

    Writing to the new cache never changes `cache`: its capacity is `length`, so the first write
    allocates a new buffer (MLX arrays are values; a slice is a new array object).
    """
    from .cache import KVCache

    out = []
    for layer in cache:
        copy = KVCache()
        if length:
            copy.keys, copy.values = layer.keys[..., :length, :], layer.values[..., :length, :]
            copy.offset = length
        out.append(copy)
    return out


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    cache: list[Any]
    nbytes: int


class PromptCache:
    """KV caches of earlier requests, keyed by their tokens, least recently used first out.

    `lookup(ids)` gives a cache holding the longest prefix of `ids` that an entry shares (at most
    all but the last token, which must be fed to get logits) and its length; `store(tokens,
    cache)` adds an entry (replacing entries it extends) and evicts the least recently used ones
    while the entries hold more than `max_bytes`.
    """

    def __init__(self, max_bytes: int = DEFAULT_PROMPT_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def lookup(self, ids: Sequence[int]) -> tuple[list[Any] | None, int]:
        best, best_len = None, 0
        for key, entry in self._entries.items():
            n = common_prefix(entry.tokens, ids)
            if n > best_len:
                best, best_len = key, n
        best_len = min(best_len, len(ids) - 1)
        if best is None or best_len <= 0:
            return None, 0
        self._entries.move_to_end(best)
        return share_cache(self._entries[best].cache, best_len), best_len

    def store(self, tokens: Sequence[int], cache: list[Any]) -> None:
        if self.max_bytes <= 0 or not tokens:
            return
        tokens = tuple(int(t) for t in tokens)
        size = cache_nbytes(cache)
        if size > self.max_bytes:
            return
        for key, entry in list(self._entries.items()):
            if len(entry.tokens) >= len(tokens) and entry.tokens[: len(tokens)] == tokens:
                self._entries.move_to_end(key)  # an entry already holds all of it
                return
            if entry.tokens == tokens[: len(entry.tokens)]:
                del self._entries[key]  # the new entry extends it
        self._entries[self._next] = _Entry(tokens, cache, size)
        self._next += 1
        while self.nbytes > self.max_bytes:
            self._entries.popitem(last=False)


# --- running a request ---------------------------------------------------------------------------


@dataclass
class Runtime:
    """What jobs run with: the model and tokenizer, the prompt cache and the prefill step."""

    model: Any
    tokenizer: Any
    prompt_cache: PromptCache = field(default_factory=PromptCache)
    prefill_step: int = DEFAULT_PREFILL_STEP
    default_max_tokens: int | None = None  # for chat requests that give none (None: up to the context window)
    prompt_lookup: bool = True  # prompt-lookup decoding for a request decoding alone (see `generate_steps`)

    @property
    def context_window(self) -> int:
        return self.model.args.max_position_embeddings

    @property
    def vocab_size(self) -> int:
        return self.model.args.vocab_size


class BatchSlot:
    """A request's row in the scheduler's decoder (`Scheduler.decoder`): what joins it, and the
    tokens the decoder produced for it, waiting to be handled."""

    def __init__(self, row: Any, cache: list[Any], logits: Any, prompt: int) -> None:
        self.row, self.cache, self.logits, self.prompt = row, cache, logits, prompt
        self.decoder: Any = None  # set by the scheduler when the row joins
        self.inbox: deque[Any] = deque()
        self.broken = False  # the decoder failed: its cache is not to be reused

    def leave(self, used: int) -> list[Any] | None:
        """Take the row out of the decoder; its cache holds the prompt and the first `used - 1`
        tokens it handed out (see `generation.Decoder.remove`)."""
        if self.decoder is None:
            return None
        cache = self.decoder.remove(self.row, used)
        self.decoder = None  # only once it is out: a failed remove leaves it joined (see Scheduler.round)
        if any(layer.keys is not None and layer.keys.shape[2] > layer.offset for layer in cache):
            # Views of the batch's buffers, or a lone row's own with spare room: copy just its
            # positions (a view would keep the whole buffer alive in the prompt cache).
            import mlx.core as mx

            for layer in cache:
                if layer.offset:
                    layer.keys, layer.values = (mx.contiguous(a) for a in layer.state)
            mx.async_eval([layer.state for layer in cache])
        return cache


def generate_steps(
    rt: Runtime,
    ids: list[int],
    options: Callable[[Sequence[int], int], dict[str, Any]],
    stats: dict[str, int],
    *,
    cache: list[Any] | None = None,
    position: int = 0,
) -> Iterator[Any]:
    """The prompt `ids` prefilled, then decoded in the scheduler's decoder: yields None at each
    scheduling point, a `BatchSlot` once (for the scheduler to add to its decoder), then a
    `GenerationChunk` per token.

    Without `cache`, the prompt cache gives the longest cached prefix (`stats["cached_tokens"]`);
    with one, its first `position` tokens of `ids` are already in it. The prompt is prefilled
    `rt.prefill_step` tokens per step (`generation.prefill_steps`); `options(prefix, n)` gives
    `stream_generate`'s keyword arguments for a prompt whose first tokens `prefix` are in the
    cache and `n` remain. However it ends, the row leaves the decoder and its cache (prompt and
    reply but its last token) is stored in the prompt cache.
    """
    import mlx.core as mx

    from .cache import rollback_cache
    from .generation import Row, prefill_steps
    from .reply import GenerationChunk, prepare_decoding

    if cache is None:
        cache, position = rt.prompt_cache.lookup(ids)
        if cache is None:
            cache, position = rt.model.make_cache(), 0
        stats["cached_tokens"] = position
    generated: list[int] = []
    slot: BatchSlot | None = None
    try:
        kwargs = options(ids[:position], len(ids) - position)
        top_logprobs = kwargs.pop("top_logprobs", None)
        constraint = kwargs.pop("constraint", None)
        if constraint is not None:  # compiled already (once per request): not again here
            kwargs.update(constrain=False, response_format=None)
        # The protocols' ChatReply parses the calls from the text, once: the reply stream does not.
        plan = prepare_decoding(rt.model, rt.tokenizer, ids[position:], position, parse_calls=False, **kwargs)
        if constraint is not None:
            plan.constraint = constraint
        prompt = mx.array(plan.ids, dtype=mx.int32)
        logits = yield from prefill_steps(rt.model, prompt, cache, rt.prefill_step)
        if plan.max_tokens <= 0:
            yield GenerationChunk("", None, "length", len(plan.ids), 0)
            return
        lookup = _prompt_lookup(rt, ids, kwargs.get("sampling"), top_logprobs, plan)
        row = Row(plan.sampler, plan.processors, prompt, plan.constraint, top_logprobs, lookup)
        slot = BatchSlot(row, cache, logits, len(plan.ids))
        cache = None  # the decoder has it now (a batch, a copy): it comes back when the row leaves
        yield slot
        while True:
            if not slot.inbox:
                yield None
                continue
            item = slot.inbox.popleft()
            generated.append(item.token)
            chunk = plan.reply.add(item.token, item.logprobs)
            if chunk.finish_reason:  # leave the decoder now: the job goes on (its last events) without it
                cache = slot.leave(len(generated))
                yield chunk
                return
            yield chunk
    finally:
        if slot is not None and slot.broken:
            slot.decoder, cache = None, None  # the failed decoder is dropped whole: its caches are not reused
        elif slot is not None and slot.decoder is not None:
            cache = slot.leave(len(generated))
        # No token taken: what the prefill left (whole chunks, or the prompt less any reply).
        held = list(ids) + generated[:-1] if generated else list(ids[: cache[0].offset if cache is not None else 0])
        if cache is not None and all(layer.offset >= len(held) for layer in cache):
            rollback_cache(cache, len(held))
            rt.prompt_cache.store(held, cache)


def _prompt_lookup(rt: Runtime, ids: list[int], sampling: Any, top_logprobs: int | None, plan: Any) -> Any:
    """Prompt-lookup decoding for the request while it decodes alone (the decoder drafts only
    for a row alone), or None: not with logprobs, and not for seeded sampling, whose
    draws would then depend on whether other requests were running (greedy output is the same
    either way, up to kernel numerics: a verify pass computes several positions in one matmul)."""
    if not rt.prompt_lookup or top_logprobs is not None:
        return None
    if sampling is not None and sampling.temperature and sampling.seed is not None:
        return None
    from .speculative import PromptLookup

    return PromptLookup(ids, sampling, max_tokens=plan.max_tokens, stop_ids=plan.reply.eos, words=rt.tokenizer)


@dataclass
class PreparedChat:
    """A chat request made ready to run: its prompt ids, its token budget and its grammar
    constraint (compiled once; None when nothing is constrained). See `prepare_chat`."""

    ids: list[int]
    max_tokens: int
    constraint: Any = None


def prepare_chat(
    tokenizer: Any, context_window: int, vocab_size: int, request: ChatRequest, default_max_tokens: int | None = None
) -> PreparedChat:
    """Template and tokenize a chat request, check it fits the window and compile its grammar.

    No MLX work: the server runs it in a thread pool on the HTTP side, so that a long prompt or a
    large schema never holds up the worker thread's decoding. Raises `RequestError`.
    """
    ids = chat_prompt_ids(tokenizer, request)
    asked = request.max_tokens
    if asked is not None and request.clamp_max_tokens:  # a ceiling: what the window leaves, at most
        asked = max(1, min(asked, context_window - len(ids)))
    if asked is None and default_max_tokens is not None:  # the server's default, within what the window leaves
        asked = max(1, min(default_max_tokens, context_window - len(ids)))
    max_tokens = check_context(len(ids), asked, context_window)
    constraint = None
    if request.tools or request.response_format is not None:
        from .constrained import GrammarError, build_processor

        try:
            constraint = build_processor(
                tokenizer, vocab_size, request.tools, request.tool_choice, request.response_format, max_tokens=max_tokens
            )
        except GrammarError as e:
            raise RequestError(str(e), "response_format" if request.response_format else "tools", "invalid_schema") from None
    return PreparedChat(ids, max_tokens, constraint)


def chat_job(rt: Runtime, request: ChatRequest, stream: bool, prepared: PreparedChat | None = None) -> Iterator[Event | None]:
    """A chat completion: "ready" once checked, "delta" events while streaming, then "done".

    `prepared` (from `prepare_chat`, run off this thread) is made here when not given.
    """
    tokenizer = rt.tokenizer
    if prepared is None:
        prepared = prepare_chat(tokenizer, rt.context_window, rt.vocab_size, request, rt.default_max_tokens)
    ids, max_tokens = prepared.ids, prepared.max_tokens
    yield {"type": "ready", "prompt_tokens": len(ids)}

    def options(prefix: Sequence[int], n: int) -> dict[str, Any]:
        return generation_options(
            request.sampling,
            max_tokens=max_tokens,
            stop=request.stop,
            vocab_size=rt.vocab_size,
            prefix=prefix,
            prompt_tokens=n,
            top_logprobs=request.top_logprobs,
            tools=request.tools,
            tool_choice=request.tool_choice,
            response_format=request.response_format,
        ) | {"constraint": prepared.constraint}

    reply = ChatReply(tokenizer, tools=bool(request.tools), logprobs=request.logprobs)
    stats = {"cached_tokens": 0}
    finish = None
    generated: list[int] = []
    steps = generate_steps(rt, ids, options, stats)
    try:
        for chunk in steps:
            if chunk is None or isinstance(chunk, BatchSlot):
                yield chunk
                continue
            if chunk.token is not None:
                generated.append(chunk.token)
            deltas, entries = reply.add(chunk)
            finish = chunk.finish_reason or finish
            yield {"type": "delta", "deltas": deltas, "logprobs": entries} if stream and (deltas or entries) else None
            if not request.parallel_tool_calls and reply.calls_completed and not chunk.finish_reason:
                finish = "stop"  # one call asked for, and it is complete
                break
    finally:
        steps.close()
    last = reply.finish()
    yield {
        "type": "done",
        "deltas": last,
        "finish_reason": reply.finish_reason(finish),
        "message": reply.message(),
        "logprobs": {"content": reply.logprob_entries} if request.logprobs else None,
        "usage": usage(len(ids), reply.completion_tokens, stats["cached_tokens"]),
        "stop_sequence": _stop_hit(tokenizer, request.stop, generated, "".join(reply.raw)) if finish == "stop" else None,
    }


def _stop_hit(tokenizer: Any, stops: Sequence[str], generated: Sequence[int], text: str) -> str | None:
    """Which of `stops` ended a reply whose text (cut before the stop) is `text`, or None (EOS)."""
    if not stops or not generated or generated[-1] in set(tokenizer.eos_token_ids):
        return None
    rest = tokenizer.decode(list(generated))[len(text) :]
    # None when no stop string is there: the reply stopped at the `<tool_call>` that tool_choice "none" stops at.
    return next((s for s in stops if rest.startswith(s)), next((s for s in stops if s in rest), None))


def prompt_logprobs(rt: Runtime, ids: Sequence[int], k: int, cache: list[Any], out: list) -> Iterator[None]:
    """Score the prompt: for each of ids[1:], append (logprob, [(token, logprob) of the k most likely])
    to `out`, from the model's distribution after the tokens before it (no logits processors).

    `ids[:-1]` go through the model into `cache` (all positions' logits, `PROMPT_LOGPROBS_STEP` at
    a time, a scheduling point after each), so generation can go on from the last prompt token.
    """
    import mlx.core as mx

    from .generation import generation_stream
    from .sampling import log_softmax

    last = len(ids) - 1
    for start in range(0, last, PROMPT_LOGPROBS_STEP):
        end = min(start + PROMPT_LOGPROBS_STEP, last)
        targets = mx.array(ids[start + 1 : end + 1], dtype=mx.int32)
        with mx.stream(generation_stream):
            logprobs = log_softmax(rt.model(mx.array([ids[start:end]], dtype=mx.int32), cache)[0])
            parts = [mx.take_along_axis(logprobs, targets[:, None], axis=-1)[:, 0]]
            if k:
                best = mx.argpartition(-logprobs, k - 1, axis=-1)[:, :k]
                parts += [best, mx.take_along_axis(logprobs, best, axis=-1)]
        mx.eval(parts)
        chosen = parts[0].tolist()
        tops = zip(parts[1].tolist(), parts[2].tolist(), strict=True) if k else ([] for _ in chosen)
        for lp, top in zip(chosen, tops, strict=True):
            pairs = sorted(zip(*top, strict=True), key=lambda p: -p[1]) if k else []
            out.append((lp, pairs))
        yield None


def completion_job(
    rt: Runtime, request: CompletionRequest, stream: bool, prompts: list[list[int]] | None = None
) -> Iterator[Event | None]:
    """A (legacy) completion, one choice per prompt: "ready", "delta" events while streaming, "done".

    `prompts` (the prompts' ids from `completions.prompt_ids`, run off this thread) are made here
    when not given.
    """
    tokenizer = rt.tokenizer
    if prompts is None:
        prompts = prompt_ids(tokenizer, request, rt.context_window)
    yield {"type": "ready", "prompt_tokens": sum(map(len, prompts))}
    eos = set(tokenizer.eos_token_ids)
    k = request.logprobs
    choices, totals = [], {"prompt": 0, "completion": 0, "cached": 0}
    for index, ids in enumerate(prompts):
        lp = LegacyLogprobs(tokenizer) if k is not None else None
        text, echo, finish, stats = [], "", "length", {"cached_tokens": 0}
        cache, position = None, 0
        if request.echo:
            detokenizer = tokenizer.detokenizer(skip_special_tokens=False)
            echo = "".join(detokenizer.add_token(t) for t in ids) + detokenizer.finalize()
        if request.echo and lp is not None:
            scores: list = []
            cache, position = rt.model.make_cache(), len(ids) - 1
            yield from prompt_logprobs(rt, ids, k, cache, scores)
            lp.add(ids[0], None, None)
            for token, (logprob, top) in zip(ids[1:], scores, strict=True):
                lp.add(token, logprob, top)
            if request.max_tokens == 0:
                rt.prompt_cache.store(ids[:-1], cache)
        if stream and (echo or (lp and lp.tokens)):
            yield {"type": "delta", "index": index, "text": echo, "logprobs": lp.to_dict() if lp else None}
        if lp is not None:
            lp.offset = len(echo)
        sent = len(lp.tokens) if lp else 0
        generated = 0
        if request.max_tokens > 0:

            def options(prefix: Sequence[int], n: int) -> dict[str, Any]:
                return generation_options(
                    request.sampling,
                    max_tokens=request.max_tokens,
                    stop=request.stop,
                    vocab_size=rt.vocab_size,
                    prefix=prefix,
                    prompt_tokens=n,
                    top_logprobs=k,
                )

            steps = generate_steps(rt, ids, options, stats, cache=cache, position=position)
            try:
                for chunk in steps:
                    if chunk is None or isinstance(chunk, BatchSlot):
                        yield chunk
                        continue
                    text.append(chunk.text)
                    finish = chunk.finish_reason or finish
                    generated = chunk.generation_tokens
                    if lp is not None and chunk.token is not None and chunk.token not in eos and chunk.logprobs is not None:
                        lp.add(chunk.token, chunk.logprobs.logprob, chunk.logprobs.top)
                    if stream and (chunk.text or (lp and len(lp.tokens) > sent)):
                        yield {"type": "delta", "index": index, "text": chunk.text, "logprobs": lp.to_dict(sent) if lp else None}
                        sent = len(lp.tokens) if lp else 0
                    else:
                        yield None
            finally:
                steps.close()
        totals["prompt"] += len(ids)
        totals["completion"] += generated
        totals["cached"] += stats["cached_tokens"]
        choices.append(
            {
                "index": index,
                "text": echo + "".join(text),
                "logprobs": lp.to_dict() if lp is not None else None,
                "finish_reason": finish,
            }
        )
    yield {"type": "done", "choices": choices, "usage": usage(totals["prompt"], totals["completion"], totals["cached"])}


# --- scheduling ------------------------------------------------------------------------------------


class Job:
    """One request: `work(runtime)` is a generator of events (dicts) or None (a step with nothing to
    say); `sink(event)` takes each event (called in the worker thread). `cancel()` may be called
    from any thread."""

    def __init__(self, work: Callable[[Runtime], Iterator[Event | None]], sink: Callable[[Event], None]) -> None:
        self.work = work
        self.sink = sink
        self.cancelled = False
        self.generator: Iterator[Event | None] | None = None
        self.slot: BatchSlot | None = None  # its row in the scheduler's batch, once it joined

    @property
    def decoding(self) -> bool:
        """Whether its tokens come from the scheduler's batch (it is stepped when one arrives)."""
        return self.slot is not None and self.slot.decoder is not None

    def cancel(self) -> None:
        self.cancelled = True


def error_event(status: int, message: str, error_type: str, param: str | None = None, code: str | None = None) -> Event:
    """An "error" event carrying the HTTP status and OpenAI's error object."""
    body = {"message": message, "type": error_type, "param": param, "code": code}
    return {"type": "error", "status": status, "error": {"error": body}}


class Scheduler:
    """Continuous batching over the active jobs; runs in the thread that calls it (the worker, or a test).

    Each round, every job that is not decoding yet takes one step (its checks, or one chunk of its
    prompt's prefill); then the jobs that are decoding take one step together, one forward pass
    for all of them (`generation.Decoder`), and each handles its token. A job joins the batch when
    its prefill is done and leaves it when it ends, is cancelled or fails.
    """

    def __init__(self, runtime: Runtime, max_concurrency: int = 8) -> None:
        from .generation import Decoder

        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.runtime = runtime
        self.max_concurrency = max_concurrency
        self.pending: deque[Job] = deque()
        self.active: list[Job] = []
        self.decoder = Decoder(runtime.model)

    @property
    def busy(self) -> bool:
        return bool(self.active or self.pending)

    def add(self, job: Job) -> None:
        """Take a new job: its first step (checks) runs now; if it passes, it waits for a slot."""
        job.generator = job.work(self.runtime)
        self.decoder.reset_clocks()  # this is no decode step's time
        if self._step(job):
            self.pending.append(job)

    def round(self) -> None:
        """Admit waiting jobs into free slots, step the jobs that are not decoding, then decode one
        token for all those that are."""
        if any(job.cancelled for job in self.pending):  # clients gone while waiting: their places free now
            for job in [j for j in self.pending if j.cancelled]:
                self._close(job)
            self.pending = deque(j for j in self.pending if not j.cancelled)
        while self.pending and len(self.active) < self.max_concurrency:
            job = self.pending.popleft()
            self.active.append(job)
        for job in list(self.active):
            if not job.decoding:
                self.decoder.reset_clocks()  # a prefill chunk is no decode step's time
                if not self._step(job):
                    self.active.remove(job)
        if not len(self.decoder):
            return
        try:
            tokens = self.decoder.step()
        except Exception:
            log.exception("a batched decode step failed")
            for job in [j for j in self.active if j.decoding]:
                job.slot.broken = True
                job.sink(error_event(500, "the server failed while generating (see its log)", "server_error"))
                self._close(job)
                self.active.remove(job)
            from .generation import Decoder

            self.decoder = Decoder(self.runtime.model)
            return
        dropped: set[int] = set()
        for item in tokens:
            job = item.row.data
            if not (job in self.active and job.decoding and job.slot.row is item.row):
                # A token its row's job no longer takes: one after its reply ended (a step may give
                # a row several; the job has left the batch, or gone on to its next prompt), or from
                # a row its job could not take out (its leave failed). Drop it, and the row if it is
                # still in the batch (once: a failed removal is not retried token after token).
                if id(item.row) not in dropped and any(row is item.row for row in self.decoder.rows):
                    dropped.add(id(item.row))
                    try:
                        self.decoder.remove(item.row)
                    except Exception:
                        log.exception("dropping an orphaned batch row failed")
                continue
            if item.error is not None:  # this request's own processors or grammar failed
                log.error("request failed while decoding", exc_info=item.error)
                job.sink(error_event(500, "the server failed while generating (see its log)", "server_error"))
                self._close(job)  # leaves the batch
                self.active.remove(job)
                continue
            job.slot.inbox.append(item)
            if not self._step(job):
                self.active.remove(job)

    def run_until_idle(self) -> None:
        """Rounds until no job is left (for callers without a worker thread)."""
        while self.busy:
            self.round()

    def close_all(self) -> None:
        for job in [*self.active, *self.pending]:
            self._close(job)
        self.active.clear()
        self.pending.clear()

    def _step(self, job: Job) -> bool:
        """One step of `job`; False when it is over (done, failed or cancelled)."""
        if job.cancelled:
            self._close(job)
            return False
        try:
            event = next(job.generator)
        except StopIteration:
            return False
        except RequestError as e:
            job.sink({"type": "error", "status": 400, "error": e.to_dict()})
            return False
        except NessoError as e:  # one-line messages about the request (context length, template)
            job.sink(error_event(400, str(e), "invalid_request_error"))
            return False
        except Exception:
            log.exception("request failed")
            job.sink(error_event(500, "the server failed while generating (see its log)", "server_error"))
            return False
        if isinstance(event, BatchSlot):  # prefill done: the job's tokens now come from the batch
            event.row.data = job
            try:
                self.decoder.add(event.row, event.cache, event.logits, event.prompt)
            except Exception:  # the decoder is unchanged (`add` is all or nothing)
                log.exception("a request could not join the batch")
                job.sink(error_event(500, "the server failed while generating (see its log)", "server_error"))
                event.broken = True  # its cache may be why: not to be reused
                self._close(job)
                return False
            event.decoder, event.cache, event.logits = self.decoder, None, None
            job.slot = event
        elif event is not None:
            job.sink(event)
        return True

    def _close(self, job: Job) -> None:
        try:
            if job.generator is not None:
                job.generator.close()
        except Exception:
            log.exception("closing a cancelled request failed")


class Engine:
    """The worker thread: it loads the model, then runs jobs with a `Scheduler` until `stop()`."""

    def __init__(
        self,
        model: str,
        *,
        dtype: str | None = None,
        max_concurrency: int = 8,
        prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES,
        prefill_step: int = DEFAULT_PREFILL_STEP,
        default_max_tokens: int | None = None,
        prompt_lookup: bool = True,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if prefill_step < 1:
            raise ValueError(f"prefill_step must be >= 1, got {prefill_step}")
        self.model_name = model
        self.dtype = dtype
        self.max_concurrency = max_concurrency
        self.prompt_cache_bytes = prompt_cache_bytes
        self.prefill_step = prefill_step
        self.default_max_tokens = default_max_tokens
        self.prompt_lookup = prompt_lookup
        self.runtime: Runtime | None = None
        self.scheduler: Scheduler | None = None
        self._inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="nesso-mlx-worker", daemon=True)

    # Read from other threads: plain ints, set once the model is loaded.
    context_window = 0
    vocab_size = 0

    @property
    def active(self) -> int:
        return len(self.scheduler.active) if self.scheduler else 0

    @property
    def queued(self) -> int:
        return len(self.scheduler.pending) + self._inbox.qsize() if self.scheduler else 0

    def start(self) -> None:
        """Start the worker and wait until the model is loaded; raises what loading raised."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def submit(self, job: Job) -> None:
        self._inbox.put(job)

    def stop(self, timeout: float = 10.0) -> None:
        """Close every job and release the model; the worker thread then stays parked (see `_main`)."""
        if self._thread.is_alive() and not self._stopped.is_set():
            self._inbox.put(None)
            self._stopped.wait(timeout)

    def _load(self) -> None:
        already = "nesso_mlx.generation" in sys.modules
        import mlx.core as mx

        from .api import stream_generate
        from .generation import generation_stream
        from .loading import load

        if already:  # imported by another thread: its stream may not be usable here
            try:
                with mx.stream(generation_stream):
                    mx.eval(mx.zeros(1) + 1)
            except RuntimeError:
                raise NessoError(
                    "nesso_mlx.generation was first imported by another thread, and MLX streams belong to the thread "
                    "that made them; run the server in a process of its own (python -m nesso_mlx.server)"
                ) from None
        if mx.metal.is_available():
            # Wire the working set once for the server's life: each stream_generate sets it and restores
            # the value it found, which is then this one, whatever order interleaved requests end in.
            mx.set_wired_limit(mx.metal.device_info()["max_recommended_working_set_size"])
        model, tokenizer = load(self.model_name, dtype=self.dtype)
        for _ in stream_generate(model, tokenizer, [tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else 0], max_tokens=1):
            pass  # warm up (kernels, sampler)
        from .constrained import build_processor

        build_processor(tokenizer, model.args.vocab_size, None, "auto", {"type": "json_object"})  # llguidance's vocabulary
        self.runtime = Runtime(
            model, tokenizer, PromptCache(self.prompt_cache_bytes), self.prefill_step, self.default_max_tokens, self.prompt_lookup
        )
        self.context_window = self.runtime.context_window
        self.vocab_size = self.runtime.vocab_size

    def _main(self) -> None:
        try:
            self._load()
            self.scheduler = Scheduler(self.runtime, self.max_concurrency)
        except BaseException as e:
            self._error = e
            self._ready.set()
            self._stopped.set()
            threading.Event().wait()  # parked, as below
        self._ready.set()
        self._serve(self.scheduler)
        self.runtime = self.scheduler = None
        self._stopped.set()
        # Parked, not ended: when a thread that used MLX ends shortly before the interpreter exits,
        # MLX's C++ teardown can abort the process ("terminate called without an active exception";
        # seen in about a third of runs on MLX 0.32). A daemon thread parked here is harmless.
        threading.Event().wait()

    def _serve(self, scheduler: Scheduler) -> None:
        while True:
            try:
                item = self._inbox.get() if not scheduler.busy else self._inbox.get_nowait()
                while True:
                    if item is None:
                        scheduler.close_all()
                        return
                    scheduler.add(item)
                    item = self._inbox.get_nowait()
            except queue.Empty:
                pass
            try:
                scheduler.round()
            except Exception:  # the scheduler catches per job; this is a bug, keep serving
                log.exception("scheduler round failed")
