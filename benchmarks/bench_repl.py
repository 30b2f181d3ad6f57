"""Does drawing the reply slow generation down? The chat REPL's tokens/s vs the API's.

    python benchmarks/bench_repl.py [--tokens 1000] [--step-ms 4]

A scripted stream of 1,000 tokens of Italian Markdown (lists, bold, code) arrives at one token
per `--step-ms` (about a Mac's decode step for a 0.4B model), as `stream_generate` would yield
them. It is consumed three ways, in one run: as the API would (just iterating), through the
REPL's renderer (`ChatREPL.reply`: Markdown parsed at the display's refresh rate), and through
the old way (Markdown rebuilt and re-parsed for every token), all drawn to an in-memory
terminal. The ratios show what drawing costs the generation.
"""

from __future__ import annotations

import argparse
import io
import time
from types import SimpleNamespace

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown

from nesso_mlx.repl import ChatREPL
from nesso_mlx.reply import GenerationChunk

PARAGRAPH = (
    "Ecco **tre consigli** per imparare l'italiano:\n\n1. Leggi ogni giorno un articolo di giornale.\n"
    "2. Ascolta podcast e *ripeti* le frasi ad alta voce.\n3. Scrivi un diario: `oggi ho imparato...`\n\n"
    "| parola | significato |\n|---|---|\n| città | city |\n| perché | why |\n\n"
)


def chunks(tokens: int, step: float):
    words = (PARAGRAPH * (tokens // 40 + 1)).split(" ")
    for i in range(tokens):
        time.sleep(step)
        yield GenerationChunk(words[i % len(words)] + " ", i, "length" if i == tokens - 1 else None, 10, i + 1)


def terminal() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=100, height=40, highlight=False)


def api(tokens: int, step: float) -> float:
    t0 = time.perf_counter()
    text = ""
    for chunk in chunks(tokens, step):
        text += chunk.text
    return tokens / (time.perf_counter() - t0)


def repl(tokens: int, step: float) -> float:
    last = SimpleNamespace(generated_tokens=tokens, generation_tps=0.0, time_to_first_token=0.0)
    session = SimpleNamespace(last=last, notices=[], context_used=lambda: 0, max_context=4096)
    shell = ChatREPL(session, "bench", "bf16", None, console=terminal())
    t0 = time.perf_counter()
    shell.reply(chunks(tokens, step))
    return tokens / (time.perf_counter() - t0)


def per_token_markdown(tokens: int, step: float) -> float:
    console = terminal()
    t0 = time.perf_counter()
    text = ""
    with Live(Markdown(""), console=console, refresh_per_second=12, vertical_overflow="visible") as live:
        for chunk in chunks(tokens, step):
            text += chunk.text
            live.update(Markdown(text))
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--step-ms", type=float, default=4.0)
    args = parser.parse_args()
    step = args.step_ms / 1000
    rates = {
        "API": api(args.tokens, step),
        "REPL": repl(args.tokens, step),
        "per-token Markdown": per_token_markdown(args.tokens, step),
    }
    print(f"{args.tokens} tokens at one per {args.step_ms} ms")
    for name, rate in rates.items():
        print(f"  {name:20s} {rate:8.1f} tok/s  {rate / rates['API']:.3f}x the API")


if __name__ == "__main__":
    main()
