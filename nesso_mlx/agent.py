"""The agent loop: the model calls Python functions, sees their results, and goes on until it answers."""

from __future__ import annotations

import importlib.util
import inspect
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .chat import ChatSession
from .errors import NessoError
from .generation import GenerationChunk
from .tools import ToolCall, parse_tool_calls


@dataclass
class ToolRun:
    """A call the loop handled: what it returned to the model, and how."""

    call: ToolCall
    result: str
    status: str  # "ok", "error" (the tool raised or the call was malformed), "declined"


@dataclass
class StepLimit:
    """The loop stopped after `steps` rounds of tool calls without a text answer."""

    steps: int


AgentEvent = GenerationChunk | ToolRun | StepLimit


def load_tools_file(path: str | Path) -> dict[str, Callable[..., Any]]:
    """The public functions defined in a Python file (or those listed in its `TOOLS`)."""
    path = Path(path)
    if not path.is_file():
        raise NessoError(f"{path}: tools file not found")
    spec = importlib.util.spec_from_file_location(f"nesso_tools_{abs(hash(path.resolve()))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's own code: report it in one line
        raise NessoError(f"{path}: cannot be loaded ({type(e).__name__}: {e})") from None
    listed = getattr(module, "TOOLS", None)
    functions = (
        listed
        if listed is not None
        else [
            f
            for name, f in vars(module).items()
            if inspect.isfunction(f) and not name.startswith("_") and f.__module__ == module.__name__
        ]
    )
    if not functions:
        raise NessoError(f"{path}: defines no public functions to use as tools")
    return {f.__name__: f for f in functions}


def run_tool(call: ToolCall, functions: dict[str, Callable[..., Any]]) -> tuple[str, str]:
    """Run one call; returns (result text for the model, status). Never raises."""
    if not call.ok:
        return f"error: malformed tool call ({call.error}); write a valid call", "error"
    function = functions.get(call.name or "")
    if function is None:
        return f"error: there is no tool named {call.name!r}", "error"
    try:
        value = function(**call.arguments)
    except Exception as e:  # the tool's error goes back to the model as its result
        return f"error: {type(e).__name__}: {e}", "error"
    if isinstance(value, str):
        return value, "ok"
    try:
        return json.dumps(value, ensure_ascii=False, default=str), "ok"
    except (TypeError, ValueError):
        return str(value), "ok"


def reply_calls(message: dict[str, Any]) -> list[ToolCall]:
    """The tool calls of an assistant message: its `tool_calls`, or calls written in its text."""
    if not message.get("tool_calls"):
        return parse_tool_calls(message.get("content") or "")[1]
    calls = []
    for call in message["tool_calls"]:
        fn = call.get("function", call)
        name, arguments = fn.get("name"), fn.get("arguments", {})
        if isinstance(arguments, str):  # OpenAI style: the arguments' JSON text
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                calls.append(ToolCall(name, {}, fn["arguments"], "arguments are not valid JSON"))
                continue
        calls.append(
            ToolCall(name, arguments)
            if isinstance(arguments, dict)
            else ToolCall(name, {}, str(arguments), '"arguments" is not a JSON object')
        )
    return calls


def agent_turn(
    session: ChatSession,
    text: str,
    functions: dict[str, Callable[..., Any]],
    confirm: Callable[[ToolCall], bool] = lambda call: True,
    max_steps: int = 5,
    tool_choice: str | dict[str, Any] | None = None,
) -> Iterator[AgentEvent]:
    """Send `text`, then run the model's tool calls and feed results back until it answers in text.

    Yields the reply chunks of every step, a `ToolRun` per call, and `StepLimit` if the model is
    still calling tools after `max_steps` rounds. `confirm(call)` may decline a call; the model is
    told so. `tool_choice` applies to the first reply only (e.g. "required" to make the model
    call a tool first); the replies after tool results use the session's own (usually "auto"),
    so the model can answer in text.
    """
    own = session.tool_choice
    if tool_choice is not None:
        session.tool_choice = tool_choice
    try:
        chunks: Iterator[GenerationChunk] = session.send(text)
        for _ in range(max_steps):
            yield from chunks
            session.tool_choice = own
            calls = reply_calls(session.messages[-1])
            if not calls or session.last.finish_reason not in ("tool_calls", "stop", "length"):
                return
            for call in calls:
                if call.ok and not confirm(call):
                    result, status = "the user declined to run this tool", "declined"
                else:
                    result, status = run_tool(call, functions)
                session.add_tool_result(result)
                yield ToolRun(call, result, status)
            chunks = session.continue_reply()
        yield StepLimit(max_steps)
    finally:
        session.tool_choice = own


__all__ = ["AgentEvent", "StepLimit", "ToolRun", "agent_turn", "load_tools_file", "reply_calls", "run_tool"]
