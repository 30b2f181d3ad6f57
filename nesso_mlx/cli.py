"""The `nesso-mlx` command line: a thin layer over the Python API (heavy imports happen lazily)."""

from __future__ import annotations

import json
import sys

import typer

from .registry import DEFAULT_CHAT_MODEL

app = typer.Typer(
    help="Run Nesso models locally with MLX.", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False
)

HUB_HINT = "run `nesso-mlx pull MODEL` on a connected machine or pass --model PATH"

ModelOption = typer.Option(DEFAULT_CHAT_MODEL, "--model", "-m", help="alias, Hugging Face repo id or local folder")
TemperatureOption = typer.Option(None, "--temperature", "--temp", help="0 = greedy")
TopPOption = typer.Option(None, "--top-p")
TopKOption = typer.Option(None, "--top-k")
MinPOption = typer.Option(None, "--min-p")
RepetitionOption = typer.Option(None, "--repetition-penalty")
SeedOption = typer.Option(None, "--seed")
SystemOption = typer.Option(None, "--system", "-s", help="system prompt")


def fail(message: str, code: int = 1) -> None:
    """Print a one-line error and exit."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


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
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        fail(f"{path}: file not found")
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


@app.command()
def chat(
    model: str = ModelOption,
    system: str | None = SystemOption,
    temperature: float | None = TemperatureOption,
    top_p: float | None = TopPOption,
    top_k: int | None = TopKOption,
    min_p: float | None = MinPOption,
    repetition_penalty: float | None = RepetitionOption,
    max_tokens: int = typer.Option(1024, "--max-tokens", help="longest reply"),
    seed: int | None = SeedOption,
    quantize: int | None = typer.Option(None, "--quantize", help="quantize float weights on load: 4 or 8"),
    max_context: int | None = typer.Option(None, "--max-context", help="context window to use (default: model's)"),
    tools: str | None = typer.Option(None, "--tools", help="Python file whose functions the model may call"),
    yes: bool = typer.Option(False, "--yes", "-y", help="run tool calls without asking"),
    max_steps: int = typer.Option(5, "--max-steps", help="most rounds of tool calls per message"),
) -> None:
    """Chat in the terminal: streamed Markdown replies, history, slash commands (/help).

    With --tools, the model may call the file's functions: each call is shown, confirmed (unless
    --yes), run, and its result fed back until the model answers in text.
    """
    if quantize not in (None, 4, 8):
        fail(f"--quantize must be 4 or 8, got {quantize}", 2)
    from .chat import ChatSession, SamplingSettings
    from .registry import home
    from .repl import ChatREPL

    settings = SamplingSettings(max_tokens=max_tokens, seed=seed, repetition_penalty=repetition_penalty)
    for name, value in {"temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p}.items():
        if value is not None:
            try:
                settings.set(name, str(value))
            except ValueError as e:
                fail(str(e), 2)
    functions = load_functions_or_fail(tools) if tools else None
    loaded, tokenizer = load_or_fail(model, quantize)
    session = ChatSession(
        loaded,
        tokenizer,
        system=system,
        settings=settings,
        max_context=max_context,
        tools=list(functions.values()) if functions else None,
    )
    repl = ChatREPL(
        session, display_name(model), precision_of(loaded), home() / "history", functions=functions, yes=yes, max_steps=max_steps
    )
    raise typer.Exit(repl.run())


@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="the prompt, or - to read it from stdin"),
    model: str = ModelOption,
    system: str | None = SystemOption,
    temperature: float = typer.Option(0.0, "--temperature", "--temp", help="0 = greedy"),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    min_p: float = typer.Option(0.0, "--min-p"),
    repetition_penalty: float | None = RepetitionOption,
    max_tokens: int = typer.Option(256, "--max-tokens", "-n"),
    seed: int | None = SeedOption,
    stop: list[str] | None = typer.Option(None, "--stop", help="stop string (repeatable)"),
    raw: bool = typer.Option(False, "--raw", help="send the prompt as is, without the chat template"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object with text, tokens and speeds"),
    quantize: int | None = typer.Option(None, "--quantize", help="quantize float weights on load: 4 or 8"),
    json_schema: str | None = typer.Option(None, "--json-schema", help="JSON schema file: the output always matches"),
    tools: str | None = typer.Option(None, "--tools", help="tools: a Python file's functions or a JSON list of schemas"),
    tool_choice: str = typer.Option("auto", "--tool-choice", help="auto, required, none or a tool name"),
    no_constrain: bool = typer.Option(False, "--no-constrain", help="do not constrain tool calls to their schemas"),
) -> None:
    """Generate once and exit. Exit codes: 0 done, 1 error, 2 bad usage, 130 interrupted."""
    if prompt == "-":
        prompt = sys.stdin.read().rstrip("\n")  # like $(...): the final newline is not part of the prompt
    if not prompt.strip():
        fail("the prompt is empty", 2)
    if raw and system:
        fail("--system needs the chat template; drop --raw", 2)
    from .errors import NessoError
    from .generation import stream_generate

    response_format = None
    if json_schema:
        response_format = {"type": "json_schema", "json_schema": {"schema": read_json_or_fail(json_schema, dict)}}
    tool_list = read_tools_or_fail(tools) if tools else None
    loaded, tokenizer = load_or_fail(model, quantize)
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
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=stop,
            tools=tool_list,
            tool_choice=tool_choice,
            response_format=response_format,
            constrain=not no_constrain,
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
            f"prompt {last.prompt_tps:.1f} tok/s, finish: {last.finish_reason}]",
            err=True,
        )


@app.command()
def models() -> None:
    """List the Nesso models, what is downloaded, and local MLX conversions."""
    from rich.console import Console
    from rich.table import Table

    from .registry import KNOWN_MODELS, is_downloaded, local_conversions

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


eval_app = typer.Typer(help="Evaluate a model.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


@eval_app.command("tools")
def eval_tools(
    cases: str = typer.Option(..., "--cases", help='case file: {"tools": [...], "cases": [...]}'),
    model: str = typer.Option("nesso-agentic", "--model", "-m", help="alias, repo id or folder"),
    mode: str = typer.Option("both", "--mode", help="constrained, free, or both (side by side)"),
    report: str | None = typer.Option(None, "--report", help="write the JSON report here"),
    max_tokens: int = typer.Option(256, "--max-tokens"),
    limit: int | None = typer.Option(None, "--limit", help="only the first N cases"),
) -> None:
    """Score tool calling per category and language (greedy; all tools offered; tool_choice auto)."""
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
                )
            )
    names = ["constrained" if r.constrained else "free" for r in reports]
    for key, title, order in (("cat", "category", CATEGORIES), ("lang", "language", ("it", "en"))):
        table = Table(title=f"{display_name(model)}: tool calling by {title}")
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


@app.command()
def version() -> None:
    """Print the nesso-mlx version."""
    from . import __version__

    typer.echo(__version__)


def main() -> None:
    app()
