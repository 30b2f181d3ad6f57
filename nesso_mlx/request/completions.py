"""OpenAI's (legacy) Completions (POST /v1/completions) over the request core.

A body is validated into a `CompletionRequest` (`parse_completion_request`); its prompts become
token ids (`prompt_ids`, run in the server's preparation threads, off the MLX worker thread),
and the engine's events become a `text_completion` or its stream (`CompletionStream`).

Field policy: the sampling fields, stop, stream and stream_options, n, model and the ignored
fields as on chat (`chat_completions`), and: prompt (a string, token ids, or a list of up to 64
of either; a stream takes one), max_tokens (default 16; 0 with echo), echo, logprobs (0-20),
best_of (1 only), suffix (null only). Everything else is refused with a 400 naming the field.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .chat_completions import (
    IGNORED_FIELDS,
    MAX_TOP_LOGPROBS,
    SAMPLING_FIELDS,
    parse_max_tokens,
    parse_stream,
    single_choice,
    sse,
)
from .core import (
    FieldPolicy,
    RequestError,
    Sampling,
    boolean,
    check_context,
    integer,
    new_id,
    parse_model,
    parse_sampling,
    parse_stop,
)

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

MAX_PROMPTS = 64  # prompts in one /v1/completions request
POLICY = FieldPolicy(
    SAMPLING_FIELDS
    | {"model", "prompt", "stream", "stream_options", "stop", "max_tokens", "n", "best_of", "logprobs", "echo", "suffix"},
    IGNORED_FIELDS,
)


@dataclass
class CompletionRequest:
    """A validated POST /v1/completions body."""

    prompts: list[str | list[int]]
    sampling: Sampling = field(default_factory=Sampling)
    max_tokens: int = 16  # OpenAI's default
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # how many alternatives per token, with token log-probabilities
    echo: bool = False
    model: str | None = None


def _token_ids(value: list, vocab_size: int, where: str, context_window: int) -> list[int]:
    if not value:
        raise RequestError(f"{where} is empty", "prompt", "invalid_value")
    if len(value) > context_window:  # before the ids are checked one by one
        raise RequestError(
            f"{where} has {len(value)} token ids, more than the model's context window of {context_window} tokens",
            "prompt",
            "context_length_exceeded",
        )
    for t in value:
        if isinstance(t, bool) or not isinstance(t, int):
            raise RequestError(f"{where} must be a string or a list of token ids", "prompt", "invalid_type")
        if not 0 <= t < vocab_size:
            raise RequestError(
                f"{where} has token id {t}, outside the vocabulary (0-{vocab_size - 1})", "prompt", "invalid_value"
            )
    return list(value)


def _parse_prompts(prompt: Any, vocab_size: int, context_window: int) -> list[str | list[int]]:
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif isinstance(prompt, list) and prompt and isinstance(prompt[0], int) and not isinstance(prompt[0], bool):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt:
        prompts = prompt
    else:
        raise RequestError(
            "prompt must be a string, a list of token ids, or a non-empty list of either", "prompt", "invalid_value"
        )
    if len(prompts) > MAX_PROMPTS:
        raise RequestError(f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", "prompt", "invalid_value")
    out: list[str | list[int]] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if not p:
                raise RequestError(f"prompt[{i}] is empty", "prompt", "invalid_value")
            out.append(p)
        elif isinstance(p, list):
            out.append(_token_ids(p, vocab_size, f"prompt[{i}]" if len(prompts) > 1 else "prompt", context_window))
        else:
            raise RequestError("prompt must be a string, a list of token ids, or a list of either", "prompt", "invalid_type")
    return out


def parse_completion_request(body: Any, *, context_window: int, vocab_size: int) -> CompletionRequest:
    """Validate a (legacy) completions body; raises `RequestError` naming the first bad field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    POLICY.check(body)
    single_choice(body)
    if body.get("suffix") is not None:
        raise RequestError("suffix (insertion) is not supported", "suffix", "unsupported_parameter")
    if "prompt" not in body:
        raise RequestError("prompt is required", "prompt", "invalid_value")
    prompts = _parse_prompts(body["prompt"], vocab_size, context_window)
    stream, include_usage = parse_stream(body)
    if stream and len(prompts) > 1:
        raise RequestError("stream takes a single prompt", "prompt", "invalid_value")
    max_tokens = parse_max_tokens(body, context_window, ("max_tokens",), 0)
    return CompletionRequest(
        prompts=prompts,
        sampling=parse_sampling(body, vocab_size),
        max_tokens=16 if max_tokens is None else max_tokens,
        stop=parse_stop(body),
        stream=stream,
        include_usage=include_usage,
        logprobs=integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS),
        echo=boolean(body, "echo", False),
        model=parse_model(body),
    )


def completion_prompt_ids(tokenizer: Tokenizer, prompt: str | list[int]) -> list[int]:
    """A completions prompt's ids: a string is encoded as `stream_generate` does (special tokens in
    the text parsed; BOS added when the tokenizer adds one, unless the text holds special tokens);
    ids are taken as they are."""
    return tokenizer.encode_prompt(prompt) if isinstance(prompt, str) else list(prompt)


def legacy_token_text(tokenizer: Tokenizer, token: int) -> str:
    """A token as the legacy completions logprobs name it: its text, or `bytes:\\xNN...` for
    bytes that are not whole UTF-8 characters."""
    data = tokenizer.token_bytes(token)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


class LegacyLogprobs:
    """The legacy completions `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset."""

    def __init__(self, tokenizer: Tokenizer, offset: int = 0) -> None:
        self.tokenizer = tokenizer
        self.detokenizer = tokenizer.detokenizer(skip_special_tokens=False)
        self.offset = offset
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def add(self, token: int, logprob: float | None, top: Sequence[tuple[int, float]] | None) -> None:
        """One token: its log-probability (None for the first prompt token) and its best alternatives."""
        self.tokens.append(legacy_token_text(self.tokenizer, token))
        self.token_logprobs.append(logprob)
        if top is None:
            self.top_logprobs.append(None)
        else:
            best: dict[str, float] = {}
            for t, lp in top:
                best.setdefault(legacy_token_text(self.tokenizer, t), lp)
            self.top_logprobs.append(best)
        self.text_offset.append(self.offset)
        self.offset += len(self.detokenizer.add_token(token))

    def to_dict(self, start: int = 0) -> dict[str, Any]:
        return {
            "tokens": self.tokens[start:],
            "token_logprobs": self.token_logprobs[start:],
            "top_logprobs": self.top_logprobs[start:],
            "text_offset": self.text_offset[start:],
        }


def prompt_ids(tokenizer: Tokenizer, request: CompletionRequest, context_window: int) -> list[list[int]]:
    """Each prompt's token ids, checked against the window with `max_tokens` (`RequestError`).

    No MLX work: the server runs it in its preparation threads, off the worker thread."""
    prompts = [completion_prompt_ids(tokenizer, p) for p in request.prompts]
    for ids in prompts:
        if not ids:
            raise RequestError("the prompt encodes to no tokens", "prompt", "invalid_value")
        check_context(len(ids), request.max_tokens, context_window, param="prompt")
    return prompts


class CompletionStream:
    """Builds a `text_completion` from the engine's completion events, or the stream that spells it.

    `start(ready)`, `delta(event)`, `finish(done)` and `error(event)` return SSE text; `body()` is
    the whole `text_completion` (after `finish`).
    """

    def __init__(self, model: str, include_usage: bool = False) -> None:
        self.base = {"id": new_id("cmpl-"), "object": "text_completion", "created": int(time.time()), "model": model}
        self.include_usage = include_usage
        self.done: dict[str, Any] | None = None

    def chunk(self, index: int, text: str, logprobs: Any, finish: str | None) -> str:
        data = {**self.base, "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
        if self.include_usage:
            data["usage"] = None
        return sse(data)

    def start(self, ready: dict[str, Any] | None = None) -> str:
        return ""

    def delta(self, event: dict[str, Any]) -> str:
        return self.chunk(event["index"], event["text"], event["logprobs"], None)

    def finish(self, done: dict[str, Any]) -> str:
        self.done = done
        out = "".join(self.chunk(choice["index"], "", None, choice["finish_reason"]) for choice in done["choices"])
        if self.include_usage:
            out += sse({**self.base, "choices": [], "usage": done["usage"]})
        return out + "data: [DONE]\n\n"

    def error(self, event: dict[str, Any]) -> str:
        return sse(event["error"])

    def body(self) -> dict[str, Any]:
        assert self.done is not None
        return {**self.base, "choices": self.done["choices"], "usage": self.done["usage"]}
