"""`nesso-mlx serve`: the OpenAI API through the official `openai` client against real server processes.

Two servers run for the module: SmolLM2-135M-Instruct in float32 (real text, compared with the
Python API and with mlx-lm's model on the same weights) and a Nesso-vocabulary model (Llama-3.2's
128k BPE with `<tool_call>` split into BPE pieces, Hermes template, tiny random weights: fast)
behind an API key. The request layer, the prompt cache and the scheduler are also tested
in-process on the Nesso model, without HTTP.
"""

from __future__ import annotations

import http.client
import json
import secrets
import threading
import time

import numpy as np
import pytest
from nesso_fixture import nesso_folder
from server_fixture import ServerProcess, asgi, get, post, running

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

KEY = "sk-test-" + secrets.token_hex(8)
SYSTEM = "You are a helpful assistant."
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
# Bounded tools for the random model: every value comes from an enum or is a boolean.
LIGHTS = {
    "type": "function",
    "function": {
        "name": "set_lights",
        "parameters": {
            "type": "object",
            "properties": {"room": {"type": "string", "enum": ["cucina", "salotto"]}, "on": {"type": "boolean"}},
            "required": ["room", "on"],
        },
    },
}
TRAINS = {
    "type": "function",
    "function": {
        "name": "cerca_treni",
        "parameters": {
            "type": "object",
            "properties": {
                "da": {"type": "string", "enum": ["Roma", "Milano"]},
                "a": {"type": "string", "enum": ["Bari", "Torino"]},
            },
            "required": ["da", "a"],
        },
    },
}
BOUNDED_SCHEMA = {
    "type": "object",
    "properties": {"colore": {"type": "string", "enum": ["rosso", "verde", "blu"]}, "ok": {"type": "boolean"}},
    "required": ["colore", "ok"],
    "additionalProperties": False,
}


# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers(smollm2_path):
    """Both server processes, started together (loading overlaps), stopped at the end."""
    smol = ServerProcess.nesso(smollm2_path, "--dtype", "float32", "--max-concurrency", "4")
    nesso = ServerProcess.nesso(nesso_folder("text"), "--api-key", KEY, "--max-concurrency", "2", "--max-body-bytes", "200000")
    with running(smol, nesso):
        yield smol, nesso


@pytest.fixture(scope="module")
def smol(servers):
    return servers[0]


@pytest.fixture(scope="module")
def nesso(servers):
    return servers[1]


def client(server: ServerProcess, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def smol_local(smollm2_path):
    """SmolLM2 in this process, in float32 as the server runs it: the Python API's answers."""
    from nesso_mlx import load

    return load(smollm2_path, dtype="float32")


@pytest.fixture(scope="module")
def nesso_local():
    from nesso_mlx import load

    return load(nesso_folder("text"))


def collect_stream(stream) -> tuple[str, list[dict], list[str], list]:
    """Content, tool calls (reassembled from their deltas), finish reasons and the chunks of a stream."""
    content, calls, finishes, chunks = [], {}, [], []
    for chunk in stream:
        chunks.append(chunk)
        for choice in chunk.choices:
            delta = choice.delta
            content.append(delta.content or "")
            for tc in delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
                if tc.id:
                    assert entry["id"] is None, "a call's id is sent once"
                    entry["id"], entry["name"] = tc.id, tc.function.name
                    assert tc.function.arguments == "" and tc.type == "function"
                else:
                    assert entry["id"] is not None, "a call's first delta carries its id and name"
                    entry["arguments"] += tc.function.arguments or ""
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    return "".join(content), [calls[i] for i in sorted(calls)], finishes, chunks


def assert_same_calls(streamed: list[dict], whole_calls) -> None:
    assert [(c["name"], c["arguments"]) for c in streamed] == [(c.function.name, c.function.arguments) for c in whole_calls or []]
    assert all(c["id"].startswith("call_") for c in streamed)


# --- SmolLM2: real text ----------------------------------------------------------------------------


def test_plain_and_streamed_replies_match_the_python_api(smol, smol_local):
    from nesso_mlx import generate

    model, tokenizer = smol_local
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    api = client(smol)
    whole = api.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=6)
    expected = generate(model, tokenizer, messages=messages, max_tokens=6)
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text and choice.message.tool_calls is None
    assert choice.finish_reason == expected.finish_reason
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    assert whole.usage.prompt_tokens == len(tokenizer.apply_chat_template(messages)) == expected.prompt_tokens
    assert whole.usage.completion_tokens == expected.generation_tokens
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    stream = api.chat.completions.create(
        model="smollm2", messages=messages, temperature=0, max_tokens=6, stream=True, stream_options={"include_usage": True}
    )
    content, calls, finishes, chunks = collect_stream(stream)
    assert content == expected.text and not calls and finishes == [expected.finish_reason]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # the same prompt again: all of it but the last token comes from the prompt cache
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens - 1


def test_required_tool_call_streams_as_openai_deltas_and_the_conversation_goes_on(smol):
    api = client(smol)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What's the weather in Paris?"}]
    args = {
        "model": "smollm2",
        "messages": messages,
        "tools": [WEATHER],
        "tool_choice": "required",
        "temperature": 0,
        "max_tokens": 60,
    }
    whole = api.chat.completions.create(**args)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    content, calls, finishes, _ = collect_stream(api.chat.completions.create(**args, stream=True))
    assert content == "" and finishes == ["tool_calls"]
    assert_same_calls(calls, choice.message.tool_calls)

    # the reply goes back as the SDK returns it (nulls included), with the tool's result
    follow = [*messages, choice.message.model_dump(), {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21}'}]
    after = api.chat.completions.create(model="smollm2", messages=follow, tools=[WEATHER], temperature=0, max_tokens=4)
    assert after.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # system prompt, tool schemas and question were prefilled once, for the first request
    assert after.usage.prompt_tokens_details.cached_tokens >= whole.usage.prompt_tokens - 1


def test_json_schema_response_format_validates(smol):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string", "maxLength": 20}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    reply = client(smol).chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Name a big city in Italy, as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}},
        temperature=0,
        max_tokens=40,
    )
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


def test_concurrent_streams_equal_their_solo_replies(smol):
    """Four streams at once (greedy, and one seeded sample) each give the reply they give alone, and
    they progress together (batched), not one after another."""
    api = client(smol)
    requests = [
        {"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 6}
        for question in ("Name a fruit.", "Name a color.", "Name an animal.")
    ]
    requests.append({"messages": [{"role": "user", "content": "Name a city."}], "temperature": 0.9, "seed": 11, "max_tokens": 6})
    solo = [api.chat.completions.create(model="smollm2", **r).choices[0].message.content for r in requests]
    results: list = [None] * len(requests)
    times: list = [None] * len(requests)

    def run(i: int) -> None:
        stream = api.chat.completions.create(model="smollm2", stream=True, **requests[i])
        stamps, text = [], []
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                stamps.append(time.monotonic())
                text.append(chunk.choices[0].delta.content)
        results[i], times[i] = "".join(text), stamps

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == solo
    assert max(t[0] for t in times) < min(t[-1] for t in times), "the streams ran one after another"


def test_completions_echo_logprobs_equal_an_independent_forward_pass(smol, smol_local, smollm2_path):
    """lm-evaluation-harness's local-completions requests: the prompt's logprobs (echo) against
    mlx-lm's Llama on the same weights, the generated ones against stream_generate's."""
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.utils import load_model

    from nesso_mlx import stream_generate

    model, tokenizer = smol_local
    prompt = "The capital of France is"
    ids = tokenizer.encode(prompt)
    status, body = post(
        smol.url + "/v1/completions", {"prompt": prompt, "max_tokens": 2, "echo": True, "logprobs": 3, "temperature": 0}
    )
    assert status == 200, body
    choice = body["choices"][0]
    lp = choice["logprobs"]
    n = len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert len(lp["tokens"]) == n + 2 and body["usage"] == {
        "prompt_tokens": n,
        "completion_tokens": 2,
        "total_tokens": n + 2,
        "prompt_tokens_details": {"cached_tokens": 0},
    }

    reference, _ = load_model(smollm2_path)
    reference.update(tree_map(lambda p: p.astype(mx.float32), reference.parameters()))
    logits = np.array(reference(mx.array([ids]))[0].astype(mx.float32), dtype=np.float64)
    logprobs = (
        logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    )
    expected = [logprobs[i - 1, ids[i]] for i in range(1, n)]
    np.testing.assert_allclose(lp["token_logprobs"][1:n], expected, atol=1e-4)
    for i in range(1, n):  # the alternatives: the reference's three most likely, with their logprobs
        best = np.argsort(-logprobs[i - 1])[:3]
        assert list(lp["top_logprobs"][i].values()) == pytest.approx([logprobs[i - 1, t] for t in best], abs=1e-4)
        assert list(lp["top_logprobs"][i]) == [tokenizer.decode([int(t)]) for t in best]

    chunks = list(stream_generate(model, tokenizer, ids, max_tokens=2, top_logprobs=3))
    assert lp["token_logprobs"][n:] == pytest.approx([c.logprobs.logprob for c in chunks], abs=1e-5)
    assert [list(d.values()) for d in lp["top_logprobs"][n:]] == [
        pytest.approx([v for _, v in c.logprobs.top], abs=1e-5) for c in chunks
    ]
    assert choice["text"] == prompt + "".join(c.text for c in chunks)
    for token, offset in zip(lp["tokens"], lp["text_offset"], strict=True):
        assert choice["text"][offset : offset + len(token)] == token

    # as lm-eval sends them: token ids in a batch of one, one token to generate; and the older max_tokens=0
    status, batch = post(
        smol.url + "/v1/completions", {"prompt": [ids], "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
    )
    assert status == 200 and batch["choices"][0]["logprobs"]["token_logprobs"][:n] == pytest.approx(
        lp["token_logprobs"][:n], abs=1e-5
    )
    status, zero = post(smol.url + "/v1/completions", {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0})
    assert status == 200 and zero["choices"][0]["finish_reason"] == "length" and zero["choices"][0]["text"] == prompt
    assert zero["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(lp["token_logprobs"][:n], abs=1e-5)


# --- the Nesso vocabulary: tools, schemas, security, bad requests, disconnects -----------------------


def test_completions_stream_batch_and_token_prompts(nesso):
    """Streamed echo with logprobs joins up to the whole reply; a batch of prompts gives one choice each."""
    api = client(nesso, KEY)
    args = {"model": "nesso", "prompt": "C'era una volta", "max_tokens": 8, "temperature": 0, "echo": True, "logprobs": 2}
    whole = api.completions.create(**args)
    text, tokens, logprobs, finishes = "", [], [], []
    for chunk in api.completions.create(**args, stream=True, stream_options={"include_usage": True}):
        for choice in chunk.choices:
            text += choice.text
            if choice.logprobs:
                tokens += choice.logprobs.tokens
                logprobs += choice.logprobs.token_logprobs
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    choice = whole.choices[0]
    assert text == choice.text and finishes == [choice.finish_reason] == ["length"]
    assert tokens == choice.logprobs.tokens and logprobs == choice.logprobs.token_logprobs
    assert whole.usage.completion_tokens == 8 and len(choice.logprobs.tokens) == whole.usage.prompt_tokens + 8
    batch = api.completions.create(model="nesso", prompt=["Uno", "Due"], max_tokens=3, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1] and batch.usage.completion_tokens == 6
    alone = api.completions.create(model="nesso", prompt="Due", max_tokens=3, temperature=0)
    assert batch.choices[1].text == alone.choices[0].text


def test_lm_eval_local_completions_gives_the_in_process_backends_results(nesso, nesso_local, monkeypatch):
    """lm-evaluation-harness's `local-completions` backend against the server: every log-likelihood,
    greedy flag and generation equals lm-eval's `nesso-mlx` backend's in this process."""
    lm_eval = pytest.importorskip("lm_eval")
    for module in ("tenacity", "aiohttp", "transformers"):
        pytest.importorskip(module, reason="lm-eval's API models need lm-eval[api] and transformers")
    from pathlib import Path

    from lm_eval.tasks import TaskManager

    from nesso_mlx.lm_eval_backend import NessoLM

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # the tasks' data files are relative to the repository root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    manager = TaskManager(include_path=str(root / "tests" / "data" / "lm_eval"), include_defaults=False)
    tasks = ["nesso_fidelity_mc", "nesso_fidelity_gen"]
    path = nesso_folder("text")
    # add_bos_token: API models leave BOS out by default; the hf backend (and nesso-mlx's) put it in
    remote_args = f"base_url={nesso.url}/v1/completions,model=nesso,tokenizer_backend=huggingface,tokenizer={path}"
    remote_args += ",tokenized_requests=True,add_bos_token=True,max_length=4096,num_concurrent=1,max_retries=1"
    run = {"tasks": tasks, "task_manager": manager, "log_samples": True, "bootstrap_iters": 0, "limit": 4}
    remote = lm_eval.simple_evaluate(model="local-completions", model_args=remote_args, **run)
    model, tokenizer = nesso_local
    local = lm_eval.simple_evaluate(model=NessoLM(model=model, tokenizer=tokenizer, max_length=4096), **run)
    for task in tasks:
        assert len(remote["samples"][task]) == len(local["samples"][task]) == 4
        for a, b in zip(remote["samples"][task], local["samples"][task], strict=True):
            if task.endswith("_gen"):
                assert a["resps"] == b["resps"] and a["resps"][0][0]
            else:
                for [(x, greedy_x)], [(y, greedy_y)] in zip(a["resps"], b["resps"], strict=True):
                    assert x == pytest.approx(y, abs=1e-4) and greedy_x == greedy_y


def test_api_key_is_required_except_for_health(nesso):
    with pytest.raises(openai.AuthenticationError) as wrong:
        client(nesso, "sk-wrong").models.list()
    assert wrong.value.status_code == 401 and wrong.value.body["code"] == "invalid_api_key"
    status, body = get(nesso.url + "/v1/models")
    assert status == 401 and body["error"]["type"] == "invalid_request_error" and "Bearer" in body["error"]["message"]
    status, body = post(nesso.url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 401
    assert nesso.health()["status"] == "ok"
    models = client(nesso, KEY).models.list()
    assert [m.id for m in models.data] == [str(nesso_folder("text"))]


HI = [{"role": "user", "content": "Ciao"}]
BAD_REQUESTS = [
    ("n", "chat", {"messages": HI, "n": 2}, "n"),
    ("unknown field", "chat", {"messages": HI, "frobnicate": True}, "frobnicate"),
    ("temperature type", "chat", {"messages": HI, "temperature": "hot"}, "temperature"),
    ("temperature range", "chat", {"messages": HI, "temperature": 3}, "temperature"),
    ("top_p zero", "chat", {"messages": HI, "top_p": 0}, "top_p"),
    ("max_tokens negative", "chat", {"messages": HI, "max_tokens": -1}, "max_tokens"),
    ("max_tokens zero", "chat", {"messages": HI, "max_tokens": 0}, "max_tokens"),
    ("max_tokens past context", "chat", {"messages": HI, "max_tokens": 5000}, "max_tokens"),
    (
        "prompt and max_tokens past context",
        "chat",
        {"messages": [{"role": "user", "content": "ciao " * 3000}], "max_tokens": 2000},
        None,
    ),
    ("max_tokens disagree", "chat", {"messages": HI, "max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens"),
    ("no messages", "chat", {"model": "x"}, "messages"),
    ("empty messages", "chat", {"messages": []}, "messages"),
    ("missing role", "chat", {"messages": [{"content": "hi"}]}, "messages[0].role"),
    ("unknown role", "chat", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ("missing content", "chat", {"messages": [{"role": "user"}]}, "messages[0].content"),
    ("non-string content", "chat", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("image part", "chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, None),
    ("tool without id", "chat", {"messages": [*HI, {"role": "tool", "content": "42"}]}, "messages[1].tool_call_id"),
    ("tool answering nothing", "chat", {"messages": [*HI, {"role": "tool", "content": "42", "tool_call_id": "c1"}]}, None),
    (
        "bad call arguments",
        "chat",
        {
            "messages": [
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{"}}],
                }
            ]
        },
        None,
    ),
    ("response_format type", "chat", {"messages": HI, "response_format": {"type": "grammar"}}, "response_format.type"),
    (
        "schema llguidance rejects",
        "chat",
        {"messages": HI, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
        "response_format",
    ),
    (
        "tool_choice unknown tool",
        "chat",
        {"messages": HI, "tools": [LIGHTS], "tool_choice": {"type": "function", "function": {"name": "x"}}},
        None,
    ),
    ("tool_choice required without tools", "chat", {"messages": HI, "tool_choice": "required"}, "tool_choice"),
    ("tool type", "chat", {"messages": HI, "tools": [{"type": "retrieval"}]}, "tools[0]"),
    ("top_logprobs range", "chat", {"messages": HI, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("top_logprobs without logprobs", "chat", {"messages": HI, "top_logprobs": 2}, "top_logprobs"),
    ("stream_options without stream", "chat", {"messages": HI, "stream_options": {"include_usage": True}}, "stream_options"),
    ("logit_bias id", "chat", {"messages": HI, "logit_bias": {"999999": 5}}, "logit_bias"),
    ("stop type", "chat", {"messages": HI, "stop": 5}, "stop"),
    ("seed type", "chat", {"messages": HI, "seed": 1.5}, "seed"),
    ("reasoning_effort", "chat", {"messages": HI, "reasoning_effort": "high"}, "reasoning_effort"),
    ("functions", "chat", {"messages": HI, "functions": [{"name": "f"}]}, "functions"),
    ("completion n", "completions", {"prompt": "a", "n": 2}, "n"),
    ("completion best_of", "completions", {"prompt": "a", "best_of": 3}, "best_of"),
    ("completion token id", "completions", {"prompt": [1, 10**7]}, "prompt"),
    ("completion empty", "completions", {"prompt": ""}, "prompt"),
    ("completion logprobs", "completions", {"prompt": "a", "logprobs": 50}, "logprobs"),
    ("completion suffix", "completions", {"prompt": "a", "suffix": "b"}, "suffix"),
    ("completion stream batch", "completions", {"prompt": ["a", "b"], "stream": True}, "prompt"),
    ("body not JSON", "chat", b"{not json", None),
    ("body NaN", "chat", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', None),
    ("body not an object", "chat", [1, 2], None),
    ("body deeply nested", "chat", b"[" * 50000 + b"]" * 50000, None),
]


@pytest.mark.parametrize(("path", "body", "param"), [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_400_with_an_openai_error(nesso, path, body, param):
    status, reply = post(
        f"{nesso.url}/v1/{'chat/completions' if path == 'chat' else path}", body, {"Authorization": f"Bearer {KEY}"}
    )
    assert status == 400, reply
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["message"] and "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param


def test_http_errors_are_openai_errors(nesso):
    auth = {"Authorization": f"Bearer {KEY}"}
    status, body = post(nesso.url + "/v1/chat/completions", b'{"messages": "' + b"x" * 300_000 + b'"}', auth)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    status, body = get(nesso.url + "/v1/nothing", auth)
    assert status == 404 and body["error"]["type"] == "invalid_request_error" and "/v1/nothing" in body["error"]["message"]
    status, body = get(nesso.url + "/v1/chat/completions", auth)
    assert status == 405 and "GET" in body["error"]["message"]
    status, body = get(nesso.url + "/v1/models/gpt-9", auth)
    assert status == 404 and body["error"]["code"] == "model_not_found"


def test_tool_calls_on_nesso_vocabulary_stream_as_they_are_generated(nesso):
    """Parallel required calls on Llama-3.2's BPE (the tags split into pieces): each call validates,
    the streamed deltas reassemble to the same calls, parallel_tool_calls=false gives one call."""
    api = client(nesso, KEY)
    args = {
        "model": "nesso",
        "messages": HI,
        "tools": [LIGHTS, TRAINS],
        "tool_choice": "required",
        "temperature": 0,
        "max_tokens": 80,
    }
    whole = api.chat.completions.create(**args)
    calls = whole.choices[0].message.tool_calls
    assert whole.choices[0].finish_reason == "tool_calls" and calls and whole.choices[0].message.content is None
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (LIGHTS, TRAINS)}
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    assert len({c.id for c in calls}) == len(calls)
    content, streamed, finishes, _ = collect_stream(api.chat.completions.create(**args, stream=True))
    assert content == "" and finishes == ["tool_calls"]
    assert_same_calls(streamed, calls)

    one = api.chat.completions.create(**args, parallel_tool_calls=False)
    assert one.choices[0].finish_reason == "tool_calls" and len(one.choices[0].message.tool_calls) == 1
    assert one.choices[0].message.tool_calls[0].function.arguments == calls[0].function.arguments
    named = api.chat.completions.create(**{**args, "tool_choice": {"type": "function", "function": {"name": "cerca_treni"}}})
    assert [c.function.name for c in named.choices[0].message.tool_calls] == ["cerca_treni"]


def test_a_call_cut_by_max_tokens_is_returned_not_a_crash(nesso):
    api = client(nesso, KEY)
    for max_tokens in (3, 12):
        args = {
            "model": "nesso",
            "messages": HI,
            "tools": [TRAINS],
            "tool_choice": "required",
            "temperature": 0,
            "max_tokens": max_tokens,
        }
        whole = api.chat.completions.create(**args)
        assert whole.choices[0].finish_reason == "length"
        content, calls, finishes, _ = collect_stream(api.chat.completions.create(**args, stream=True))
        assert finishes == ["length"] and content == (whole.choices[0].message.content or "")
        assert_same_calls(calls, whole.choices[0].message.tool_calls)


def test_json_schema_and_logprobs_on_nesso_vocabulary(nesso):
    reply = client(nesso, KEY).chat.completions.create(
        model="nesso",
        messages=HI,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": BOUNDED_SCHEMA, "strict": True}},
        temperature=0,
        max_tokens=60,
        logprobs=True,
        top_logprobs=2,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), BOUNDED_SCHEMA)
    entries = choice.logprobs.content
    assert "".join(e.token for e in entries) == choice.message.content  # every token but the end-of-turn one
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)


def test_a_client_that_disconnects_frees_its_slot(nesso):
    """A stream of up to 4,000 tokens is dropped after a few chunks: the server stops generating at
    once (no active request) and serves the next request normally."""
    body = json.dumps({"messages": HI, "max_tokens": 4000, "temperature": 0, "stream": True}).encode()
    connection = http.client.HTTPConnection("127.0.0.1", nesso.port, timeout=30)
    connection.request(
        "POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    )
    response = connection.getresponse()
    assert response.status == 200
    seen = b""
    while seen.count(b"data:") < 5:
        seen += response.read1(4096)
    assert nesso.health()["active"] == 1
    connection.close()
    deadline = time.monotonic() + 10
    while nesso.health()["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert nesso.health() == {"status": "ok", "active": 0, "queued": 0}
    after = client(nesso, KEY).chat.completions.create(model="nesso", messages=HI, temperature=0, max_tokens=3)
    assert after.choices[0].finish_reason == "length" and after.usage.completion_tokens == 3


def test_three_concurrent_streams_with_two_slots_equal_their_solo_replies(nesso):
    api = client(nesso, KEY)
    requests = [
        {"messages": HI, "max_tokens": 40},
        {"messages": HI, "tools": [LIGHTS, TRAINS], "tool_choice": "required", "max_tokens": 40},
        {"messages": HI, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": BOUNDED_SCHEMA}}},
    ]
    solo = []
    for r in requests:
        message = api.chat.completions.create(model="nesso", temperature=0, **r).choices[0].message
        solo.append((message.content or "", [(c.function.name, c.function.arguments) for c in message.tool_calls or []]))
    results: list = [None] * len(requests)

    def run(i: int) -> None:
        content, calls, _, _ = collect_stream(
            api.chat.completions.create(model="nesso", temperature=0, stream=True, **requests[i])
        )
        results[i] = (content, [(c["name"], c["arguments"]) for c in calls])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == solo


# --- in-process: the request layer, the prompt cache and the scheduler -------------------------------


def run_jobs(runtime, works, batch_sizes=None):
    """Run `(work, stream)` jobs together on a Scheduler in this thread; returns each job's events
    (and appends the batch's size after each round to `batch_sizes`)."""
    from nesso_mlx.server_engine import Job, Scheduler

    scheduler = Scheduler(runtime, max_concurrency=len(works))
    events = [[] for _ in works]
    for i, work in enumerate(works):
        scheduler.add(Job(work, events[i].append))
    while scheduler.busy:
        scheduler.round()
        if batch_sizes is not None:
            batch_sizes.append(len(scheduler.decoder))
    return events


def chat_request(content: str, **fields):
    from nesso_mlx.request import parse_chat_request

    body = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}], "temperature": 0, **fields}
    return parse_chat_request(body, context_window=4096, vocab_size=128258)


def test_a_reused_prompt_cache_entry_is_not_changed_by_the_request_that_reused_it(nesso_local):
    import mlx.core as mx

    from nesso_mlx.server_engine import PromptCache, Runtime, chat_job

    model, tokenizer = nesso_local
    runtime = Runtime(model, tokenizer, PromptCache(2**30), prefill_step=8)  # several prefill steps per prompt
    first = chat_request("Ciao, come stai?", max_tokens=12)
    # penalties over a cached prefix: the repetition penalty must still see the system prompt's tokens
    second = chat_request("Che tempo fa a Roma?", max_tokens=12, repetition_penalty=3.0, repetition_context_size=48)
    [a] = run_jobs(runtime, [lambda rt: chat_job(rt, first, False)])
    assert a[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    [entry] = runtime.prompt_cache._entries.values()
    before = [(np.array(layer.keys.astype(mx.float32)), np.array(layer.values.astype(mx.float32))) for layer in entry.cache]
    [b] = run_jobs(runtime, [lambda rt: chat_job(rt, second, False)])
    shared = b[-1]["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert shared > 10  # the system prompt
    after = [(np.array(layer.keys.astype(mx.float32)), np.array(layer.values.astype(mx.float32))) for layer in entry.cache]
    assert all(np.array_equal(x, y) for pair in zip(before, after, strict=True) for x, y in zip(*pair, strict=True))
    # and the replies are those of a server without a prompt cache
    fresh = Runtime(model, tokenizer, PromptCache(0))
    [fb] = run_jobs(fresh, [lambda rt: chat_job(rt, second, False)])
    assert b[-1]["message"] == fb[-1]["message"] and fb[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    [again] = run_jobs(runtime, [lambda rt: chat_job(rt, first, False)])
    assert again[-1]["message"] == a[-1]["message"]
    assert again[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == a[-1]["usage"]["prompt_tokens"] - 1


def test_prompt_cache_evicts_least_recently_used_entries_over_its_budget():
    import mlx.core as mx

    from nesso_mlx.cache import KVCache
    from nesso_mlx.server_engine import PromptCache, cache_nbytes

    def cache(n: int) -> list:
        layer = KVCache()
        layer.update_and_fetch(mx.ones((1, 1, n, 4)), mx.ones((1, 1, n, 4)))
        return [layer]

    size = cache_nbytes(cache(3))  # one 256-position block per buffer
    store = PromptCache(max_bytes=2 * size)
    store.store([1, 2, 3], cache(3))
    store.store([4, 5, 6], cache(3))
    assert store.lookup([1, 2, 9])[1] == 2  # touches the first entry
    store.store([7, 8, 9], cache(3))  # over the budget: the least recently used ([4, 5, 6]) goes
    assert len(store) == 2 and store.nbytes <= 2 * size
    assert store.lookup([4, 5, 6, 1])[1] == 0 and store.lookup([1, 2, 3, 4])[1] == 3
    store.store([1, 2, 3, 4], cache(4))  # extends [1, 2, 3]: replaces it
    assert len(store) == 2 and store.lookup([1, 2, 3, 4, 5])[1] == 4
    assert store.lookup([1])[1] == 0  # at least one token is always left to prefill


def test_interleaved_jobs_give_their_solo_results(nesso_local):
    """Batched decoding of plain, constrained-tool and JSON-schema jobs, two with logprobs: each job's
    events are those it gives alone (MLX work of several generators interleaved on one thread)."""
    from nesso_mlx.server_engine import PromptCache, Runtime, chat_job

    model, tokenizer = nesso_local
    requests = [
        chat_request("Uno", max_tokens=20, logprobs=True, top_logprobs=3),
        chat_request("Due", max_tokens=30, tools=[LIGHTS, TRAINS], tool_choice="required"),
        chat_request("Tre", response_format={"type": "json_schema", "json_schema": {"schema": BOUNDED_SCHEMA}}, logprobs=True),
        chat_request("Quattro", max_tokens=25, temperature=1.0, seed=3, frequency_penalty=0.5, presence_penalty=0.5),
    ]

    def work(request):
        return lambda rt: chat_job(rt, request, True)

    def strip_ids(events):
        text = json.dumps(events)
        for event in events:
            for call in (event.get("message") or {}).get("tool_calls") or []:
                text = text.replace(call["id"], "call_")
        return text

    solo = [strip_ids(run_jobs(Runtime(model, tokenizer, PromptCache(0)), [work(r)])[0]) for r in requests]
    sizes = []
    together = run_jobs(Runtime(model, tokenizer, PromptCache(0)), [work(r) for r in requests], sizes)
    assert [strip_ids(e) for e in together] == solo
    assert max(sizes) == len(requests)  # decoded in one batch, not one after another


def test_a_job_cancelled_in_the_batch_leaves_it_and_the_others_go_on(nesso_local):
    """A client gone mid-stream: its row leaves the batch at once (its cache stored for reuse), and
    the others' replies are those they give alone."""
    from nesso_mlx.server_engine import Job, PromptCache, Runtime, Scheduler, chat_job

    model, tokenizer = nesso_local
    requests = [chat_request(word, max_tokens=16) for word in ("Uno", "Due", "Tre")]
    solo = [run_jobs(Runtime(model, tokenizer, PromptCache(0)), [lambda rt, r=r: chat_job(rt, r, False)])[0] for r in requests]
    runtime = Runtime(model, tokenizer, PromptCache(2**30))
    scheduler = Scheduler(runtime, max_concurrency=3)
    events = [[] for _ in requests]
    jobs = [Job(lambda rt, r=r: chat_job(rt, r, False), events[i].append) for i, r in enumerate(requests)]
    for job in jobs:
        scheduler.add(job)
    for _ in range(6):
        scheduler.round()
    assert len(scheduler.decoder) == 3
    jobs[1].cancel()
    scheduler.round()
    assert len(scheduler.decoder) == 2 and jobs[1] not in scheduler.active
    scheduler.run_until_idle()
    assert len(scheduler.decoder) == 0
    assert events[0][-1]["message"] == solo[0][-1]["message"] and events[2][-1]["message"] == solo[2][-1]["message"]
    assert not any(e["type"] == "done" for e in events[1])
    assert len(runtime.prompt_cache) == 3  # every row's cache was kept, the cancelled one's too


def test_chat_reply_streamed_deltas_equal_the_message_even_for_malformed_calls():
    from nesso_mlx.reply import GenerationChunk
    from nesso_mlx.request import ChatReply

    class Tok:
        eos_token_ids: list[int] = []

    def replay(pieces, finish):
        reply = ChatReply(Tok(), tools=True)
        deltas = []
        for i, text in enumerate(pieces):
            deltas += reply.add(GenerationChunk(text, i, finish if i == len(pieces) - 1 else None, 0, i + 1))[0]
        deltas += reply.finish()
        content = "".join(d.get("content", "") for d in deltas)
        calls: dict = {}
        for d in deltas:
            for tc in d.get("tool_calls", []):
                entry = calls.setdefault(tc["index"], {"name": None, "arguments": ""})
                entry["name"] = tc.get("function", {}).get("name") or entry["name"]
                entry["arguments"] += tc["function"].get("arguments", "")
        message = reply.message()
        assert content == (message["content"] or "")
        assert [(c["name"], c["arguments"]) for c in calls.values()] == [
            (c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls", [])
        ]
        return message, reply.finish_reason(finish)

    # two well-formed calls with newlines around them: no content, finish_reason tool_calls
    text = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
    text += '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>'
    message, finish = replay([text[i : i + 3] for i in range(0, len(text), 3)], "stop")
    assert message["content"] is None and finish == "tool_calls"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == [
        ("f", {"x": 1}),
        ("g", {}),
    ]
    # text, then a call cut in its arguments: the call with what was written, finish_reason length
    message, finish = replay(["Sure.", "\n<tool_", "call>\n", '{"name": "f", ', '"arguments": {"city": "Ro'], "length")
    assert message["content"] == "Sure." and finish == "length"
    assert message["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"city": "Ro'}
    # a block without a recognizable name: returned as content, verbatim; no calls
    message, finish = replay(["Ok ", "<tool_call>\n{broken json}\n</tool_call>", "\nDone."], "stop")
    assert finish == "stop" and "tool_calls" not in message
    assert message["content"] == "Ok Done.\n<tool_call>\n{broken json}\n</tool_call>"
    # no tools involved: the text is the content exactly, whitespace included
    message, _ = replay(["  Hello", "\n\n", "world \n"], "stop")
    assert message["content"] == "  Hello\n\nworld \n"


def test_frequency_and_presence_penalties_follow_openai():
    import mlx.core as mx

    from nesso_mlx.request import penalty_processor

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, 50)).astype(np.float32)
    prompt, generated = [3, 3, 7], [5, 5, 5, 9, 3]
    process = penalty_processor(0.4, 0.3, prompt_tokens=len(prompt))
    out = np.array(process(mx.array(prompt + generated), mx.array(logits)))
    expected = logits.copy()
    for token, count in {5: 3, 9: 1, 3: 1}.items():  # the prompt's tokens do not count
        expected[0, token] -= 0.4 * count + 0.3
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert np.array_equal(np.array(process(mx.array(prompt), mx.array(logits))), logits)


def test_repetition_penalty_sees_the_cached_prefix():
    """With part of the prompt in the cache, the decode loop sees only the rest; the repetition
    penalty must still cover the same recent tokens as without the cache."""
    import mlx.core as mx

    from nesso_mlx.request import Sampling, logits_processors
    from nesso_mlx.sampling import repetition_penalty_processor

    logits = np.random.default_rng(1).normal(size=(1, 40)).astype(np.float32)
    prompt, generated = [1, 2, 3, 4, 5, 6, 7, 8], [9, 9]
    whole = repetition_penalty_processor(1.7, 6)(mx.array(prompt + generated), mx.array(logits))
    for cached in (0, 3, 6, 8):
        [process] = logits_processors(
            Sampling(repetition_penalty=1.7, repetition_context_size=6), 40, prompt[:cached], 8 - cached
        )
        out = process(mx.array(prompt[cached:] + generated), mx.array(logits))
        np.testing.assert_allclose(np.array(out), np.array(whole), rtol=1e-6)


def test_messages_convert_for_the_template():
    from nesso_mlx.request import RequestError, parse_messages

    messages = parse_messages(
        [
            {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
            {"role": "user", "content": "Weather?", "name": "ada"},
            {
                "role": "assistant",
                "content": None,
                "refusal": None,
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": '{"city": "Roma"}'}}],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ]
    )
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": {"city": "Roma"}}}],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    ]
    with pytest.raises(RequestError, match="did not make"):
        parse_messages([{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "c1", "content": "y"}])


class StubEngine:
    """What the app reads from an engine, without a model (the MLX side is tested above)."""

    model_name, context_window, vocab_size, active, queued = "stub", 2048, 100, 0, 0

    def submit(self, job) -> None:
        raise AssertionError("no request should reach the engine")


def test_cors_is_off_unless_origins_are_named_and_preflights_need_no_key():
    from nesso_mlx.server import create_app

    preflight = {
        "Origin": "http://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os",
    }
    closed = create_app(StubEngine())
    status, headers, _ = asgi(closed, "GET", "/v1/models", {"Origin": "http://app.example"})
    assert status == 200 and "access-control-allow-origin" not in headers
    assert "access-control-allow-origin" not in asgi(closed, "OPTIONS", "/v1/chat/completions", preflight)[1]

    app = create_app(StubEngine(), api_key=KEY, cors=["http://app.example"])
    status, headers, _ = asgi(app, "OPTIONS", "/v1/chat/completions", preflight)
    assert status == 200 and headers["access-control-allow-origin"] == "http://app.example"
    status, headers, _ = asgi(app, "OPTIONS", "/v1/chat/completions", {**preflight, "Origin": "http://evil.example"})
    assert status == 400 and "access-control-allow-origin" not in headers
    status, headers, body = asgi(app, "GET", "/v1/models", {"Origin": "http://app.example"})
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key" and headers["www-authenticate"] == "Bearer"
    status, headers, _ = asgi(app, "GET", "/v1/models", {"Origin": "http://app.example", "Authorization": f"Bearer {KEY}"})
    assert status == 200 and headers["access-control-allow-origin"] == "http://app.example"
    assert asgi(app, "GET", "/v1/models", {"Authorization": f"bearer {KEY}x"})[0] == 401
    assert asgi(app, "GET", "/health")[0] == 200


def test_an_unexpected_failure_is_a_json_500_without_a_traceback():
    from nesso_mlx.server import create_app

    class Broken(StubEngine):
        @property
        def context_window(self):
            raise ZeroDivisionError("secret internals")

    status, headers, body = asgi(create_app(Broken()), "POST", "/v1/chat/completions", body=b'{"messages": []}')
    error = json.loads(body)["error"]
    assert status == 500 and headers["content-type"] == "application/json"
    assert error["type"] == "server_error" and "secret" not in error["message"] and "Traceback" not in body.decode()


def test_the_servers_default_max_tokens_caps_only_requests_without_one(nesso_local):
    from nesso_mlx.server_engine import PromptCache, Runtime, chat_job

    model, tokenizer = nesso_local
    runtime = Runtime(model, tokenizer, PromptCache(0), default_max_tokens=5)
    unset, explicit = chat_request("Ciao"), chat_request("Ciao", max_tokens=9)
    [a], [b] = (
        run_jobs(runtime, [lambda rt: chat_job(rt, unset, False)]),
        run_jobs(runtime, [lambda rt: chat_job(rt, explicit, False)]),
    )
    assert (a[-1]["finish_reason"], a[-1]["usage"]["completion_tokens"]) == ("length", 5)
    assert (b[-1]["finish_reason"], b[-1]["usage"]["completion_tokens"]) == ("length", 9)


def test_a_request_failing_in_the_batch_fails_alone(nesso_local, monkeypatch):
    """One request's processors raise while decoding: it gets a 500, the others their solo replies,
    and the scheduler ends idle with an empty batch."""
    import nesso_mlx.reply as reply
    from nesso_mlx.server_engine import PromptCache, Runtime, chat_job

    model, tokenizer = nesso_local
    requests = [chat_request(word, max_tokens=10) for word in ("Uno", "Due", "Tre")]
    solo = [run_jobs(Runtime(model, tokenizer, PromptCache(0)), [lambda rt, r=r: chat_job(rt, r, False)])[0] for r in requests]
    real = reply.prepare_decoding

    def breaking(model_, tokenizer_, ids, cached=0, **options):
        plan = real(model_, tokenizer_, ids, cached, **options)
        if "Due" in tokenizer_.decode(ids):
            plan.processors.append(lambda tokens, logits: (_ for _ in ()).throw(RuntimeError("processor bug")))
        return plan

    monkeypatch.setattr(reply, "prepare_decoding", breaking)
    events = run_jobs(Runtime(model, tokenizer, PromptCache(2**30)), [lambda rt, r=r: chat_job(rt, r, False) for r in requests])
    assert events[1][-1]["type"] == "error" and events[1][-1]["status"] == 500
    assert events[0][-1]["message"] == solo[0][-1]["message"] and events[2][-1]["message"] == solo[2][-1]["message"]


def test_a_request_that_cannot_join_the_batch_gets_an_error_not_a_hang(nesso_local, monkeypatch):
    """A cache the batch cannot take (here a bounded one): a row alone decodes in it, but a second
    one cannot join it: a 500 at once for that one; the scheduler goes idle."""
    from nesso_mlx.server_engine import Job, PromptCache, Runtime, Scheduler, chat_job

    model, tokenizer = nesso_local
    real = type(model).make_cache
    monkeypatch.setattr(type(model), "make_cache", lambda self, *a, **k: real(self, max_kv_size=64))
    runtime = Runtime(model, tokenizer, PromptCache(0))
    scheduler = Scheduler(runtime, max_concurrency=2)
    events: list = [[], []]
    for i, word in enumerate(("Uno", "Due")):
        scheduler.add(Job(lambda rt, w=word: chat_job(rt, chat_request(w, max_tokens=5), False), events[i].append))
    for _ in range(8):
        scheduler.round()
    assert not scheduler.busy and len(scheduler.decoder) == 0
    assert events[0][-1]["type"] == "done"
    assert events[1][-1]["type"] == "error" and events[1][-1]["status"] == 500


def test_a_job_cancelled_while_prefilling_never_joins(nesso_local):
    from nesso_mlx.server_engine import Job, PromptCache, Runtime, Scheduler, chat_job

    model, tokenizer = nesso_local
    runtime = Runtime(model, tokenizer, PromptCache(2**30), prefill_step=4)  # several prefill steps
    scheduler = Scheduler(runtime, max_concurrency=2)
    events: list = []
    job = Job(lambda rt: chat_job(rt, chat_request("Uno due tre quattro cinque", max_tokens=5), False), events.append)
    scheduler.add(job)
    scheduler.round()
    scheduler.round()
    assert not job.decoding and job in scheduler.active
    job.cancel()
    scheduler.run_until_idle()
    assert len(scheduler.decoder) == 0 and not any(e["type"] == "done" for e in events)
    assert len(runtime.prompt_cache) == 1  # the prefilled part is kept for the next request


def test_a_failed_batch_step_fails_its_requests_and_the_server_goes_on(nesso_local, monkeypatch):
    """An error that escapes the batch's step (here, injected): every request in the batch gets a
    500, none of their caches is kept, and the next request is served normally."""
    from nesso_mlx.generation import Decoder
    from nesso_mlx.server_engine import Job, PromptCache, Runtime, Scheduler, chat_job

    model, tokenizer = nesso_local
    request = chat_request("Tre", max_tokens=6)
    solo = run_jobs(Runtime(model, tokenizer, PromptCache(0)), [lambda rt: chat_job(rt, request, False)])[0]
    runtime = Runtime(model, tokenizer, PromptCache(2**30))
    scheduler = Scheduler(runtime, max_concurrency=4)
    events: list = [[], []]
    for i, word in enumerate(("Uno", "Due")):
        scheduler.add(Job(lambda rt, w=word: chat_job(rt, chat_request(w, max_tokens=20), False), events[i].append))
    for _ in range(4):
        scheduler.round()
    real = Decoder.step
    monkeypatch.setattr(Decoder, "step", lambda self: (_ for _ in ()).throw(RuntimeError("device lost")))
    scheduler.round()
    monkeypatch.setattr(Decoder, "step", real)
    assert [e[-1]["status"] for e in events] == [500, 500] and not scheduler.busy
    assert len(runtime.prompt_cache) == 0
    after: list = []
    scheduler.add(Job(lambda rt: chat_job(rt, request, False), after.append))
    scheduler.run_until_idle()
    assert after[-1]["message"] == solo[-1]["message"]


def test_prompt_lookup_in_the_server_gives_the_replies_without_it(nesso_local, monkeypatch):
    """A request decoding alone drafts (grammar-forced tokens of a tool call or a schema, n-grams);
    its reply is the one the server gives without prompt lookup, also when another request joins
    mid-way; seeded sampling is left without it (its draws would depend on the other requests)."""
    import nesso_mlx.speculative as speculative
    from nesso_mlx.sampling import SamplingOptions
    from nesso_mlx.server_engine import Job, PromptCache, Runtime, Scheduler, _prompt_lookup, chat_job

    passes = []
    original = speculative.LookupController.verified

    def verified(self, drafted, accepted, seconds, forced=0, after_forced=False, **counts):
        passes.append((drafted, accepted, forced))
        original(self, drafted, accepted, seconds, forced, after_forced, **counts)

    monkeypatch.setattr(speculative.LookupController, "verified", verified)
    model, tokenizer = nesso_local
    requests = [
        chat_request("Accendi la luce in cucina.", max_tokens=40, tools=[LIGHTS, TRAINS], tool_choice="required"),
        chat_request("Dati", response_format={"type": "json_schema", "json_schema": {"schema": BOUNDED_SCHEMA}}),
        chat_request("Quattro", max_tokens=12, temperature=1.0, seed=3),
    ]

    def run(lookup: bool, join_after: int | None = None) -> list[list]:
        scheduler = Scheduler(Runtime(model, tokenizer, PromptCache(0), prompt_lookup=lookup), max_concurrency=2)
        events = [[] for _ in requests]
        jobs = [Job(lambda rt, r=r: chat_job(rt, r, False), events[i].append) for i, r in enumerate(requests)]
        if join_after is None:
            for job in jobs:  # one after another: each alone in the batch
                scheduler.add(job)
                scheduler.run_until_idle()
        else:
            scheduler.add(jobs[0])
            for _ in range(join_after):
                scheduler.round()
            for job in jobs[1:]:
                scheduler.add(job)
            scheduler.run_until_idle()
        call_id = events[0][-1]["message"]["tool_calls"][0]["id"]  # random: not part of the comparison
        return [json.dumps(e).replace(call_id, "call_") for e in events]

    without = run(False)
    assert not passes
    assert run(True) == without
    assert any(forced > 0 for _, _, forced in passes), passes  # the call's opening went in a pass
    passes.clear()
    assert run(True, join_after=4) == without
    assert passes  # drafted while alone, before the others joined or after they left
    runtime = Runtime(model, tokenizer, PromptCache(0))
    seeded, greedy = SamplingOptions(temperature=1.0, seed=3), SamplingOptions()
    assert _prompt_lookup(runtime, [1, 2], seeded, None, None) is None
    assert _prompt_lookup(runtime, [1, 2], SamplingOptions(temperature=1.0), 2, None) is None  # logprobs asked
    plan = type("Plan", (), {"max_tokens": 5, "reply": type("Reply", (), {"eos": [0]})})
    assert _prompt_lookup(runtime, [1, 2], greedy, None, plan) is not None
    assert _prompt_lookup(Runtime(model, tokenizer, PromptCache(0), prompt_lookup=False), [1, 2], greedy, None, plan) is None


def assert_cache_entries_hold_their_tokens(runtime) -> None:
    """Every prompt-cache entry holds the keys a fresh prefill of the tokens it lists gives."""
    import mlx.core as mx

    assert runtime.prompt_cache._entries
    for entry in runtime.prompt_cache._entries.values():
        fresh = runtime.model.make_cache()
        runtime.model(mx.array([entry.tokens]), fresh)
        for stored, expected in zip(entry.cache, fresh, strict=True):
            assert stored.offset == expected.offset == len(entry.tokens)
            a, b = stored.state[0].astype(mx.float32), expected.state[0].astype(mx.float32)
            assert mx.allclose(a, b, atol=0.1, rtol=0.05).item()


def step_sizes(monkeypatch) -> list[int]:
    """How many tokens each `Decoder.step` gave its first row (several: a verified draft)."""
    from nesso_mlx.generation import Decoder

    sizes = []
    original = Decoder.step

    def step(self):
        out = original(self)
        sizes.append(sum(item.row is out[0].row for item in out) if out else 0)
        return out

    monkeypatch.setattr(Decoder, "step", step)
    return sizes


def test_a_reply_ending_inside_a_multi_token_step_is_clean(nesso_local, monkeypatch, caplog):
    """A stop string or a cancel can land among the tokens one verify pass gave: the tokens after
    it are dropped without errors, and the stored caches hold exactly the tokens they list."""
    import logging

    import nesso_mlx.speculative as speculative
    from nesso_mlx.server_engine import Job, PromptCache, Runtime, Scheduler, chat_job

    model, tokenizer = nesso_local
    sizes = step_sizes(monkeypatch)
    passes = []
    original = speculative.LookupController.verified
    monkeypatch.setattr(
        speculative.LookupController, "verified", lambda self, *a, **k: passes.append(a) or original(self, *a, **k)
    )
    caplog.set_level(logging.WARNING, logger="nesso_mlx.server")
    runtime = Runtime(model, tokenizer, PromptCache(2**30))
    # a stop string inside the call's forced opening (drafted and verified in one pass)
    stopped = chat_request("Accendi la luce.", max_tokens=40, tools=[LIGHTS], tool_choice="required", stop=['"name"'])
    [events] = run_jobs(runtime, [lambda rt: chat_job(rt, stopped, False)])
    assert events[-1]["finish_reason"] == "stop" and events[-1]["type"] == "done"
    # `<tool_call>` handed out at once (before its pass), then the opening `\n{"name": ...` it forces,
    # verified in that pass: the stop lands inside that step
    assert sizes[0] == 1 and sizes[1] >= 7, sizes
    # a client gone after its second delta
    call = chat_request("Accendi la luce.", max_tokens=40, tools=[LIGHTS], tool_choice="required")
    scheduler = Scheduler(runtime, max_concurrency=1)
    streamed = []
    job = Job(lambda rt: chat_job(rt, call, True), streamed.append)
    scheduler.add(job)
    sizes.clear()
    while scheduler.busy:
        scheduler.round()
        if sum(e.get("type") == "delta" for e in streamed) >= 2:
            job.cancel()
    assert max(sizes) >= 3  # drafts were verified in this run too
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    assert_cache_entries_hold_their_tokens(runtime)
    # unseeded sampling drafts too (forced tokens), and its replies stay well-formed calls
    passes.clear()
    sampled = chat_request("Accendi la luce.", max_tokens=40, tools=[LIGHTS], tool_choice="required", temperature=0.2)
    for _ in range(2):
        [events] = run_jobs(runtime, [lambda rt: chat_job(rt, sampled, False)])
        for call in events[-1]["message"]["tool_calls"]:
            assert call["function"]["name"] in ("set_lights", "cerca_treni")
            assert isinstance(json.loads(call["function"]["arguments"]), dict)
    assert passes


def test_tokens_after_a_stop_inside_a_verified_draft_go_nowhere(smollm2, monkeypatch, caplog):
    """A multi-prompt completion whose first reply stops inside a verified draft: the draft's later
    tokens neither reach the next prompt's reply (the job has moved on to it) nor the stored
    caches, and nothing is logged as an error."""
    import logging

    import nesso_mlx.speculative as speculative
    from nesso_mlx.request import parse_completion_request
    from nesso_mlx.server_engine import PromptCache, Runtime, completion_job

    model, tokenizer = smollm2
    monkeypatch.setattr(speculative.LookupController, "wants_draft", lambda self: True)  # draft at every match
    sizes = step_sizes(monkeypatch)
    body = {
        "prompt": ["1 2 3 4 5 6 7 8 9 10 1 2 3 4 5 6 7 8 9 10 1 2 3", "Lunedì martedì mercoledì giovedì venerdì. Lunedì"],
        "max_tokens": 14,
        "stop": [" 6", " venerdì"],
        "temperature": 0,
    }
    request = parse_completion_request(body, context_window=8192, vocab_size=model.args.vocab_size)

    def run(lookup):
        runtime = Runtime(model, tokenizer, PromptCache(2**30), prompt_lookup=lookup)
        [events] = run_jobs(runtime, [lambda rt: completion_job(rt, request, False)])
        return events, runtime

    caplog.set_level(logging.WARNING, logger="nesso_mlx.server")
    without, _ = run(False)
    sizes.clear()
    with_lookup, runtime = run(True)
    assert with_lookup == without
    assert without[-1]["choices"][0]["finish_reason"] == "stop"
    # the counting ran in verified drafts, and the stop fell inside one: tokens were given, not taken
    assert max(sizes) >= 3 and sum(sizes) > with_lookup[-1]["usage"]["completion_tokens"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert_cache_entries_hold_their_tokens(runtime)


def test_other_requests_work_is_not_timed_as_a_lone_rows_decode_step(nesso_local):
    """Prompt lookup sizes drafts by the time of a plain decode step; another request's checks and
    prefill chunks between two steps must not count as one."""
    from nesso_mlx.server_engine import Job, PromptCache, Runtime, Scheduler, chat_job

    model, tokenizer = nesso_local
    scheduler = Scheduler(Runtime(model, tokenizer, PromptCache(0), prefill_step=8), max_concurrency=2)
    first = Job(lambda rt: chat_job(rt, chat_request("Uno", max_tokens=40), False), [].append)
    scheduler.add(first)
    while not first.decoding:
        scheduler.round()
    controller = first.slot.row.lookup.controller
    controller._last, controller.step_time = 1.0, 0.001  # a step began long ago
    scheduler.add(Job(lambda rt: chat_job(rt, chat_request("Due " * 40, max_tokens=4), False), [].append))
    assert controller._last is None  # the new request's checks
    controller._last = 1.0
    scheduler.round()  # the new request's first prefill chunk, then the lone row's step
    assert controller.step_time == 0.001  # no sample spanning the prefill


def test_the_prompt_lookup_flag_reaches_the_engine(monkeypatch):
    import nesso_mlx.server as server

    real_serve, seen, engines = server.serve, [], []
    monkeypatch.setattr(server, "serve", lambda model, **options: seen.append(options["prompt_lookup"]))
    server.main(["--model", "x"])
    server.main(["--model", "x", "--no-prompt-lookup"])
    assert seen == [True, False]

    class Stop(Exception):
        pass

    def engine(model, **options):
        engines.append(options["prompt_lookup"])
        raise Stop

    monkeypatch.setattr(server, "Engine", engine)
    with pytest.raises(Stop):
        real_serve("x", prompt_lookup=False)
    assert engines == [False]
