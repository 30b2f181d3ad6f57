"""nesso-mlx's lm-eval backend vs mlx-lm's (`mlx_lm.evaluate`'s MLXLM) on the same weights and tasks.

    python benchmarks/bench_lm_eval.py                       # SmolLM2 fixture, the local test tasks
    python benchmarks/bench_lm_eval.py --model PATH --tasks arc_it --limit 100 --include-path ""

Both backends get the same lm-eval Instances through `lm_eval.simple_evaluate` (same prompts, same
few-shot examples); runs alternate between them. Printed: documents per second, the ratio (> 1:
nesso-mlx is faster) and each backend's metrics (mlx-lm tokenizes the context and continuation
separately and generates without stop strings, so its numbers may differ). Run from anywhere: the
local tasks' data paths are relative to the repository root, which becomes the cwd.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCAL_TASKS = "nesso_fidelity_mc,nesso_fidelity_gen,nesso_fidelity_ppl"


def make_lm(name: str, path: str, batch_size: int):
    if name == "nesso-mlx":
        from nesso_mlx.lm_eval_backend import NessoLM

        return NessoLM(pretrained=path, batch_size=batch_size)
    from mlx_lm.evaluate import MLXLM

    return MLXLM(path, batch_size=batch_size, use_chat_template=False)


def run(lm, tasks: list[str], manager, limit: int | None) -> tuple[float, int, dict]:
    import lm_eval

    t0 = time.perf_counter()
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, bootstrap_iters=0)
    seconds = time.perf_counter() - t0
    docs = sum(results["n-samples"][t]["effective"] for t in results["n-samples"])
    from nesso_mlx.lm_eval_backend import scores

    return seconds, docs, scores(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: the SmolLM2 test fixture)")
    parser.add_argument("--tasks", default=LOCAL_TASKS, help="comma-separated lm-eval tasks")
    parser.add_argument("--include-path", default=str(ROOT / "tests" / "data" / "lm_eval"), help='task folder ("" for none)')
    parser.add_argument("--limit", type=int, help="documents per task")
    parser.add_argument("--batch-size", type=int, default=8, help="both backends (mlx-lm's default is 8)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each backend, alternating")
    args = parser.parse_args()

    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT / "tests"))
    if args.model is None:
        from smollm2_fixture import smollm2_path

        args.model = str(smollm2_path())
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=args.include_path or None)
    tasks = [t for t in args.tasks.split(",") if t]
    lms = {name: make_lm(name, args.model, args.batch_size) for name in ("nesso-mlx", "mlx-lm")}
    times: dict[str, list[float]] = {name: [] for name in lms}
    docs, metrics = 0, {}
    for _ in range(args.repeats):
        for name, lm in lms.items():
            seconds, docs, metrics[name] = run(lm, tasks, manager, args.limit)
            times[name].append(seconds)
            print(f"{name}: {seconds:.1f} s for {docs} documents", file=sys.stderr)
    rate = {name: docs / statistics.median(t) for name, t in times.items()}
    print(f"model: {args.model}\ntasks: {', '.join(tasks)} ({docs} documents), batch size {args.batch_size}\n")
    print("| backend | seconds | documents/s |")
    print("| --- | ---: | ---: |")
    for name in lms:
        print(f"| {name} | {statistics.median(times[name]):.1f} | {rate[name]:.3f} |")
    print(f"\nratio nesso-mlx / mlx-lm: {rate['nesso-mlx'] / rate['mlx-lm']:.2f}x\n")
    for task in tasks:
        for name in lms:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics[name].get(task, {}).items())
            print(f"{task} {name}: {shown}")


if __name__ == "__main__":
    main()
