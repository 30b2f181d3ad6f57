"""What constrained decoding costs per generated token.

    python benchmarks/bench_constrained.py [--model PATH] [--tokens 48]

Runs the same chat prompt free and under a JSON schema (llguidance), greedy, and reports decode
tokens/s of each plus the grammar processor's own time per token (mask computation, advancing
the parser, applying the mask). The processor reads each sampled token back from the device,
which also removes the decode loop's one-step overlap: that shows in the tokens/s difference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "country": {"type": "string"},
        "landmarks": {"type": "array", "items": {"type": "string"}},
        "population_millions": {"type": "number"},
    },
    "required": ["city", "country", "landmarks", "population_millions"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: the SmolLM2 test fixture)")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.model is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from smollm2_fixture import smollm2_path

        args.model = str(smollm2_path())

    import nesso_mlx.constrained as constrained
    from nesso_mlx import generate, load

    model, tokenizer = load(args.model)
    messages = [{"role": "user", "content": "Describe Paris as a JSON object."}]
    timings: list[float] = []
    waits: list[float] = []
    original, original_new_tokens = constrained.GrammarProcessor.__call__, constrained.GrammarProcessor._new_tokens

    def new_tokens(self, tokens):  # reading the sampled token waits for the forward pass: not grammar work
        t0 = time.perf_counter()
        out = original_new_tokens(self, tokens)
        waits.append(time.perf_counter() - t0)
        return out

    def timed(self, tokens, logits):
        t0 = time.perf_counter()
        n = len(waits)
        out = original(self, tokens, logits)  # host work: parser, bitmask, unpacking (mx.where stays lazy)
        timings.append(time.perf_counter() - t0 - sum(waits[n:]))
        return out

    constrained.GrammarProcessor.__call__ = timed
    constrained.GrammarProcessor._new_tokens = new_tokens
    fmt = {"type": "json_schema", "json_schema": {"schema": SCHEMA}}
    generate(model, tokenizer, messages=messages, max_tokens=4, response_format=fmt)  # warm-up, tokenizer build
    free, constrained_tps = [], []
    for _ in range(args.repeats):
        free.append(generate(model, tokenizer, messages=messages, max_tokens=args.tokens).generation_tps)
        timings.clear()
        result = generate(model, tokenizer, messages=messages, max_tokens=args.tokens, response_format=fmt)
        constrained_tps.append(result.generation_tps)
        per_token = statistics.median(timings) * 1e6
    print(f"model {args.model}, {args.tokens} tokens, median of {args.repeats}")
    print(f"free decode        {statistics.median(free):8.2f} tok/s")
    print(
        f"constrained decode {statistics.median(constrained_tps):8.2f} tok/s "
        f"({statistics.median(constrained_tps) / statistics.median(free):.2f}x)"
    )
    print(
        f"grammar processor  {per_token:8.0f} µs per token (median), "
        f"{max(timings) * 1e6:.0f} µs max; {100 * per_token / 1e6 * statistics.median(free):.1f}% of a free step"
    )


if __name__ == "__main__":
    main()
