"""Tools: parsing, schemas from functions, the grammar processor, constrained generation, scoring."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import jsonschema
import mlx.core as mx
import numpy as np
import pytest

from nesso_mlx import generate, load
from nesso_mlx.constrained import GrammarError, GrammarProcessor, build_processor, tool_calls_grammar
from nesso_mlx.evaluation import load_cases, run_tool_eval, score
from nesso_mlx.tokenizer import Tokenizer
from nesso_mlx.tools import function_schema, parse_tool_calls, tool_schemas

CASES = Path(__file__).parent / "data" / "tool_cases.json"


# --- parsing -------------------------------------------------------------------------------------


def test_parse_good_parallel_and_malformed_calls():
    text = (
        'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Roma"}}\n</tool_call>\n'
        '<tool_call>{"name": "convert_currency", "arguments": "{\\"amount\\": 5}"}</tool_call>\n'
        '<tool_call>\n{"name": "send_email", "arguments": {"to": "a@b.it",}}\n</tool_call>\n'
        '<tool_call>\n{"arguments": {}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Na'
    )
    content, calls = parse_tool_calls(text)
    assert content == "Sure."
    assert [c.name for c in calls] == ["get_weather", "convert_currency", None, None, None]
    assert calls[0].ok and calls[0].arguments == {"city": "Roma"}
    assert calls[1].ok and calls[1].arguments == {"amount": 5}  # arguments given as a JSON string
    assert "not valid JSON" in calls[2].error and '"to": "a@b.it",' in calls[2].raw
    assert calls[3].error == 'the call has no "name"'
    assert "not valid JSON" in calls[4].error  # cut short: reported, not dropped
    closed_late = parse_tool_calls('<tool_call>{"name": "x", "arguments": {}}')[1][0]
    assert closed_late.error == "the <tool_call> block was not closed"
    assert parse_tool_calls("no calls here") == ("no calls here", [])


def test_schema_from_a_python_function():
    def book_table(
        restaurant: str,
        people: int,
        when: str | None = None,
        vegan: bool = False,
        area: Literal["inside", "outside"] = "inside",
        notes: list[str] | None = None,
    ) -> str:
        """Book a table at a restaurant.

        Args:
            restaurant: Name of the restaurant.
            people: How many people,
                children included.
            when: Time, e.g. "20:30".
        """

    schema = function_schema(book_table)
    fn = schema["function"]
    assert schema["type"] == "function" and fn["name"] == "book_table"
    assert fn["description"] == "Book a table at a restaurant."
    props = fn["parameters"]["properties"]
    assert props["restaurant"] == {"type": "string", "description": "Name of the restaurant."}
    assert props["people"] == {"type": "integer", "description": "How many people, children included."}
    assert props["when"]["type"] == "string" and props["when"]["default"] is None
    assert props["vegan"] == {"type": "boolean", "default": False}
    assert props["area"] == {"enum": ["inside", "outside"], "default": "inside"}
    assert props["notes"]["items"] == {"type": "string"}
    assert fn["parameters"]["required"] == ["restaurant", "people"]
    assert tool_schemas([book_table, {"name": "x", "parameters": {}}])[1] == {
        "type": "function",
        "function": {"name": "x", "parameters": {}},
    }


# --- the grammar processor, token by token -----------------------------------------------------


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2_path):
    return Tokenizer.from_folder(smollm2_path)


WEATHER = tool_schemas(
    [
        {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                "required": ["city"],
            },
        }
    ]
)


def allowed(processor: GrammarProcessor, history: list[int], vocab: int) -> np.ndarray:
    logits = processor(mx.array(history), mx.zeros((1, vocab)))
    return np.array(logits[0] > -np.inf)


def test_required_call_masks_and_finishes_with_eos(smol_tokenizer):
    vocab, eos = 49152, smol_tokenizer.eos_token_ids[0]
    processor = GrammarProcessor(smol_tokenizer, tool_calls_grammar(smol_tokenizer, WEATHER, single=True), vocab)
    prompt = [1, 2, 3]
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Roma", "unit": "c"}}\n</tool_call>'
    ids = smol_tokenizer.encode(text, add_special_tokens=False)
    mask = allowed(processor, prompt, vocab)
    assert mask[ids[0]] and not mask[eos] and mask.sum() < vocab  # must open a call
    history = list(prompt)
    for token in ids:
        mask = allowed(processor, history, vocab)
        assert mask[token], smol_tokenizer.decode([token])
        history.append(token)
    mask = allowed(processor, history, vocab)
    assert mask[eos] and mask.sum() == 1  # only EOS after the closing tag: never stuck without it
    # a wrong tool name or an unknown argument is banned
    fresh = GrammarProcessor(smol_tokenizer, tool_calls_grammar(smol_tokenizer, WEATHER, single=True), vocab)
    prefix = smol_tokenizer.encode('<tool_call>\n{"name": "', add_special_tokens=False)
    allowed(fresh, prompt, vocab)
    mask = allowed(fresh, prompt + prefix, vocab)
    assert not mask[smol_tokenizer.encode("send", add_special_tokens=False)[0]]
    assert mask[smol_tokenizer.encode("get", add_special_tokens=False)[0]]


def test_auto_mode_is_free_until_a_call_opens(smol_tokenizer):
    vocab = 49152
    processor = build_processor(smol_tokenizer, vocab, WEATHER, "auto")
    history = [1, 2]
    assert allowed(processor, history, vocab).all()  # free text
    for token in smol_tokenizer.encode("Ok. <tool_call>", add_special_tokens=False):
        history.append(token)
        mask = allowed(processor, history, vocab)
    assert not mask.all()  # the body is constrained now
    body = smol_tokenizer.encode(
        '\n{"name": "get_weather", "arguments": {"city": "Bari"}}\n</tool_call>', add_special_tokens=False
    )
    for token in body:
        assert mask[token]
        history.append(token)
        mask = allowed(processor, history, vocab)
    assert mask.all()  # free again: more text, another call, or EOS


def test_bad_tool_choice_and_schema(smol_tokenizer):
    with pytest.raises(GrammarError, match="not one of the tools"):
        build_processor(smol_tokenizer, 49152, WEATHER, "book_flight")
    with pytest.raises(GrammarError, match="json_schema"):
        build_processor(smol_tokenizer, 49152, response_format={"type": "json_schema"})
    with pytest.raises(GrammarError, match="not supported"):
        build_processor(smol_tokenizer, 49152, response_format={"type": "yaml"})
    assert build_processor(smol_tokenizer, 49152, WEATHER, "none") is None


# --- constrained generation on the real model ---------------------------------------------------

SCHEMAS = {
    "nested_enum_integer": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "country": {"enum": ["France", "Italy", "Spain"]},
            "stats": {
                "type": "object",
                "properties": {"population_millions": {"type": "integer"}, "capital": {"type": "boolean"}},
                "required": ["population_millions", "capital"],
                "additionalProperties": False,
            },
        },
        "required": ["city", "country", "stats"],
        "additionalProperties": False,
    },
    "array_and_number": {
        "type": "object",
        "properties": {
            "cities": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 2, "maxItems": 3},
            "average_temperature": {"type": "number", "minimum": -50, "maximum": 60},
        },
        "required": ["cities", "average_temperature"],
        "additionalProperties": False,
    },
}


@pytest.mark.parametrize("name", SCHEMAS)
def test_schema_constrained_output_parses_and_validates(smollm2, name):
    model, tokenizer = smollm2
    schema = SCHEMAS[name]
    result = generate(
        model,
        tokenizer,
        messages=[{"role": "user", "content": "Describe the capital of France as JSON."}],
        max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"schema": schema}},
    )
    assert result.finish_reason == "stop", result.text
    jsonschema.validate(json.loads(result.text), schema)


def test_json_object_mode(smollm2):
    model, tokenizer = smollm2
    result = generate(
        model,
        tokenizer,
        messages=[{"role": "user", "content": 'Reply with a JSON object with one key, "name", set to your name.'}],
        max_tokens=40,
        response_format={"type": "json_object"},
    )
    assert result.finish_reason == "stop" and isinstance(json.loads(result.text), dict)


def test_named_tool_choice_gives_a_valid_call(smollm2):
    model, tokenizer = smollm2

    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> str:
        """Weather for a city."""

    result = generate(
        model,
        tokenizer,
        messages=[{"role": "user", "content": "Weather in Rome?"}],
        tools=[get_weather, SCHEMAS_TOOL],
        tool_choice="get_weather",
        max_tokens=60,
    )
    assert result.finish_reason == "tool_calls", result.raw_text
    (call,) = result.tool_calls
    assert call.ok and call.name == "get_weather"
    jsonschema.validate(call.arguments, function_schema(get_weather)["function"]["parameters"])
    assert result.message["tool_calls"][0]["function"]["name"] == "get_weather"


SCHEMAS_TOOL = {"name": "web_search", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}


# --- scoring ------------------------------------------------------------------------------------


def call(name: str, **arguments) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


HAND_WRITTEN = {
    "s-it": (call("get_weather", city="Bari"), True),
    "s-en": (call("convert_currency", amount=1, **{"from": "a", "to": "b"}), False),
    "ps-it": (call("get_weather", city="Napoli") + call("get_weather", city="Genova"), True),
    "ps-en": (call("get_weather", city="Oslo"), False),
    "pd-it": (call("convert_currency", amount=10) + call("get_weather", city="Pisa"), True),
    "pd-en": (call("get_weather", city="Bath") + call("get_weather", city="x"), False),
    "ma-it": (call("book_table", restaurant="Gino", people=4, time="20:00"), True),
    "ma-en": (call("send_email", to="ann@ex.com"), False),
    "d-it": ('<tool_call>\n{"name": "convert_currency", "arguments": {"amount": 30,}}\n</tool_call>', False),
    "d-en": (call("convert_currency", amount=20, **{"from": "EUR", "to": "USD"}), True),
    "mi-it": ("A chi devo inviarla?", True),
    "mi-en": (call("send_email", to="boss@company.com", body="late"), False),
    "u-it": ("Non posso farlo, non ho uno strumento per il riscaldamento.", True),
    "u-en": (call("get_weather", city="home"), False),
    "k-it": ("La capitale della Francia è Parigi.", True),
    "k-en": ("", False),
    "o-it": ("Piove: porta l'ombrello.", True),
    "o-en": ("It is 12 dollars.", False),
    "m-it": (call("send_email", to="lia@ex.it", body="Piove"), True),
    "m-en": (call("get_weather", city="Rome"), False),
}


def test_scoring_on_hand_written_outputs():
    data = load_cases(CASES)
    cats = {c["cat"] for c in data["cases"]}
    assert len(cats) == 10 and {c["lang"] for c in data["cases"]} == {"IT", "EN"}
    for case in data["cases"]:
        output, expected = HAND_WRITTEN[case["id"]]
        result = score(case, output)
        assert result.passed is expected, (case["id"], result.reason)
    assert "malformed" in score(data["cases"][8], HAND_WRITTEN["d-it"][0]).reason
    obs = next(c for c in data["cases"] if c["id"] == "o-it")
    echo = '<tool_response>\n{"city": "Roma", "condition": "pioggia"}\n</tool_response>'
    assert not score(obs, echo).passed  # echoing the tool's result is not an answer


def test_the_authors_case_file_loads(tmp_path):
    shared = Path(__file__).resolve().parents[2] / "shared" / "eval" / "agentic_eval_cases_100.json"
    if not shared.exists():
        pytest.skip("../shared is not beside this checkout")
    data = load_cases(shared)
    assert len(data["cases"]) == 100 and len(data["tools"]) == 9
    for case in data["cases"]:  # every spec is understood by the scorer
        score(case, "")
    (tmp_path / "bad.json").write_text('{"tools": [], "cases": [{"id": 1}]}')
    with pytest.raises(Exception, match="not a tool-calling case file"):
        load_cases(tmp_path / "bad.json")


def test_eval_runs_end_to_end_on_a_tiny_model(tiny_folder, monkeypatch):
    from types import SimpleNamespace

    import nesso_mlx.api

    model, tokenizer = load(tiny_folder)
    data = load_cases(CASES)
    # 1. The real path: what the eval records is what the model writes for the case's messages.
    real = run_tool_eval(model, tokenizer, {**data, "cases": data["cases"][:2]}, constrain=False, max_tokens=4)
    for case, result in zip(data["cases"][:2], real.results, strict=True):
        direct = generate(model, tokenizer, messages=case["messages"], tools=data["tools"], constrain=False, max_tokens=4)
        assert result.output == direct.raw_text and result.id == case["id"]
    # 2. The scripted path: each case's hand-written output must get its known verdict, per
    # case, per category and per language, and the request must carry the case's tools.
    outputs = {json.dumps(c["messages"]): HAND_WRITTEN[c["id"]][0] for c in data["cases"]}

    def scripted(model_, tokenizer_, requests, *, batch_size, progress, tools, constrain, sampling):
        assert tools == data["tools"] and constrain is True and sampling.temperature == 0.0 and batch_size == 8
        replies = []
        for request in requests:
            assert request["max_tokens"] == 7
            replies.append(SimpleNamespace(raw_text=outputs[json.dumps(request["messages"])]))
            progress(len(replies), len(requests))
        return replies

    monkeypatch.setattr(nesso_mlx.api, "batch_generate", scripted)
    seen = []
    report = run_tool_eval(model, tokenizer, data, constrain=True, max_tokens=7, progress=lambda d, t: seen.append((d, t)))
    expected = {c["id"]: HAND_WRITTEN[c["id"]][1] for c in data["cases"]}
    assert {r.id: r.passed for r in report.results} == expected
    assert seen == [(i, 20) for i in range(1, 21)]
    by_lang = {lang: (sum(expected[c["id"]] for c in data["cases"] if c["lang"].lower() == lang), 10) for lang in ("it", "en")}
    assert report.accuracy("lang") == by_lang and report.passed == sum(expected.values())
    summary = report.to_dict()
    assert summary["by_category"] == {cat: (sum(expected[i] for i in (f"{p}-it", f"{p}-en")), 2) for p, cat in PREFIXES.items()}


PREFIXES = {
    "s": "single",
    "ps": "par_same",
    "pd": "par_diff",
    "ma": "multiarg",
    "d": "disamb",
    "mi": "missing",
    "u": "unavail",
    "k": "notool",
    "o": "obs",
    "m": "multistep",
}


def test_eval_command_runs_the_authors_file_as_is(smollm2_path, tmp_path):
    import shutil
    import subprocess

    from conftest import TINY_CONFIG, write_model_folder

    shared = Path(__file__).resolve().parents[2] / "shared" / "eval" / "agentic_eval_cases_100.json"
    if not shared.exists():
        pytest.skip("../shared is not beside this checkout")
    # A tiny random model with SmolLM2's real tokenizer: the pipeline end to end, quickly.
    tiny_folder = write_model_folder(tmp_path / "tiny", {**TINY_CONFIG, "vocab_size": 49152})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(smollm2_path / name, tiny_folder / name)
    report = tmp_path / "report.json"
    run = subprocess.run(
        [
            "nesso-mlx",
            "eval",
            "tools",
            "--cases",
            str(shared),
            "--model",
            str(tiny_folder),
            "--max-tokens",
            "2",
            "--report",
            str(report),
            "--rules",
            "strict",  # nesso-mlx's own rules, constrained and free side by side
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "by category" in run.stdout and "multistep" in run.stdout and "by language" in run.stdout
    runs = json.loads(report.read_text())["runs"]
    assert [r["constrained"] for r in runs] == [True, False]
    cases = load_cases(shared)["cases"]
    for run_report in runs:
        assert [c["id"] for c in run_report["cases"]] == [str(c["id"]) for c in cases]
        # every verdict is the scorer's on the recorded output, and the tables add up
        for case, recorded in zip(cases, run_report["cases"], strict=True):
            assert recorded["passed"] == score(case, recorded["output"]).passed
        passed = sum(c["passed"] for c in run_report["cases"])
        assert run_report["passed"] == passed and run_report["total"] == 100
        assert sum(p for p, _ in run_report["by_category"].values()) == passed
        assert {k: t for k, (_, t) in run_report["by_language"].items()} == {"it": 50, "en": 50}
        assert sorted(run_report["by_category"]) == sorted({c["cat"] for c in cases})
