"""`python -m nesso_mlx.generate`: mlx-lm's `python -m mlx_lm.generate`, for the commands model cards show.

    python -m nesso_mlx.generate --model mlx-community/nesso-0.4B-agentic-mlx \\
      --prompt "<|im_start|>user\\nChe tempo fa a Milano?<|im_end|>\\n<|im_start|>assistant\\n" \\
      --temp 0.3 --max-tokens 256

It is `nesso-mlx generate` (every option of it) with mlx_lm.generate's habits: `\\n` and `\\t`
written in `--prompt` become a newline and a tab, and `--temp`, `--max-tokens`, `--system-prompt`
and `--ignore-chat-template` are its flags' names. A prompt that starts with a special token
(the chat format, as above) is used as it is: mlx_lm.generate would wrap it in a second template.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Sequence
from typing import Any


def unescape(prompt: str) -> str:
    """mlx_lm.generate's reading of `--prompt`: `\\n` is a newline and `\\t` a tab."""
    return prompt.replace("\\n", "\n").replace("\\t", "\t")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line (`argv` defaults to `sys.argv[1:]`)."""
    import typer

    from . import cli

    @functools.wraps(cli.generate)
    def generate(**options: Any) -> None:
        options["prompt"] = unescape(options["prompt"])
        options["raw_if_templated"] = True
        cli.generate(**options)

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(cls=cli.OneLineCommand, help=HELP)(generate)
    command = typer.main.get_command(app)
    for param in command.params:  # mlx_lm.generate's -m is --max-tokens (nesso-mlx's is --model)
        if param.name == "model":
            param.opts = [o for o in param.opts if o != "-m"]
        elif param.name == "max_tokens":
            param.opts = [*param.opts, "-m"]
    command(args=list(sys.argv[1:] if argv is None else argv), prog_name="python -m nesso_mlx.generate")


HELP = (
    "Generate once and exit, as `python -m mlx_lm.generate` does: `nesso-mlx generate` under mlx_lm.generate's "
    "names (--temp, --max-tokens/-m, --system-prompt, --ignore-chat-template). `\\n` and `\\t` in --prompt are a "
    "newline and a tab, and a --prompt that starts with a special token (`<|im_start|>`: the chat format a model "
    "card's raw prompt is written in) is used as it is, without a second template. A prompt read from stdin (-) is "
    "always the user's message. Exit codes: 0 done, 1 error, 2 bad usage, 130 interrupted."
)


class _CallableModule(types.ModuleType):
    """`import nesso_mlx.generate` binds the package's `generate` to this module, hiding the
    function of the same name; calling the module calls the function, so both keep working."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from .api import generate

        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    main()
