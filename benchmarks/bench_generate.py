"""nesso-mlx vs mlx-lm on the same weights, in one run: start-up, prefill and decode speed.

    python benchmarks/bench_generate.py                      # the SmolLM2 test fixture
    python benchmarks/bench_generate.py --model PATH --prompt-tokens 512 --gen-tokens 128

Both generate greedily from the same prompt token ids; runs alternate between the two so that
machine drift affects both alike. Start-up (import + load until the first token can be made)
is timed in fresh subprocesses. Ratios > 1 mean nesso-mlx is faster.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

STARTUP = {
    "nesso-mlx": "from nesso_mlx import load; m, t = load({path!r})",
    "mlx-lm": "from mlx_lm import load; m, t = load({path!r})",
}


def startup_seconds(name: str, path: str, repeats: int) -> float:
    code = f"import time; t0 = time.perf_counter(); {STARTUP[name].format(path=path)}; print(time.perf_counter() - t0)"
    runs = [
        float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
        for _ in range(repeats)
    ]
    return statistics.median(runs)


def run_nesso(model, tokenizer, prompt: list[int], gen_tokens: int) -> tuple[float, float]:
    from nesso_mlx import generate

    result = generate(model, tokenizer, prompt, max_tokens=gen_tokens)
    return result.prompt_tps, result.generation_tps


def run_mlx_lm(model, prompt: list[int], gen_tokens: int) -> tuple[float, float]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    t0 = time.perf_counter()
    n = 0
    for n, _ in enumerate(
        generate_step(mx.array(prompt), model, max_tokens=gen_tokens, sampler=lambda x: mx.argmax(x, axis=-1)), start=1
    ):
        if n == 1:
            t1 = time.perf_counter()
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), (n - 1) / (t2 - t1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: the SmolLM2 test fixture)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.model is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from smollm2_fixture import smollm2_path

        args.model = str(smollm2_path())

    import mlx.core as mx
    from mlx_lm.utils import load_model

    from nesso_mlx import load

    model, tokenizer = load(args.model)
    reference, _ = load_model(Path(args.model))
    text = "La pizza napoletana è un piatto tradizionale. The quick brown fox jumps over the lazy dog. " * 200
    prompt = tokenizer.encode(text)[: args.prompt_tokens]
    # Never stop on EOS in this benchmark: count exactly gen_tokens for both.
    tokenizer.eos_token_ids = []

    results: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "decode": []} for n in STARTUP}
    run_nesso(model, tokenizer, prompt[:16], 4)  # warm-up both
    run_mlx_lm(reference, prompt[:16], 4)
    for _ in range(args.repeats):
        for name in STARTUP:
            mx.clear_cache()
            if name == "nesso-mlx":
                p, d = run_nesso(model, tokenizer, prompt, args.gen_tokens)
            else:
                p, d = run_mlx_lm(reference, prompt, args.gen_tokens)
            results[name]["prefill"].append(p)
            results[name]["decode"].append(d)
    figures = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in results.items()}
    for name in STARTUP:
        figures[name]["startup_s"] = startup_seconds(name, args.model, args.repeats)

    print(
        f"model: {args.model}  device: {mx.default_device()}  prompt: {len(prompt)} tokens, "
        f"generate: {args.gen_tokens} tokens, median of {args.repeats}"
    )
    print(f"{'':12}{'prefill tok/s':>15}{'decode tok/s':>15}{'start-up s':>12}")
    for name, f in figures.items():
        print(f"{name:12}{f['prefill']:>15.1f}{f['decode']:>15.1f}{f['startup_s']:>12.2f}")
    ours, theirs = figures["nesso-mlx"], figures["mlx-lm"]
    ratios = {
        "prefill": ours["prefill"] / theirs["prefill"],
        "decode": ours["decode"] / theirs["decode"],
        "startup": theirs["startup_s"] / ours["startup_s"],
    }
    print(
        f"{'ratio':12}{ratios['prefill']:>14.2f}x{ratios['decode']:>14.2f}x{ratios['startup']:>11.2f}x"
        "   (nesso-mlx / mlx-lm speed; > 1 is faster)"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"figures": figures, "ratios": ratios, "model": args.model, "device": str(mx.default_device())}, indent=2)
        )


if __name__ == "__main__":
    main()
