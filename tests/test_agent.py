"""The agent loop: tool calls run, results go back, the loop ends in text; in the API and the REPL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
from agent_script import ScriptedSession, call
from conftest import TINY_CONFIG, write_model_folder

from nesso_mlx import load
from nesso_mlx.agent import StepLimit, ToolRun, agent_turn, load_tools_file, run_tool
from nesso_mlx.errors import NessoError
from nesso_mlx.reply import GenerationChunk
from nesso_mlx.tools import ToolCall

ROOT = Path(__file__).resolve().parents[1]


def weather(city: str) -> dict:
    """Weather for a city."""
    if city == "Atlantide":
        raise LookupError("no such city")
    return {"city": city, "condition": "sereno"}


@pytest.fixture
def tiny(tiny_folder):
    return load(tiny_folder)


def events_of(session, text, **kwargs):
    return list(agent_turn(session, text, {"weather": weather}, **kwargs))


def test_loop_runs_the_call_feeds_the_result_and_ends_in_text(tmp_path):
    config = {**TINY_CONFIG, "max_position_embeddings": 4096}  # byte-level tiny tokenizer: long prompts
    hermes = load(write_model_folder(tmp_path / "m", config, chat_template=None))  # the built-in Hermes ChatML
    session = ScriptedSession(*hermes, [call("weather", {"city": "Roma"}), "Sereno a Roma."], tools=[weather])
    events = events_of(session, "Che tempo fa a Roma?")
    runs = [e for e in events if isinstance(e, ToolRun)]
    assert [r.status for r in runs] == ["ok"] and json.loads(runs[0].result) == {"city": "Roma", "condition": "sereno"}
    assert "".join(e.text for e in events if isinstance(e, GenerationChunk)).endswith("Sereno a Roma.")
    assert [m["role"] for m in session.messages] == ["user", "assistant", "tool", "assistant"]
    assert session.messages[2]["content"] == runs[0].result
    rendered = session.tokenizer.apply_chat_template(session._all_messages(), tools=session.tools, tokenize=False)
    assert "<tool_response>\n" + runs[0].result + "\n</tool_response>" in rendered


def test_errors_declines_malformed_calls_and_the_step_limit(tiny):
    script = [
        call("weather", {"city": "Atlantide"})
        + call("weather", {"city": "Bari"})
        + '<tool_call>\n{"name": "weather", "arguments": {"city": }\n</tool_call>',
        "Fatto.",
    ]
    session = ScriptedSession(*tiny, script, tools=[weather])
    events = events_of(session, "Meteo?", confirm=lambda c: c.arguments.get("city") != "Bari")
    runs = [e for e in events if isinstance(e, ToolRun)]
    assert [r.status for r in runs] == ["error", "declined", "error"]
    assert runs[0].result == "error: LookupError: no such city"
    assert "declined" in runs[1].result and "malformed tool call" in runs[2].result
    looping = ScriptedSession(*tiny, [call("weather", {"city": "Roma"})] * 3, tools=[weather])
    events = events_of(looping, "Meteo?", max_steps=2)
    assert isinstance(events[-1], StepLimit) and events[-1].steps == 2


def test_run_tool_unknown_and_bad_arguments():
    assert run_tool(ToolCall("nope", {}), {"weather": weather}) == ("error: there is no tool named 'nope'", "error")
    result, status = run_tool(ToolCall("weather", {"town": "Roma"}), {"weather": weather})
    assert status == "error" and "TypeError" in result


def test_load_tools_file(tmp_path):
    functions = load_tools_file(ROOT / "examples" / "tools.py")
    assert sorted(functions) == ["calculator", "convert_units", "get_weather"]
    assert functions["calculator"]("2 ** 10") == 1024
    with pytest.raises(ValueError):
        functions["calculator"]("__import__('os')")
    (tmp_path / "broken.py").write_text("def f(:\n")
    with pytest.raises(NessoError, match="cannot be loaded"):
        load_tools_file(tmp_path / "broken.py")
    (tmp_path / "empty.py").write_text("X = 1\n")
    with pytest.raises(NessoError, match="no public functions"):
        load_tools_file(tmp_path / "empty.py")


def test_agent_repl_confirms_runs_and_continues(tiny_folder, tmp_path):
    env = {**os.environ, "NO_COLOR": "1", "NESSO_MLX_HOME": str(tmp_path)}
    child = pexpect.spawn(
        sys.executable,
        [str(ROOT / "tests" / "agent_script.py"), str(tiny_folder)],
        env=env,
        encoding="utf-8",
        timeout=60,
        dimensions=(50, 200),
    )
    child.expect("Type /help")
    child.sendline("Che tempo fa a Roma?")
    child.expect(r"run get_weather\(\{\"city\": \"Roma\"\}\)\? \[y/N\]")
    child.sendline("y")
    child.expect("→ ok")
    child.expect("sereno, 24 gradi")
    child.sendline("Quanto fa 17 * 23?")
    child.expect(r"run calculator")
    child.sendline("n")
    child.expect("→ declined")
    child.expect("non calcolo nulla")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_generate_with_json_schema_and_tools_files(smollm2_path, tmp_path):
    schema = {
        "type": "object",
        "properties": {"answer": {"enum": ["Paris", "Rome", "Madrid"]}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    base = ["nesso-mlx", "generate", "--model", str(smollm2_path), "--json", "--max-tokens", "40"]
    out = subprocess.run(
        [*base, "--prompt", "Capital of France?", "--json-schema", str(tmp_path / "schema.json")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(json.loads(out.stdout)["text"]) == {"answer": "Paris"}
    out = subprocess.run(
        [*base, "--prompt", "Weather in Rome?", "--tools", str(ROOT / "examples" / "tools.py"), "--tool-choice", "get_weather"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["finish_reason"] == "tool_calls" and data["tool_calls"][0]["name"] == "get_weather"
    assert data["tool_calls"][0]["error"] is None and "city" in data["tool_calls"][0]["arguments"]
    bad = subprocess.run([*base, "--prompt", "x", "--tools", str(tmp_path / "missing.py")], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("error:") and "not found" in bad.stderr


def test_agent_loop_example_runs():
    """The example end to end on a Nesso-vocabulary model: a forced call runs and its result is shown."""
    from nesso_fixture import nesso_folder

    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "agent_loop.py"),
            "Che tempo fa a Roma?",
            "--model",
            str(nesso_folder("added")),
            "--tool-choice",
            "required",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    shown = [line for line in out.stdout.splitlines() if line.startswith("[") and " -> " in line]
    assert shown, out.stdout
    name = shown[0][1:].split("(", 1)[0]
    status = shown[0].split(" -> ", 1)[1].split(":", 1)[0]
    # A random model may write an unbounded number until max_tokens: the cut call is reported, not run.
    assert (name in ("get_weather", "calculator", "convert_units") and status in ("ok", "error")) or (
        name == "None" and "malformed tool call" in shown[0]
    ), shown


def test_ctrl_c_in_one_of_several_calls_leaves_every_call_answered(tiny):
    """A reply with three calls, Ctrl-C in the first: each call still has its tool message."""

    def slow(city: str) -> str:
        raise KeyboardInterrupt

    script = [call("slow", {"city": "Roma"}) + call("slow", {"city": "Bari"}) + call("slow", {"city": "Pisa"}), "Fatto."]
    session = ScriptedSession(*tiny, script, tools=[slow])
    with pytest.raises(KeyboardInterrupt):
        list(agent_turn(session, "Tre città", {"slow": slow}))
    assert [m["role"] for m in session.messages] == ["user", "assistant", "tool", "tool", "tool"]
    assert len(session.messages[1]["tool_calls"]) == 3
    assert "interrupted this tool" in session.messages[2]["content"]
    assert all("not run" in m["content"] for m in session.messages[3:])


def test_a_loop_closed_after_its_first_tool_run_answers_every_call(tiny):
    """The REPL closes the loop on Ctrl-C while it shows a result: the calls after it still get answers."""
    script = [call("weather", {"city": "Roma"}) + call("weather", {"city": "Bari"}) + call("weather", {"city": "Pisa"}), "Fatto."]
    session = ScriptedSession(*tiny, script, tools=[weather])
    events = agent_turn(session, "Tre città", {"weather": weather})
    next(e for e in events if isinstance(e, ToolRun))
    events.close()
    assert [m["role"] for m in session.messages] == ["user", "assistant", "tool", "tool", "tool"]
    assert "sereno" in session.messages[2]["content"] and all("not run" in m["content"] for m in session.messages[3:])


def test_mcp_tools_not_started_say_so():
    from nesso_mlx.agent import mcp_tools

    tools = mcp_tools("python -c pass")  # not entered: no server runs
    for use in (len, list, lambda t: t.get("read_file"), lambda t: t.schemas()):
        with pytest.raises(RuntimeError, match="not running"):
            use(tools)
