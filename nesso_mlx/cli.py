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


def main() -> None:
    app()
