"""The `nesso-mlx` command line: a thin layer over the Python API."""

from __future__ import annotations

import typer

app = typer.Typer(help="Run Nesso models locally with MLX.", no_args_is_help=True, add_completion=False)


@app.command()
def version() -> None:
    """Print the nesso-mlx version."""
    from . import __version__

    typer.echo(__version__)


@app.command()
def chat() -> None:
    """Chat with a model (coming with the chat REPL)."""
    typer.echo("nesso-mlx chat is not available yet; use the Python API: nesso_mlx.generate", err=True)
    raise typer.Exit(2)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def convert(ctx: typer.Context) -> None:
    """Convert a Hugging Face checkpoint into MLX weights (see `nesso-mlx convert --help`)."""
    from .convert.__main__ import main as convert_main

    raise typer.Exit(convert_main(ctx.args, prog="nesso-mlx convert"))


def main() -> None:
    app()
