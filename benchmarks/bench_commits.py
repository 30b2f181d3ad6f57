"""Before and after: one benchmark command run on two checkouts of nesso-mlx, alternating, in one run.

    git worktree add --detach /tmp/nesso-old <old-commit>
    python benchmarks/bench_commits.py --old /tmp/nesso-old --new . --rounds 2 -- \\
        python -m nesso_mlx.cli bench --model PATH --vs mlx-lm -p 128 -n 32 -r 2
    python benchmarks/bench_commits.py --old /tmp/nesso-old --new . -- python {tree}/benchmarks/bench_batch.py

The command runs `--rounds` times per checkout, old and new taking turns (old, new, new, old, ...),
each in that checkout's folder with `PYTHONPATH` set to it, so `nesso_mlx` is imported from it; `{tree}` in the
command is replaced by the checkout's folder (to run its own copy of a benchmark script). Every
markdown table the command prints (`| a | b | ... |` lines) is read: rows are matched by their
first cell and their second unless it is a number, and each numeric cell is reported as the median over the rounds for old and new
and the ratio new / old. Whether higher is better depends on the column (tokens/s: higher; seconds:
lower); the ratio is printed as is.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

NUMBER = re.compile(r"^-?\d+(\.\d+)?(e-?\d+)?x?$")


def tables(text: str) -> dict[tuple[str, str], dict[str, float]]:
    """Numeric cells of the markdown tables in `text`, by (first cell, second cell) and column name."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    header: list[str] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not (line.startswith("|") and line.endswith("|")):
            header = None
            continue
        cells = [c.strip() for c in line[1:-1].split("|")]
        if header is None:
            header = cells
            continue
        if all(set(c) <= set("-: ") for c in cells):
            continue
        # A row is named by its first cell, and its second unless that is a number (a measurement).
        second = cells[1] if len(cells) > 1 and not NUMBER.match(cells[1].replace(",", "")) else ""
        key = (cells[0], second)
        row = out.setdefault(key, {})
        for name, cell in zip(header, cells, strict=False):
            value = cell.replace(",", "")
            if NUMBER.match(value):
                row[name] = float(value.rstrip("x"))
    return out


def run(command: list[str], tree: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(tree))
    argv = [part.replace("{tree}", str(tree)) for part in command]
    # In the checkout's folder: `python -c` puts the working folder first on sys.path.
    done = subprocess.run(argv, env=env, cwd=tree, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"error: the command failed on {tree} (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, type=Path, help="checkout of the old commit")
    parser.add_argument("--new", required=True, type=Path, help="checkout of the new commit")
    parser.add_argument("--rounds", type=int, default=2, help="runs per checkout (default 2)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the benchmark command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        sys.exit("error: no command given; put it after --")
    for tree in (args.old, args.new):
        if not (tree / "nesso_mlx" / "__init__.py").is_file():
            sys.exit(f"error: {tree} is not a nesso-mlx checkout (no nesso_mlx/__init__.py there)")
    results: dict[str, list[dict]] = {"old": [], "new": []}
    order = ["old", "new", "new", "old"] * args.rounds
    for i, which in enumerate(order[: 2 * args.rounds]):
        tree = args.old if which == "old" else args.new
        print(f"round {i + 1}/{2 * args.rounds}: {which} ({tree})", file=sys.stderr, flush=True)
        text = run(command, tree.resolve())
        print(f"--- {which} ---\n{text}", flush=True)
        results[which].append(tables(text))
    print(f"\nmedians over {args.rounds} run(s) each; ratio = new / old")
    print("| row | column | old | new | new / old |")
    print("|---|---|---:|---:|---:|")
    for key in results["new"][0]:
        for column in results["new"][0][key]:
            old = [r[key][column] for r in results["old"] if column in r.get(key, {})]
            new = [r[key][column] for r in results["new"] if column in r.get(key, {})]
            if not old or not new:
                continue
            o, n = statistics.median(old), statistics.median(new)
            ratio = f"{n / o:.3f}" if o else ""
            print(f"| {' / '.join(k for k in key if k)} | {column} | {o:g} | {n:g} | {ratio} |")


if __name__ == "__main__":
    main()
