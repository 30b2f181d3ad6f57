"""Tools in the Hermes style: schemas (also from Python functions) and parsing of `<tool_call>` blocks."""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

ToolSpec = dict[str, Any] | Callable[..., Any]
_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


@dataclass
class ToolCall:
    """One call the model made. A malformed call has `error` set and keeps its `raw` text."""

    name: str | None
    arguments: dict[str, Any] = field(default_factory=dict)
    raw: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_message(self) -> dict[str, Any]:
        """The call as it goes into an assistant message's `tool_calls`."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def parse_tool_call(body: str) -> ToolCall:
    """Parse the JSON inside one `<tool_call>` block; never raises."""
    raw = body.strip()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        return ToolCall(None, {}, raw, f"not valid JSON: {e.msg} at character {e.pos}")
    if not isinstance(data, dict):
        return ToolCall(None, {}, raw, "the call is not a JSON object")
    name, arguments = data.get("name"), data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return ToolCall(name if isinstance(name, str) else None, {}, raw, "arguments are not valid JSON")
    if not isinstance(name, str) or not name:
        return ToolCall(None, {}, raw, 'the call has no "name"')
    if not isinstance(arguments, dict):
        return ToolCall(name, {}, raw, '"arguments" is not a JSON object')
    return ToolCall(name, arguments, raw)


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """Split model output into its text and its tool calls, in order.

    An unclosed last block (the reply was cut short) is still parsed; if its JSON is incomplete
    the call is returned with an error rather than dropped.
    """
    calls = []
    for match in _CALL.finditer(text):
        call = parse_tool_call(match.group(1))
        if not match.group(0).endswith("</tool_call>") and call.ok:
            call.error = "the <tool_call> block was not closed"
        calls.append(call)
    content = _CALL.sub("", text).strip() if calls else text
    return content, calls


# --- schemas --------------------------------------------------------------------------------

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}


def _type_schema(annotation: Any) -> dict[str, Any]:
    if annotation is inspect.Parameter.empty or annotation is Any:
        return {}
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation in _JSON_TYPES:
        return {"type": _JSON_TYPES[annotation]}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _type_schema(options[0])
        return {"anyOf": [_type_schema(a) for a in args]}
    if annotation is list or origin in (list, Sequence, tuple):
        return {"type": "array", **({"items": _type_schema(args[0])} if args else {})}
    if annotation is dict or origin is dict:
        return {"type": "object"}
    raise TypeError(f"cannot describe parameter type {annotation!r} as JSON schema")


def _docstring_parts(doc: str) -> tuple[str, dict[str, str]]:
    """The summary and the per-argument descriptions of a Google-style ("Args:") docstring."""
    lines = inspect.cleandoc(doc or "").splitlines()
    summary, params, current, in_args = [], {}, None, False
    for line in lines:
        stripped = line.strip()
        if stripped.lower() in ("args:", "arguments:", "parameters:"):
            in_args = True
            continue
        if in_args and stripped.endswith(":") and not line.startswith(" "):
            in_args = False  # "Returns:" and other sections
        if in_args:
            match = re.match(r"^\s*(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$", line)
            if match and not line.startswith("        "):
                current = match.group(1).lstrip("*")
                params[current] = match.group(2).strip()
            elif current and stripped:
                params[current] += " " + stripped
        elif not params and stripped and not summary[-1:] == [""]:
            summary.append(stripped)
        elif not stripped and summary:
            summary.append("")
    return " ".join(s for s in summary if s), params


def function_schema(fn: Callable[..., Any]) -> dict[str, Any]:
    """An OpenAI-style tool schema for a Python function, from its type hints and docstring."""
    hints = typing.get_type_hints(fn)
    summary, described = _docstring_parts(fn.__doc__ or "")
    properties, required = {}, []
    for name, param in inspect.signature(fn).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        schema = _type_schema(hints.get(name, param.annotation))
        if name in described:
            schema["description"] = described[name]
        if param.default is inspect.Parameter.empty:
            required.append(name)
        elif param.default is None or isinstance(param.default, (str, int, float, bool)):
            schema["default"] = param.default
        properties[name] = schema
    parameters = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    return {"type": "function", "function": {"name": fn.__name__, "description": summary, "parameters": parameters}}


def tool_schemas(tools: Sequence[ToolSpec] | None) -> list[dict[str, Any]] | None:
    """Normalize tools to `{"type": "function", "function": {...}}` dicts (functions are described)."""
    if not tools:
        return None
    out = []
    for tool in tools:
        if callable(tool) and not isinstance(tool, dict):
            out.append(function_schema(tool))
        elif isinstance(tool, dict) and "function" in tool:
            out.append(tool)
        elif isinstance(tool, dict) and "name" in tool:
            out.append({"type": "function", "function": tool})
        else:
            raise ValueError(f"a tool must be a function or a JSON-schema dict with a name, got {tool!r:.80}")
    return out


def tool_names(tools: Sequence[dict[str, Any]]) -> list[str]:
    return [t["function"]["name"] for t in tools]
