"""The agent loop: the model calls tools (Python functions, or MCP servers' tools through
`mcp_tools`), sees their results, and goes on until it answers."""

from __future__ import annotations

import importlib.util
import inspect
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .chat import ChatSession
from .errors import NessoError, ToolError
from .reply import GenerationChunk
from .tools import ToolCall, parse_tool_calls

if TYPE_CHECKING:
    from .mcp_tools import MCPTools

Functions = Mapping[str, Callable[..., Any]]
"""Tools the loop can run: name -> callable taking the call's arguments as keywords (Python
functions, or an `MCPTools`)."""


@dataclass
class ToolRun:
    """A call the loop handled: what it returned to the model, and how."""

    call: ToolCall
    result: str
    status: str  # "ok", "error" (the tool raised or the call was malformed), "declined"
    seconds: float = 0.0  # how long the tool ran


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


def run_tool(call: ToolCall, functions: Functions) -> tuple[str, str]:
    """Run one call; returns (result text for the model, status). Never raises (but Ctrl-C)."""
    if not call.ok:
        return f"error: malformed tool call ({call.error}); write a valid call", "error"
    function = functions.get(call.name or "")
    if function is None:
        return f"error: there is no tool named {call.name!r}", "error"
    try:
        value = function(**call.arguments)
    except ToolError as e:
        return f"error: {e}", "error"
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


def cut_result(text: str, session: ChatSession, budget: int | None) -> str:
    """`text`, or its first `budget` tokens and a marker the model sees, if it is longer."""
    if budget is None:
        return text
    tokenizer = session.tokenizer
    ids = tokenizer.encode(text, add_special_tokens=False, parse_special=False)
    if len(ids) <= budget:
        return text
    kept = tokenizer.decode(ids[:budget]).rstrip("\ufffd")
    return f"{kept}\n[... cut: the result had {len(ids)} tokens; only the first {budget} are shown]"


def agent_turn(
    session: ChatSession,
    text: str,
    functions: Functions | None = None,
    confirm: Callable[[ToolCall], bool] = lambda call: True,
    max_steps: int = 5,
    tool_choice: str | dict[str, Any] | None = None,
    *,
    tools: Functions | None = None,
    max_result_tokens: int | None = None,
    on_call: Callable[[ToolCall], Any] | None = None,
) -> Iterator[AgentEvent]:
    """Send `text`, then run the model's tool calls and feed results back until it answers in text.

    Yields the reply chunks of every step, a `ToolRun` per call, and `StepLimit` if the model is
    still calling tools after `max_steps` rounds. `confirm(call)` may decline a call; the model is
    told so. `tool_choice` applies to the first reply only (e.g. "required" to make the model
    call a tool first); the replies after tool results use the session's own (usually "auto"),
    so the model can answer in text.

    `functions` (or `tools`, its other name) maps tool names to callables: Python functions, or
    an `MCPTools` (see `mcp_tools`). Results longer than `max_result_tokens` are cut, with a
    marker the model sees. `on_call(call)`, if given, is a context manager entered while a
    confirmed call runs (e.g. a spinner).
    """
    if functions is None and tools is None:
        raise TypeError("agent_turn needs the tools to run: functions=... (or tools=...)")
    functions = functions if functions is not None else tools
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
            answered = 0
            try:
                for call in calls:
                    if call.ok and not confirm(call):
                        result, status, seconds = "the user declined to run this tool", "declined", 0.0
                    else:
                        start = time.perf_counter()
                        try:
                            with on_call(call) if on_call is not None and call.ok else nullcontext():
                                result, status = run_tool(call, functions)
                        except KeyboardInterrupt:
                            session.add_tool_result("error: the user interrupted this tool")
                            answered += 1
                            raise
                        seconds = time.perf_counter() - start
                    result = cut_result(result, session, max_result_tokens)
                    session.add_tool_result(result)
                    answered += 1
                    yield ToolRun(call, result, status, seconds)
            finally:
                # However the round stops (Ctrl-C anywhere, the caller closing the loop, an error), every
                # call gets an answer, so the conversation stays well formed.
                for _ in calls[answered:]:
                    session.add_tool_result("error: not run (the user interrupted the tools)")
            chunks = session.continue_reply()
        yield StepLimit(max_steps)
    finally:
        session.tool_choice = own


def mcp_tools(
    *commands: str,
    urls: Sequence[str] = (),
    config: str | Path | None = None,
    timeout: float = 60.0,
    reserved: Sequence[str] = (),
) -> MCPTools:
    """The tools of MCP servers: stdio `commands` (e.g. "npx -y @modelcontextprotocol/server-filesystem
    ~/Documents"), streamable-HTTP `urls`, and the servers of a Claude-Desktop-style `config` file.

    Use it as a context manager (it starts the servers, and stops them on exit), and pass it to
    `agent_turn` like a dict of functions; its `schemas()` are the tools for `ChatSession`:

        with mcp_tools("python my_server.py") as tools:
            session = ChatSession(model, tokenizer, tools=tools.schemas())
            for event in agent_turn(session, "What is in my notes?", tools, confirm=ask):
                ...
    """
    from .mcp_tools import MCPServerSpec, MCPTools, read_mcp_config

    specs = [MCPServerSpec.from_command(c) for c in commands] + [MCPServerSpec.from_url(u) for u in urls]
    if config is not None:
        specs += read_mcp_config(config)
    return MCPTools(specs, timeout=timeout, reserved=reserved)


__all__ = [
    "AgentEvent",
    "Functions",
    "StepLimit",
    "ToolError",
    "ToolRun",
    "agent_turn",
    "cut_result",
    "load_tools_file",
    "mcp_tools",
    "reply_calls",
    "run_tool",
]
