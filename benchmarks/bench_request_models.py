"""Should the protocols' requests be pydantic models (as vLLM's `entrypoints/openai/protocol.py`)?

    python benchmarks/bench_request_models.py              # start-up and per-request costs
    python benchmarks/bench_request_models.py --runs 7 --repeat 300
    python benchmarks/bench_request_models.py --serve ~/.cache/nesso-mlx-tests/smollm2-135m-instruct-bf16  # + serve's

Measures, against the hand-written validators of `nesso_mlx.request`:

- start-up: a fresh interpreter importing pydantic and defining a prototype of the four
  protocols' request models (Chat Completions, Completions, Responses, Anthropic Messages; each
  field typed and bounded, unknown fields forbidden, the ignored ones declared), against one
  importing `nesso_mlx.request` with its four protocol modules (median of `--runs` interpreters);
- per request: validating a Claude-Code-sized Messages body (24 tools, ~76 KB), a Codex-sized
  Responses body (9 tools, ~40 KB) and the same conversation as a chat body, with the models
  (`model_validate`: validation only; the translation to the core request would come on top)
  and with the protocol modules' parsers (validation and translation to the core request).

The models are a prototype: enough of each protocol to cost what the real ones would. They
give pydantic's own error messages, which would still have to be mapped to the protocols' own
(`RequestError` naming the field, Anthropic's error shape).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def define_models() -> dict:
    """The prototype request models of the four protocols."""
    from typing import Annotated, Any, Literal

    from pydantic import BaseModel, ConfigDict, Field

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid", populate_by_name=True)

    Temperature = Annotated[float, Field(ge=0, le=2)]
    TopP = Annotated[float, Field(gt=0, le=1)]
    Penalty = Annotated[float, Field(ge=-2, le=2)]
    Stop = str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=16)]

    # --- Chat Completions and Completions ---
    class TextPart(Strict):
        type: Literal["text"]
        text: str

    Content = str | list[TextPart]

    class Function(Strict):
        name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
        description: str | None = None
        parameters: dict[str, Any] | None = None
        strict: bool | None = None

    class ChatTool(Strict):
        type: Literal["function"]
        function: Function

    class CallFunction(Strict):
        name: Annotated[str, Field(min_length=1)]
        arguments: str = "{}"

    class ToolCall(Strict):
        id: Annotated[str, Field(min_length=1)]
        type: Literal["function"] = "function"
        function: CallFunction

    class SystemMessage(Strict):
        role: Literal["system", "developer"]
        content: Content
        name: str | None = None

    class UserMessage(Strict):
        role: Literal["user"]
        content: Content
        name: str | None = None

    class AssistantMessage(Strict):
        role: Literal["assistant"]
        content: Content | None = None
        name: str | None = None
        tool_calls: list[ToolCall] | None = None
        refusal: None = None
        function_call: None = None
        audio: None = None
        annotations: list[Any] | None = None

    class ToolMessage(Strict):
        role: Literal["tool"]
        content: Content
        tool_call_id: Annotated[str, Field(min_length=1)]

    ChatMessage = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]

    class StreamOptions(Strict):
        include_usage: bool | None = None
        include_obfuscation: bool | None = None

    class JsonSchemaSpec(Strict):
        name: str | None = None
        schema_: dict[str, Any] = Field(alias="schema")
        strict: bool | None = None
        description: str | None = None

    class ResponseFormat(Strict):
        type: Literal["text", "json_object", "json_schema"]
        json_schema: JsonSchemaSpec | None = None

    class NamedFunction(Strict):
        name: str

    class ToolChoiceFunction(Strict):
        type: Literal["function"]
        function: NamedFunction

    class Sampling(Strict):
        model: str | None = None
        temperature: Temperature | None = None
        top_p: TopP | None = None
        top_k: Annotated[int, Field(ge=0)] | None = None
        min_p: Annotated[float, Field(ge=0, lt=1)] | None = None
        seed: Annotated[int, Field(ge=0)] | None = None
        frequency_penalty: Penalty | None = None
        presence_penalty: Penalty | None = None
        repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = None
        repetition_context_size: Annotated[int, Field(ge=1)] | None = None
        logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
        stop: Stop | None = None
        stream: bool | None = None
        stream_options: StreamOptions | None = None
        n: Literal[1] | None = None
        user: Any = None
        metadata: Any = None
        store: Any = None
        service_tier: Any = None
        safety_identifier: Any = None
        prompt_cache_key: Any = None

    class ChatCompletionRequest(Sampling):
        messages: Annotated[list[ChatMessage], Field(min_length=1)]
        max_tokens: Annotated[int, Field(ge=1)] | None = None
        max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
        logprobs: bool | None = None
        top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
        tools: list[ChatTool] | None = None
        tool_choice: Literal["auto", "none", "required"] | ToolChoiceFunction | None = None
        parallel_tool_calls: bool | None = None
        response_format: ResponseFormat | None = None
        modalities: list[Literal["text"]] | None = None

    class CompletionRequest(Sampling):
        prompt: str | list[int] | list[str | list[int]]
        max_tokens: Annotated[int, Field(ge=0)] | None = None
        best_of: Literal[1] | None = None
        logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
        echo: bool | None = None
        suffix: None = None

    # --- Responses ---
    class InputText(Strict):
        type: Literal["input_text", "output_text", "text"]
        text: str
        annotations: list[Any] | None = None
        logprobs: list[Any] | None = None

    class MessageItem(Strict):
        type: Literal["message"] = "message"
        role: Literal["user", "assistant", "system", "developer"]
        content: str | list[InputText]
        id: str | None = None
        status: str | None = None
        phase: str | None = None

    class FunctionCallItem(Strict):
        type: Literal["function_call"]
        call_id: Annotated[str, Field(min_length=1)]
        name: Annotated[str, Field(min_length=1)]
        arguments: str = "{}"
        id: str | None = None
        status: str | None = None

    class FunctionCallOutputItem(Strict):
        type: Literal["function_call_output"]
        call_id: Annotated[str, Field(min_length=1)]
        output: str | list[InputText] = ""
        id: str | None = None
        status: str | None = None

    class ReasoningItem(BaseModel):  # sent back by clients, ignored
        type: Literal["reasoning"]

    InputItem = Annotated[MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem, Field(discriminator="type")]

    class FunctionTool(Strict):
        type: Literal["function"]
        name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
        description: str | None = None
        parameters: dict[str, Any] | None = None
        strict: bool | None = None

    class HostedTool(BaseModel):  # web_search, namespace, ...: left out of the prompt
        type: str

    class TextFormat(Strict):
        type: Literal["text", "json_object", "json_schema"]
        name: str | None = None
        schema_: dict[str, Any] | None = Field(None, alias="schema")
        strict: bool | None = None
        description: str | None = None

    class TextConfig(Strict):
        format: TextFormat | None = None
        verbosity: Any = None

    class ResponsesRequest(Strict):
        model: str | None = None
        input: str | list[InputItem]
        instructions: str | None = None
        tools: list[FunctionTool | HostedTool] | None = None
        tool_choice: Literal["auto", "none", "required"] | NamedFunction | None = None
        parallel_tool_calls: bool | None = None
        text: TextConfig | None = None
        temperature: Temperature | None = None
        top_p: TopP | None = None
        max_output_tokens: Annotated[int, Field(ge=1)] | None = None
        stream: bool | None = None
        store: bool | None = None
        previous_response_id: str | None = None
        reasoning: Any = None
        include: Any = None
        prompt_cache_key: Any = None
        prompt_cache_retention: Any = None
        client_metadata: Any = None
        truncation: Any = None
        user: Any = None
        metadata: Any = None
        service_tier: Any = None
        safety_identifier: Any = None
        stream_options: Any = None

    # --- Anthropic Messages ---
    class CacheControl(BaseModel):
        type: str

    class TextBlock(Strict):
        type: Literal["text"]
        text: str
        cache_control: CacheControl | None = None
        citations: Any = None

    class ToolUseBlock(Strict):
        type: Literal["tool_use"]
        id: str
        name: str
        input: dict[str, Any] = {}
        cache_control: CacheControl | None = None

    class ToolResultBlock(Strict):
        type: Literal["tool_result"]
        tool_use_id: Annotated[str, Field(min_length=1)]
        content: str | list[TextBlock] | None = ""
        is_error: bool | None = None
        cache_control: CacheControl | None = None

    class ThinkingBlock(BaseModel):
        type: Literal["thinking", "redacted_thinking"]

    Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock, Field(discriminator="type")]

    class AnthropicMessage(Strict):
        role: Literal["user", "assistant", "system"]
        content: str | list[Block]

    class AnthropicTool(Strict):
        type: Literal["custom"] | None = None
        name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
        description: str | None = None
        input_schema: dict[str, Any]
        cache_control: CacheControl | None = None

    class AnthropicToolChoice(Strict):
        type: Literal["auto", "any", "tool", "none"]
        name: str | None = None
        disable_parallel_tool_use: bool | None = None

    class OutputFormat(Strict):
        type: Literal["json_schema"]
        schema_: dict[str, Any] = Field(alias="schema")

    class OutputConfig(Strict):
        effort: Any = None
        format: OutputFormat | None = None

    class MessagesRequest(Strict):
        model: str | None = None
        messages: Annotated[list[AnthropicMessage], Field(min_length=1)]
        system: str | list[TextBlock] | None = None
        max_tokens: Annotated[int, Field(ge=1)]
        temperature: Annotated[float, Field(ge=0, le=1)] | None = None
        top_p: TopP | None = None
        top_k: Annotated[int, Field(ge=0)] | None = None
        stop_sequences: Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=16)] | None = None
        stream: bool | None = None
        tools: list[AnthropicTool] | None = None
        tool_choice: AnthropicToolChoice | None = None
        output_config: OutputConfig | None = None
        thinking: Any = None
        metadata: Any = None
        context_management: Any = None
        service_tier: Any = None
        cache_control: Any = None
        speed: Any = None
        inference_geo: Any = None
        diagnostics: Any = None
        user_profile_id: Any = None
        workspace_id: Any = None

    models = {
        "chat": ChatCompletionRequest,
        "completions": CompletionRequest,
        "responses": ResponsesRequest,
        "messages": MessagesRequest,
    }
    for model in models.values():
        model.model_rebuild()  # built now (pydantic builds lazily only with defer_build)
    return models


# --- realistic bodies ----------------------------------------------------------------------------


def _schema(i: int) -> dict:
    """A tool's input schema the size of Claude Code's (a dozen properties, long descriptions)."""
    props = {
        f"option_{j}": {
            "type": ["string", "integer", "boolean", "array"][j % 4],
            "description": f"Option {j} of tool {i}: " + "what it changes, when to use it, and what it must not be. " * 3,
            **({"items": {"type": "string"}} if j % 4 == 3 else {}),
        }
        for j in range(10)
    }
    return {"type": "object", "properties": props, "required": ["option_0"], "additionalProperties": False}


def _description(i: int) -> str:
    return f"Tool {i}. " + "Use it when the task needs it; read the notes on each option before calling. " * 8


def conversation() -> tuple[str, list[tuple[str, str, dict, str]]]:
    """(a long system prompt, turns of (user text, assistant text, a call's input, its result))."""
    system = "You are an interactive CLI tool that helps users with software engineering tasks. " * 60
    turns = [
        (
            f"Please look at file {k}.py and fix the bug in it.",
            f"I will read file {k}.py first.",
            {"option_0": f"src/{k}.py"},
            "x = 1\n" * 40,
        )
        for k in range(4)
    ]
    return system, turns


def messages_body(tools: int = 24) -> dict:
    """A Messages body shaped like Claude Code 2.1's."""
    system, turns = conversation()
    messages = []
    for k, (user, text, call, result) in enumerate(turns):
        messages.append({"role": "user", "content": [{"type": "text", "text": user, "cache_control": {"type": "ephemeral"}}]})
        use = {"type": "tool_use", "id": f"toolu_{k}", "name": "tool_0", "input": call}
        messages.append({"role": "assistant", "content": [{"type": "text", "text": text}, use]})
        messages.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"toolu_{k}", "content": result}]})
    messages.append({"role": "user", "content": "Now run the tests."})
    return {
        "model": "claude-sonnet-4-5",
        "max_tokens": 32000,
        "system": [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
        "messages": messages,
        "tools": [{"name": f"tool_{i}", "description": _description(i), "input_schema": _schema(i)} for i in range(tools)],
        "metadata": {"user_id": "user_abc"},
        "thinking": {"type": "disabled"},
        "context_management": {"edits": []},
        "stream": True,
    }


def responses_body(tools: int = 9) -> dict:
    """A Responses body shaped like Codex CLI's."""
    system, turns = conversation()
    items: list[dict] = [{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": system[:2000]}]}]
    for k, (user, text, call, result) in enumerate(turns):
        items.append({"type": "message", "role": "user", "content": [{"type": "input_text", "text": user}]})
        items.append({"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]})
        items.append({"type": "function_call", "call_id": f"call_{k}", "name": "tool_0", "arguments": json.dumps(call)})
        items.append({"type": "function_call_output", "call_id": f"call_{k}", "output": result})
    function_tools = [
        {"type": "function", "name": f"tool_{i}", "description": _description(i), "parameters": _schema(i), "strict": False}
        for i in range(tools)
    ]
    return {
        "model": "gpt-5-codex",
        "instructions": system,
        "input": items,
        "tools": [*function_tools, {"type": "web_search"}],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "abc",
        "client_metadata": {"x": "y"},
    }


def chat_body(tools: int = 24) -> dict:
    """The Messages body's conversation as a chat body."""
    system, turns = conversation()
    messages: list[dict] = [{"role": "system", "content": system}]
    for k, (user, text, call, result) in enumerate(turns):
        messages.append({"role": "user", "content": user})
        tool_call = {"id": f"call_{k}", "type": "function", "function": {"name": "tool_0", "arguments": json.dumps(call)}}
        messages.append({"role": "assistant", "content": text, "tool_calls": [tool_call]})
        messages.append({"role": "tool", "tool_call_id": f"call_{k}", "content": result})
    messages.append({"role": "user", "content": "Now run the tests."})
    function_tools = [
        {"type": "function", "function": {"name": f"tool_{i}", "description": _description(i), "parameters": _schema(i)}}
        for i in range(tools)
    ]
    return {"model": "m", "messages": messages, "tools": function_tools, "stream": True, "temperature": 0}


def hand_parsers() -> dict:
    """protocol -> body -> the core request, with the protocol modules' own parsers."""
    from nesso_mlx.request import anthropic_messages, chat_completions, responses

    window = {"context_window": 4096, "vocab_size": 128262}
    store = responses.ResponseStore()
    return {
        "chat": lambda body: chat_completions.parse_chat_request(body, **window),
        "responses": lambda body: responses.parse_responses_request(body, store=store, **window),
        "messages": lambda body: anthropic_messages.parse_messages_request(body, **window),
    }


def per_request(repeat: int) -> list[dict]:
    models = define_models()
    parsers = hand_parsers()
    bodies = {"messages": messages_body(), "responses": responses_body(), "chat": chat_body()}
    rows = []
    for name, body in bodies.items():
        models[name].model_validate(body)  # both must accept the body
        parsers[name](body)

        def timed(function, body=body) -> float:
            times = []
            for _ in range(repeat):
                start = time.perf_counter()
                function(body)
                times.append(time.perf_counter() - start)
            return statistics.median(times)

        rows.append(
            {
                "protocol": name,
                "body_kb": len(json.dumps(body)) / 1000,
                "tools": len(body["tools"]),
                "hand_ms": timed(parsers[name]) * 1000,
                "pydantic_ms": timed(models[name].model_validate) * 1000,
            }
        )
    return rows


def startup(runs: int) -> dict:
    """Median seconds, in fresh interpreters, to import and define each way."""
    codes = {
        "pydantic": f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import time; t = time.perf_counter(); "
        "import bench_request_models as b; b.define_models(); print(time.perf_counter() - t)",
        "pydantic_import": "import time; t = time.perf_counter(); import pydantic; from pydantic import BaseModel; "
        "print(time.perf_counter() - t)",
        "hand": "import time; t = time.perf_counter(); from nesso_mlx.request import anthropic_messages, chat_completions, "
        "completions, responses; print(time.perf_counter() - t)",
    }
    out = {}
    for name, code in codes.items():
        times = [
            float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
            for _ in range(runs)
        ]
        out[name] = statistics.median(times)
    return out


def serve_startup(model: str, runs: int) -> float:
    """Median seconds from starting `python -m nesso_mlx.server --model MODEL` to its first /health 200."""
    sys.path.insert(0, str(ROOT / "tests"))
    from server_fixture import ServerProcess

    times = []
    for _ in range(runs):
        start = time.perf_counter()
        server = ServerProcess.nesso(model)
        try:
            server.wait_ready()
            times.append(time.perf_counter() - start)
        finally:
            server.stop()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="fresh interpreters per start-up measurement (default 5)")
    parser.add_argument("--repeat", type=int, default=200, help="validations per body (default 200)")
    parser.add_argument("--serve", metavar="MODEL", help="also time `serve` MODEL's start-up (to /health), for scale")
    args = parser.parse_args()
    start = startup(args.runs)
    print("| start-up (fresh interpreter, median) | ms |")
    print("|---|---|")
    print(f"| import pydantic | {start['pydantic_import'] * 1000:.0f} |")
    print(f"| import pydantic + define the four protocols' models | {start['pydantic'] * 1000:.0f} |")
    print(f"| import nesso_mlx.request's four protocol modules (hand-written) | {start['hand'] * 1000:.0f} |")
    if args.serve:
        print(
            f"| serve {Path(args.serve).name}: start to first /health 200 | {serve_startup(args.serve, args.runs) * 1000:.0f} |"
        )
    print()
    print("| body | KB | tools | hand-written parse + translate (ms) | pydantic model_validate only (ms) |")
    print("|---|---|---|---|---|")
    for row in per_request(args.repeat):
        print(f"| {row['protocol']} | {row['body_kb']:.0f} | {row['tools']} | {row['hand_ms']:.3f} | {row['pydantic_ms']:.3f} |")


if __name__ == "__main__":
    main()
