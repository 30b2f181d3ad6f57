"""Bad input on the command line: one line on stderr, exit code 2, no traceback, no model loaded.

Most cases run the Typer app in-process (a CLI start-up each would cost seconds in all); a few
run the real `nesso-mlx` to check what a user sees, tracebacks included.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from typer.testing import CliRunner

import nesso_mlx.loading
from nesso_mlx.cli import app

# What each option allows, as its error message says it, and values it must refuse.
ALLOWED = {
    "--max-tokens": (">= 1", ["0", "-5", "abc", "2.5"]),
    "--top-k": (">= 0", ["-1", "x"]),
    "--min-p": ("in [0, 1)", ["-0.1", "1", "1.5", "nan"]),
    "--top-p": ("in (0, 1]", ["0", "1.01", "-1", "inf"]),
    "--temperature": (">= 0", ["-0.1", "nan", "inf", "hot"]),
    "--repetition-penalty": ("> 0", ["0", "-1.2"]),
    "--max-context": (">= 1", ["0", "-10"]),
    "--max-steps": (">= 1", ["0"]),
    "--seed": (">= 0", ["-1", "1.5", str(2**64)]),
    "--quantize": ("4 or 8", ["3", "16", "four"]),
    "--limit": (">= 1", ["0", "-3"]),
    "--batch-size": (">= 1", ["0", "-2", "many"]),
}
SAMPLING = ["--max-tokens", "--top-k", "--min-p", "--top-p", "--temperature", "--repetition-penalty", "--seed", "--quantize"]
COMMANDS = {
    "chat": (["chat", "--model", "/m"], [*SAMPLING, "--max-context", "--max-steps"]),
    "generate": (["generate", "--prompt", "hi", "--model", "/m"], SAMPLING),
    "eval tools": (["eval", "tools", "--cases", "cases.json", "--model", "/m"], ["--max-tokens", "--limit", "--batch-size"]),
}
CASES = [
    pytest.param(args, option, value, id=f"{command} {option} {value}")
    for command, (args, options) in COMMANDS.items()
    for option in options
    for value in ALLOWED[option][1]
]


def runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        return CliRunner()


@pytest.fixture
def no_model(monkeypatch):
    """Validation must come before any model is loaded."""

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the command line was checked")

    monkeypatch.setattr(nesso_mlx.loading, "load", load)


def assert_one_line_error(code: int, stderr: str, *needles: str) -> str:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, stderr)
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize("args, option, value", CASES)
def test_bad_number_is_one_line_before_loading(no_model, args, option, value):
    result = runner().invoke(app, [*args, option, value])
    line = assert_one_line_error(result.exit_code, result.stderr, option, ALLOWED[option][0])
    assert isinstance(result.exception, SystemExit), result.exception
    assert f"{option} must be" in line


@pytest.mark.parametrize(
    "args, needle",
    [
        (["generate", "--prompt", "hi", "--frobnicate"], "No such option: --frobnicate"),
        (["generate", "--model", "/m"], "Missing option '--prompt'"),
        (["generate", "--prompt", "hi", "--tool-choice", "nope"], "--tool-choice must be"),
        (["eval", "tools", "--cases", "c.json", "--mode", "fast"], "--mode must be"),
    ],
)
def test_other_usage_errors_are_one_line(no_model, args, needle):
    result = runner().invoke(app, args)
    assert_one_line_error(result.exit_code, result.stderr, needle)


def test_good_numbers_pass_the_checks(no_model):
    """The edges of each range are accepted (the run then stops at the model, which is missing)."""
    edges = ["--max-tokens", "1", "--top-k", "0", "--min-p", "0", "--top-p", "1", "--temperature", "0"]
    edges += ["--repetition-penalty", "0.01", "--seed", "0", "--quantize", "8"]
    result = runner().invoke(app, ["generate", "--prompt", "hi", "--model", "/m", *edges])
    assert isinstance(result.exception, AssertionError) and "a model was loaded" in str(result.exception)


# --- the real command: what a user sees -----------------------------------------------------------


@pytest.fixture
def env(tmp_path):
    home, hf = str(tmp_path / "home"), str(tmp_path / "hf-cache")
    return {**os.environ, "NESSO_MLX_HOME": home, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": hf, "NO_COLOR": "1"}


def run(args: list[str], env, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["nesso-mlx", *args], input=stdin, capture_output=True, env=env, timeout=120)


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--prompt", "hi", "--max-tokens", "-5"],  # used to exit 0 with no output
        ["chat", "--temperature", "-1"],
        ["eval", "tools", "--cases", "c.json", "--limit", "0"],
        ["generate", "--prompt", "hi", "--seed", "x"],
    ],
    ids=lambda a: " ".join(a[:1] + a[-2:]),
)
def test_real_cli_bad_number(env, args):
    # The default model is not in this empty HF cache: a check after loading would exit 1 with another message.
    result = run(args, env)
    assert_one_line_error(result.returncode, result.stderr.decode(), args[-2], ALLOWED[args[-2]][0])
    assert result.stdout == b""


def test_invalid_utf8_prompt_becomes_replacement_characters(tiny_folder, env):
    """Prompts are decoded leniently: U+FFFD for bad bytes and one warning line, then it runs."""
    args = ["generate", "--model", str(tiny_folder), "--raw", "-n", "2", "--json"]
    result = run([*args, "--prompt", "-"], env, stdin=b"caf\xe9 \xff\xfe ok\n")
    stderr = result.stderr.decode()
    assert result.returncode == 0 and "Traceback" not in stderr, stderr
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "not valid UTF-8" in warnings[0] and "offset 3" in warnings[0]
    assert json.loads(result.stdout)["prompt_tokens"] > 0
    # The same bytes in argv (Python keeps them as surrogates) get the same treatment.
    result = run([*args, "--prompt", os.fsdecode(b"caf\xe9")], env)
    assert result.returncode == 0 and "warning: --prompt is not valid UTF-8" in result.stderr.decode()


def test_invalid_utf8_files_are_refused_in_one_line(tmp_path, no_model):
    """Files that define tools, schemas or cases are not guessed at: a one-line refusal naming the file."""
    bad_json = tmp_path / "bad.json"
    bad_json.write_bytes(b'[{"name": "caf\xe9"}]')
    bad_py = tmp_path / "tools.py"
    bad_py.write_bytes(b'def f(x: str) -> str:\n    """caf\xe9"""\n    return x\n')
    for args in (
        ["generate", "--prompt", "hi", "--tools", str(bad_json)],
        ["generate", "--prompt", "hi", "--json-schema", str(bad_json)],
        ["generate", "--prompt", "hi", "--tools", str(bad_py)],
        ["eval", "tools", "--cases", str(bad_json)],
    ):
        result = runner().invoke(app, args)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1, result.stderr
        assert lines[0].startswith("error: ") and args[-1] in lines[0] and "utf-8" in lines[0].lower()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--hf-path", "x", "--q-bits", "7"], "--q-bits: invalid choice: 7"),
        (["--hf-path", "x", "--q-group-size", "5"], "--q-group-size: invalid choice: 5"),
        (["--hf-path", "x", "--eval-tokens", "many"], "--eval-tokens: invalid int value"),
        (["--q-bits", "4"], "required: --hf-path"),
        (["--hf-path", "x", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_convert_usage_errors_are_one_line(env, args, needle):
    for command in (["nesso-mlx", "convert"], ["python", "-m", "nesso_mlx.convert"]):
        result = subprocess.run([*command, *args], capture_output=True, env=env, timeout=120)
        assert_one_line_error(result.returncode, result.stderr.decode(), needle)
        assert result.stdout == b""
