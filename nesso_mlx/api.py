"""The Python API over the decoder: `stream_generate`, `generate` and `batch_generate`.

Each builds its requests' rows (`reply.prepare_decoding`: sampler, processors, grammar, reply
stream), prefills them (`generation.prefill`) and drives one `generation.Decoder`: a lone row for
`stream_generate`, up to `batch_size` rows for `batch_generate`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import mlx.core as mx

from .cache import KVCache
from .generation import Decoder, Row, prefill, rollback_or_empty
from .model import Model
from .reply import GenerationChunk, GenerationResult, prepare_decoding, prompt_tokens
from .sampling import LogitsProcessor, SamplingOptions
from .speculative import PromptLookup
from .tokenizer import Tokenizer
from .tools import ToolSpec, tool_schemas


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
    reply = plan.reply
    context = [*cached_ids, *ids] if cached_ids is not None else ids  # what the processors and lookup see
    lookup = None
    # Not with the caller's own logits processors: they may keep state from call to call, which
    # a verify pass (several positions at once, some rolled back) would corrupt.
    if prompt_lookup and top_logprobs is None and not logits_processors:
        lookup = PromptLookup(context, sampling, max_tokens=plan.max_tokens, stop_ids=reply.eos, words=tokenizer)
    row = Row(plan.sampler, plan.processors, mx.array(context, dtype=mx.int32), plan.constraint, top_logprobs, lookup)
    decoder, n = Decoder(model), 0
    wired = _wire_memory()
    try:
        # Interrupted, the prefill leaves the cache as it was (see `prefill_steps`).
        logits = prefill(model, mx.array(ids, dtype=mx.int32), cache, prefill_chunk_size)
        if plan.max_tokens <= 0:
            rollback_or_empty(cache, start)
            yield GenerationChunk("", None, "length", len(ids), 0)
            return
        decoder.add(row, cache, logits, prompt=len(ids))
        while True:
            for item in decoder.step():
                if item.error is not None:
                    raise item.error
                n += 1
                chunk = reply.add(item.token, item.logprobs)
                yield chunk
                if chunk.finish_reason:
                    return
    finally:
        # Whatever stopped it, the cache holds the prompt and the tokens handed out but the last,
        # or nothing of this call when none was (a bounded cache that dropped what that needs: emptied).
        if decoder.rows:
            decoder.remove(row, n)
        else:  # stopped between the prefill and joining the decoder
            rollback_or_empty(cache, start)
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
    decoder = Decoder(model)
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
        row = Row(plan.sampler, plan.processors, tokens, plan.constraint, data=(index, plan.reply, []))
        if plan.max_tokens <= 0:
            finish(row, [GenerationChunk("", None, "length", len(ids), 0)])
        else:
            decoder.add(row, cache, logits)

    def finish(row: Row, chunks: list[Any]) -> None:
        index, reply = row.data[:2]
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
            _, reply, chunks = item.row.data
            if chunks and chunks[-1].finish_reason:
                continue  # a token after the reply ended (a step may give a row several)
            chunks.append(reply.add(item.token))
            if chunks[-1].finish_reason:
                finished.append(item.row)
        if finished:
            decoder.remove_many(finished)
            for row in finished:
                finish(row, row.data[2])
    return results
