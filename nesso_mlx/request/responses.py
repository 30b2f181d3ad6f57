"""OpenAI's Responses API (POST /v1/responses, GET and DELETE /v1/responses/{id}) over the request core.

A body becomes a `ChatRequest`: `instructions` is the system message; `input` (a string, or
items: `message` items with roles user / assistant / system / developer and string or
`input_text` / `output_text` content, `function_call` and `function_call_output` items) becomes
chat messages; flat function tools and `text.format` become chat tools and `response_format`.
The reply events become a Response (`output` items `message` and `function_call`, `status`,
`usage`) or its stream of events, each with its `sequence_number`.

`store` (default true) keeps the response and its conversation in a bounded in-memory store
(`ResponseStore`, least recently used out), so that `previous_response_id` continues it: the
stored conversation is replayed before the new input, and the server's prompt cache (keyed on
token prefixes) reuses its KV cache, so `usage.input_tokens_details.cached_tokens` counts it.
As on OpenAI, `instructions` are not carried over from the previous response.

Field policy:

- supported: model (any string), input, instructions, tools (type function), tool_choice (auto,
  none, required, {"type": "function", "name"}), parallel_tool_calls, text.format (text,
  json_object, json_schema with name and schema; always strict), temperature, top_p,
  max_output_tokens (a ceiling, lowered to what the context window leaves), stream, store,
  previous_response_id;
- accepted and ignored: reasoning, include, prompt_cache_key, prompt_cache_retention,
  client_metadata, truncation, user, metadata, service_tier, safety_identifier, text.verbosity,
  stream_options, `reasoning` input items (a non-reasoning model has none to replay);
- hosted tools (web_search, file_search, code_interpreter, namespace, mcp, ...) run only on
  OpenAI's servers: they are left out of the prompt, with one log line per request, so that a
  client such as Codex CLI that always sends them still works with its function tools; a
  tool_choice naming one is a 400;
- everything else is refused with a 400 naming the field (background, conversation, prompt,
  top_logprobs, image / file input parts, ...).
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from typing import Any

from .core import (
    BlockStream,
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
    parse_tool_choice,
    parse_tools,
    refuse_unknown,
)

log = logging.getLogger("nesso_mlx.server")

DEFAULT_STORE_SIZE = 256
DEFAULT_STORE_CHARS = 64 * 2**20  # characters of JSON kept in all (responses and their conversations)
POLICY = FieldPolicy(
    frozenset(
        {
            "model",
            "input",
            "instructions",
            "tools",
            "tool_choice",
            "parallel_tool_calls",
            "text",
            "temperature",
            "top_p",
            "max_output_tokens",
            "stream",
            "store",
            "previous_response_id",
        }
    ),
    frozenset(
        {
            "reasoning",
            "include",
            "prompt_cache_key",
            "prompt_cache_retention",
            "client_metadata",
            "truncation",
            "user",
            "metadata",
            "service_tier",
            "safety_identifier",
            "stream_options",
        }
    ),
)
_PARAMS = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text.format"}


class ResponseStore:
    """Stored responses and their conversations (OpenAI chat messages): at most `size` of them
    and `max_chars` characters of JSON in all, the least recently used out first."""

    def __init__(self, size: int = DEFAULT_STORE_SIZE, max_chars: int = DEFAULT_STORE_CHARS) -> None:
        self.size, self.max_chars = size, max_chars
        self._items: OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = OrderedDict()
        self._chars: dict[str, int] = {}

    def put(self, response: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        key = response["id"]
        self.delete(key)
        self._items[key] = (response, conversation)
        self._chars[key] = len(json.dumps(response)) + len(json.dumps(conversation))
        while len(self._items) > self.size or (len(self._items) > 1 and sum(self._chars.values()) > self.max_chars):
            old, _ = self._items.popitem(last=False)
            del self._chars[old]

    def get(self, response_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        item = self._items.get(response_id)
        if item is not None:
            self._items.move_to_end(response_id)
        return item

    def delete(self, response_id: str) -> bool:
        self._chars.pop(response_id, None)
        return self._items.pop(response_id, None) is not None


def _part_text(part: Any, where: str) -> str:
    if isinstance(part, dict) and part.get("type") in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
        refuse_unknown(part, {"type", "text", "annotations", "logprobs"}, where)
        return part["text"]
    if isinstance(part, dict) and part.get("type") == "refusal" and isinstance(part.get("refusal"), str):
        return part["refusal"]
    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
    raise RequestError(f"{where} is not a text part ({kind!r}): this model reads text only", where, "unsupported_content")


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_part_text(part, f"{where}[{i}]") for i, part in enumerate(content))
    raise RequestError(f"{where} must be a string or a list of text parts", where, "invalid_type")


def convert_input(value: Any) -> list[dict[str, Any]]:
    """`input` as OpenAI chat messages (tool call arguments as JSON strings)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise RequestError("input must be a string or a list of items", "input", "invalid_type")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise RequestError(f"{where} must be an object", where, "invalid_type")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            refuse_unknown(item, {"type", "role", "content", "id", "status", "phase"}, where)
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise RequestError(
                    f"{where}.role must be user, assistant, system or developer (got {json.dumps(role)[:40]})", f"{where}.role"
                )
            out.append({"role": role, "content": _content(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            refuse_unknown(item, {"type", "id", "call_id", "name", "arguments", "status"}, where)
            for name in ("call_id", "name"):
                if not isinstance(item.get(name), str) or not item[name]:
                    raise RequestError(f"{where}.{name} must be a non-empty string", f"{where}.{name}", "invalid_value")
            arguments = item.get("arguments", "{}")
            if not isinstance(arguments, str):
                raise RequestError(f"{where}.arguments must be a JSON string", f"{where}.arguments", "invalid_type")
            call = {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": arguments}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":  # calls after the text of the same turn
                last.setdefault("tool_calls", []).append(call)
                last["content"] = last["content"] or None
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            refuse_unknown(item, {"type", "id", "call_id", "output", "status"}, where)
            if not isinstance(item.get("call_id"), str) or not item["call_id"]:
                raise RequestError(f"{where}.call_id must be a non-empty string", f"{where}.call_id", "invalid_value")
            out.append(
                {"role": "tool", "tool_call_id": item["call_id"], "content": _content(item.get("output", ""), f"{where}.output")}
            )
        elif kind == "reasoning":
            continue  # a reasoning model's thoughts, sent back by clients: nothing here to replay
        else:
            raise RequestError(
                f"{where} has type {kind!r}; supported items are message, function_call and function_call_output",
                f"{where}.type",
                "unsupported_value",
            )
    return out


def _convert_tools(tools: Any) -> tuple[list[dict[str, Any]] | None, list[str]]:
    """(chat tools, the types of the hosted tools left out)."""
    if tools is None:
        return None, []
    if not isinstance(tools, list):
        raise RequestError("tools must be a list", "tools", "invalid_type")
    out, hosted = [], []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
            raise RequestError(f"{where} must be an object with a type", where, "invalid_value")
        if tool["type"] != "function":
            hosted.append(tool["type"])
            continue
        refuse_unknown(tool, {"type", "name", "description", "parameters", "strict"}, where)
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        out.append({"type": "function", "function": function})
    return parse_tools(out), hosted


def _convert_tool_choice(choice: Any, tools: list[dict[str, Any]] | None) -> str | dict[str, Any]:
    if choice is None or isinstance(choice, str):
        return parse_tool_choice(choice, tools)
    if isinstance(choice, dict) and choice.get("type") == "function":
        refuse_unknown(choice, {"type", "name"}, "tool_choice")
        return parse_tool_choice({"type": "function", "function": {"name": choice.get("name")}}, tools)
    kind = choice.get("type") if isinstance(choice, dict) else None
    raise RequestError(
        f'tool_choice must be "auto", "none", "required" or {{"type": "function", "name": ...}} (got type {kind!r}; '
        "hosted tools cannot run here)",
        "tool_choice",
        "unsupported_value",
    )


def _text_format(text: Any) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(the chat response_format, the `text` object echoed in the response)."""
    if text is None:
        return None, {"format": {"type": "text"}}
    if not isinstance(text, dict):
        raise RequestError("text must be an object", "text", "invalid_type")
    refuse_unknown(text, {"format", "verbosity"}, "text")
    fmt = text.get("format")
    if fmt is None:
        return None, {"format": {"type": "text"}}
    if not isinstance(fmt, dict):
        raise RequestError("text.format must be an object", "text.format", "invalid_type")
    if fmt.get("type") == "json_schema":
        refuse_unknown(fmt, {"type", "name", "schema", "strict", "description"}, "text.format")
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        try:
            response_format = parse_response_format({"type": "json_schema", "json_schema": spec})
        except RequestError as e:
            raise RequestError(str(e).replace("response_format.json_schema", "text.format"), "text.format") from None
        return response_format, {"format": {"strict": True, **fmt}}
    try:
        return parse_response_format(fmt), {"format": fmt}
    except RequestError as e:
        raise RequestError(str(e).replace("response_format", "text.format"), "text.format", e.code) from None


class ResponsesRequest:
    """A validated Responses body: the core's `ChatRequest`, and what the Response echoes and stores."""

    def __init__(self, chat: ChatRequest, conversation: list[dict[str, Any]], echo: dict[str, Any], store: bool) -> None:
        self.chat = chat
        self.conversation = conversation  # OpenAI chat messages, without the instructions
        self.echo = echo
        self.store = store


def parse_responses_request(body: Any, *, context_window: int, vocab_size: int, store: ResponseStore) -> ResponsesRequest:
    """Validate a Responses body into the core's `ChatRequest`; raises `RequestError` naming the field."""
    try:
        return _parse(body, vocab_size, store)
    except RequestError as e:
        if e.param in _PARAMS:
            e.param = _PARAMS[e.param]
        raise


def _parse(body: Any, vocab_size: int, store: ResponseStore) -> ResponsesRequest:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    POLICY.check(body)
    model = parse_model(body)
    if "input" not in body:
        raise RequestError("input is required", "input", "invalid_value")
    conversation: list[dict[str, Any]] = []
    previous = body.get("previous_response_id")
    if previous is not None:
        stored = store.get(previous) if isinstance(previous, str) else None
        if stored is None:
            raise RequestError(
                f"previous_response_id {previous!r}: no such stored response (it was not stored, was deleted, or is gone)",
                "previous_response_id",
                "previous_response_not_found",
            )
        conversation = [dict(m) for m in stored[1]]
    conversation += convert_input(body["input"])
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise RequestError("instructions must be a string", "instructions", "invalid_type")
    messages = ([{"role": "system", "content": instructions}] if instructions else []) + conversation
    tools, hosted = _convert_tools(body.get("tools"))
    if hosted:
        log.info("responses: hosted tools left out (they run only on OpenAI's servers): %s", ", ".join(hosted))
    tool_choice = _convert_tool_choice(body.get("tool_choice"), tools)
    response_format, text = _text_format(body.get("text"))
    max_tokens = integer(body, "max_output_tokens", None, 1, 2**31)
    chat = ChatRequest(
        messages=parse_messages(messages),
        sampling=parse_sampling({k: body.get(k) for k in ("temperature", "top_p")}, vocab_size),
        max_tokens=max_tokens,
        clamp_max_tokens=True,
        stream=boolean(body, "stream", False),
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=boolean(body, "parallel_tool_calls", True),
        response_format=response_format,
        model=model,
    )
    echo = {
        "instructions": instructions,
        "max_output_tokens": max_tokens,
        "parallel_tool_calls": chat.parallel_tool_calls,
        "previous_response_id": previous,
        "temperature": chat.sampling.temperature,
        "top_p": chat.sampling.top_p,
        "text": text,
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": [t for t in body.get("tools") or [] if t.get("type") == "function"],
        "metadata": _metadata(body.get("metadata")),
    }
    return ResponsesRequest(chat, conversation, echo, boolean(body, "store", True))


def _metadata(value: Any) -> dict[str, str]:
    """`metadata`, echoed in every response event and stored: held to OpenAI's limits (16 pairs,
    keys of 64 characters, string values of 512), so that it cannot multiply a request's size."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > 16:
        raise RequestError("metadata must be an object of at most 16 pairs", "metadata", "invalid_value")
    for key, item in value.items():
        if len(key) > 64 or not isinstance(item, str) or len(item) > 512:
            raise RequestError(
                "metadata keys must be at most 64 characters and values strings of at most 512", "metadata", "invalid_value"
            )
    return value


# --- replies ---------------------------------------------------------------------------------------


class ResponseStream(BlockStream):
    """Builds a Response from the core's events, and the stream of events that spells it.

    `start()`, `delta(event)` (or `add(deltas)`) for each "delta" event, `finish(done)` and
    `error(event)` return SSE text; `response` (also `body()`) is the Response, the same whether
    or not it was streamed; `assistant_message()` is the reply as an OpenAI chat message, for the
    store. The output items open and close with the core's `BlockStream`.
    """

    def __init__(self, request: ResponsesRequest, model: str) -> None:
        super().__init__()
        self.request = request
        self.id = new_id("resp_")
        self.created = int(time.time())
        self.model = model
        self.output: list[dict[str, Any]] = []
        self.sequence = 0
        self.response: dict[str, Any] = self._response("in_progress")

    def event(self, name: str, data: dict[str, Any]) -> str:
        payload = {"type": name, "sequence_number": self.sequence, **data}
        self.sequence += 1
        return f"event: {name}\ndata: {dumps(payload)}\n\n"

    def _response(self, status: str, usage: dict[str, Any] | None = None, reason: str | None = None) -> dict[str, Any]:
        texts = [p["text"] for item in self.output if item["type"] == "message" for p in item["content"]]
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": reason} if reason else None,
            "model": self.model,
            "output": json.loads(json.dumps(self.output)),
            "output_text": "".join(texts),
            "reasoning": {"effort": None, "summary": None},
            "store": self.request.store,
            "truncation": "disabled",
            "usage": usage,
            "user": None,
            **self.request.echo,
        }

    def start(self, ready: dict[str, Any] | None = None) -> str:
        return self.event("response.created", {"response": self.response}) + self.event(
            "response.in_progress", {"response": self.response}
        )

    def delta(self, event: dict[str, Any]) -> str:
        return self.add(event["deltas"])

    # --- the block hooks (see `BlockStream`) ---

    def _open_text(self, index: int) -> str:
        item = {"id": new_id("msg_"), "type": "message", "role": "assistant", "status": "in_progress", "content": []}
        self.output.append(item)
        out = self.event("response.output_item.added", {"output_index": index, "item": json.loads(json.dumps(item))})
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        item["content"].append(part)
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        return out + self.event("response.content_part.added", {**where, "part": dict(part)})

    def _text(self, index: int, text: str) -> str:
        item = self.output[index]
        item["content"][0]["text"] += text
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        return self.event("response.output_text.delta", {**where, "delta": text, "logprobs": []})

    def _open_call(self, index: int, call: dict[str, Any]) -> str:
        item = {
            "id": "fc_" + call["id"].removeprefix("call_"),
            "type": "function_call",
            "status": "in_progress",
            "call_id": call["id"],
            "name": call["function"]["name"],
            "arguments": "",
        }
        self.output.append(item)
        return self.event("response.output_item.added", {"output_index": index, "item": dict(item)})

    def _arguments(self, index: int, fragment: str) -> str:
        self.output[index]["arguments"] += fragment
        where = {"item_id": self.output[index]["id"], "output_index": index}
        return self.event("response.function_call_arguments.delta", {**where, "delta": fragment})

    def _close_block(self, index: int, status: str = "completed") -> str:
        item = self.output[index]
        item["status"] = status
        if item["type"] == "message":
            part = item["content"][0]
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            return (
                self.event("response.output_text.done", {**where, "text": part["text"], "logprobs": []})
                + self.event("response.content_part.done", {**where, "part": dict(part)})
                + self.event("response.output_item.done", {"output_index": index, "item": json.loads(json.dumps(item))})
            )
        where = {"item_id": item["id"], "output_index": index}
        return self.event(
            "response.function_call_arguments.done", {**where, "name": item["name"], "arguments": item["arguments"]}
        ) + self.event("response.output_item.done", {"output_index": index, "item": dict(item)})

    # --- the end ---

    def finish(self, done: dict[str, Any]) -> str:
        incomplete = done["finish_reason"] == "length"
        out = self.add(done["deltas"]) + self.close("incomplete" if incomplete else "completed")
        core = done["usage"]
        usage = {
            "input_tokens": core["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": core["prompt_tokens_details"]["cached_tokens"]},
            "output_tokens": core["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": core["total_tokens"],
        }
        status = "incomplete" if incomplete else "completed"
        self.response = self._response(status, usage, "max_output_tokens" if incomplete else None)
        return out + self.event(f"response.{status}", {"response": self.response})

    def body(self) -> dict[str, Any]:
        return self.response

    def assistant_message(self) -> dict[str, Any]:
        """The reply as an OpenAI chat message (for a later `previous_response_id`). A call cut
        by `max_output_tokens` (its arguments not a JSON object) is left out: no result can
        answer it, and the conversation must stay one the chat core accepts."""
        text = "".join(p["text"] for item in self.output if item["type"] == "message" for p in item["content"])
        inputs = self.call_inputs()
        calls = [
            {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}
            for index, item in enumerate(self.output)
            if item["type"] == "function_call" and inputs.get(index) is not None
        ]
        message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
        if calls:
            message["tool_calls"] = calls
        return message

    def error(self, event: dict[str, Any]) -> str:
        """An error after the stream began (the core's "error" event): OpenAI's `error` event,
        then `response.failed` (the open item closed as incomplete), so that clients waiting for
        the response's end get one."""
        status, message = event["status"], event["error"]["error"]["message"]
        code = "server_error" if status >= 500 else "invalid_request"
        out = self.close("incomplete") + self.event("error", {"code": code, "message": message, "param": None})
        self.response = self._response("failed")
        self.response["error"] = {"code": code, "message": message}
        return out + self.event("response.failed", {"response": self.response})
