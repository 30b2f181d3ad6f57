"""The request core and its protocol modules without a server: the same conversation through each
protocol gives the same prompt ids on Nesso's agentic vocabulary (the "added" tool tags) and on
SmolLM2's, the shared block state machine, completions' prompt ids, and the tokenizer's refusal of
Python functions (converting them is the caller's work)."""

from __future__ import annotations

import pytest
from nesso_fixture import nesso_folder

from nesso_mlx.request import anthropic_messages, chat_completions, completions, responses
from nesso_mlx.request.core import BlockStream, RequestError, chat_prompt_ids
from nesso_mlx.tokenizer import Tokenizer

WEATHER = {
    "name": "get_weather",
    "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
SYSTEM = "Sei un assistente."
USER = "Che tempo fa a Roma? <tool_call>\n{}\n</tool_call>"  # the user's copy of the tags stays text
RESULT = '{"temp": 21, "note": "<tool_response>"}'
CITY = {"city": "Roma"}


def chat_body(user: str = USER) -> dict:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Roma"}'}}
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": user},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": RESULT},
        ],
        "tools": [{"type": "function", "function": WEATHER}],
    }


def responses_body(user: str = USER) -> dict:
    return {
        "instructions": SYSTEM,
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": user}]},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Roma"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": RESULT},
        ],
        "tools": [{"type": "function", **WEATHER}],
    }


def messages_body(user: str = USER) -> dict:
    return {
        "system": SYSTEM,
        "max_tokens": 16,
        "messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "get_weather", "input": CITY}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": RESULT}]},
        ],
        "tools": [{"name": WEATHER["name"], "description": WEATHER["description"], "input_schema": WEATHER["parameters"]}],
    }


def core_requests(user: str = USER) -> dict:
    """protocol -> the core request its body becomes."""
    window = {"context_window": 4096, "vocab_size": 128262}
    return {
        "chat": chat_completions.parse_chat_request(chat_body(user), **window),
        "responses": responses.parse_responses_request(responses_body(user), store=responses.ResponseStore(), **window).chat,
        "messages": anthropic_messages.parse_messages_request(messages_body(user), **window),
    }


@pytest.fixture(scope="module", params=["nesso-added", "smollm2"])
def tokenizer(request, smollm2_path):
    return Tokenizer.from_folder(nesso_folder("added") if request.param == "nesso-added" else smollm2_path)


def test_every_protocol_gives_the_same_prompt_ids(tokenizer):
    ids = {name: chat_prompt_ids(tokenizer, request) for name, request in core_requests().items()}
    assert ids["responses"] == ids["chat"] == ids["messages"]
    text = tokenizer.decode(ids["chat"])
    # the tools, the call (arguments as JSON) and its result are all in the prompt
    assert '"name": "get_weather"' in text and '"arguments": {"city": "Roma"}' in text and RESULT in text


def test_on_the_agentic_vocabulary_only_the_template_writes_tool_tags():
    tokenizer = Tokenizer.from_folder(nesso_folder("added"))
    tag, response_tag = tokenizer.token_to_id("<tool_call>"), tokenizer.token_to_id("<tool_response>")
    plain = "Che tempo fa a Roma?"
    for name, request in core_requests().items():
        ids = chat_prompt_ids(tokenizer, request)
        baseline = chat_prompt_ids(tokenizer, core_requests(plain)[name])
        # The template's own tags are the added tokens (the instructions and the assistant's call,
        # the tool result's wrapper); the user's and the tool result's copies of them stay text.
        assert baseline.count(tag) >= 2 and baseline.count(response_tag) >= 1, name
        assert ids.count(tag) == baseline.count(tag) and ids.count(response_tag) == baseline.count(response_tag), name
        assert len(ids) > len(baseline)


def test_completions_prompt_ids_on_the_agentic_vocabulary():
    tokenizer = Tokenizer.from_folder(nesso_folder("added"))
    tag = tokenizer.token_to_id("<tool_call>")
    body = {"prompt": ["<tool_call>\n", [tag, 13]], "max_tokens": 4}
    request = completions.parse_completion_request(body, context_window=64, vocab_size=128262)
    text_ids, given = completions.prompt_ids(tokenizer, request, 64)
    assert tag in text_ids  # a completions prompt is raw text: its tags are parsed, as stream_generate does
    assert given == [tag, 13]  # ids are taken as they are
    long = completions.parse_completion_request({"prompt": "ciao " * 80, "max_tokens": 4}, context_window=64, vocab_size=128262)
    with pytest.raises(RequestError, match="the prompt has .* context window is 64 tokens") as error:
        completions.prompt_ids(tokenizer, long, 64)
    assert error.value.code == "context_length_exceeded" and error.value.param == "prompt"


def test_the_tokenizer_takes_schemas_and_refuses_python_functions():
    tokenizer = Tokenizer.from_folder(nesso_folder("added"))
    messages = [{"role": "user", "content": "Meteo?"}]

    def get_weather(city: str) -> str:
        return city

    wrapped = tokenizer.apply_chat_template(messages, tools=[{"type": "function", "function": WEATHER}])
    assert tokenizer.apply_chat_template(messages, tools=[WEATHER]) == wrapped  # a bare schema is wrapped
    with pytest.raises(TypeError, match=r"not the Python function 'get_weather'.*tool_schemas\(tools\)"):
        tokenizer.apply_chat_template(messages, tools=[get_weather])
    from nesso_mlx.tools import tool_schemas

    assert '"name": "get_weather"' in tokenizer.apply_chat_template(messages, tools=tool_schemas([get_weather]), tokenize=False)


class Recorder(BlockStream):
    """A protocol that spells each step of the block state machine as a word."""

    def _open_text(self, index):
        return f"[text {index}]"

    def _text(self, index, text):
        return text

    def _open_call(self, index, call):
        return f"[call {index} {call['function']['name']}]"

    def _arguments(self, index, fragment):
        return f"<{index}:{fragment}>"

    def _close_block(self, index, *args):
        return f"[/{index}{''.join(args)}]"


def test_the_block_state_machine_opens_and_closes_blocks_in_order():
    stream = Recorder()
    call = {"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": ""}}
    second = {"index": 1, "id": "call_b", "type": "function", "function": {"name": "g", "arguments": ""}}
    out = stream.add([{"content": "Sì"}, {"content": "."}, {"tool_calls": [call]}])
    out += stream.add([{"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]}, {"tool_calls": [second]}])
    out += stream.add([{"tool_calls": [{"index": 1, "function": {"arguments": '{"b": "tr'}}]}, {"content": "fine"}])
    out += stream.close("!") + stream.close("!")  # a second close has nothing left to close
    assert out == '[text 0]Sì.[/0][call 1 f]<1:{"a": 1}>[/1][call 2 g]<2:{"b": "tr>[/2][text 3]fine[/3!]'
    assert stream.call_inputs() == {1: {"a": 1}, 2: None}  # the cut call is None, parsed once here


def test_the_preparation_pool_is_shut_down_with_the_app():
    from nesso_mlx.server import create_app

    class Engine:
        model_name, context_window, vocab_size, active, queued, max_concurrency = "stub", 2048, 100, 0, 0, 1

    app = create_app(Engine())
    assert app.state.prepare_pool.submit(sum, [1, 2]).result(timeout=5) == 3
    app.state.close()
    with pytest.raises(RuntimeError, match="shutdown"):
        app.state.prepare_pool.submit(sum, [1, 2])


def documented_policy(title: str) -> dict[str, set[str]]:
    """docs/server.md's "Field policy (TITLE):" list: bullet name -> the field names it shows."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "server.md").read_text(encoding="utf-8")
    lines = text[text.index(f"Field policy ({title}):") :].splitlines()[2:]
    bullets: dict[str, str] = {}
    for line in lines:
        if line.startswith("- **"):
            name = line[4 : line.index("**", 4)]
            bullets[name] = line
        elif line.startswith("  ") and bullets:
            bullets[name] += line
        else:
            break
    return {name: set(re.findall(r"`([a-z_.]+)`", body)) for name, body in bullets.items()}


def heads(names: set[str]) -> set[str]:
    """The top-level fields: `output_config.format` is `output_config`."""
    return {name.split(".")[0] for name in names}


@pytest.mark.parametrize(
    ("title", "policy"),
    [
        ("Chat Completions", chat_completions.POLICY),
        ("Completions", completions.POLICY),
        ("Responses", responses.POLICY),
        ("Messages", anthropic_messages.POLICY),
    ],
)
def test_each_protocols_field_table_is_the_documented_policy(title, policy):
    documented = documented_policy(title)
    assert policy.supported <= heads(documented["supported"]), policy.supported - heads(documented["supported"])
    ignored = documented["accepted and ignored"]
    assert policy.ignored <= ignored, policy.ignored - ignored
    assert not policy.supported & ignored  # no field both used and documented as ignored
    with pytest.raises(RequestError, match="unsupported field 'nesso_unknown'"):
        policy.check({"nesso_unknown": 1})


class Untouchable:
    """A tokenizer the worker thread must not use."""

    def __getattr__(self, name):
        raise AssertionError(f"tokenizer.{name} used on the worker thread")


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_prompts_are_tokenized_before_they_reach_the_worker(path):
    """The job the engine gets already holds its prompt ids: its worker side never tokenizes."""
    import json
    from types import SimpleNamespace

    from server_fixture import asgi

    from nesso_mlx.server import create_app

    tokenizer = Tokenizer.from_folder(nesso_folder("added"))
    seen = []

    class Engine:
        model_name, context_window, vocab_size, active, queued, max_concurrency = "stub", 4096, 128262, 0, 0, 1
        runtime = SimpleNamespace(tokenizer=tokenizer, default_max_tokens=None)

        def submit(self, job):
            worker = SimpleNamespace(tokenizer=Untouchable(), context_window=4096, vocab_size=128262, default_max_tokens=None)
            ready = next(job.work(worker))  # its first step on the worker: the checks are done already
            seen.append(ready)
            job.sink(ready)
            job.sink({"type": "error", "status": 503, "error": {"error": {"message": "stub engine", "type": "x"}}})

    prompt = "Scrivi una poesia <tool_call> sul mare."
    body = {"prompt": prompt} if path == "/v1/completions" else {"messages": [{"role": "user", "content": prompt}]}
    status, _, reply = asgi(create_app(Engine()), "POST", path, {"content-type": "application/json"}, json.dumps(body).encode())
    assert status == 503 and json.loads(reply)["error"]["message"] == "stub engine"
    expected = tokenizer.encode_prompt(prompt) if path == "/v1/completions" else tokenizer.apply_chat_template(body["messages"])
    assert seen == [{"type": "ready", "prompt_tokens": len(expected)}]


def test_lone_surrogate_escapes_become_replacement_characters():
    from nesso_mlx.server import parse_json_body

    body = b'{"k\\ud800": ["a \\udfff b", "\\ud83d\\ude00", 1], "plain": "\\\\ud800"}'
    assert parse_json_body(body) == {"k\ufffd": ["a \ufffd b", "\U0001f600", 1], "plain": "\\ud800"}


# --- odd but valid JSON, and bodies built to stall the server: 400s, before any real work ----------


WINDOW = {"context_window": 4096, "vocab_size": 128262}


@pytest.mark.parametrize(
    "change, match",
    [
        ({"temperature": 10**400}, "temperature must be a number"),  # past a float's range
        ({"messages": [{"role": ["user"], "content": "hi"}]}, r"messages\[0\]\.role must be one of"),
    ],
)
def test_odd_field_values_are_400s(change, match):
    with pytest.raises(RequestError, match=match):
        chat_completions.parse_chat_request({**chat_body(), **change}, **WINDOW)
    if "temperature" in change:
        with pytest.raises(RequestError, match=match):
            anthropic_messages.parse_messages_request({**messages_body(), **change}, **WINDOW)


def test_a_number_past_a_floats_range_is_refused_not_read_as_infinity():
    from nesso_mlx.server import parse_json_body

    with pytest.raises(RequestError, match="out of range"):
        parse_json_body(b'{"input": "hi", "metadata": {"x": 1e400}}')
    assert parse_json_body(b'{"t": 1e300, "n": 10}') == {"t": 1e300, "n": 10}


def test_property_names_count_as_text_toward_the_size_limit():
    from nesso_mlx.server import check_text_size

    names = {f"p{i:06d}": {} for i in range(2000)}  # 14,000 characters of keys, no string values
    with pytest.raises(RequestError, match="characters of text"):
        check_text_size({"tools": [{"parameters": {"properties": names}}]}, 10_000, 4096)
    check_text_size({"tools": [{"parameters": {"properties": names}}]}, 20_000, 4096)


def test_token_id_prompts_longer_than_the_window_are_refused_before_each_id_is_checked():
    with pytest.raises(RequestError, match="more than the model's context window"):
        completions.parse_completion_request({"prompt": [10**9] * 5000}, **WINDOW)  # ids out of range: not reached
    with pytest.raises(RequestError, match="outside the vocabulary"):
        completions.parse_completion_request({"prompt": [10**9] * 50}, **WINDOW)


def test_responses_metadata_is_held_to_openais_limits():
    store = responses.ResponseStore()
    small = {"user": "u1", "run": "7"}
    assert responses.parse_responses_request({"input": "hi", "metadata": small}, store=store, **WINDOW).echo["metadata"] == small
    for bad in ({f"k{i}": "v" for i in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513}, {"k": 1}, ["k"]):
        with pytest.raises(RequestError, match="metadata"):
            responses.parse_responses_request({"input": "hi", "metadata": bad}, store=store, **WINDOW)


def test_a_schemas_own_x_guidance_is_not_taken():
    from nesso_mlx.constrained import build_processor

    tokenizer = Tokenizer.from_folder(nesso_folder("text"))
    for own in (None, "fast", {"whitespace_flexible": True}):
        schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "x-guidance": own}
        processor = build_processor(tokenizer, 128262, response_format={"type": "json_schema", "json_schema": {"schema": schema}})
        blank = tokenizer.encode(" ", add_special_tokens=False)[0]
        assert not processor.allowed()[blank]  # the server's compact style holds: no space before the brace
