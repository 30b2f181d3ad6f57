"""The request core that every protocol of `nesso-mlx serve` translates to and from.

No HTTP and no protocol here. A protocol module (`chat_completions`, `completions`, `responses`,
`anthropic_messages`) validates its body with the field checks below (`number`, `integer`,
`boolean`, `refuse_unknown`, `check_depth`; each bad value raises `RequestError`, whose message
names the field) and translates it to a `ChatRequest`: messages for the chat template
(`parse_messages`), tools (`parse_tools`), a tool choice (`parse_tool_choice`), a format
(`parse_response_format`), sampling (`parse_sampling`) and stop strings (`parse_stop`). From it
the core gives the prompt's token ids (`chat_prompt_ids`, checked by `check_context`), the
keyword arguments for generation (`generation_options`: penalties and `logit_bias` as logits
processors) and, from the generated chunks, the reply events: `ChatReply` parses the tool calls
out of the model's text once, as OpenAI chat deltas (content, a call's name, its arguments
fragment by fragment). `BlockStream` is the block state machine (a text block, tool-call blocks
opening and closing) that the Responses and Messages streams both spell their events with.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import NessoError
from ..tools import ToolCallDelta, ToolCallStream

if TYPE_CHECKING:
    from ..reply import GenerationChunk
    from ..tokenizer import Tokenizer

MAX_STOP = 16  # stop strings in one request
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class RequestError(NessoError):
    """A request that cannot be served as sent: `param` names the field, `code` is OpenAI's code."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code

    def to_dict(self) -> dict[str, Any]:
        """OpenAI's error object."""
        return {"error": {"message": str(self), "type": "invalid_request_error", "param": self.param, "code": self.code}}


# --- field checks ------------------------------------------------------------------------------

MAX_JSON_DEPTH = 128  # nesting a request (and any JSON text inside it) may have


def check_depth(value: Any, where: str = "the request", limit: int = MAX_JSON_DEPTH) -> None:
    """Raise `RequestError` when `value` (parsed JSON) nests lists and objects deeper than `limit`.

    Iterative, so that no nesting can raise `RecursionError` here; the chat templates, the JSON
    encoder and the grammar compiler all recurse, so what reaches them must be bounded first.
    """
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            raise RequestError(f"{where} nests JSON deeper than {limit} levels", None, "invalid_value")
        stack.extend((child, depth + 1) for child in children)


def load_json(text: str, where: str) -> Any:
    """`json.loads` for JSON text inside a request (a tool call's arguments): nesting past
    `MAX_JSON_DEPTH` is a `RequestError`, never a `RecursionError`. Raises `json.JSONDecodeError`."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise RequestError(f"{where} nests JSON deeper than {MAX_JSON_DEPTH} levels", where, "invalid_value") from None
    check_depth(value, where)
    return value


def number(body: dict, name: str, default: float | None, low: float, high: float, *, low_open: bool = False) -> float | None:
    """`body[name]` as a finite number in [low, high] (`(low, high]` with `low_open`), or `default` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    try:
        finite = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        finite = False
    if not finite:
        raise RequestError(f"{name} must be a number, got {json.dumps(value)[:40]}", name, "invalid_type")
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise RequestError(f"{name} must be in {bracket}{low:g}, {high:g}], got {value}", name, "invalid_value")
    return float(value)


def integer(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    """`body[name]` as an integer in [low, high] (not a bool), or `default` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {json.dumps(value)[:40]}", name, "invalid_type")
    if not low <= value <= high:
        raise RequestError(f"{name} must be between {low} and {high}, got {value}", name, "invalid_value")
    return value


def boolean(body: dict, name: str, default: bool) -> bool:
    """`body[name]` as true or false, or `default` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false, got {json.dumps(value)[:40]}", name, "invalid_type")
    return value


def refuse_unknown(body: dict, allowed: set[str] | frozenset[str], where: str = "") -> None:
    """Raise `RequestError` (unsupported_parameter) naming the first key of `body` not in `allowed`
    (`where` is the path of `body` in the request, for the message)."""
    for key in body:
        if key not in allowed:
            name = f"{where}.{key}" if where else key
            raise RequestError(f"unsupported field {name!r}", name, "unsupported_parameter")


@dataclass(frozen=True)
class FieldPolicy:
    """A protocol's field policy as a table: the fields it `supported`s and those it accepts and
    `ignored`s (they cannot change this model's output); `check` refuses any other with a
    `RequestError` naming it. docs/server.md lists the same (a test holds them together)."""

    supported: frozenset[str]
    ignored: frozenset[str] = frozenset()

    def check(self, body: dict, where: str = "") -> None:
        """Raise `RequestError` naming the first field of `body` the policy neither supports nor ignores."""
        refuse_unknown(body, self.supported | self.ignored, where)

    def without(self, *names: str) -> FieldPolicy:
        """The policy with `names` no longer supported (refused)."""
        return FieldPolicy(self.supported - set(names), self.ignored)


def parse_model(body: dict) -> str | None:
    """`model`: any string (a server runs one model), or None."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("model must be a string", "model", "invalid_type")
    return model


# --- the shared parts of a request -------------------------------------------------------------


@dataclass
class Sampling:
    """How tokens are chosen: `stream_generate`'s sampler options and the logits processors'."""

    temperature: float = 1.0  # OpenAI's default; 0 is greedy
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float | None = None
    repetition_context_size: int = 64
    logit_bias: dict[int, float] = field(default_factory=dict)


def parse_sampling(body: dict, vocab_size: int) -> Sampling:
    """The sampling fields of a chat or completions body."""
    bias = body.get("logit_bias")
    logit_bias: dict[int, float] = {}
    if bias is not None:
        if not isinstance(bias, dict):
            raise RequestError("logit_bias must be an object mapping token ids to biases", "logit_bias", "invalid_type")
        for key, value in bias.items():
            try:
                token = int(key)
            except ValueError:
                raise RequestError(f"logit_bias key {key!r} is not a token id", "logit_bias", "invalid_value") from None
            if not 0 <= token < vocab_size:
                raise RequestError(f"logit_bias token id {token} is outside the vocabulary (0-{vocab_size - 1})", "logit_bias")
            if value is None:
                raise RequestError(f"logit_bias for token {token} must be a number", "logit_bias", "invalid_type")
            logit_bias[token] = number({"logit_bias": value}, "logit_bias", None, -100, 100)
    repetition = number(body, "repetition_penalty", None, 0, 10, low_open=True)
    return Sampling(
        temperature=number(body, "temperature", 1.0, 0, 2),
        top_p=number(body, "top_p", 1.0, 0, 1, low_open=True),
        top_k=integer(body, "top_k", 0, 0, vocab_size),
        min_p=number(body, "min_p", 0.0, 0, 0.999999),
        seed=integer(body, "seed", None, 0, 2**63 - 1),
        frequency_penalty=number(body, "frequency_penalty", 0.0, -2, 2),
        presence_penalty=number(body, "presence_penalty", 0.0, -2, 2),
        repetition_penalty=None if repetition == 1.0 else repetition,
        repetition_context_size=integer(body, "repetition_context_size", 64, 1, 2**20),
        logit_bias=logit_bias,
    )


def parse_stop(body: dict) -> list[str]:
    """`stop`: a string or up to `MAX_STOP` non-empty strings."""
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError("stop must be a string or a list of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOP:
        raise RequestError(f"stop takes at most {MAX_STOP} strings, got {len(stops)}", "stop", "invalid_value")
    if any(not s for s in stops):
        raise RequestError("stop strings must not be empty", "stop", "invalid_value")
    return stops


# --- the core request -----------------------------------------------------------------------------


@dataclass
class ChatRequest:
    """The core request every chat-shaped protocol translates to: messages ready for the chat
    template, tools, a tool choice, a response format, sampling and stops (the fields of OpenAI's
    chat completions, which the other protocols map onto)."""

    messages: list[dict[str, Any]]
    sampling: Sampling = field(default_factory=Sampling)
    max_tokens: int | None = None  # None: up to the context window
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int | None = None  # with logprobs: how many alternatives (0-20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None
    model: str | None = None
    clamp_max_tokens: bool = False  # max_tokens is a ceiling, lowered to what the window leaves (Anthropic's)


def _text_content(content: Any, where: str, *, nullable: bool = False) -> str | None:
    """A message's content as text: a string, or a list of text parts (joined)."""
    if content is None:
        if nullable:
            return None
        raise RequestError(f"{where}.content is required", f"{where}.content", "invalid_value")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RequestError(
                    f"{where}.content[{i}] is not a text part ({kind!r}): this model reads text only",
                    f"{where}.content",
                    "unsupported_content",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(f"{where}.content must be a string or a list of text parts", f"{where}.content", "invalid_type")


def _assistant_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """OpenAI tool calls (arguments as JSON strings) as the template wants them (arguments as dicts)."""
    if not isinstance(calls, list):
        raise RequestError(f"{where}.tool_calls must be a list", f"{where}.tool_calls", "invalid_type")
    out = []
    for i, call in enumerate(calls):
        here = f"{where}.tool_calls[{i}]"
        if not isinstance(call, dict):
            raise RequestError(f"{here} must be an object", here, "invalid_type")
        refuse_unknown(call, {"id", "type", "function"}, here)
        fn = call.get("function")
        if call.get("type", "function") != "function" or not isinstance(fn, dict):
            raise RequestError(f'{here} must be {{"type": "function", "function": {{...}}}}', here, "invalid_value")
        if not isinstance(call.get("id"), str) or not call["id"]:
            raise RequestError(f"{here}.id must be a non-empty string", f"{here}.id", "invalid_value")
        name, arguments = fn.get("name"), fn.get("arguments", "{}")
        if not isinstance(name, str) or not name:
            raise RequestError(f"{here}.function.name must be a non-empty string", f"{here}.function.name", "invalid_value")
        if isinstance(arguments, str):
            try:
                arguments = load_json(arguments, f"{here}.function.arguments") if arguments.strip() else {}
            except json.JSONDecodeError as e:
                raise RequestError(
                    f"{here}.function.arguments is not valid JSON ({e.msg}, character {e.pos})",
                    f"{here}.function.arguments",
                    "invalid_value",
                ) from None
        if not isinstance(arguments, dict):
            raise RequestError(f"{here}.function.arguments must be a JSON object", f"{here}.function.arguments", "invalid_value")
        out.append({"id": call["id"], "type": "function", "function": {"name": name, "arguments": arguments}})
    return out


_MESSAGE_FIELDS = {
    "system": {"role", "content", "name"},
    "developer": {"role", "content", "name"},
    "user": {"role", "content", "name"},
    "assistant": {"role", "content", "name", "tool_calls", "refusal", "function_call", "audio", "annotations"},
    "tool": {"role", "content", "tool_call_id"},
}


def parse_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI messages as the chat template wants them (`developer` is `system`; arguments are dicts).

    A tool message must answer a call of the assistant message before it, by `tool_call_id`.
    """
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages", "invalid_value")
    out: list[dict[str, Any]] = []
    open_calls: set[str] = set()  # ids of the last assistant message's calls, while tool messages answer them
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object", where, "invalid_type")
        role = message.get("role")
        if not isinstance(role, str) or role not in _MESSAGE_FIELDS:
            shown = json.dumps(role)[:40] if role is not None else "missing"
            raise RequestError(
                f"{where}.role must be one of system, developer, user, assistant, tool (got {shown})",
                f"{where}.role",
                "invalid_value",
            )
        refuse_unknown(message, _MESSAGE_FIELDS[role], where)
        if role == "assistant":
            for name in ("refusal", "function_call", "audio"):
                if message.get(name) is not None:
                    raise RequestError(f"{where}.{name} is not supported", f"{where}.{name}", "unsupported_parameter")
            calls = _assistant_calls(message["tool_calls"], where) if message.get("tool_calls") else []
            content = _text_content(message.get("content"), where, nullable=bool(calls))
            entry: dict[str, Any] = {"role": "assistant", "content": content or ""}
            if calls:
                entry["tool_calls"] = calls
            open_calls = {c["id"] for c in calls}
            out.append(entry)
            continue
        content = _text_content(message.get("content"), where)
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise RequestError(f"{where}.tool_call_id is required", f"{where}.tool_call_id", "invalid_value")
            if call_id not in open_calls:
                raise RequestError(
                    f"{where} answers tool call {call_id!r}, which the assistant message before it did not make",
                    f"{where}.tool_call_id",
                    "invalid_value",
                )
            out.append({"role": "tool", "content": content, "tool_call_id": call_id})
            continue
        open_calls = set()
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def parse_tools(tools: Any) -> list[dict[str, Any]] | None:
    """OpenAI function tools, checked: names, parameters as an object schema, no duplicates."""
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise RequestError("tools must be a list", "tools", "invalid_type")
    out, names = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise RequestError(f'{where} must be {{"type": "function", "function": {{...}}}}', where, "invalid_value")
        refuse_unknown(tool, {"type", "function"}, where)
        fn = tool["function"]
        refuse_unknown(fn, {"name", "description", "parameters", "strict"}, f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise RequestError(
                f"{where}.function.name must match ^[A-Za-z0-9_-]{{1,64}}$", f"{where}.function.name", "invalid_value"
            )
        if name in names:
            raise RequestError(f"two tools are named {name!r}", f"{where}.function.name", "invalid_value")
        names.add(name)
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise RequestError(f"{where}.function.description must be a string", f"{where}.function.description", "invalid_type")
        if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
            raise RequestError(f"{where}.function.strict must be true or false", f"{where}.function.strict", "invalid_type")
        parameters = fn.get("parameters")
        if parameters is not None:
            if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
                raise RequestError(
                    f"{where}.function.parameters must be a JSON schema of type object",
                    f"{where}.function.parameters",
                    "invalid_value",
                )
        clean = {"name": name}
        if fn.get("description"):
            clean["description"] = fn["description"]
        clean["parameters"] = parameters if parameters is not None else {"type": "object", "properties": {}}
        out.append({"type": "function", "function": clean})
    return out


def parse_tool_choice(choice: Any, tools: list[dict[str, Any]] | None) -> str | dict[str, Any]:
    """`tool_choice`: "auto", "none", "required" or {"type": "function", "function": {"name": ...}} naming a tool."""
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise RequestError(f'tool_choice must be "auto", "none", "required" or a function, got {choice!r}', "tool_choice")
        if choice == "required" and not tools:
            raise RequestError('tool_choice "required" needs tools', "tool_choice", "invalid_value")
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        refuse_unknown(choice, {"type", "function"}, "tool_choice")
        name = choice["function"].get("name")
        known = [t["function"]["name"] for t in tools or []]
        if name not in known:
            raise RequestError(
                f"tool_choice names {name!r}, which is not one of the tools ({', '.join(known) or 'none given'})", "tool_choice"
            )
        return {"type": "function", "function": {"name": name}}
    raise RequestError(
        'tool_choice must be "auto", "none", "required" or {"type": "function", "function": {"name": ...}}', "tool_choice"
    )


def parse_response_format(value: Any) -> dict[str, Any] | None:
    """None for text; {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}}."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RequestError("response_format must be an object", "response_format", "invalid_type")
    kind = value.get("type")
    if kind == "text":
        refuse_unknown(value, {"type"}, "response_format")
        return None
    if kind == "json_object":
        refuse_unknown(value, {"type"}, "response_format")
        return {"type": "json_object"}
    if kind == "json_schema":
        refuse_unknown(value, {"type", "json_schema"}, "response_format")
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise RequestError(
                'response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}', "response_format"
            )
        refuse_unknown(spec, {"name", "schema", "strict", "description"}, "response_format.json_schema")
        if not isinstance(spec.get("schema"), dict):
            raise RequestError(
                "response_format.json_schema.schema must be a JSON schema object", "response_format.json_schema.schema"
            )
        if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
            raise RequestError("response_format.json_schema.strict must be true or false", "response_format.json_schema.strict")
        return {"type": "json_schema", "json_schema": {"name": spec.get("name") or "response", "schema": spec["schema"]}}
    raise RequestError(
        f"response_format type {kind!r} is not supported (text, json_object or json_schema)",
        "response_format.type",
        "unsupported_value",
    )


def chat_prompt_ids(tokenizer: Tokenizer, request: ChatRequest) -> list[int]:
    """The prompt's token ids: messages and tools through the model's chat template."""
    from ..errors import TokenizerError

    try:
        return tokenizer.apply_chat_template(request.messages, tools=request.tools, add_generation_prompt=True)
    except TokenizerError as e:
        raise RequestError(str(e), "messages", "invalid_value") from None


def check_context(prompt_tokens: int, max_tokens: int | None, context_window: int, *, param: str = "messages") -> int:
    """The number of tokens to generate: `max_tokens`, or what the context window leaves.

    Raises `RequestError` (code context_length_exceeded) when the prompt and `max_tokens` do not fit.
    """
    if prompt_tokens + 1 > context_window:
        raise RequestError(
            f"the prompt has {prompt_tokens} tokens, and the model's context window is {context_window} tokens",
            param,
            "context_length_exceeded",
        )
    if max_tokens is None:
        return context_window - prompt_tokens
    if prompt_tokens + max_tokens > context_window:
        raise RequestError(
            f"the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}, {prompt_tokens + max_tokens} in all, "
            f"past the model's context window of {context_window} tokens",
            "max_tokens",
            "context_length_exceeded",
        )
    return max_tokens


# --- generation options ----------------------------------------------------------------------------


def penalty_processor(frequency: float, presence: float, prompt_tokens: int) -> Callable:
    """OpenAI's frequency and presence penalties as a logits processor `f(tokens, logits)`.

    `tokens` is what the decode loop passes (the prompt it was given, then the generated tokens);
    the penalties count only the generated ones, those past the first `prompt_tokens`:
    logit -= presence * (count > 0) + frequency * count.
    """
    import mlx.core as mx

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        generated = tokens[prompt_tokens:]
        if generated.size == 0:
            return logits
        counts = mx.zeros((logits.shape[-1],), dtype=mx.float32).at[generated].add(1.0)
        penalty = frequency * counts + presence * (counts > 0).astype(mx.float32)
        return logits.astype(mx.float32) - penalty

    return process


def logit_bias_processor(bias: dict[int, float], vocab_size: int) -> Callable:
    """Adds OpenAI's `logit_bias` (token id -> bias) to the logits."""
    import mlx.core as mx
    import numpy as np

    row = np.zeros(vocab_size, dtype=np.float32)
    for token, value in bias.items():
        row[token] = value
    added = mx.array(row)

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        return logits.astype(mx.float32) + added

    process.reads_history = False  # so no token history is kept for it alone
    return process


def logits_processors(sampling: Sampling, vocab_size: int, prefix: Sequence[int], prompt_tokens: int) -> list[Callable]:
    """The request's logits processors, in the order logit_bias, repetition, frequency/presence.

    The decode loop is given only the prompt tokens that were not in the cache (`prompt_tokens` of
    them); `prefix` are those that were, so that the repetition penalty sees the same recent tokens
    whether or not the prompt came from the cache.
    """
    import mlx.core as mx

    from ..sampling import repetition_penalty_processor

    processors: list[Callable] = []
    if sampling.logit_bias:
        processors.append(logit_bias_processor(sampling.logit_bias, vocab_size))
    if sampling.repetition_penalty is not None:
        size = sampling.repetition_context_size
        penalize = repetition_penalty_processor(sampling.repetition_penalty, size)
        before = mx.array(list(prefix[-size:]), dtype=mx.int32)

        def repetition(tokens: mx.array, logits: mx.array) -> mx.array:
            if tokens.size < size and before.size:
                tokens = mx.concatenate([before, tokens.astype(mx.int32)])
            return penalize(tokens, logits)

        processors.append(repetition)
    if sampling.frequency_penalty or sampling.presence_penalty:
        processors.append(penalty_processor(sampling.frequency_penalty, sampling.presence_penalty, prompt_tokens))
    return processors


def generation_options(
    sampling: Sampling,
    *,
    max_tokens: int,
    stop: Sequence[str],
    vocab_size: int,
    prefix: Sequence[int] = (),
    prompt_tokens: int,
    top_logprobs: int | None = None,
    tools: list[dict[str, Any]] | None = None,
    tool_choice: str | dict[str, Any] = "auto",
    response_format: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for `stream_generate` (all but the model, tokenizer, prompt and cache)."""
    from ..sampling import SamplingOptions

    return {
        "max_tokens": max_tokens,
        # The repetition penalty is among the processors below (it must see `prefix` too).
        "sampling": SamplingOptions(
            temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k, min_p=sampling.min_p, seed=sampling.seed
        ),
        "stop": list(stop),
        "logits_processors": logits_processors(sampling, vocab_size, prefix, prompt_tokens),
        "top_logprobs": top_logprobs,
        "tools": tools,
        "tool_choice": tool_choice,
        "response_format": response_format,
    }


# --- replies -----------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    """A random id in OpenAI's style: `chatcmpl-...`, `cmpl-...`, `call_...`."""
    return f"{prefix}{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """OpenAI's `usage` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def token_entry(tokenizer: Tokenizer, token: int, logprob: float) -> dict[str, Any]:
    """A chat logprobs entry for one token: its text, log-probability and bytes."""
    data = tokenizer.token_bytes(token)
    return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(data)}


_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


class ChatReply:
    """Assembles a chat reply from `stream_generate` chunks: OpenAI deltas as it goes, the message at the end.

    The streamed deltas and the final message come from the same state, so a client that joins the
    deltas gets exactly the message a non-streaming request returns. With tools:

    - content is the text outside the `<tool_call>` blocks. Whitespace is held back until text
      follows it; the newlines a model writes around its calls are dropped (text before and after
      calls is joined by one run of whitespace), so streamed content never holds a call's text;
    - a call is sent as soon as its name is written (`id`, `type`, `function.name`, empty
      `arguments`), then its arguments' JSON text fragment by fragment, as OpenAI streams them;
    - malformed calls: a block whose name was written stays a call, with its arguments as the text
      the model wrote (valid JSON unless the reply was cut, then finish_reason is "length"); a block
      with no recognizable name is returned as content, verbatim, at the end. Nothing is dropped
      and nothing raises.
    """

    def __init__(self, tokenizer: Tokenizer, *, tools: bool, logprobs: bool = False) -> None:
        self.tokenizer = tokenizer
        self.split = ToolCallStream() if tools else None
        self.logprobs = logprobs
        self.raw: list[str] = []
        self.content: list[str] = []
        self.calls: list[dict[str, Any]] = []
        self.logprob_entries: list[dict[str, Any]] = []
        self.eos = set(tokenizer.eos_token_ids)
        self.completion_tokens = 0
        self._call_of_block: dict[int, int] = {}
        self._closed_blocks = 0
        self._held = ""  # whitespace after the last content sent, not yet sent
        self._after_block = False  # a block opened since content was last sent
        self._gap = ""  # whitespace since the last block
        self._finished = False

    @property
    def calls_completed(self) -> int:
        """How many `<tool_call>` blocks have closed so far."""
        return self._closed_blocks

    def add(self, chunk: GenerationChunk) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Feed one chunk; returns (deltas to stream, logprobs entries of its token)."""
        entries = []
        if chunk.token is not None:
            self.completion_tokens = max(self.completion_tokens, chunk.generation_tokens)
            if self.logprobs and chunk.logprobs is not None and chunk.token not in self.eos:
                entry = token_entry(self.tokenizer, chunk.token, chunk.logprobs.logprob)
                entry["top_logprobs"] = [token_entry(self.tokenizer, t, lp) for t, lp in chunk.logprobs.top]
                entries.append(entry)
                self.logprob_entries.append(entry)
        return self._text(chunk.text), entries

    def _text(self, text: str) -> list[dict[str, Any]]:
        self.raw.append(text)
        if self.split is None:
            if text:
                self.content.append(text)
                return [{"content": text}]
            return []
        deltas: list[dict[str, Any]] = []
        for c in text:  # a character at a time: content is then always before a block opened in the same feed
            blocks, inside = self.split.index, self.split.body is not None
            content, calls = self.split.feed(c)
            self._content(content, deltas)
            if self.split.index != blocks:
                self._after_block, self._gap = True, ""
            if inside and self.split.body is None:
                self._closed_blocks += 1
            self._calls(calls, deltas)
        return deltas

    def _content(self, text: str, deltas: list[dict[str, Any]]) -> None:
        if not text:
            return
        if not text.strip():
            if self._after_block:
                self._gap += text
            else:
                self._held += text
            return
        if self._after_block:  # text again after calls: one separator, the whitespace before them or after
            body = text.lstrip()
            separator = (self._held or (self._gap + text)[: len(self._gap) + len(text) - len(body)]) if self.content else ""
            text, self._after_block, self._gap = separator + body, False, ""
        else:
            text = self._held + text
        body = text.rstrip()
        self._held = text[len(body) :]
        self._emit_content(body, deltas)

    def _emit_content(self, text: str, deltas: list[dict[str, Any]]) -> None:
        self.content.append(text)
        if deltas and "content" in deltas[-1]:
            deltas[-1]["content"] += text
        else:
            deltas.append({"content": text})

    def _calls(self, calls: list[ToolCallDelta], deltas: list[dict[str, Any]]) -> None:
        for delta in calls:
            if delta.index not in self._call_of_block:
                if delta.name is None:
                    continue  # never happens: a block's first delta has its name
                index = len(self.calls)
                self._call_of_block[delta.index] = index
                call = {"id": new_id("call_"), "type": "function", "function": {"name": delta.name, "arguments": ""}}
                self.calls.append(call)
                deltas.append({"tool_calls": [{"index": index, **json.loads(json.dumps(call))}]})
            index = self._call_of_block[delta.index]
            if delta.arguments:
                self.calls[index]["function"]["arguments"] += delta.arguments
                last = deltas[-1]["tool_calls"][0] if deltas and "tool_calls" in deltas[-1] else {}
                if last.get("index") == index and "id" not in last:  # one fragment per chunk, not per character
                    last["function"]["arguments"] += delta.arguments
                else:
                    deltas.append({"tool_calls": [{"index": index, "function": {"arguments": delta.arguments}}]})

    def finish(self) -> list[dict[str, Any]]:
        """Flush at the end of the reply; returns the last deltas (held text, nameless blocks)."""
        if self._finished:
            return []
        self._finished = True
        if self.split is None:
            return []
        deltas: list[dict[str, Any]] = []
        blocks = self.split.index
        content, calls = self.split.finish()
        self._content(content, deltas)
        self._calls(calls, deltas)
        if self.split.index == -1 and blocks == -1 and self._held:  # no block at all: the text is the content
            self._emit_content(self._held, deltas)
        self._held = ""
        # blocks that never named a call: their text is content
        raw = "".join(self.raw)
        nameless = [m.group(0) for i, m in enumerate(_BLOCK.finditer(raw)) if i not in self._call_of_block]
        if nameless:
            text = "\n".join(nameless)
            self._emit_content(("\n" if self.content else "") + text, deltas)
        return deltas

    def finish_reason(self, generation_finish: str | None) -> str:
        """OpenAI's finish_reason: "length" when cut, "tool_calls" when there are calls, else "stop"."""
        if generation_finish == "length":
            return "length"
        return "tool_calls" if self.calls else "stop"

    def message(self) -> dict[str, Any]:
        """The assistant message: content without the call blocks (null when there are only calls)."""
        self.finish()
        content = "".join(self.content)
        message: dict[str, Any] = {"role": "assistant", "content": content if content or not self.calls else None}
        if self.calls:
            message["tool_calls"] = json.loads(json.dumps(self.calls))
        message["refusal"] = None
        return message


def call_input(arguments: str) -> dict[str, Any] | None:
    """A call's arguments (the JSON text `ChatReply` streamed) as an object, parsed once; None
    when they are not a JSON object (the reply was cut by its token limit mid-call)."""
    try:
        value = json.loads(arguments) if arguments.strip() else None
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def dumps(value: Any) -> str:
    """Compact JSON as the server writes it (UTF-8 text as it is; NaN and infinities refused)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


class BlockStream:
    """The block state machine of the protocols whose replies are a list of blocks (Responses'
    output items, Messages' content blocks), fed with `ChatReply`'s deltas.

    Content after anything but text opens a text block; a call's first delta (its id and name)
    opens a tool-call block; the open block closes when the next one opens, or at `close()`. The
    protocol spells each step as its own events, returned as text by the hooks `_open_text(index)`,
    `_text(index, text)`, `_open_call(index, call)`, `_arguments(index, fragment)` and
    `_close_block(index, *args)` (`index` is the block's position in the reply). The arguments'
    JSON text of each call block is kept, and `call_inputs()` parses it once.
    """

    def __init__(self) -> None:
        self.count = 0  # blocks opened so far
        self.open_kind: str | None = None  # "text" or "call" while a block is open
        self.arguments: dict[int, str] = {}  # call block index -> its arguments' JSON text
        self._call_block: dict[int, int] = {}  # ChatReply's call index -> block index

    def add(self, deltas: Sequence[dict[str, Any]]) -> str:
        """Feed a "delta" event's deltas; returns the events they spell."""
        out: list[str] = []
        for delta in deltas:
            if delta.get("content"):
                if self.open_kind != "text":
                    out.append(self.close())
                    out.append(self._open_text(self._next("text")))
                out.append(self._text(self.count - 1, delta["content"]))
            for call in delta.get("tool_calls") or []:
                if "id" in call:
                    out.append(self.close())
                    index = self._next("call")
                    self._call_block[call["index"]] = index
                    self.arguments[index] = ""
                    out.append(self._open_call(index, call))
                fragment = call.get("function", {}).get("arguments") or ""
                if fragment:
                    index = self._call_block[call["index"]]
                    self.arguments[index] += fragment
                    out.append(self._arguments(index, fragment))
        return "".join(out)

    def close(self, *args: Any) -> str:
        """Close the open block, if any (`args` go to `_close_block`); returns its events."""
        if self.open_kind is None:
            return ""
        self.open_kind = None
        return self._close_block(self.count - 1, *args)

    def call_inputs(self) -> dict[int, dict[str, Any] | None]:
        """Each call block's arguments as an object (None when cut), by block index."""
        return {index: call_input(text) for index, text in self.arguments.items()}

    def _next(self, kind: str) -> int:
        self.open_kind = kind
        self.count += 1
        return self.count - 1

    def _open_text(self, index: int) -> str:
        raise NotImplementedError

    def _text(self, index: int, text: str) -> str:
        raise NotImplementedError

    def _open_call(self, index: int, call: dict[str, Any]) -> str:
        raise NotImplementedError

    def _arguments(self, index: int, fragment: str) -> str:
        raise NotImplementedError

    def _close_block(self, index: int, *args: Any) -> str:
        raise NotImplementedError
