"""A ChatSession whose model is replaced by scripted replies, for testing the agent loop.

Run as a script, it starts the real chat REPL in agent mode on such a session (for pexpect).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

from nesso_mlx.chat import ChatSession
from nesso_mlx.reply import GenerationChunk

ROOT = Path(__file__).resolve().parents[1]


class ScriptedSession(ChatSession):
    """Replies come from `script` in order; everything else (messages, tools, loop) is real."""

    def __init__(self, model, tokenizer, script: list[str], **kwargs) -> None:
        super().__init__(model, tokenizer, **kwargs)
        self.script = list(script)

    def _stream(self, new_tokens: list[int]) -> Iterator[GenerationChunk]:
        text = self.script.pop(0)
        pieces = [text[i : i + 7] for i in range(0, len(text), 7)]
        finish = "tool_calls" if "<tool_call>" in text else "stop"
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            yield GenerationChunk(piece, i, finish if last else None, len(new_tokens), i + 1)


def call(name: str, arguments: dict) -> str:
    import json

    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


if __name__ == "__main__":  # python tests/agent_script.py MODEL_FOLDER [--yes]
    sys.path.insert(0, str(ROOT / "tests"))
    from nesso_mlx import load
    from nesso_mlx.agent import load_tools_file
    from nesso_mlx.repl import ChatREPL

    functions = load_tools_file(ROOT / "examples" / "tools.py")
    model, tokenizer = load(sys.argv[1])
    script = [
        call("get_weather", {"city": "Roma"}),
        "A Roma il cielo è sereno, 24 gradi.",
        call("calculator", {"expression": "17 * 23"}),
        "Va bene, non calcolo nulla.",
    ]
    session = ScriptedSession(model, tokenizer, script, tools=list(functions.values()))
    repl = ChatREPL(session, "scripted", "test", None, functions=functions, yes="--yes" in sys.argv)
    sys.exit(repl.run())
