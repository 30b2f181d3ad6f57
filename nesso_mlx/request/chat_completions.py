"""OpenAI's Chat Completions (POST /v1/chat/completions) over the request core.

A body is validated into the core's `ChatRequest` (`parse_chat_request`; every bad field raises
`RequestError` naming it, which the server answers with a 400 and OpenAI's error object). The
core's reply events become a `chat.completion` or its stream of `chat.completion.chunk` events
(`ChatCompletionStream`): the core's `ChatReply` deltas are OpenAI's own, so they pass through.

Field policy:

- supported: messages, model (any string: a server runs one model), stream, stream_options
  (include_usage), temperature (default 1, as OpenAI), top_p, seed, stop (up to 16 strings),
  max_tokens, max_completion_tokens, frequency_penalty, presence_penalty, logit_bias, logprobs,
  top_logprobs (0-20), tools, tool_choice, parallel_tool_calls, response_format (text,
  json_object, json_schema; always strict), n (1 only); extensions as in vLLM and mlx-lm: top_k,
  min_p, repetition_penalty, repetition_context_size.
- accepted and ignored (they never change the output): user, metadata, store, service_tier,
  safety_identifier, prompt_cache_key (prompts are cached automatically), modalities (["text"]
  only), stream_options.include_obfuscation, and on messages `name` (the chat templates have no
  place for it) and null `refusal`/`function_call`/`audio`, `annotations` (as the OpenAI SDK
  echoes them back).
- everything else is refused with a 400 naming the field: n > 1, audio, prediction,
  reasoning_effort, verbosity, web_search_options, functions/function_call (the legacy API),
  unknown fields, image/audio/file content parts.

`completions` shares the sampling fields, `stream_options`, `n` and the token limit's checks.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from .core import (
    ChatRequest,
    FieldPolicy,
    RequestError,
    boolean,
    dumps,
    integer,
    new_id,
    parse_messages,
    parse_model,
    parse_response_format,
    parse_sampling,
    parse_stop,
    parse_tool_choice,
    parse_tools,
    refuse_unknown,
)

MAX_TOP_LOGPROBS = 20
SAMPLING_FIELDS = frozenset(
    {
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "frequency_penalty",
        "presence_penalty",
        "repetition_penalty",
        "repetition_context_size",
        "logit_bias",
    }
)
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"})
POLICY = FieldPolicy(
    SAMPLING_FIELDS
    | {
        "model",
        "messages",
        "stream",
        "stream_options",
        "stop",
        "max_tokens",
        "max_completion_tokens",
        "n",
        "logprobs",
        "top_logprobs",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "modalities",
    },
    IGNORED_FIELDS,
)


def single_choice(body: dict) -> None:
    """`n` and `best_of`: 1 (or absent) only."""
    for name in ("n", "best_of"):
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise RequestError(f"{name} must be a positive integer", name, "invalid_value")
        if value is not None and value != 1:
            raise RequestError(f"{name} > 1 is not supported: send one request per choice", name, "unsupported_value")


def parse_stream(body: dict) -> tuple[bool, bool]:
    """(`stream`, `stream_options.include_usage`)."""
    stream = boolean(body, "stream", False)
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise RequestError("stream_options is only allowed with stream: true", "stream_options", "invalid_value")
    if not isinstance(options, dict):
        raise RequestError("stream_options must be an object", "stream_options", "invalid_type")
    refuse_unknown(options, {"include_usage", "include_obfuscation"}, "stream_options")
    return stream, boolean(options, "include_usage", False)


def parse_max_tokens(body: dict, context_window: int, names: Sequence[str], low: int) -> int | None:
    """The token limit, under any of `names` (they must agree): at least `low`, within the window."""
    values = {name: integer(body, name, None, -(2**63), 2**63) for name in names}
    given = {name: v for name, v in values.items() if v is not None}
    if len(set(given.values())) > 1:
        raise RequestError(f"{' and '.join(given)} disagree; send one", names[-1], "invalid_value")
    if not given:
        return None
    name, value = next(iter(given.items()))
    if value < low:
        raise RequestError(f"{name} must be at least {low}, got {value}", name, "invalid_value")
    if value > context_window:
        raise RequestError(
            f"{name} is {value}, past the model's context window of {context_window} tokens", name, "context_length_exceeded"
        )
    return value


def parse_chat_request(body: Any, *, context_window: int, vocab_size: int) -> ChatRequest:
    """Validate a chat completions body; raises `RequestError` naming the first bad field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    POLICY.check(body)
    single_choice(body)
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise RequestError('modalities must be ["text"]: this model writes text only', "modalities", "unsupported_value")
    stream, include_usage = parse_stream(body)
    logprobs = boolean(body, "logprobs", False)
    top = integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise RequestError("top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")
    tools = parse_tools(body.get("tools"))
    tool_choice = parse_tool_choice(body.get("tool_choice"), tools)
    response_format = parse_response_format(body.get("response_format"))
    return ChatRequest(
        messages=parse_messages(body.get("messages")),
        sampling=parse_sampling(body, vocab_size),
        max_tokens=parse_max_tokens(body, context_window, ("max_tokens", "max_completion_tokens"), 1),
        stop=parse_stop(body),
        stream=stream,
        include_usage=include_usage,
        logprobs=logprobs,
        top_logprobs=(top or 0) if logprobs else None,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=boolean(body, "parallel_tool_calls", True),
        response_format=response_format,
        model=parse_model(body),
    )


# --- replies ---------------------------------------------------------------------------------------


def sse(data: Any) -> str:
    """One server-sent event carrying `data` as JSON."""
    return f"data: {dumps(data)}\n\n"


class ChatCompletionStream:
    """Builds a `chat.completion` from the core's events, or the stream of chunks that spells it.

    `start(ready)`, `delta(event)` for each "delta" event, `finish(done)` and `error(event)` return
    SSE text; `body()` is the whole `chat.completion` (after `finish`).
    """

    def __init__(self, model: str, include_usage: bool = False) -> None:
        self.base = {"id": new_id("chatcmpl-"), "object": "chat.completion", "created": int(time.time()), "model": model}
        self.head = {**self.base, "object": "chat.completion.chunk"}
        self.include_usage = include_usage
        self.done: dict[str, Any] | None = None

    def chunk(self, delta: dict[str, Any], logprobs: Any = None, finish: str | None = None) -> str:
        data = {**self.head, "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
        if self.include_usage:
            data["usage"] = None
        return sse(data)

    def _deltas(self, items: list[dict[str, Any]], entries: list[dict[str, Any]]) -> str:
        logprobs = {"content": entries} if entries else None
        if not items:
            return self.chunk({}, logprobs) if logprobs else ""
        return "".join(self.chunk(d, logprobs if i == 0 else None) for i, d in enumerate(items))

    def start(self, ready: dict[str, Any] | None = None) -> str:
        return self.chunk({"role": "assistant", "content": ""})

    def delta(self, event: dict[str, Any]) -> str:
        return self._deltas(event["deltas"], event["logprobs"])

    def finish(self, done: dict[str, Any]) -> str:
        self.done = done
        out = self._deltas(done["deltas"], []) + self.chunk({}, None, done["finish_reason"])
        if self.include_usage:
            out += sse({**self.head, "choices": [], "usage": done["usage"]})
        return out + "data: [DONE]\n\n"

    def error(self, event: dict[str, Any]) -> str:
        return sse(event["error"])

    def body(self) -> dict[str, Any]:
        assert self.done is not None
        done = self.done
        choice = {"index": 0, "message": done["message"], "logprobs": done["logprobs"], "finish_reason": done["finish_reason"]}
        return {**self.base, "choices": [choice], "usage": done["usage"]}
