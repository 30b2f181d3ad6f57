"""`python -m nesso_mlx.convert` (and `nesso-mlx convert`): the converter's command line."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import NoReturn

from ..quantize import RECIPES


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (`error: ...`, exit 2), as the rest of the CLI prints them."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser(prog: str = "python -m nesso_mlx.convert") -> argparse.ArgumentParser:
    p = _OneLineParser(prog=prog, description="Convert a Hugging Face checkpoint into MLX weights.")
    p.add_argument("--hf-path", "--model", required=True, help="local folder, repo id or alias (nesso-agentic)")
    p.add_argument("--mlx-path", help="output folder (default: ~/.nesso-mlx/models/NAME-PRECISION)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="float precision (default: as stored)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize linear and embedding layers")
    p.add_argument("--q-bits", type=int, default=4, choices=[2, 3, 4, 5, 6, 8])
    p.add_argument("--q-group-size", type=int, default=64, choices=[32, 64, 128])
    p.add_argument("--q-recipe", choices=list(RECIPES), help="mixed precision: sensitive layers and embedding get more bits")
    p.add_argument("--dequantize", action="store_true", help="turn a quantized MLX folder back into float weights")
    p.add_argument("--force", action="store_true", help="replace an earlier nesso-mlx conversion (never anything else)")
    p.add_argument("--no-eval", action="store_true", help="skip the quality report")
    p.add_argument("--eval-tokens", type=int, default=256, help="tokens per language in the quality report")
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    return p


def _raise_interrupt(signum, frame):  # SIGTERM cleans up like Ctrl-C
    raise KeyboardInterrupt


def main(argv: list[str] | None = None, prog: str = "python -m nesso_mlx.convert") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.mlx_path is None:
        from ..registry import conversions_dir, resolve_alias

        precision = args.q_recipe or (f"{args.q_bits}bit" if args.quantize else args.dtype or "mlx")
        args.mlx_path = str(conversions_dir() / f"{resolve_alias(args.hf_path).rstrip('/').split('/')[-1]}-{precision}")
        conversions_dir().mkdir(parents=True, exist_ok=True)
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from ..errors import NessoError
    from . import convert

    console = Console(stderr=True)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    labels = {
        "load": "Loading weights",
        "quantize": "Quantizing",
        "write": "Writing safetensors",
        "reference": "Source model on the sample",
        "evaluate": "Evaluating quality",
    }
    tasks: dict[str, int] = {}
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )

    def progress(stage: str, done: int, total: int) -> None:
        if not tasks:
            bar.start()  # only once the work starts: an early error stays one line
        if stage not in tasks:
            tasks[stage] = bar.add_task(labels.get(stage, stage), total=total)
        bar.update(tasks[stage], completed=done, total=total)

    try:
        try:
            result = convert(
                args.hf_path,
                args.mlx_path,
                dtype=args.dtype,
                quantize=args.quantize,
                q_bits=args.q_bits,
                q_group_size=args.q_group_size,
                q_recipe=args.q_recipe,
                dequantize=args.dequantize,
                force=args.force,
                evaluate=not args.no_eval,
                eval_tokens=args.eval_tokens,
                max_shard_gb=args.max_shard_gb,
                revision=args.revision,
                progress=progress,
            )
        finally:
            if tasks:  # Progress.stop prints a blank line even when it never started
                bar.stop()
    except NessoError as e:
        print(f"error: {e}", file=sys.stderr)  # one line: no wrapping, no markup
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written to the output folder", file=sys.stderr)
        return 130

    from .card import precision_label

    table = Table(title=f"{result.path}", show_header=False)
    table.add_row("precision", precision_label(result, args.q_recipe))
    table.add_row("size on disk", f"{result.size_bytes / 1e6:.1f} MB")
    table.add_row("bits per weight", f"{result.bits_per_weight:.2f}")
    table.add_row("time", f"{result.seconds:.1f} s")
    if result.quality is not None:
        q = result.quality
        table.add_row("perplexity source → this", f"{q.perplexity_source:.3f} → {q.perplexity_candidate:.3f}")
        table.add_row("mean KL", f"{q.mean_kl:.5f} nats")
        table.add_row("top-1 agreement", f"{100 * q.top1_agreement:.1f}%")
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
