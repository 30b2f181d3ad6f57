"""`nesso-mlx serve`: Anthropic's Messages API and OpenAI's Responses API through their real SDKs
(anthropic, openai, openai-agents), and the server's defences (nesting, a full queue, huge text).

One SmolLM2 server (behind an API key, one generation slot and a queue of one) serves
every test but the Nesso-vocabulary ones, which use a tiny random Nesso model (Llama-3.2's BPE,
`<tool_call>` split into BPE pieces) to check that tool input is constrained on that vocabulary.
Requests generate few tokens: a tool call is the longest (about 25 tokens on SmolLM2).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import secrets
import threading
import time

import pytest
from nesso_fixture import nesso_folder
from server_fixture import ServerProcess, get, post, running

anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("starlette")

KEY = "sk-test-" + secrets.token_hex(8)
CITY = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Rome", "Paris"]}}, "required": ["city"]}
WEATHER = {"name": "get_weather", "description": "Current weather for a city.", "input_schema": CITY}
FN_WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather for a city.", "parameters": CITY}
LIGHTS = {
    "type": "object",
    "properties": {"room": {"type": "string", "enum": ["cucina", "salotto"]}, "on": {"type": "boolean"}},
    "required": ["room", "on"],
}
GREEDY = {"temperature": 0}  # this anthropic SDK has no temperature argument: sent as an extra field


@pytest.fixture(scope="module")
def servers(smollm2_path):
    smol = ServerProcess.nesso(smollm2_path, "--dtype", "float32", "--api-key", KEY, "--max-concurrency", "1", "--max-queue", "1")
    nesso = ServerProcess.nesso(nesso_folder("text"), "--api-key", KEY)
    with running(smol, nesso):
        yield smol, nesso


@pytest.fixture(scope="module")
def smol(servers):
    return servers[0]


@pytest.fixture(scope="module")
def nesso(servers):
    return servers[1]


def claude(server: ServerProcess, key: str = KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0, timeout=120)


def oai(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def headers(extra: dict | None = None) -> dict:
    return {"x-api-key": KEY, **(extra or {})}


# --- Anthropic Messages -------------------------------------------------------------------------------


def test_messages_create_claude_code_style(smol):
    """A system prompt as blocks plus a system-role message inside `messages` (merged), max_tokens
    32000 (clamped to the window), the fields Claude Code sends (ignored) and ?beta=true; the reply
    stops at a stop sequence and says which."""
    body = {
        "model": "claude-sonnet-4",
        "max_tokens": 32000,
        "system": [{"type": "text", "text": "You are brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "system", "content": "Answer in English."},
            {"role": "user", "content": [{"type": "text", "text": "Say hello.", "cache_control": {"type": "ephemeral"}}]},
        ],
        "stop_sequences": [" "],
        "thinking": {"type": "disabled"},
        "metadata": {"user_id": "u1"},
        "context_management": {"edits": []},
        "output_config": {"effort": "low"},
        **GREEDY,
    }
    status, reply = post(smol.url + "/v1/messages?beta=true", body, headers())
    assert status == 200, reply
    assert reply["type"] == "message" and reply["role"] == "assistant" and reply["model"] == "claude-sonnet-4"
    assert [b["type"] for b in reply["content"]] == ["text"] and reply["content"][0]["text"].strip()
    assert reply["stop_reason"] == "stop_sequence" and reply["stop_sequence"] == " "
    usage = reply["usage"]
    assert usage["output_tokens"] >= 1 and usage["input_tokens"] + usage["cache_read_input_tokens"] > 10

    # The system-role message counts as system prompt: the same tokens as sending it in `system`.
    count = claude(smol).messages.count_tokens
    inside = count(model="m", system="You are brief.", messages=body["messages"]).input_tokens
    merged = count(model="m", system="You are brief.\n\nAnswer in English.", messages=body["messages"][1:]).input_tokens
    dropped = count(model="m", system="You are brief.", messages=body["messages"][1:]).input_tokens
    assert inside == merged > dropped
    # count_tokens is the prompt the reply was generated from
    assert inside == usage["input_tokens"] + usage["cache_read_input_tokens"]


def test_messages_tool_choice_any_gives_valid_input(smol):
    reply = claude(smol).messages.create(
        model="m",
        max_tokens=40,
        messages=[{"role": "user", "content": "Weather in Rome?"}],
        tools=[WEATHER],
        tool_choice={"type": "any"},
        extra_body=GREEDY,
    )
    assert reply.stop_reason == "tool_use"
    uses = [b for b in reply.content if b.type == "tool_use"]
    assert len(uses) >= 1 and uses[0].name == "get_weather" and uses[0].id.startswith("toolu_")
    for use in uses:
        jsonschema.validate(use.input, CITY)


def test_messages_stream_text_equals_create(smol):
    args = {"model": "m", "max_tokens": 6, "messages": [{"role": "user", "content": "Name a fruit."}], "extra_body": GREEDY}
    whole = claude(smol).messages.create(**args)
    with claude(smol).messages.stream(**args) as stream:
        types = [event.type for event in stream]
        final = stream.get_final_message()
    assert types[0] == "message_start" and types[-1] == "message_stop"
    assert "content_block_start" in types and "message_delta" in types
    assert final.content[0].text == whole.content[0].text and final.content[0].text
    assert final.stop_reason == whole.stop_reason == "max_tokens"
    assert final.usage.output_tokens == whole.usage.output_tokens == 6


def test_messages_stream_tool_input(smol):
    with claude(smol).messages.stream(
        model="m",
        max_tokens=40,
        messages=[{"role": "user", "content": "Weather in Rome?"}],
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        extra_body=GREEDY,
    ) as stream:
        deltas = [e.delta.partial_json for e in stream if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    [use] = [b for b in final.content if b.type == "tool_use"]
    jsonschema.validate(use.input, CITY)
    assert json.loads("".join(deltas)) == use.input


def test_messages_tool_result_round_trip(smol):
    api = claude(smol)
    turn = [
        {"role": "user", "content": "Weather in Rome?"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Rome"}}],
        },
    ]

    def result(text: str, **extra) -> list:
        block = {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": text}], **extra}
        return [*turn, {"role": "user", "content": [block]}]

    reply = api.messages.create(model="m", max_tokens=6, messages=result("Sunny, 24 C."), tools=[WEATHER], extra_body=GREEDY)
    assert reply.content[0].type == "text" and reply.content[0].text
    # the result reaches the prompt (a longer result, more tokens; an error is marked)
    count = api.messages.count_tokens
    short = count(model="m", messages=result("Sunny."), tools=[WEATHER]).input_tokens
    longer = count(model="m", messages=result("Sunny, with a light breeze."), tools=[WEATHER]).input_tokens
    failed = count(model="m", messages=result("Sunny.", is_error=True), tools=[WEATHER]).input_tokens
    assert short < longer and short < failed
    with pytest.raises(anthropic.BadRequestError, match="toolu_2"):
        bad = [*turn, {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_2", "content": "x"}]}]
        api.messages.create(model="m", max_tokens=4, messages=bad)


def test_messages_auth_and_error_shapes(smol):
    with pytest.raises(anthropic.AuthenticationError):
        claude(smol, "wrong-key").messages.create(model="m", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    status, body = post(smol.url + "/v1/messages", {"max_tokens": 2, "messages": []}, {"x-api-key": "wrong"})
    assert status == 401 and body["type"] == "error" and body["error"]["type"] == "authentication_error"
    # Bearer works too
    status, body = post(
        smol.url + "/v1/messages/count_tokens",
        {"messages": [{"role": "user", "content": "hi"}]},
        {"Authorization": f"Bearer {KEY}"},
    )
    assert status == 200 and body["input_tokens"] > 0
    cases = [
        ({"max_tokens": 2, "messages": [{"role": "user", "content": "hi"}], "temperatur": 0}, "temperatur"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
        ({"max_tokens": 2, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "image"),
        (
            {
                "max_tokens": 2,
                "messages": [{"role": "user", "content": "hi"}],
                "tools": [{"type": "web_search_20250305", "name": "w"}],
            },
            "server tool",
        ),
    ]
    for body, named in cases:
        status, reply = post(smol.url + "/v1/messages", body, headers())
        assert status == 400 and reply["type"] == "error" and reply["error"]["type"] == "invalid_request_error", reply
        assert named in reply["error"]["message"]
    status, reply = get(smol.url + "/v1/messages/nope", headers())
    assert status == 404 and reply["error"]["type"] == "not_found_error"


def test_messages_prompt_too_long_names_both_counts(smol):
    text = "parola " * 9000  # ~9,000 tokens, past SmolLM2's 8,192 (and under the early size check)
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude(smol).messages.create(model="m", max_tokens=32000, messages=[{"role": "user", "content": text}])
    message = caught.value.body["error"]["message"]
    assert caught.value.body["type"] == "error"
    assert "8192" in message and any(n.isdigit() and int(n) > 8192 for n in message.replace(",", " ").split())


# --- OpenAI Responses -----------------------------------------------------------------------------------


def test_responses_create_plain(smol):
    reply = oai(smol).responses.create(
        model="m", input="Name a fruit.", instructions="Be brief.", max_output_tokens=6, temperature=0
    )
    assert reply.object == "response" and reply.id.startswith("resp_")
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"
    [item] = reply.output
    assert item.type == "message" and item.content[0].type == "output_text"
    assert reply.output_text == item.content[0].text and reply.output_text
    assert reply.usage.output_tokens == 6 and reply.usage.total_tokens == reply.usage.input_tokens + 6


def test_responses_stream_assembles(smol):
    """`client.responses.stream()` assembles a completed response (a bounded JSON format: it ends by
    itself), and a plain stream's deltas join to its text, numbered in order."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    fmt = {"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}}
    with oai(smol).responses.stream(
        model="m", input="Is water wet? Answer in JSON.", text=fmt, max_output_tokens=16, temperature=0
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert final.status == "completed" and json.loads(final.output_text) in ({"ok": True}, {"ok": False})
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    for kind in (
        "output_item.added",
        "content_part.added",
        "output_text.delta",
        "output_text.done",
        "content_part.done",
        "output_item.done",
    ):
        assert "response." + kind in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))

    raw = oai(smol).responses.create(model="m", input="Name a color.", max_output_tokens=5, temperature=0, stream=True)
    events = list(raw)
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-1].type == "response.incomplete" and events[-1].response.output_text == text and text


def test_responses_forced_function_call(smol):
    reply = oai(smol).responses.create(
        model="m",
        input="Weather in Rome?",
        tools=[FN_WEATHER, {"type": "web_search"}],  # a hosted tool is left out, not refused
        tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False,
        # instructor's RESPONSES_TOOLS mode sends a text format beside the forced tool: the call wins
        text={"format": {"type": "json_schema", "name": "City", "schema": CITY, "strict": True}},
        max_output_tokens=40,
        temperature=0,
    )
    assert reply.status == "completed"
    [call] = [item for item in reply.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_") and call.id.startswith("fc_")
    jsonschema.validate(json.loads(call.arguments), CITY)


def test_responses_parse_pydantic(smol):
    from pydantic import BaseModel

    class Answer(BaseModel):
        ok: bool

    reply = oai(smol).responses.parse(
        model="m", input="Is the sky blue? Answer in JSON.", text_format=Answer, max_output_tokens=16, temperature=0
    )
    assert reply.status == "completed" and isinstance(reply.output_parsed, Answer)


def test_responses_previous_response_id_reuses_the_cache(smol):
    api = oai(smol)
    first = api.responses.create(model="m", input="My name is Ada. Say hi.", max_output_tokens=4, temperature=0)
    second = api.responses.create(
        model="m", input="What is my name?", previous_response_id=first.id, max_output_tokens=4, temperature=0
    )
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens  # the first turn is replayed
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 1
    assert api.responses.retrieve(first.id).output_text == first.output_text
    api.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        api.responses.retrieve(first.id)
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        api.responses.create(model="m", input="x", previous_response_id=first.id, max_output_tokens=2)


def test_responses_function_call_output_round_trip(smol):
    api = oai(smol)
    items = [
        {"role": "user", "content": "Weather in Rome?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 24 C."},
    ]
    reply = api.responses.create(model="m", input=items, tools=[FN_WEATHER], max_output_tokens=5, temperature=0)
    assert reply.output[0].type == "message" and reply.output_text
    with pytest.raises(openai.BadRequestError, match="call_9"):
        api.responses.create(model="m", input=[*items[:2], {**items[2], "call_id": "call_9"}], max_output_tokens=2)
    with pytest.raises(openai.BadRequestError, match="verbosityy"):
        api.responses.create(model="m", input="x", max_output_tokens=2, extra_body={"verbosityy": 1})


def test_openai_agents_runs_a_tool_loop(smol):
    """openai-agents' default (Responses) model runs an agent whose tool is called with valid
    arguments; the tool's schema is the other tests' (so the prompt comes from the cache)."""
    agents = pytest.importorskip("agents")
    from agents.models.openai_responses import OpenAIResponsesModel

    agents.set_tracing_disabled(True)
    calls: list[dict] = []

    async def get_weather(context, arguments: str) -> str:
        calls.append(json.loads(arguments))
        return "sunny"

    tool = agents.FunctionTool(
        name="get_weather",
        description=WEATHER["description"],
        params_json_schema=CITY,
        on_invoke_tool=get_weather,
        strict_json_schema=False,
    )

    async def run():
        client = openai.AsyncOpenAI(base_url=smol.url + "/v1", api_key=KEY, max_retries=0)
        agent = agents.Agent(
            name="weather",
            model=OpenAIResponsesModel(model="smollm2", openai_client=client),
            tools=[tool],
            model_settings=agents.ModelSettings(tool_choice="required", max_tokens=40, temperature=0),
            tool_use_behavior="stop_on_first_tool",
        )
        return await agents.Runner.run(agent, "Weather in Rome?", max_turns=2)

    result = asyncio.run(run())
    assert len(calls) == 1
    jsonschema.validate(calls[0], CITY)
    assert result.final_output == "sunny"


# --- hostile requests -------------------------------------------------------------------------------------


def test_nested_json_anywhere_is_a_400(smol):
    deep = "[" * 100000 + "]" * 100000
    chat = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": deep}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        ],
        "max_tokens": 1,
    }
    status, reply = post(smol.url + "/v1/chat/completions", chat, {"Authorization": f"Bearer {KEY}"})
    assert status == 400 and "nests JSON deeper" in reply["error"]["message"]
    items = [{"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a":' * 300 + "1" + "}" * 300}]
    status, reply = post(smol.url + "/v1/responses", {"input": items}, {"Authorization": f"Bearer {KEY}"})
    assert status == 400 and "deeper" in reply["error"]["message"]
    nested: dict = {}
    for _ in range(300):
        nested = {"a": nested}
    body = {"max_tokens": 1, "messages": [{"role": "user", "content": "hi"}], "metadata": nested}
    status, reply = post(smol.url + "/v1/messages", body, headers())
    assert status == 400 and reply["type"] == "error" and "deeper" in reply["error"]["message"]


def test_a_lone_surrogate_escape_is_no_500(smol):
    """JSON may escape half a surrogate pair (`\\ud800`), which no UTF-8 text holds: it reads as U+FFFD."""
    conn = http.client.HTTPConnection("127.0.0.1", smol.port, timeout=120)
    body = b'{"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "hi \\ud800 there"}]}'
    conn.request("POST", "/v1/messages", body, headers({"content-type": "application/json"}))
    reply = conn.getresponse()
    assert reply.status == 200, reply.read()
    assert json.loads(reply.read())["usage"]["output_tokens"] == 1


def test_huge_text_is_refused_before_tokenizing(smol):
    text = "x" * 3_000_000
    start = time.perf_counter()
    status, reply = post(
        smol.url + "/v1/chat/completions", {"messages": [{"role": "user", "content": text}]}, {"Authorization": f"Bearer {KEY}"}
    )
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded"
    counts = [int(n) for n in re.findall(r"\d+", reply["error"]["message"])]
    assert 8192 in counts and max(counts) >= 3_000_000
    assert time.perf_counter() - start < 5


def test_full_queue_gets_429_with_retry_after(smol):
    """One slot, a queue of one: a third request is refused (each API in its own error shape) while a
    long stream runs and another waits; once the stream is dropped the waiting one is served."""
    body = json.dumps({"messages": [{"role": "user", "content": "Count to 500."}], "max_tokens": 2000, "stream": True}).encode()
    connection = http.client.HTTPConnection("127.0.0.1", smol.port, timeout=60)
    connection.request(
        "POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    )
    response = connection.getresponse()
    assert response.status == 200
    seen = b""
    while seen.count(b"data:") < 2:
        seen += response.read1(4096)
    waiting: list = []
    thread = threading.Thread(
        target=lambda: waiting.append(
            post(
                smol.url + "/v1/chat/completions",
                {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
                {"Authorization": f"Bearer {KEY}"},
            )
        )
    )
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    quitter = http.client.HTTPConnection("127.0.0.1", smol.port, timeout=60)  # waits, then gives up
    quitter.request("POST", "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}]}), headers)

    def wait_for(queued: int) -> None:
        deadline = time.monotonic() + 30
        while smol.health()["queued"] != queued and time.monotonic() < deadline:
            time.sleep(0.05)
        assert smol.health() == {"status": "ok", "active": 1, "queued": queued}

    try:
        wait_for(1)
        quitter.close()  # a client that leaves while it waits frees its place at once, the stream still running
        wait_for(0)
        thread.start()
        wait_for(1)
        request = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        status, reply = post(smol.url + "/v1/chat/completions", request, {"Authorization": f"Bearer {KEY}"})
        assert status == 429 and reply["error"]["type"] == "rate_limit_error"
        with pytest.raises(anthropic.RateLimitError) as caught:
            claude(smol).messages.create(model="m", max_tokens=1, messages=[{"role": "user", "content": "hi"}])
        assert caught.value.response.headers["retry-after"] == "1" and caught.value.body["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            oai(smol).responses.create(model="m", input="hi", max_output_tokens=1)
    finally:
        connection.close()  # the stream's client goes away: its slot frees
        thread.join(60)
    assert waiting and waiting[0][0] == 200


# --- the Nesso vocabulary ---------------------------------------------------------------------------------


def test_tool_input_is_constrained_on_nesso_vocabulary(nesso):
    """A random-weight model writes valid tool input only because decoding is constrained."""
    tool = {"name": "set_lights", "input_schema": LIGHTS}
    reply = claude(nesso).messages.create(
        model="m",
        max_tokens=60,
        messages=[{"role": "user", "content": "Luce in cucina"}],
        tools=[tool],
        tool_choice={"type": "any"},
    )
    uses = [b for b in reply.content if b.type == "tool_use"]
    assert reply.stop_reason == "tool_use" and uses
    for use in uses:
        jsonschema.validate(use.input, LIGHTS)
    response = oai(nesso).responses.create(
        model="m",
        input="Luce in cucina",
        tools=[{"type": "function", "name": "set_lights", "parameters": LIGHTS}],
        tool_choice="required",
        max_output_tokens=60,
    )
    calls = [item for item in response.output if item.type == "function_call"]
    assert response.status == "completed" and calls
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), LIGHTS)


# --- structured output: the additionalProperties convention ----------------------------------------------


def _grammar_accepts(tokenizer, schema: dict, text: str) -> bool:
    """Whether the response_format grammar for `schema` lets `text` (then EOS) be generated."""
    import mlx.core as mx
    import numpy as np

    from nesso_mlx.constrained import build_processor

    vocab = tokenizer.vocab_size
    processor = build_processor(tokenizer, vocab, response_format={"type": "json_schema", "json_schema": {"schema": schema}})
    history = [0]
    for token in [*tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_ids[0]]:
        if not np.array(processor(mx.array(history), mx.zeros((1, vocab)))[0] > -np.inf)[token]:
            return False
        history.append(token)
    return True


@pytest.mark.parametrize("vocabulary", ["smollm2", "nesso"])
def test_a_schema_without_additional_properties_allows_no_extra_keys(vocabulary, smollm2_path):
    from nesso_mlx.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(smollm2_path if vocabulary == "smollm2" else nesso_folder("text"))
    item = {"type": "object", "properties": {"name": {"type": "string"}}}
    order = {"type": "object", "properties": {"item": item, "n": {"type": "integer"}}, "required": ["item"]}
    assert _grammar_accepts(tokenizer, order, '{"item": {"name": "pane"}, "n": 2}')
    assert not _grammar_accepts(tokenizer, order, '{"item": {"name": "pane"}, "quantity": 2}')  # extra key, top level
    assert not _grammar_accepts(tokenizer, order, '{"item": {"name": "pane", "quantity": 2}}')  # extra key, nested
    open_order = {
        **order,
        "additionalProperties": True,
        "properties": {**order["properties"], "item": {**item, "additionalProperties": True}},
    }
    assert _grammar_accepts(tokenizer, open_order, '{"item": {"name": "pane", "quantity": 2}, "note": "x"}')
    assert _grammar_accepts(tokenizer, {"type": "object"}, '{"anything": 1}')  # no properties listed: open
    assert order["properties"]["item"] == item and "additionalProperties" not in item  # the caller's schema is unchanged


def test_a_huge_message_does_not_stall_a_running_stream(smol):
    """While a 3 MB message is refused, a running stream's longest gap between chunks stays within
    about twice its calm one (loosely: this machine is shared): the refusal happens on the HTTP
    side, before templating or tokenizing, never on the worker thread that decodes."""
    body = json.dumps({"messages": [{"role": "user", "content": "Count to 500."}], "max_tokens": 2000, "stream": True}).encode()
    connection = http.client.HTTPConnection("127.0.0.1", smol.port, timeout=60)
    connection.request(
        "POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    )
    response = connection.getresponse()

    def gaps(n: int) -> list[float]:
        times = []
        while len(times) < n:
            if response.readline().startswith(b"data:"):
                times.append(time.perf_counter())
        return [b - a for a, b in zip(times[:-1], times[1:], strict=True)]

    try:
        gaps(2)  # past the prefill
        calm = gaps(8)
        refused: list = []
        huge = {"messages": [{"role": "user", "content": "x" * 3_000_000}], "max_tokens": 1}
        thread = threading.Thread(
            target=lambda: refused.append(post(smol.url + "/v1/chat/completions", huge, {"Authorization": f"Bearer {KEY}"}))
        )
        thread.start()
        during = gaps(8)
        thread.join(30)
    finally:
        connection.close()
    assert refused and refused[0][0] == 400
    # Loose, as the issue asks: on two busy cores (two test workers) a gap of 0.58 s against a calm
    # 0.16 s was seen once; the stall this guards against lasted 2.6 s (7.5 to 9 s for 7.7 MB).
    assert max(during) <= 2 * max(calm) + 0.6, (calm, during)
