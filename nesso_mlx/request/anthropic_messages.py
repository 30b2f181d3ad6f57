"""Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens) over the request core.

A body becomes a `ChatRequest`: `system` (a string or text blocks) and any `system`-role messages
inside `messages` (Claude Code sends one) are merged into one system prompt; `tool_use` blocks
become assistant tool calls, `tool_result` blocks tool messages; `tool_choice` any/tool/none map
to required/a named function/none. The reply events become a Message (content blocks `text` and
`tool_use`, `stop_reason`, `stop_sequence`, `usage`) or its stream of server-sent events.

Field policy:

- supported: model (any string), messages, system, max_tokens (required; a ceiling, lowered to
  what the context window leaves after the prompt, as llama.cpp does), temperature (0-1, default
  1), top_p, top_k, stop_sequences (up to 16), stream, tools (custom tools with input_schema),
  tool_choice (auto, any, tool, none; disable_parallel_tool_use);
- output_config.format (a JSON schema: the reply is constrained to it, as response_format on chat);
- accepted and ignored (they cannot change this model's output): thinking, metadata,
  context_management, output_config.effort, service_tier, speed, inference_geo, diagnostics,
  user_profile_id, workspace_id, cache_control (top level, on any block or tool), citations on
  text blocks, and thinking / redacted_thinking blocks in assistant messages;
- refused with a 400 naming the field: everything else, image and document blocks, and server
  tools (web search, code execution, ...), which only Anthropic's servers can run.

`usage.input_tokens` counts the prompt tokens that were not read from the prompt cache, as
Anthropic's does; `cache_read_input_tokens` counts those that were.
"""

from __future__ import annotations

import json
from typing import Any

from .core import (
    MAX_STOP,
    BlockStream,
    ChatRequest,
    FieldPolicy,
    RequestError,
    boolean,
    dumps,
    integer,
    new_id,
    number,
    parse_messages,
    parse_model,
    parse_sampling,
    parse_tool_choice,
    parse_tools,
    refuse_unknown,
)

POLICY = FieldPolicy(
    frozenset({"model", "messages", "system", "max_tokens", "temperature", "top_p", "top_k", "stop_sequences", "stream"})
    | {"tools", "tool_choice", "output_config"},
    frozenset({"thinking", "metadata", "context_management", "service_tier", "cache_control", "speed", "inference_geo"})
    | {"diagnostics", "user_profile_id", "workspace_id"},
)
COUNT_POLICY = POLICY.without("max_tokens", "temperature", "top_p", "top_k", "stop_sequences", "stream")
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}


def error_body(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error object for an HTTP status."""
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


def _text_blocks(value: Any, where: str) -> str:
    """A string, or a list of text blocks, as one string."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise RequestError(f"{where} must be a string or a list of text blocks", where, "invalid_type")
    texts = []
    for i, block in enumerate(value):
        here = f"{where}[{i}]"
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise RequestError(f"{here} is not a text block ({kind!r}): this model reads text only", here, "unsupported_content")
        refuse_unknown(block, {"type", "text", "cache_control", "citations"}, here)
        texts.append(block["text"])
    return "\n\n".join(texts) if where == "system" else "".join(texts)


def _tool_result(block: dict, here: str) -> dict[str, Any]:
    refuse_unknown(block, {"type", "tool_use_id", "content", "is_error", "cache_control"}, here)
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or not call_id:
        raise RequestError(f"{here}.tool_use_id is required", f"{here}.tool_use_id", "invalid_value")
    content = block.get("content", "")
    text = _text_blocks(content, f"{here}.content") if content is not None else ""
    if boolean(block, "is_error", False):
        text = f"Error: {text}"
    return {"role": "tool", "tool_call_id": call_id, "content": text}


def _convert_messages(messages: Any) -> tuple[list[str], list[dict[str, Any]]]:
    """Anthropic messages as OpenAI chat messages, and the texts of system-role messages among them."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages", "invalid_value")
    system: list[str] = []
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object", where, "invalid_type")
        refuse_unknown(message, {"role", "content"}, where)
        role, content = message.get("role"), message.get("content")
        if role not in ("user", "assistant", "system"):
            raise RequestError(f"{where}.role must be user or assistant (got {json.dumps(role)[:40]})", f"{where}.role")
        if role == "system":  # Claude Code sends one: it belongs to the system prompt
            system.append(_text_blocks(content, f"{where}.content"))
            continue
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise RequestError(f"{where}.content must be a string or a list of blocks", f"{where}.content", "invalid_type")
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        results: list[dict[str, Any]] = []
        for j, block in enumerate(content):
            here = f"{where}.content[{j}]"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                refuse_unknown(block, {"type", "text", "cache_control", "citations"}, here)
                texts.append(block["text"])
            elif kind == "tool_use" and role == "assistant":
                refuse_unknown(block, {"type", "id", "name", "input", "cache_control"}, here)
                if not isinstance(block.get("input", {}), dict):
                    raise RequestError(f"{here}.input must be an object", f"{here}.input", "invalid_type")
                arguments = json.dumps(block.get("input", {}), ensure_ascii=False)
                calls.append(
                    {"id": block.get("id"), "type": "function", "function": {"name": block.get("name"), "arguments": arguments}}
                )
            elif kind == "tool_result" and role == "user":
                results.append(_tool_result(block, here))
            elif kind in ("thinking", "redacted_thinking") and role == "assistant":
                continue  # this model does not think aloud; earlier thoughts change nothing
            else:
                shown = kind if kind is not None else type(block).__name__
                raise RequestError(
                    f"{here} is a {shown!r} block, which a {role} message cannot carry here (text, tool_use, tool_result)",
                    here,
                    "unsupported_content",
                )
        if role == "assistant":
            entry: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or (None if calls else "")}
            if calls:
                entry["tool_calls"] = calls
            out.append(entry)
        else:
            out.extend(results)
            if texts or not results:
                out.append({"role": "user", "content": "\n\n".join(texts)})
    return system, out


def _convert_tools(tools: Any) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise RequestError("tools must be a list", "tools", "invalid_type")
    out = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise RequestError(f"{where} must be an object", where, "invalid_type")
        if tool.get("type", "custom") != "custom":
            raise RequestError(
                f"{where} is a server tool ({tool.get('type')!r}), which only Anthropic's servers can run; send custom tools "
                "with input_schema",
                where,
                "unsupported_value",
            )
        refuse_unknown(tool, {"type", "name", "description", "input_schema", "cache_control"}, where)
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise RequestError(f"{where}.input_schema must be a JSON schema object", f"{where}.input_schema", "invalid_value")
        function = {"name": tool.get("name"), "parameters": schema}
        if tool.get("description") is not None:
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return parse_tools(out)


def _convert_tool_choice(choice: Any, tools: list[dict[str, Any]] | None) -> tuple[str | dict[str, Any], bool]:
    """(OpenAI's tool_choice, parallel calls allowed)."""
    if choice is None:
        return "auto", True
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise RequestError('tool_choice must be {"type": "auto" | "any" | "tool" | "none"}', "tool_choice", "invalid_value")
    kind = choice["type"]
    refuse_unknown(
        choice,
        {"type", "name", "disable_parallel_tool_use"} if kind == "tool" else {"type", "disable_parallel_tool_use"},
        "tool_choice",
    )
    parallel = not boolean(choice, "disable_parallel_tool_use", False)
    if kind in ("any", "tool") and not tools:
        raise RequestError(f'tool_choice "{kind}" needs tools', "tool_choice", "invalid_value")
    if kind == "tool":
        return parse_tool_choice({"type": "function", "function": {"name": choice.get("name")}}, tools), parallel
    return {"auto": "auto", "any": "required", "none": "none"}[kind], parallel


def _stops(body: dict) -> list[str]:
    stops = body.get("stop_sequences")
    if stops is None:
        return []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("stop_sequences must be a list of non-empty strings", "stop_sequences", "invalid_type")
    if len(stops) > MAX_STOP:
        raise RequestError(f"stop_sequences takes at most {MAX_STOP} strings, got {len(stops)}", "stop_sequences")
    return stops


def parse_messages_request(body: Any, *, context_window: int, vocab_size: int, count_only: bool = False) -> ChatRequest:
    """Validate a Messages body (or a count_tokens body) into the core's `ChatRequest`."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    (COUNT_POLICY if count_only else POLICY).check(body)
    model = parse_model(body)
    system, messages = _convert_messages(body.get("messages"))
    if body.get("system") is not None:
        system.insert(0, _text_blocks(body["system"], "system"))
    if system:
        messages.insert(0, {"role": "system", "content": "\n\n".join(system)})
    if not any(m["role"] != "system" for m in messages):
        raise RequestError("messages must hold at least one user or assistant message", "messages", "invalid_value")
    tools = _convert_tools(body.get("tools"))
    tool_choice, parallel = _convert_tool_choice(body.get("tool_choice"), tools)
    request = ChatRequest(
        messages=parse_messages(messages),
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=parallel,
        model=model,
    )
    if count_only:
        return request
    if "max_tokens" not in body:
        raise RequestError("max_tokens is required", "max_tokens", "invalid_value")
    request.max_tokens = integer(body, "max_tokens", None, 1, 2**31)
    request.clamp_max_tokens = True
    number(body, "temperature", None, 0, 1)
    request.sampling = parse_sampling({k: body.get(k) for k in ("temperature", "top_p", "top_k")}, vocab_size)
    request.stop = _stops(body)
    request.stream = boolean(body, "stream", False)
    request.response_format = _output_format(body.get("output_config"))
    return request


def _output_format(config: Any) -> dict[str, Any] | None:
    """`output_config.format` (a JSON schema) as the core's response_format; `effort` is ignored."""
    if config is None:
        return None
    if not isinstance(config, dict):
        raise RequestError("output_config must be an object", "output_config", "invalid_type")
    refuse_unknown(config, {"effort", "format"}, "output_config")
    fmt = config.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise RequestError(
            'output_config.format must be {"type": "json_schema", "schema": {...}}', "output_config.format", "invalid_value"
        )
    refuse_unknown(fmt, {"type", "schema"}, "output_config.format")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}


# --- replies ---------------------------------------------------------------------------------------


def _tool_id(call_id: str) -> str:
    """The core's call ids (`call_...`) in Anthropic's style (`toolu_...`)."""
    return "toolu_" + call_id.removeprefix("call_")


def stop_reason(done: dict[str, Any]) -> str:
    """Anthropic's stop_reason from the core's "done" event."""
    finish = done["finish_reason"]
    if finish == "length":
        return "max_tokens"
    if finish == "tool_calls":
        return "tool_use"
    return "stop_sequence" if done.get("stop_sequence") else "end_turn"


def _usage(prompt_tokens: int, output_tokens: int, cached: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt_tokens - cached,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


class MessageStream(BlockStream):
    """Builds a Message from the core's events, and the stream of SSE events that spells it.

    `start(ready)`, `delta(event)` (or `add(deltas)`) for each "delta" event, `finish(done)` and
    `error(event)` return SSE text; `message()` (also `body()`) is the whole Message, the same
    whether or not it was streamed. The content blocks open and close with the core's `BlockStream`.
    """

    def __init__(self, model: str) -> None:
        super().__init__()
        self.id = new_id("msg_")
        self.model = model
        self.blocks: list[dict[str, Any]] = []
        self.prompt_tokens = 0
        self.done: dict[str, Any] | None = None

    @staticmethod
    def event(name: str, data: dict[str, Any]) -> str:
        return f"event: {name}\ndata: {dumps({'type': name, **data})}\n\n"

    def start(self, ready: dict[str, Any]) -> str:
        self.prompt_tokens = ready["prompt_tokens"]
        head = {
            **self._head(),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": _usage(self.prompt_tokens, 0, 0),
        }
        return self.event("message_start", {"message": head}) + self.event("ping", {})

    def _head(self) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model}

    def delta(self, event: dict[str, Any]) -> str:
        return self.add(event["deltas"])

    # --- the block hooks (see `BlockStream`) ---

    def _open_text(self, index: int) -> str:
        self.blocks.append({"type": "text", "text": ""})
        return self.event("content_block_start", {"index": index, "content_block": {"type": "text", "text": ""}})

    def _text(self, index: int, text: str) -> str:
        self.blocks[index]["text"] += text
        return self.event("content_block_delta", {"index": index, "delta": {"type": "text_delta", "text": text}})

    def _open_call(self, index: int, call: dict[str, Any]) -> str:
        block = {"type": "tool_use", "id": _tool_id(call["id"]), "name": call["function"]["name"], "input": {}}
        self.blocks.append(block)
        return self.event("content_block_start", {"index": index, "content_block": dict(block)})

    def _arguments(self, index: int, fragment: str) -> str:
        return self.event(
            "content_block_delta", {"index": index, "delta": {"type": "input_json_delta", "partial_json": fragment}}
        )

    def _close_block(self, index: int) -> str:
        return self.event("content_block_stop", {"index": index})

    # --- the end ---

    def finish(self, done: dict[str, Any]) -> str:
        out = self.add(done["deltas"]) + self.close()
        self.done = done
        for index, value in self.call_inputs().items():
            self.blocks[index]["input"] = value if value is not None else {}  # {} when cut by max_tokens mid-call
        usage = done["usage"]
        delta_usage = _usage(self.prompt_tokens, usage["completion_tokens"], usage["prompt_tokens_details"]["cached_tokens"])
        out += self.event(
            "message_delta",
            {"delta": {"stop_reason": stop_reason(done), "stop_sequence": done.get("stop_sequence")}, "usage": delta_usage},
        )
        return out + self.event("message_stop", {})

    def message(self) -> dict[str, Any]:
        assert self.done is not None
        usage = self.done["usage"]
        return {
            **self._head(),
            "content": self.blocks,
            "stop_reason": stop_reason(self.done),
            "stop_sequence": self.done.get("stop_sequence"),
            "usage": _usage(usage["prompt_tokens"], usage["completion_tokens"], usage["prompt_tokens_details"]["cached_tokens"]),
        }

    def body(self) -> dict[str, Any]:
        return self.message()

    def error(self, event: dict[str, Any]) -> str:
        """An error after the stream began (the core's "error" event), as Anthropic's `error` event."""
        return self.event("error", {"error": error_body(event["status"], event["error"]["error"]["message"])["error"]})
