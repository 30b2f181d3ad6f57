"""Batched decoding: nesso-mlx `batch_generate` vs one request at a time, and vs mlx-lm's
`batch_generate`, on the same weights in one run.

    python benchmarks/bench_batch.py                       # the SmolLM2 test fixture
    python benchmarks/bench_batch.py --model PATH --requests 16 --batch-sizes 1,4,8 --max-tokens 32

Every request is a different chat prompt, decoded greedily for exactly `--max-tokens` tokens
(EOS ignored on both sides, so both do the same work). Reported per batch size: generated tokens/s
over the whole run (prefill included), for nesso-mlx and mlx-lm, and the ratios: nesso-mlx batched
vs nesso-mlx one at a time, and nesso-mlx vs mlx-lm at the same batch size. Runs alternate between
the two, so machine drift affects both alike. Also checks that nesso-mlx's batched tokens equal
its one-at-a-time tokens (greedy).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

TOPICS = ["il mare", "Roma", "un gatto", "la pizza", "un treno", "la montagna", "un violino", "Milano", "la luna", "un fiume"]


def prompts(n: int) -> list[str]:
    return [f"Scrivi una lunga storia su {TOPICS[i % len(TOPICS)]} (numero {i})." for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the SmolLM2 fixture)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--batch-sizes", default="1,4,8")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    if args.model is None:
        from smollm2_fixture import smollm2_path

        args.model = str(smollm2_path())

    import mlx.core as mx
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    from nesso_mlx import load
    from nesso_mlx.api import batch_generate

    model, tokenizer = load(args.model)
    theirs, their_tokenizer = mlx_lm.load(args.model)
    texts = prompts(args.requests)
    requests = [{"messages": [{"role": "user", "content": t}]} for t in texts]
    their_prompts = [
        their_tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True) for t in texts
    ]
    n = args.max_tokens

    # EOS ignored on both sides: each request decodes exactly n tokens
    tokenizer.eos_token_ids = []
    their_tokenizer._eos_token_ids = set()

    def ours(batch_size: int) -> tuple[float, list[list[int]]]:
        t0 = time.perf_counter()
        out = batch_generate(model, tokenizer, requests, batch_size=batch_size, max_tokens=n)
        dt = time.perf_counter() - t0
        assert all(len(r.tokens) == n for r in out), [len(r.tokens) for r in out]
        return len(texts) * n / dt, [r.tokens for r in out]

    def mlx_lms(batch_size: int) -> float:
        t0 = time.perf_counter()
        if batch_size == 1:
            total = 0
            for prompt in their_prompts:
                *_, last = mlx_lm.stream_generate(theirs, their_tokenizer, prompt, max_tokens=n, sampler=make_sampler(0.0))
                total += last.generation_tokens
        else:  # its continuous batching over all the requests, `batch_size` decoding at once
            response = mlx_lm.batch_generate(
                theirs, their_tokenizer, their_prompts, max_tokens=n, completion_batch_size=batch_size, return_token_ids=True
            )
            total = sum(len(ids) for ids in response.token_ids)
        return total / (time.perf_counter() - t0)

    ours(2), mlx_lms(2)  # warm up both (compilation, allocation)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    rows = {}
    reference = None
    for b in sizes:
        best_ours, best_theirs = 0.0, 0.0
        for _ in range(args.repeats):
            tps, tokens = ours(b)
            best_ours = max(best_ours, tps)
            if reference is None:
                reference = tokens
            same = sum(t == r for t, r in zip(tokens, reference, strict=True))
            best_theirs = max(best_theirs, mlx_lms(b))
        rows[b] = (best_ours, best_theirs, same)
        mx.clear_cache()
    base = rows[sizes[0]][0]
    print(f"model {args.model}, {len(texts)} requests x {n} tokens, greedy; tokens/s over the whole run (prefill included)")
    print("| batch | nesso-mlx tok/s | mlx-lm tok/s | nesso batched / nesso b1 | nesso / mlx-lm | same tokens as b1 |")
    print("|---|---|---|---|---|---|")
    for b, (o, t, same) in rows.items():
        print(f"| {b} | {o:.1f} | {t:.1f} | {o / base:.2f}x | {o / t:.2f}x | {same}/{len(texts)} |")


if __name__ == "__main__":
    main()
