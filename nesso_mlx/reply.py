"""The reply layer over the decoder: a request's prompt ids, its sampler, processors and grammar
(`prepare_decoding`), and its tokens turned into text (`ReplyStream`: detokenized, cut at stop
strings, tool calls parsed as they stream) and results (`GenerationChunk`, `GenerationResult`).

The engine (`generation`, `batch`, ...) only chooses tokens; this module knows tools, stops and
chat templates."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from .errors import ContextLengthError
from .generation import TokenConstraint, TokenLogprobs
from .model import Model
from .sampling import LogitsProcessor, Sampler, SamplingOptions, vocab_limit_processor
from .tokenizer import Tokenizer
from .tools import ToolCall, ToolCallDelta, ToolCallStream, parse_tool_calls


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
