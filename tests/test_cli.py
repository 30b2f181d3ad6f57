"""The terminal app, driven for real: the chat REPL in a pseudo-terminal, generate, models, pull."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

import pexpect
import pytest
from conftest import write_model_folder
from test_loading import hf_cache_with

NEW_PROMPT = "\x1b[?2004h"  # prompt_toolkit enables bracketed paste when it draws a fresh prompt
FOOTER = r"context \d+/\d+"


@pytest.fixture
def env(tmp_path):
    return {
        **os.environ,
        "NESSO_MLX_HOME": str(tmp_path / "home"),
        "NO_COLOR": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
    }


def spawn_chat(model, env, *args: str) -> pexpect.spawn:
    child = pexpect.spawn(
        "nesso-mlx", ["chat", "--model", str(model), *args], env=env, encoding="utf-8", timeout=90, dimensions=(50, 200)
    )
    child.expect("Type /help")
    wait_prompt(child)
    return child


def wait_prompt(child: pexpect.spawn) -> str:
    """Wait for a fresh input prompt; returns what was printed before it."""
    child.expect_exact(NEW_PROMPT)
    before = child.before
    child.expect_exact("›")
    return before


def turn(child: pexpect.spawn, text: str) -> str:
    """Send a message; return the screen text of the reply (up to its footer)."""
    child.sendline(text)
    child.expect(FOOTER)
    reply = child.before
    wait_prompt(child)
    return reply


def command(child: pexpect.spawn, text: str) -> str:
    child.sendline(text)
    return wait_prompt(child)


def test_chat_repl_session(smollm2_path, env, tmp_path):
    child = spawn_chat(smollm2_path, env, "--max-tokens", "12")
    assert "Rome" not in command(child, "/set temperature 0")
    first = turn(child, "What is the capital of France?")
    assert "Paris" in first
    second = turn(child, "And of Italy?")
    assert "Rome" in second  # turn 2 refers to turn 1
    stats = command(child, "/stats")
    match = re.search(r"prompt (\d+) tokens: (\d+) prefilled, (\d+) reused", stats)
    assert match and int(match[3]) > int(match[2]) > 0  # only turn 2's new tokens were prefilled
    assert "Rome" in turn(child, "/retry")  # temperature 0: the same answer again
    saved = tmp_path / "conversation.json"
    assert "saved to" in command(child, f"/save {saved}")
    assert json.loads(saved.read_text())["messages"][-1]["content"].count("Rome") >= 1
    assert "new conversation" in command(child, "/reset")
    assert "loaded 4 messages" in command(child, f"/load {saved}")
    show = command(child, "/show")
    assert "smollm2" in show and "bfloat16" in show and "temperature" in show and "0.0" in show
    assert "unknown command /frobnicate" in command(child, "/frobnicate")
    assert "usage: /set" in command(child, "/set temperature")
    assert "between" in command(child, "/set top_p 7")
    child.sendline("/exit")
    child.expect("bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(smollm2_path, env):
    child = spawn_chat(smollm2_path, env, "--max-tokens", "300", "--temperature", "0")
    child.sendline("Write a very long story about a dragon who loves pasta.")
    child.expect(r"\x1b\[2K\w")  # the reply has started to stream
    time.sleep(1.0)
    child.sendintr()
    child.expect("interrupted")
    child.expect(FOOTER)
    wait_prompt(child)
    stats = command(child, "/stats")
    assert "finish: interrupted" in stats
    assert "max_tokens = 12" in command(child, "/set max_tokens 12")
    assert "Paris" in turn(child, "Forget the story. What is the capital of France?")
    child.sendcontrol("d")  # Ctrl-D at the prompt exits
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_context_overflow_drops_old_turns(smollm2_path, env):
    child = spawn_chat(smollm2_path, env, "--max-tokens", "16", "--temperature", "0", "--max-context", "140")
    replies = [turn(child, f"Say one short sentence about the number {n}.") for n in range(4)]
    assert any("dropped" in r for r in replies)
    child.sendintr()  # Ctrl-C at the prompt exits cleanly
    child.expect("bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


# --- generate ----------------------------------------------------------------------------------


def run(args: list[str], env, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["nesso-mlx", *args], input=stdin, capture_output=True, text=True, env=env, timeout=300)


def test_generate_from_stdin_as_json(smollm2_path, env):
    result = run(
        ["generate", "--model", str(smollm2_path), "--prompt", "-", "--json", "--max-tokens", "12"],
        env,
        stdin="What is the capital of France?\n",
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert "Paris" in data["text"] and data["finish_reason"] == "stop"
    assert data["generation_tokens"] == len(data["tokens"]) and data["prompt_tps"] > 0


def test_generate_streams_raw_text(tiny_folder, env):
    result = run(
        [
            "generate",
            "--model",
            str(tiny_folder),
            "--prompt",
            "the",
            "--raw",
            "--max-tokens",
            "5",
            "--temp",
            "0.3",
            "--seed",
            "1",
        ],
        env,
    )
    assert result.returncode == 0, result.stderr
    assert "finish: length" in result.stderr and "5 tokens" in result.stderr


@pytest.mark.parametrize(
    "args, code, needle",
    [
        (["--model", "/no/such/model", "--prompt", "hi"], 1, "no such folder"),
        (["--model", "mii-llm/nesso-0.4B-instruct", "--prompt", "hi"], 1, "nesso-mlx pull"),
        (["--prompt", ""], 2, "the prompt is empty"),
    ],
)
def test_generate_errors_are_one_line(env, args, code, needle):
    result = run(["generate", *args], env)
    assert result.returncode == code
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.stderr


# --- models, pull, convert --------------------------------------------------------------------


def test_models_lists_variants_downloads_and_conversions(tmp_path, env):
    cache = tmp_path / "hf-cache"
    hf_cache_with(cache, "mii-llm/nesso-0.4B-agentic", write_model_folder(tmp_path / "src"))
    converted = run(["convert", "--hf-path", str(tmp_path / "src"), "-q", "--q-bits", "8", "--no-eval"], env)
    assert converted.returncode == 0, converted.stderr
    listing = run(["models"], env)
    assert listing.returncode == 0, listing.stderr
    rows = {line.split("│")[1].strip(): line for line in listing.stdout.splitlines() if line.count("│") > 3}
    assert "yes" in rows["nesso-agentic"] and "no" in rows["nesso-instruct"]
    assert "src-8bit" in listing.stdout and "8-bit" in listing.stdout
    # A local conversion's name works anywhere a model is accepted.
    result = run(["generate", "--model", "src-8bit", "--prompt", "hi", "--raw", "--max-tokens", "2"], env)
    assert result.returncode == 0, result.stderr


def test_pull_offline(tmp_path, env):
    hf_cache_with(tmp_path / "hf-cache", "mii-llm/zagreus-0.4B-ita", write_model_folder(tmp_path / "src"))
    ok = run(["pull", "zagreus"], env)
    assert ok.returncode == 0 and "ready at" in ok.stdout, ok.stderr
    missing = run(["pull", "open-zagreus"], env)
    assert missing.returncode == 1 and "HF_HUB_OFFLINE" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_help_lists_every_command(env):
    result = run(["--help"], env)
    assert result.returncode == 0
    for name in ("chat", "generate", "models", "pull", "convert"):
        assert name in result.stdout
    assert shutil.which("nesso-mlx")


def test_chat_and_generate_defaults_are_stated_in_help():
    """`chat` samples and `generate` is greedy: each --help says so, with the numbers actually used."""
    import inspect

    from typer.testing import CliRunner

    from nesso_mlx.api import stream_generate
    from nesso_mlx.chat import SamplingSettings
    from nesso_mlx.cli import CHAT_DEFAULTS, GENERATE_DEFAULTS, app, defaults_text
    from nesso_mlx.sampling import SamplingOptions

    settings = SamplingSettings()
    assert CHAT_DEFAULTS == {name: getattr(settings, name) for name in CHAT_DEFAULTS}
    options = vars(SamplingOptions()) | {"max_tokens": inspect.signature(stream_generate).parameters["max_tokens"].default}
    assert GENERATE_DEFAULTS == {name: options[name] for name in GENERATE_DEFAULTS}
    for command, defaults in (("chat", CHAT_DEFAULTS), ("generate", GENERATE_DEFAULTS)):
        result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
        assert result.exit_code == 0
        text = " ".join(result.output.split())
        assert defaults_text(defaults) in text and "then temperature" in text
        assert ("`generate` is greedy" if command == "chat" else "`chat` samples") in text


def test_repl_input_multiline_paste_unicode_and_history(tiny_folder, env, tmp_path):
    child = spawn_chat(tiny_folder, env, "--max-tokens", "2")
    assert "/retry" in command(child, "/help")
    child.sendline('"""')
    child.sendline("prima riga")
    child.sendline('seconda riga"""')
    child.expect(FOOTER)
    wait_prompt(child)
    child.sendline("continua \\")
    child.sendline("qui")
    child.expect(FOOTER)
    wait_prompt(child)
    child.send("\x1b[200~incollato: uno\ndue\x1b[201~")  # a bracketed paste with a newline inside
    child.sendline("")
    child.expect(FOOTER)
    wait_prompt(child)
    turn(child, "Perché no? Città, caffè 😀")
    saved = tmp_path / "c.json"
    command(child, f"/save {saved}")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    users = [m["content"] for m in json.loads(saved.read_text())["messages"] if m["role"] == "user"]
    assert users == ["prima riga\nseconda riga", "continua \nqui", "incollato: uno\ndue", "Perché no? Città, caffè 😀"]
    history = (tmp_path / "home" / "history").read_text()
    assert "Perché no? Città, caffè 😀" in history  # kept for the next run


def test_the_reply_is_not_reparsed_for_every_token(monkeypatch):
    """Markdown is parsed per refresh and per finished block, not per token; fenced code stays whole."""
    import io
    from types import SimpleNamespace

    from rich.console import Console
    from rich.markdown import Markdown

    import nesso_mlx.repl as repl
    from nesso_mlx.reply import GenerationChunk

    parsed = []

    class CountingMarkdown(Markdown):
        def __init__(self, text, *args, **kwargs):
            parsed.append(text)
            super().__init__(text, *args, **kwargs)

    monkeypatch.setattr(repl, "Markdown", CountingMarkdown)
    text = "Primo paragrafo.\n\n```python\nx = 1\n\ny = 2\n```\n\n" + "parola " * 500 + "\n\nFine."
    pieces = [text[i : i + 5] for i in range(0, len(text), 5)]
    chunks = [GenerationChunk(p, i, "stop" if i == len(pieces) - 1 else None) for i, p in enumerate(pieces)]
    console = Console(file=io.StringIO(), force_terminal=True, width=80, record=True)
    last = SimpleNamespace(generated_tokens=len(chunks), generation_tps=0.0, time_to_first_token=0.0)
    session = SimpleNamespace(last=last, notices=[], context_used=lambda: 0, max_context=4096)
    repl.ChatREPL(session, "m", "bf16", None, console=console).reply(iter(chunks))
    assert len(pieces) > 700 and len(parsed) < 50, len(parsed)
    assert "Primo paragrafo." in parsed  # printed once, for good
    assert "```python\nx = 1\n\ny = 2\n```" in parsed  # the fence was not split at its blank line
    assert "```python\nx = 1" not in parsed  # (what splitting the fence at its blank line would print)
    assert parsed[-1] == "Fine."  # the last block is what the live area shows at the end


@pytest.mark.parametrize("flag, expected", [([], True), (["--no-prompt-lookup"], False), (["--prompt-lookup"], True)])
def test_prompt_lookup_is_on_by_default_and_can_be_turned_off(tiny_folder, monkeypatch, flag, expected):
    """`generate` and `chat` pass --prompt-lookup/--no-prompt-lookup on (chat to its ChatSession)."""
    from typer.testing import CliRunner

    import nesso_mlx.api as api
    import nesso_mlx.chat as chat
    from nesso_mlx import load
    from nesso_mlx.cli import app

    seen = []
    original = api.stream_generate

    def spy(*args, **kwargs):
        seen.append(kwargs.get("prompt_lookup"))
        return original(*args, **kwargs)

    monkeypatch.setattr(api, "stream_generate", spy)
    result = CliRunner().invoke(app, ["generate", "--model", str(tiny_folder), "-p", "ciao", "-n", "3", *flag])
    assert result.exit_code == 0, result.output
    assert seen == [expected]
    monkeypatch.setattr(chat, "stream_generate", spy)
    model, tokenizer = load(tiny_folder)
    session = chat.ChatSession(model, tokenizer, prompt_lookup=expected)
    list(session.send("ciao"))
    assert seen == [expected, expected]

    given = []
    original_init = chat.ChatSession.__init__

    def record(self, *args, **kwargs):  # the chat command's session, stopped before the REPL starts
        given.append(kwargs.get("prompt_lookup"))
        original_init(self, *args, **kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(chat.ChatSession, "__init__", record)
    result = CliRunner().invoke(app, ["chat", "--model", str(tiny_folder), *flag])
    assert result.exit_code == 1 and "stop here" in result.output
    assert given == [expected]
