"""Start-up, nesso-mlx vs mlx-lm, in fresh processes: CLI help, import, and a one-token generation.

    python benchmarks/bench_startup.py [--model PATH] [--repeats 5]

"one token" is the wall time of the whole command, from process start to exit, generating a
single token from a short chat prompt on the same weights: what a user waits for. Ratios > 1
mean nesso-mlx starts faster.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def wall(cmd: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: the SmolLM2 test fixture)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.model is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from smollm2_fixture import smollm2_path

        args.model = str(smollm2_path())
    py = sys.executable
    nesso = shutil.which("nesso-mlx") or "nesso-mlx"
    cases = {
        "CLI --help": ([nesso, "--help"], [py, "-m", "mlx_lm", "generate", "--help"]),
        "import": ([py, "-c", "import nesso_mlx.api, nesso_mlx.loading"], [py, "-c", "import mlx_lm"]),
        "one token": (
            [nesso, "generate", "--model", args.model, "--prompt", "Ciao!", "--max-tokens", "1"],
            [py, "-m", "mlx_lm", "generate", "--model", args.model, "--prompt", "Ciao!", "--max-tokens", "1"],
        ),
    }
    print(f"median wall time of {args.repeats} fresh processes, model {args.model}")
    print(f"{'':12}{'nesso-mlx s':>13}{'mlx-lm s':>11}{'ratio':>8}")
    for name, (ours, theirs) in cases.items():
        a, b = wall(ours, args.repeats), wall(theirs, args.repeats)
        print(f"{name:12}{a:>13.2f}{b:>11.2f}{b / a:>7.2f}x")


if __name__ == "__main__":
    main()
