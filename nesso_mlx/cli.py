"""The `nesso-mlx` command line: a thin layer over the Python API (heavy imports happen lazily).

Bad input never shows a traceback: every number is checked while the command line is parsed,
before any model is loaded, and a usage error is one line on stderr with exit code 2.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import typer
from typer.core import TyperCommand, TyperGroup

from .registry import DEFAULT_CHAT_MODEL

# click's UsageError: the base of every command-line error (newer typer vendors click).
UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class BadNumber(typer.BadParameter):
    """A number option out of range; the message names the option and what it allows."""


class _OneLine:
    """Usage errors (bad numbers, unknown or missing options) as one line: `error: ...`, exit 2."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().make_context(*args, **kwargs)
        except UsageError as e:
            usage_error(e)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as e:
            usage_error(e)


class OneLineErrors(_OneLine, TyperGroup):
    """The command group, with one-line usage errors."""


class OneLineCommand(_OneLine, TyperCommand):
    """A command run on its own (`python -m nesso_mlx.generate`), with one-line usage errors."""


def usage_error(e: Exception) -> NoReturn:
    if type(e).__name__ == "NoArgsIsHelpError":  # `nesso-mlx eval` alone prints its help
        raise e
    message = e.message if isinstance(e, BadNumber) else e.format_message()
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    raise typer.Exit(2)


app = typer.Typer(
    help="Run Nesso models locally with MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=OneLineErrors,
)

HUB_HINT = "run `nesso-mlx pull MODEL` on a connected machine or pass --model PATH"


def number(
    kind: type,
    name: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    choices: tuple[int, ...] | None = None,
    words: str | None = None,
) -> tuple[Callable[[Any], Any], str]:
    """A parser for option `name` that accepts a `kind` (int or float) in a range, and the range in words."""
    if words:
        allowed = words
    elif choices:
        allowed = " or ".join(map(str, choices))
    elif low is not None and high is not None:
        allowed = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        allowed = f"{'>' if low_open else '>='} {low}"
    else:
        allowed = ""
    what = allowed if choices else f"{'an integer' if kind is int else 'a number'} {allowed}".strip()

    def parse(value: Any) -> Any:
        try:
            parsed = kind(value.strip()) if isinstance(value, str) else kind(value)
        except (TypeError, ValueError):
            raise BadNumber(f"{name} must be {what}, got {value!r}") from None
        ok = (
            (kind is int or math.isfinite(parsed))
            and (choices is None or parsed in choices)
            and (low is None or (parsed > low if low_open else parsed >= low))
            and (high is None or (parsed < high if high_open else parsed <= high))
        )
        if not ok:
            raise BadNumber(f"{name} must be {what}, got {value}")
        return parsed

    return parse, allowed


def NumberOption(default: Any, name: str, *aliases: str, kind: type = int, help: str = "", **limits: Any) -> Any:  # noqa: N802
    """A typer option for a checked number; its help says what it allows."""
    parse, allowed = number(kind, name, **limits)
    return typer.Option(
        default,
        name,
        *aliases,
        parser=parse,
        metavar="INTEGER" if kind is int else "FLOAT",
        help=f"{help}; {allowed}" if help and allowed else help or allowed,
    )


# What `chat` and `generate` do when no sampling option is given. They differ on purpose: `generate`
# is for scripts (greedy: the same prompt gives the same text), `chat` for people (sampling, as
# `SamplingSettings` in chat.py defines; a test checks that these agree). Each --help says so.
CHAT_DEFAULTS = {"temperature": 0.7, "top_p": 0.9, "top_k": 0, "min_p": 0.0, "max_tokens": 1024}
GENERATE_DEFAULTS = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "max_tokens": 256}


def defaults_text(d: dict[str, Any]) -> str:
    sampling = "greedy (temperature 0)" if d["temperature"] == 0 else f"sampling at temperature {d['temperature']}"
    return (
        f"{sampling}, top-p {d['top_p']}, top-k {d['top_k']} (0 = off), min-p {d['min_p']} (0 = off), "
        f"up to {d['max_tokens']} tokens"
    )


SAMPLING_ORDER = "Sampling: repetition penalty, then top-k, top-p and min-p on the untempered probabilities, then temperature."

ModelOption = typer.Option(DEFAULT_CHAT_MODEL, "--model", "-m", help="alias, Hugging Face repo id or local folder")
SystemOption = typer.Option(None, "--system", "-s", help="system prompt")


def shown(help: str, default: Any) -> str:
    return help if default is None else f"{help}; default {default}"


def TemperatureOption(default: float | None, chat_default: float | None = None) -> Any:  # noqa: N802
    return NumberOption(default, "--temperature", "--temp", kind=float, help=shown("0 = greedy", chat_default), low=0)


def TopPOption(default: float | None, chat_default: float | None = None) -> Any:  # noqa: N802
    return NumberOption(default, "--top-p", kind=float, help=shown("1 = off", chat_default), low=0, high=1, low_open=True)


def TopKOption(default: int | None, chat_default: int | None = None) -> Any:  # noqa: N802
    return NumberOption(default, "--top-k", help=shown("0 = off", chat_default), low=0)


def MinPOption(default: float | None, chat_default: float | None = None) -> Any:  # noqa: N802
    return NumberOption(default, "--min-p", kind=float, help=shown("0 = off", chat_default), low=0, high=1, high_open=True)


RepetitionOption = NumberOption(None, "--repetition-penalty", kind=float, help="1 = off", low=0, low_open=True)
SeedOption = NumberOption(None, "--seed", low=0, high=2**64 - 1, words=">= 0 (below 2^64)")
QuantizeOption = NumberOption(None, "--quantize", help="quantize float weights on load", choices=(4, 8))
KVBitsOption = NumberOption(None, "--kv-bits", help="store the KV cache quantized to this many bits", choices=(4, 8))
MaxKVSizeOption = NumberOption(
    None, "--max-kv-size", help="bound the KV cache: 4 attention sinks + a sliding window of N positions in all", low=9
)
PromptLookupOption = typer.Option(
    True,
    "--prompt-lookup/--no-prompt-lookup",
    help="draft tokens from the prompt and grammar-forced tokens, verified in one pass (greedy: the same output)",
)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print a one-line error and exit."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def as_text(data: bytes | str, what: str) -> str:
    """Text from bytes (or from a str with undecodable bytes, as Python reads argv): invalid UTF-8
    becomes U+FFFD, with a one-line warning on stderr. For prompts: the model still gets the text."""
    if isinstance(data, str):
        try:
            data.encode("utf-8")
            return data
        except UnicodeEncodeError:
            data = data.encode("utf-8", "surrogateescape")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        typer.echo(
            f"warning: {what} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "invalid bytes were replaced with U+FFFD",
            err=True,
        )
        return data.decode("utf-8", "replace")


def load_or_fail(model: str, quantize: int | None = None):
    from .errors import HubError, NessoError
    from .loading import load

    try:
        return load(model, quantize=quantize)
    except HubError as e:
        fail(f"{e} ({HUB_HINT})")
    except NessoError as e:
        fail(str(e))


def load_functions_or_fail(path: str) -> dict:
    from .agent import load_tools_file
    from .errors import NessoError

    try:
        return load_tools_file(path)
    except NessoError as e:
        fail(str(e))


def read_tools_or_fail(path: str) -> list:
    """Tools for `generate`: a Python file's functions, or a JSON list of schemas."""
    if path.endswith(".py"):
        return list(load_functions_or_fail(path).values())
    return read_json_or_fail(path, list)


def read_json_or_fail(path: str, kind: type):
    from pathlib import Path

    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        fail(f"{path}: file not found")
    except UnicodeDecodeError as e:  # files that define tools or schemas are refused, not guessed at
        fail(f"{path}: not valid UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start}); save it as UTF-8")
    except (OSError, ValueError) as e:
        fail(f"{path}: not valid JSON ({e})")
    if not isinstance(data, kind):
        fail(f"{path}: expected a JSON {'list' if kind is list else 'object'}")
    return data


def precision_of(model) -> str:
    q = model.args.quantization
    if q:
        return f"{q['bits']}-bit, group size {q['group_size']}"
    return str(model.model.norm.weight.dtype).split(".")[-1]


def display_name(model: str) -> str:
    from pathlib import Path

    return Path(model.rstrip("/")).name if "/" in model else model


CHAT_HELP = (
    "Chat in the terminal: streamed Markdown replies, history, slash commands (/help).\n\n"
    "With --tools, the model may call the file's functions: each call is shown, confirmed (unless --yes), run, "
    "and its result fed back until the model answers in text. --mcp, --mcp-url and --mcp-config add the tools of "
    "MCP servers (they run with your rights: use servers you trust).\n\n"
    f"Defaults: {defaults_text(CHAT_DEFAULTS)}; `generate` is greedy instead. {SAMPLING_ORDER}"
)

GENERATE_HELP = (
    "Generate once and exit. Exit codes: 0 done, 1 error, 2 bad usage, 130 interrupted.\n\n"
    f"Defaults: {defaults_text(GENERATE_DEFAULTS)}, so the same prompt gives the same text; `chat` samples instead. "
    f"{SAMPLING_ORDER}\n\n"
    "A prompt that is not valid UTF-8 (on stdin) is read with U+FFFD for the bad bytes, and a warning; "
    "--tools and --json-schema files that are not UTF-8 are refused. The prompt is always the user's message in "
    "the chat template (its text never becomes control tokens) unless --raw sends it as it is."
)


@app.command(help=CHAT_HELP)
def chat(
    model: str = ModelOption,
    system: str | None = SystemOption,
    temperature: float | None = TemperatureOption(None, CHAT_DEFAULTS["temperature"]),
    top_p: float | None = TopPOption(None, CHAT_DEFAULTS["top_p"]),
    top_k: int | None = TopKOption(None, CHAT_DEFAULTS["top_k"]),
    min_p: float | None = MinPOption(None, CHAT_DEFAULTS["min_p"]),
    repetition_penalty: float | None = RepetitionOption,
    max_tokens: int | None = NumberOption(None, "--max-tokens", help=shown("longest reply", CHAT_DEFAULTS["max_tokens"]), low=1),
    seed: int | None = SeedOption,
    quantize: int | None = QuantizeOption,
    max_context: int | None = NumberOption(None, "--max-context", help="context window to use (default: model's)", low=1),
    tools: str | None = typer.Option(None, "--tools", help="Python file whose functions the model may call"),
    yes: bool = typer.Option(False, "--yes", "-y", help="run tool calls without asking"),
    max_steps: int = NumberOption(5, "--max-steps", help="most rounds of tool calls per message", low=1),
    prompt_cache: str | None = typer.Option(
        None, "--prompt-cache", help="file with the system prompt and tools prefilled: used if it fits, (re)built if not"
    ),
    kv_bits: int | None = KVBitsOption,
    max_kv_size: int | None = MaxKVSizeOption,
    prompt_lookup: bool = PromptLookupOption,
    mcp: list[str] | None = typer.Option(
        None,
        "--mcp",
        help='start a stdio MCP server and use its tools, e.g. --mcp "npx -y @modelcontextprotocol/server-filesystem DIR"',
    ),
    mcp_url: list[str] | None = typer.Option(None, "--mcp-url", help="use the tools of a streamable-HTTP MCP server"),
    mcp_config: str | None = typer.Option(
        None, "--mcp-config", help='JSON file of MCP servers, as Claude Desktop writes it: {"mcpServers": {...}}'
    ),
    mcp_timeout: float = NumberOption(
        60.0, "--mcp-timeout", kind=float, help="seconds an MCP tool call may take", low=0, low_open=True
    ),
    max_tool_result_tokens: int = NumberOption(
        1024, "--max-tool-result-tokens", help="longer tool results are cut (the model is told)", low=1
    ),
) -> None:
    from contextlib import ExitStack

    from .chat import ChatSession, SamplingSettings
    from .registry import home
    from .repl import ChatREPL

    given = {
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "min_p": min_p,
        "max_tokens": max_tokens,
        "seed": seed,
        "repetition_penalty": repetition_penalty,
    }
    settings = SamplingSettings(**{name: value for name, value in given.items() if value is not None})
    system = as_text(system, "--system") if system is not None else None
    functions = load_functions_or_fail(tools) if tools else None
    servers = mcp_servers_or_fail(mcp or [], mcp_url or [], mcp_config) if mcp or mcp_url or mcp_config else []
    with ExitStack() as stack:  # MCP servers are stopped however the chat ends
        if servers:
            exit_on_signals(stack)
        mcp_tools = start_mcp_or_fail(servers, mcp_timeout, list(functions or {}), stack) if servers else None
        loaded, tokenizer = load_or_fail(model, quantize)
        tool_specs = list((functions or {}).values()) + (mcp_tools.schemas() if mcp_tools is not None else [])
        try:
            session = ChatSession(
                loaded,
                tokenizer,
                system=system,
                settings=settings,
                max_context=max_context,
                tools=tool_specs or None,
                kv_bits=kv_bits,
                max_kv_size=max_kv_size,
                prompt_lookup=prompt_lookup,
            )
        except ValueError as e:  # --kv-bits on a model whose head dimension cannot be quantized
            fail(str(e))
        if prompt_cache:
            use_prompt_cache(session, prompt_cache)
        repl = ChatREPL(
            session,
            display_name(model),
            precision_of(loaded),
            home() / "history",
            functions=functions,
            yes=yes,
            max_steps=max_steps,
            mcp=mcp_tools,
            max_result_tokens=max_tool_result_tokens,
        )
        try:
            code = repl.run()
        except KeyboardInterrupt:  # before the first prompt: the REPL handles it afterwards
            code = 130
    raise typer.Exit(code)


def exit_on_signals(stack: Any) -> None:
    """SIGTERM and SIGHUP (`kill`, a closed terminal) exit through `stack`'s clean-up, which stops
    the MCP servers; the old handlers come back when the stack closes. Main thread only."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def leave(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            number = getattr(signal, name)
            stack.callback(signal.signal, number, signal.signal(number, leave))


def mcp_servers_or_fail(commands: list[str], urls: list[str], config: str | None) -> list:
    """The MCP servers that --mcp, --mcp-url and --mcp-config name (checked, not started)."""
    from .errors import NessoError
    from .mcp_tools import MCPServerSpec, read_mcp_config

    try:
        servers = [MCPServerSpec.from_command(c) for c in commands] + [MCPServerSpec.from_url(u) for u in urls]
        return servers + (read_mcp_config(config) if config else [])
    except NessoError as e:
        fail(str(e))


def start_mcp_or_fail(servers: list, timeout: float, reserved: list[str], stack: Any) -> Any:
    """Start the MCP servers (stopped when `stack` closes); a server that fails is a one-line error."""
    from .errors import NessoError
    from .mcp_tools import MCPTools

    tools = MCPTools(servers, timeout=timeout, reserved=reserved)
    try:
        tools.start()
    except NessoError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted while starting the MCP servers", 130)
    stack.callback(tools.close)
    return tools


def use_prompt_cache(session, path: str) -> None:
    """Start `session` from the prompt-cache file at `path`, building it first if it is missing or
    was made for another system prompt or tools. Another model's file is refused, not replaced."""
    from pathlib import Path

    from .errors import NessoError

    file = Path(path).expanduser()
    try:
        if file.exists():
            reused = session.load_prompt_cache(file)
            if reused == len(session.cached_tokens) == len(session.static_prefix()):
                typer.echo(f"prompt cache: {reused} tokens from {file}", err=True)
                return
            typer.echo(f"prompt cache: {file} was made for another system prompt or tools; rebuilding it", err=True)
        count = session.save_prompt_cache(file)
        session.load_prompt_cache(file)
        typer.echo(f"prompt cache: {count} tokens prefilled and saved to {file}", err=True)
    except NessoError as e:
        fail(str(e))


@app.command(help=GENERATE_HELP)
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="the prompt, or - to read it from stdin"),
    model: str = ModelOption,
    system: str | None = typer.Option(None, "--system", "-s", "--system-prompt", help="system prompt"),
    temperature: float = TemperatureOption(GENERATE_DEFAULTS["temperature"]),
    top_p: float = TopPOption(GENERATE_DEFAULTS["top_p"]),
    top_k: int = TopKOption(GENERATE_DEFAULTS["top_k"]),
    min_p: float = MinPOption(GENERATE_DEFAULTS["min_p"]),
    repetition_penalty: float | None = RepetitionOption,
    max_tokens: int = NumberOption(GENERATE_DEFAULTS["max_tokens"], "--max-tokens", "-n", low=1),
    seed: int | None = SeedOption,
    stop: list[str] | None = typer.Option(None, "--stop", help="stop string (repeatable)"),
    raw: bool = typer.Option(False, "--raw", "--ignore-chat-template", help="send the prompt as is, without the chat template"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object with text, tokens and speeds"),
    quantize: int | None = QuantizeOption,
    json_schema: str | None = typer.Option(None, "--json-schema", help="JSON schema file: the output always matches"),
    tools: str | None = typer.Option(None, "--tools", help="tools: a Python file's functions or a JSON list of schemas"),
    tool_choice: str = typer.Option("auto", "--tool-choice", help="auto, required, none or a tool name"),
    no_constrain: bool = typer.Option(False, "--no-constrain", help="do not constrain tool calls to their schemas"),
    kv_bits: int | None = KVBitsOption,
    max_kv_size: int | None = MaxKVSizeOption,
    prompt_lookup: bool = PromptLookupOption,
    raw_if_templated: bool = typer.Option(False, "--raw-if-templated", hidden=True),
) -> None:
    # `raw_if_templated` (python -m nesso_mlx.generate, for model cards' commands): a --prompt that
    # starts with a special token is used raw. Never for stdin: piped text stays the user's text.
    raw_if_templated = raw_if_templated and prompt != "-"
    if prompt == "-":
        stdin = getattr(sys.stdin, "buffer", None)
        data = stdin.read() if stdin is not None else sys.stdin.read()
        prompt = as_text(data, "the prompt on stdin").rstrip("\n")  # like $(...): the final newline is not part of it
    else:
        prompt = as_text(prompt, "--prompt")
    system = as_text(system, "--system") if system is not None else None
    stop = [as_text(s, "--stop") for s in stop] if stop else stop
    if not prompt.strip():
        fail("the prompt is empty", 2)
    if raw and system:
        fail("--system needs the chat template; drop --raw", 2)
    from .api import stream_generate
    from .errors import NessoError
    from .sampling import SamplingOptions

    response_format = None
    if json_schema:
        response_format = {"type": "json_schema", "json_schema": {"schema": read_json_or_fail(json_schema, dict)}}
    tool_list = read_tools_or_fail(tools) if tools else None
    if tool_choice not in ("auto", "required", "none"):
        from .tools import tool_names, tool_schemas

        try:
            names = tool_names(tool_schemas(tool_list) or [])
        except (ValueError, KeyError, TypeError) as e:
            fail(f"{tools}: not a list of tool schemas ({e})")
        if tool_choice not in names:
            fail(f"--tool-choice must be auto, required, none or the name of a tool in --tools, got {tool_choice!r}", 2)
    loaded, tokenizer = load_or_fail(model, quantize)
    if not raw and raw_if_templated and tokenizer.is_templated(prompt):
        if system:
            fail("the prompt is already in the chat format (it starts with a special token); put the system turn in it", 2)
        raw = True
    messages = None
    if not raw:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text, tokens, last = [], [], None
    try:
        for last in stream_generate(
            loaded,
            tokenizer,
            None if messages else prompt,
            messages=messages,
            max_tokens=max_tokens,
            sampling=SamplingOptions(
                temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed
            ),
            stop=stop,
            tools=tool_list,
            tool_choice=tool_choice,
            response_format=response_format,
            constrain=not no_constrain,
            cache=loaded.make_cache(kv_bits=kv_bits, max_kv_size=max_kv_size),
            prompt_lookup=prompt_lookup,
        ):
            text.append(last.text)
            if last.token is not None:
                tokens.append(last.token)
            if not as_json:
                sys.stdout.write(last.text)
                sys.stdout.flush()
    except (NessoError, ValueError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        typer.echo("\ninterrupted", err=True)
        raise typer.Exit(130) from None
    if as_json:
        result = {
            "text": "".join(text),
            "tokens": tokens,
            "finish_reason": last.finish_reason,
            "prompt_tokens": last.prompt_tokens,
            "generation_tokens": last.generation_tokens,
            "prompt_tps": last.prompt_tps,
            "generation_tps": last.generation_tps,
            "peak_memory_gb": last.peak_memory,
        }
        if last.tool_calls is not None:
            result["tool_calls"] = [
                {"name": c.name, "arguments": c.arguments, "raw": c.raw, "error": c.error} for c in last.tool_calls
            ]
        typer.echo(json.dumps(result, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        typer.echo(
            f"[{last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s, "
            f"prompt {last.prompt_tokens} tokens at {last.prompt_tps:.1f} tok/s, finish: {last.finish_reason}]",
            err=True,
        )


@app.command()
def models() -> None:
    """List the Nesso models, what is downloaded, and local MLX conversions."""
    from rich.console import Console
    from rich.table import Table

    from .hub import is_downloaded
    from .registry import KNOWN_MODELS, local_conversions

    table = Table(title="Nesso models")
    for column in ("alias", "repo id", "purpose", "size", "downloaded"):
        table.add_column(column)
    for m in KNOWN_MODELS:
        table.add_row(m.alias, m.repo_id, m.purpose, m.parameters, "yes" if is_downloaded(m.repo_id) else "no")
    console = Console()
    console.print(table)
    conversions = local_conversions()
    if conversions:
        local = Table(title="Local MLX conversions (use the name with --model)")
        for column in ("name", "base model", "precision", "size"):
            local.add_column(column)
        for c in conversions:
            local.add_row(c.name, c.base_model, c.precision, f"{c.size_bytes / 1e6:.0f} MB")
        console.print(local)
    else:
        console.print("No local conversions yet: `nesso-mlx convert --hf-path nesso-instruct -q` makes one.")


@app.command()
def pull(model: str = typer.Argument(..., help="alias or Hugging Face repo id")) -> None:
    """Download a model into the Hugging Face cache, with a progress bar."""
    import warnings

    from .errors import NessoError
    from .hub import download
    from .registry import resolve_alias

    try:
        from tqdm import TqdmExperimentalWarning
        from tqdm.rich import tqdm as rich_tqdm

        warnings.filterwarnings("ignore", category=TqdmExperimentalWarning)
    except ImportError:  # tqdm comes with huggingface-hub; fall back to its own bars
        rich_tqdm = None
    try:
        path = download(resolve_alias(model), tqdm_class=rich_tqdm)
    except NessoError as e:
        fail(str(e))
    typer.echo(f"{model}: ready at {path}")


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def convert(ctx: typer.Context) -> None:
    """Convert a Hugging Face checkpoint into MLX weights (see `nesso-mlx convert --help`)."""
    from .convert.__main__ import main as convert_main

    raise typer.Exit(convert_main(ctx.args, prog="nesso-mlx convert"))


@app.command()
def bench(
    model: str = ModelOption,
    prompt_tokens: int = NumberOption(512, "--prompt-tokens", "-p", help="prompt length of the pp test", low=1),
    gen_tokens: int = NumberOption(128, "--gen-tokens", "-n", help="tokens to generate", low=2),
    repetitions: int = NumberOption(3, "--repetitions", "-r", help="runs of each test", low=1),
    workloads: str = typer.Option("pp,tg,chat,extract,tool,turn2", "--workloads", "-w", help="comma-separated tests"),
    vs: str | None = typer.Option(None, "--vs", help="mlx-lm: run it too, on the same weights, alternating"),
    prompt_lookup: bool = typer.Option(
        True, "--prompt-lookup/--no-prompt-lookup", help="speculative decoding in chat/extract/tool"
    ),
    output: str = typer.Option("md", "--output", "-o", help="md, json or csv"),
) -> None:
    """Measure prompt processing, generation and request workloads (llama-bench style).

    Tests: pp (prefill), tg (decode, EOS ignored), chat, extract (JSON schema), tool (forced call),
    turn2 (time to first token of a cached second turn). With --vs mlx-lm, the ratio column is
    nesso-mlx over mlx-lm: decode speed, prefill speed for pp, time to first token for turn2.
    """
    from .bench import WORKLOADS

    chosen = [w.strip() for w in workloads.split(",") if w.strip()]
    if not chosen or any(w not in WORKLOADS for w in chosen):
        fail(f"--workloads must name some of {', '.join(WORKLOADS)}, got {workloads!r}", 2)
    if vs not in (None, "mlx-lm"):
        fail(f"--vs must be mlx-lm, got {vs!r}", 2)
    if output not in ("md", "json", "csv"):
        fail(f"--output must be md, json or csv, got {output!r}", 2)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .bench import render, run_bench
    from .errors import HubError, NessoError
    from .hub import resolve_model_path

    try:
        path = str(resolve_model_path(model))
    except HubError as e:
        fail(f"{e} ({HUB_HINT})")
    if vs:
        try:
            import mlx_lm  # noqa: F401
        except ImportError:
            fail("--vs mlx-lm needs mlx-lm: pip install mlx-lm")
    columns = (TextColumn("bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("bench", total=None)
        try:
            rows = run_bench(
                path,
                chosen,
                prompt_tokens,
                gen_tokens,
                repetitions,
                vs_mlx_lm=bool(vs),
                prompt_lookup=prompt_lookup,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
        except NessoError as e:
            fail(str(e))
    import mlx.core as mx

    if output == "md":
        typer.echo(f"model: {display_name(model)}  device: {mx.default_device()}  repetitions: {repetitions}\n")
    typer.echo(render(rows, output, prompt_tokens, gen_tokens))


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def serve(ctx: typer.Context) -> None:
    """Serve an OpenAI-compatible API on 127.0.0.1:8080 (see `nesso-mlx serve --help`)."""
    from .server import main as serve_main

    serve_main(ctx.args)


eval_app = typer.Typer(help="Evaluate a model.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


AUTHORS_NOTE = "the Nesso authors' agentic_eval_100.py: their prompt, token budget, parsing and verdicts"
STRICT_NOTE = "nesso-mlx's own: well-formed calls only, stricter on missing, obs, unavail and multistep"


@eval_app.command("tools")
def eval_tools(
    cases: str = typer.Option(..., "--cases", help='case file: {"tools": [...], "cases": [...]}'),
    model: str = typer.Option("nesso-agentic", "--model", "-m", help="alias, repo id or folder"),
    mode: str | None = typer.Option(
        None, "--mode", help="constrained, free, or both side by side (default: free with authors rules, both with strict)"
    ),
    report: str | None = typer.Option(None, "--report", help="write the JSON report here"),
    max_tokens: int | None = NumberOption(
        None, "--max-tokens", help="default: the authors' 260, or 320 for obs, multistep, notool; 256 with strict", low=1
    ),
    limit: int | None = NumberOption(None, "--limit", help="only the first N cases", low=1),
    rules: str = typer.Option(
        "authors", "--rules", help="authors (the Nesso authors' script, as published) or strict (nesso-mlx's, stricter)"
    ),
    batch_size: int = NumberOption(8, "--batch-size", help="cases decoded together (each as it would be alone)", low=1),
) -> None:
    """Score tool calling per category and language (greedy; all tools offered; tool_choice auto).

    --rules authors (the default) reproduces the procedure and verdicts of the Nesso authors'
    agentic_eval_100.py; --rules strict is nesso-mlx's own, stricter reading (see evaluation.py)."""
    if rules not in ("authors", "strict"):
        fail(f"--rules must be authors or strict, got {rules!r}", 2)
    mode = mode or ("free" if rules == "authors" else "both")
    if mode not in ("constrained", "free", "both"):
        fail(f"--mode must be constrained, free or both, got {mode!r}", 2)
    from pathlib import Path

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from .errors import NessoError
    from .evaluation import CATEGORIES, load_cases, run_tool_eval

    try:
        data = load_cases(cases)
    except NessoError as e:
        fail(str(e))
    if limit:
        data["cases"] = data["cases"][:limit]
    loaded, tokenizer = load_or_fail(model)
    runs = {"constrained": [True], "free": [False], "both": [True, False]}[mode]
    reports = []
    console = Console()
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True)
    ) as bar:
        for constrain in runs:
            task = bar.add_task("constrained" if constrain else "free", total=len(data["cases"]))
            reports.append(
                run_tool_eval(
                    loaded,
                    tokenizer,
                    data,
                    model_name=model,
                    constrain=constrain,
                    max_tokens=max_tokens,
                    progress=lambda done, total, t=task: bar.update(t, completed=done),
                    rules=rules,
                    batch_size=batch_size,
                )
            )
    names = ["constrained" if r.constrained else "free" for r in reports]
    console.print(f"rules: {rules} ({AUTHORS_NOTE if rules == 'authors' else STRICT_NOTE})")
    for key, title, order in (("cat", "category", CATEGORIES), ("lang", "language", ("it", "en"))):
        table = Table(title=f"{display_name(model)}: tool calling by {title}")
        table.min_width = len(table.title)  # one column is narrower than the title; keep it on one line
        table.add_column(title)
        for name in names:
            table.add_column(name, justify="right")
        groups = [r.accuracy(key) for r in reports]
        for group in [g for g in order if g in groups[0]] + ["all"]:
            cells = []
            for r, acc in zip(reports, groups, strict=True):
                passed, total = (r.passed, len(r.results)) if group == "all" else acc[group]
                cells.append(f"{passed}/{total} ({100 * passed / total:.0f}%)")
            table.add_row(group, *cells)
        console.print(table)
    if report:
        import os

        path = Path(report)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"runs": [r.to_dict() for r in reports]}, ensure_ascii=False, indent=2))
        os.replace(tmp, path)
        console.print(f"report written to {path}")


EVAL_LM_HELP = (
    "Run lm-evaluation-harness tasks (MMLU, ARC, HellaSwag, IFEval, ...) on the MLX weights, with lm-eval's own "
    "prompts and metrics: the numbers of `lm-eval --model hf` (tested item by item on the same weights).\n\n"
    "Needs lm-eval (pip install 'nesso-mlx[eval]'); each task's data set is downloaded from the Hugging Face Hub "
    "on first use and cached. --include-path adds folders of task YAML files (local tasks, a fork's tasks)."
)


@eval_app.command("lm", help=EVAL_LM_HELP)
def eval_lm(
    tasks: str = typer.Option(..., "--tasks", "-t", help="lm-eval tasks, groups or patterns, comma-separated"),
    model: str = typer.Option("nesso-agentic", "--model", "-m", help="alias, repo id or folder"),
    num_fewshot: int | None = NumberOption(None, "--num-fewshot", help="examples in each prompt (default: the task's)", low=0),
    limit: int | None = NumberOption(None, "--limit", help="only the first N documents of each task", low=1),
    output: str | None = typer.Option(None, "--output", "-o", help="write lm-eval's results (JSON) here"),
    apply_chat_template: bool = typer.Option(False, "--apply-chat-template", help="write prompts with the chat template"),
    batch_size: int = NumberOption(1, "--batch-size", help="continuations of one context scored together", low=1),
    include_path: str | None = typer.Option(None, "--include-path", help="folder of extra task YAML files"),
    dtype: str | None = typer.Option(None, "--dtype", help="bfloat16, float16 or float32 (default: as stored)"),
    log_samples: bool = typer.Option(False, "--log-samples", help="with --output: every document, prompt and answer"),
) -> None:
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        fail("--tasks needs at least one task name", 2)
    if dtype not in (None, "bfloat16", "float16", "float32"):
        fail(f"--dtype must be bfloat16, float16 or float32, got {dtype!r}", 2)
    if log_samples and not output:
        fail("--log-samples needs --output", 2)
    from pathlib import Path

    if include_path and not Path(include_path).is_dir():
        fail(f"--include-path {include_path}: not a folder", 2)
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        fail("eval lm needs lm-eval: pip install 'nesso-mlx[eval]'")
    import os

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from . import lm_eval_backend as backend
    from .errors import HubError, NessoError
    from .loading import load

    manager = backend.task_manager(include_path)
    unknown = backend.unknown_tasks(manager, names)
    if unknown:
        fail(f"unknown lm-eval task {', '.join(unknown)} (list them with `lm-eval ls tasks`; local tasks need --include-path)", 2)
    try:
        loaded, tokenizer = load(model, dtype=dtype)
    except HubError as e:
        fail(f"{e} ({HUB_HINT})")
    except NessoError as e:
        fail(str(e))
    import logging

    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # its retry warnings; a failure is reported below
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        bars: dict[str, Any] = {}

        def progress(kind: str, done: int, total: int) -> None:
            if kind not in bars:
                bars[kind] = bar.add_task(kind, total=total)
            bar.update(bars[kind], completed=done, total=total)

        try:
            results = backend.evaluate(
                loaded,
                tokenizer,
                names,
                name=model,
                num_fewshot=num_fewshot,
                limit=limit,
                apply_chat_template=apply_chat_template,
                batch_size=batch_size,
                manager=manager,
                log_samples=log_samples,
                progress=progress,
            )
        except KeyboardInterrupt:
            typer.echo("\ninterrupted", err=True)
            raise typer.Exit(130) from None
        except ImportError as e:  # a task's own dependency, e.g. IFEval's langdetect
            fail(f"lm-eval: {e}; the task needs it (IFEval: pip install 'lm-eval[ifeval]')")
        except (NessoError, OSError, ValueError, KeyError) as e:  # data sets that cannot be loaded, bad task configs
            hint = (
                " (data sets come from the Hugging Face Hub on first use, then from its cache)"
                if isinstance(e, ConnectionError)
                else ""
            )
            fail(f"lm-eval: {type(e).__name__}: {' '.join(str(e).split())}{hint}")
    from lm_eval.utils import handle_non_serializable, make_table

    typer.echo(make_table(results))
    if "groups" in results:
        typer.echo(make_table(results, "groups"))
    if output:
        path = Path(output)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(results, default=handle_non_serializable, ensure_ascii=False, indent=2))
        os.replace(tmp, path)
        typer.echo(f"results written to {path}", err=True)


@app.command()
def version() -> None:
    """Print the nesso-mlx version."""
    from . import __version__

    typer.echo(__version__)


def main() -> None:
    app()
