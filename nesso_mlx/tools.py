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


# --- streaming ------------------------------------------------------------------------------


@dataclass
class ToolCallDelta:
    """A piece of a tool call as it is generated: the call's index, its name once (first), then
    fragments of its arguments' JSON text, which concatenated are the call's arguments."""

    index: int
    name: str | None = None
    arguments: str = ""


_NAME_FIRST = re.compile(r'^\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ARGUMENTS_NEXT = re.compile(r'\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\S)')


class _ValueEnd:
    """Finds where a JSON value ends, fed a character at a time (objects, arrays, strings, scalars)."""

    def __init__(self) -> None:
        self.depth, self.in_string, self.escaped, self.kind = 0, False, False, ""

    def feed(self, c: str) -> bool:
        """Feed `c` (part of the value); True when `c` completed it."""
        if not self.kind:
            self.kind = c
            if c in "{[":
                self.depth = 1
            self.in_string = c == '"'
            return False
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif c == "\\":
                self.escaped = True
            elif c == '"':
                self.in_string = False
                return self.kind == '"'
            return False
        if c == '"':
            self.in_string = True
        elif c in "{[":
            self.depth += 1
        elif c in "}]":
            self.depth -= 1
            return self.depth == 0
        return False


class ToolCallStream:
    """Splits streamed model text into content and tool-call deltas, as they are generated.

    `feed(text)` returns the content that is certainly not part of a `<tool_call>` block (a
    possible partial tag is held back) and the deltas: for each call, its index and name as soon
    as the name is written, then its arguments' JSON text fragment by fragment (for calls written
    as `{"name": ..., "arguments": ...}`; other orders are sent whole when the block closes).
    """

    def __init__(self) -> None:
        self.pending = ""  # text not yet classified
        self.body: str | None = None  # inside a block: its text so far
        self.index = -1
        self._named = False
        self._args_at = 0  # where the arguments value starts in `body`, once known
        self._sent = 0  # how much of the arguments value was sent
        self._end: _ValueEnd | None = None
        self._done = False

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self.pending += text
        content, deltas = [], []
        while self.pending:
            if self.body is None:
                at = self.pending.find("<tool_call>")
                if at == -1:
                    keep = _partial_suffix(self.pending, "<tool_call>")
                    content.append(self.pending[: len(self.pending) - keep])
                    self.pending = self.pending[len(self.pending) - keep :]
                    break
                content.append(self.pending[:at])
                self.pending = self.pending[at + len("<tool_call>") :]
                self._open()
            else:
                at = self.pending.find("</tool_call>")
                keep = 0 if at != -1 else _partial_suffix(self.pending, "</tool_call>")
                upto = at if at != -1 else len(self.pending) - keep
                self.body += self.pending[:upto]
                self.pending = self.pending[upto:]
                deltas += self._progress()
                if at == -1:
                    break
                self.pending = self.pending[len("</tool_call>") :]
                deltas += self._close()
        return "".join(content), deltas

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """Flush at the end of generation (an unclosed block is closed as it stands)."""
        if self.body is None:
            content, self.pending = self.pending, ""
            return content, []
        self.body += self.pending
        self.pending = ""
        return "", self._progress() + self._close()

    def _open(self) -> None:
        self.index += 1
        self.body, self._named, self._args_at, self._sent, self._end, self._done = "", False, 0, 0, None, False

    def _progress(self) -> list[ToolCallDelta]:
        deltas = []
        if not self._named:
            match = _NAME_FIRST.match(self.body)
            if match is None:
                return []
            try:
                name = json.loads(f'"{match.group(1)}"')
            except json.JSONDecodeError:
                return []
            self._named, self._args_at = True, -match.end()  # negative: the name's end, arguments not found yet
            deltas.append(ToolCallDelta(self.index, name=name))
        if self._args_at < 0:
            match = _ARGUMENTS_NEXT.match(self.body, -self._args_at)
            if match is None:
                return deltas
            self._args_at, self._end = match.end(), _ValueEnd()
        if not self._done:
            new = self.body[self._args_at + self._sent :]
            for i, c in enumerate(new):
                if self._end.feed(c):
                    new, self._done = new[: i + 1], True
                    break
            if new:
                self._sent += len(new)
                if deltas:
                    deltas[0].arguments = new
                else:
                    deltas.append(ToolCallDelta(self.index, arguments=new))
        return deltas

    def _close(self) -> list[ToolCallDelta]:
        body, named, sent = self.body or "", self._named, self._sent
        self.body = None
        if sent:
            return []
        call = parse_tool_call(body)  # not written name first: send what was not sent, whole
        if not call.ok:
            return []
        arguments = json.dumps(call.arguments, ensure_ascii=False)
        return [ToolCallDelta(self.index, arguments=arguments) if named else ToolCallDelta(self.index, call.name, arguments)]


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a proper beginning of `tag`."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


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
