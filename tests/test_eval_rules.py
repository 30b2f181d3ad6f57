"""`eval tools --rules authors|strict`: the Nesso authors' procedure and verdicts, and ours.

The authors' rules are those of `nesso2/eval/agentic_eval_100.py` in mii-llm/zagreus-nesso-slm
(read at commit 6bd5b76). Line numbers in the comments below are that file's: `gen` 153-161
(prompt 156-157, the reply decoded without special tokens and stripped 159), `parse_all` 162-173,
the token budget 179, `grade` 184-218. Every hand-written output below is one on which the two
rule sets disagree; the comment says which of the authors' lines decides.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from nesso_mlx.evaluation import authors_calls, authors_max_tokens, load_cases, run_tool_eval, score

ROOT = Path(__file__).resolve().parents[1]


def call(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


BOOK = {
    "tools": ["book_flight"],
    "n": 1,
    "argkeys": ["book_flight", ["origin", "destination", "date", "passengers"]],
    "intarg": ["book_flight", "passengers", 2],
}
FLIGHT = '{"origin": "Bari", "destination": "Oslo", "date": "2025-06-01", "passengers": %s}'

# (category, spec, output, authors' verdict, strict verdict, why)
DISAGREEMENTS = [
    # single: a block whose JSON does not parse still names a tool (lines 166-168: the name is
    # recovered by regex), and one name in one call is all line 187 checks. Strict: malformed.
    (
        "single",
        {"tools": ["get_weather"], "n": 1},
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pisa",}}\n</tool_call>',
        True,
        False,
        "broken JSON, name recovered",
    ),
    # single: untagged JSON is read when no block gave a call (lines 169-172). Strict: no call.
    (
        "single",
        {"tools": ["get_weather"], "n": 1},
        '{"name": "get_weather", "arguments": {"city": "Pisa"}}',
        True,
        False,
        "untagged JSON",
    ),
    # par_same: two calls, the second with an unquoted value: line 168 keeps its name, line 187
    # sees {get_stock_price} twice. Strict: any malformed call fails.
    (
        "par_same",
        {"tools": ["get_stock_price"], "n": 2},
        call("get_stock_price", '{"symbol": "ENI"}') + "\n" + call("get_stock_price", '{"symbol": FCA}'),
        True,
        False,
        "one broken call of two",
    ),
    # par_diff: a "tool" key instead of "name" (line 165: o.get("name") or o.get("tool")).
    # Strict: a call without "name" is malformed.
    (
        "par_diff",
        {"tools": ["calculate", "web_search"], "n": 2},
        call("web_search", '{"query": "meteo"}')
        + '\n<tool_call>\n{"tool": "calculate", "arguments": {"expression": "3*4"}}\n</tool_call>',
        True,
        False,
        '"tool" key',
    ),
    # multiarg: an integer written as a string passes line 194 (str(...) in ("2", "2.0")).
    # Strict: intarg must be the integer 2.
    ("multiarg", BOOK, call("book_flight", FLIGHT % '"2"'), True, False, "integer as a string"),
    # multiarg: 2.0 passes line 194 too; strict wants an int.
    ("multiarg", BOOK, call("book_flight", FLIGHT % "2.0"), True, False, "integer as a float"),
    # multiarg: arguments written as a JSON string are not a dict, so line 190 finds no
    # arguments and line 191 fails. Strict decodes string arguments (looser here).
    (
        "multiarg",
        {"tools": ["send_email"], "n": 1, "argkeys": ["send_email", ["to", "body"]]},
        call("send_email", '"{\\"to\\": \\"ada@ex.it\\", \\"body\\": \\"ok\\"}"'),
        False,
        True,
        "arguments as a JSON string",
    ),
    # disamb: untagged JSON again (lines 169-172, then 197). Strict: no call.
    (
        "disamb",
        {"tools": ["convert_currency"], "n": 1},
        'Eccolo: {"name": "convert_currency", "arguments": {"amount": 9, "from": "EUR", "to": "USD"}}',
        True,
        False,
        "untagged JSON",
    ),
    # missing: an address without "@" is not a fake address (line 204). Strict: any value is invented.
    (
        "missing",
        {"tool": "send_email", "fabricate_field": "to"},
        call("send_email", '{"to": "il capo", "body": "in ritardo"}'),
        True,
        False,
        "recipient without @",
    ),
    # missing: another tool is not the tool whose field could be invented (line 199 finds no
    # send_email call, line 206 passes). Strict: only a question or that tool pass.
    (
        "missing",
        {"tool": "send_email", "fabricate_field": "to"},
        call("web_search", '{"query": "indirizzo del capo"}'),
        True,
        False,
        "another tool",
    ),
    # missing: a blank origin is not an invented one (line 205 strips it). Strict: " " is a value.
    (
        "missing",
        {"tool": "book_flight", "fabricate_field": "origin"},
        call("book_flight", '{"origin": " ", "destination": "Oslo"}'),
        True,
        False,
        "blank origin",
    ),
    # unavail: an empty reply has no call, which is all line 208 checks. Strict wants some text.
    ("unavail", " ", "", True, False, "empty reply"),
    # unavail: an untagged call in the text is a call (lines 169-172) and fails line 208. Strict
    # reads only <tool_call> blocks, so this is text.
    ("unavail", " ", 'Non posso, ma ecco: {"name": "order_taxi", "arguments": {"time": "8:00"}}', False, True, "untagged call"),
    # notool without gold: one word fails line 211 (len(ans.split()) >= 2). Strict: any text.
    ("notool", {"gold": None}, "Benissimo!", False, True, "one word"),
    # obs with only `want`: line 214 checks `gold` only, so any call-free reply passes. Strict
    # needs one of the `want` phrases.
    ("obs", {"want": "bring umbrella / rain"}, "Tomorrow will be lovely, enjoy!", True, False, "want is not checked"),
    # obs with gold: echoing the tool response contains the gold (line 214). Strict: an echo is not an answer.
    (
        "obs",
        {"want": "42 EUR", "gold": "42"},
        '<tool_response>\n{"result": 42, "currency": "EUR"}\n</tool_response>',
        True,
        False,
        "echoed result",
    ),
    # multistep: the expected tool anywhere among the calls (line 217). Strict: it must come first.
    (
        "multistep",
        {"next": "send_email"},
        call("get_weather", '{"city": "Roma"}') + "\n" + call("send_email", '{"to": "me@ex.it", "body": "piove"}'),
        True,
        False,
        "expected tool second",
    ),
    # multistep with next null: an untagged call is a call (line 216). Strict: text.
    (
        "multistep",
        {"next": None},
        'Invio: {"name": "send_email", "arguments": {"to": "me@ex.com"}}',
        False,
        True,
        "untagged call",
    ),
]


@pytest.mark.parametrize(
    "cat, spec, output, authors, strict", [pytest.param(*d[:5], id=f"{d[0]}: {d[5]}") for d in DISAGREEMENTS]
)
def test_the_two_rule_sets_on_outputs_where_they_differ(cat, spec, output, authors, strict):
    case = {"id": "x", "lang": "IT", "cat": cat, "messages": [], "spec": spec}
    assert score(case, output, rules="authors").passed is authors
    assert score(case, output, rules="strict").passed is strict
    assert score(case, output).passed is strict  # the Python default stays the strict rules


def test_every_category_has_a_disagreement():
    cats = {d[0] for d in DISAGREEMENTS}
    assert cats == {"single", "par_same", "par_diff", "multiarg", "disamb", "missing", "unavail", "notool", "obs", "multistep"}
    assert {d[3] for d in DISAGREEMENTS} == {True, False}  # the authors are sometimes the stricter


def test_authors_parsing():
    # JSON parsed: name, else "tool"; broken JSON: the name only (lines 164-168)
    text = call("a", '{"x": 1}') + '<tool_call>{"tool": "b", "arguments": {}}</tool_call><tool_call>{"name": "c", x}</tool_call>'
    assert authors_calls(text) == [("a", {"x": 1}), ("b", {}), ("c", None)]
    # untagged JSON only when no block gave a call (line 169), with None for unparsable arguments
    assert authors_calls('{"name": "d", "arguments": {"k": 1}} and {"name": "e", "arguments": {"k": 1,}}') == [
        ("d", {"k": 1}),
        ("e", None),
    ]
    assert authors_calls(call("a", "{}") + '{"name": "d", "arguments": {}}') == [("a", {})]
    # an unclosed block is not a call (line 164 needs </tool_call>), but its JSON is untagged JSON
    assert authors_calls('<tool_call>\n{"name": "f", "arguments": {"q": 1}}') == [("f", {"q": 1})]
    assert authors_calls('<tool_call>\n{"name": "f", "arguments": {"q": 1') == []
    assert (authors_max_tokens("obs"), authors_max_tokens("notool"), authors_max_tokens("single")) == (320, 320, 260)


def test_authors_procedure_prompt_budget_and_decoding(monkeypatch):
    """run_tool_eval(rules="authors") prompts as transformers does (the template rendered to text
    and tokenized, control tokens in message text parsed), uses the authors' budget per category,
    decodes freely and greedily, and scores the reply decoded without special tokens and stripped."""
    from types import SimpleNamespace

    from nesso_fixture import nesso_folder
    from transformers import AutoTokenizer

    import nesso_mlx.api
    from nesso_mlx import load

    path = nesso_folder("added")  # <tool_call> is an added token here: how the prompt is tokenized matters
    model, tokenizer = load(path)
    reference = AutoTokenizer.from_pretrained(str(path))
    data = load_cases(ROOT / "tests" / "data" / "tool_cases.json")
    cases = [c for c in data["cases"] if c["cat"] in ("single", "obs", "missing", "multistep")]
    assert any(m["role"] == "assistant" and "<tool_call>" in m["content"] for c in cases for m in c["messages"])
    seen = []
    # a reply with special tokens in it and blank space around: " \n<tool_call>...</tool_call><|im_start|><|im_end|>"
    reply_ids = reference.encode(" \n" + call("get_weather", '{"city": "Bari"}'), add_special_tokens=False) + [128257, 128256]

    def scripted(model_, tokenizer_, requests, *, batch_size, progress, tools, constrain, sampling):
        replies = []
        for request in requests:
            assert set(request) == {"prompt", "max_tokens"}
            seen.append((request["prompt"], tools, constrain, request["max_tokens"], sampling.temperature))
            replies.append(SimpleNamespace(tokens=reply_ids, raw_text="ignored"))
        return replies

    monkeypatch.setattr(nesso_mlx.api, "batch_generate", scripted)
    report = run_tool_eval(model, tokenizer, {**data, "cases": cases}, constrain=False, rules="authors")
    expected_answer = reference.decode(reply_ids, skip_special_tokens=True).strip()
    for case, (prompt, tools, constrain, max_tokens, temperature), result in zip(cases, seen, report.results, strict=True):
        text = reference.apply_chat_template(case["messages"], tools=data["tools"], tokenize=False, add_generation_prompt=True)
        assert prompt == reference(text, add_special_tokens=False)["input_ids"]
        assert tools == data["tools"] and constrain is False and temperature == 0.0
        assert max_tokens == (320 if case["cat"] in ("obs", "multistep", "notool") else 260)
        assert result.output == expected_answer and result.passed == score(case, expected_answer, rules="authors").passed
    assert report.rules == "authors" and report.to_dict()["rules"] == "authors"
    seen.clear()
    run_tool_eval(model, tokenizer, {**data, "cases": cases[:1]}, max_tokens=9, rules="authors")
    assert seen[0][2] is True and seen[0][3] == 9  # constrained decoding and --max-tokens still apply


def test_authors_rules_on_real_generation():
    """Real generation (a tiny random model with Nesso's vocabulary, so special tokens do come
    out): what is scored is the decoded, stripped reply to the authors' prompt."""
    from nesso_fixture import nesso_folder

    from nesso_mlx import generate, load

    model, tokenizer = load(nesso_folder("added"))
    data = load_cases(ROOT / "tests" / "data" / "tool_cases.json")
    cases = [c for c in data["cases"] if c["cat"] in ("notool", "obs")]
    report = run_tool_eval(model, tokenizer, {**data, "cases": cases}, constrain=False, max_tokens=24, rules="authors")
    raw = []
    for case, result in zip(cases, report.results, strict=True):
        text = tokenizer.apply_chat_template(case["messages"], tools=data["tools"], tokenize=False)
        direct = generate(
            model,
            tokenizer,
            tokenizer.encode(text, add_special_tokens=False),
            tools=data["tools"],
            constrain=False,
            max_tokens=24,
        )
        assert result.output == tokenizer.decode(direct.tokens, skip_special_tokens=True).strip()
        assert result.passed == score(case, result.output, rules="authors").passed
        raw.append(direct.raw_text)
    assert any(t != t.strip() or "<|im_start|>" in t for t in raw)  # decoding and stripping did change something


def test_eval_tools_command_reports_the_authors_way(tmp_path):
    """Default rules: authors, free decoding only; 10 cases per category and 100 in all, per
    language 50 and 50; each recorded verdict is the authors' rules' verdict on the recorded reply."""
    import shutil

    from conftest import TINY_CONFIG, write_model_folder

    shared = ROOT.parent / "shared" / "eval" / "agentic_eval_cases_100.json"
    if not shared.exists():
        pytest.skip("../shared is not beside this checkout")
    from smollm2_fixture import smollm2_path

    tiny = write_model_folder(tmp_path / "tiny", {**TINY_CONFIG, "vocab_size": 49152})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(smollm2_path() / name, tiny / name)
    report = tmp_path / "report.json"
    command = ["nesso-mlx", "eval", "tools", "--cases", str(shared), "--model", str(tiny), "--max-tokens", "3"]
    done = subprocess.run([*command, "--report", str(report)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "rules: authors" in done.stdout and "by category" in done.stdout and "by language" in done.stdout
    (run,) = json.loads(report.read_text())["runs"]
    assert run["rules"] == "authors" and run["constrained"] is False and run["total"] == 100
    assert {cat: total for cat, (_, total) in run["by_category"].items()} == {cat: 10 for cat in run["by_category"]}
    assert len(run["by_category"]) == 10 and {k: t for k, (_, t) in run["by_language"].items()} == {"it": 50, "en": 50}
    cases = load_cases(shared)["cases"]
    for case, recorded in zip(cases, run["cases"], strict=True):
        assert recorded["passed"] == score(case, recorded["output"], rules="authors").passed
    assert run["passed"] == sum(c["passed"] for c in run["cases"])
    assert f"{run['passed']}/100" in done.stdout


def test_rules_option_is_checked():
    from typer.testing import CliRunner

    from nesso_mlx.cli import app

    try:
        runner = CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        runner = CliRunner()
    result = runner.invoke(app, ["eval", "tools", "--cases", "c.json", "--model", "/m", "--rules", "lenient"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: --rules must be authors or strict")
