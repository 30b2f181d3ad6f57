"""Prefill chunk size, chosen by measurement: nesso-mlx's `prefill` vs mlx-lm's on the same weights.

    python benchmarks/bench_prefill.py                                   # Nesso's shape, random bf16 weights
    python benchmarks/bench_prefill.py --prompt 2048 --chunks 128,256,512,1024,2048 --repeats 2
    python benchmarks/bench_prefill.py --model PATH                      # a real model folder

A prompt of `--prompt` tokens is prefilled into a fresh cache in chunks of each size, by
nesso-mlx (`generation.prefill`) and by mlx-lm (`generate_step`'s `prefill_step_size`, its first
token's logits) on one model: mlx-lm's Llama built from the same weights. Reported per chunk size:
prefill tokens/s and peak memory for both, and the ratio. Runs alternate. The default chunk size
(512 in `stream_generate`, 256 per scheduling step in the server) is the one this table supports
on the machine at hand; on a Mac run it with Metal to choose there.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--chunks", default="128,256,512,1024")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--shape", choices=["nesso", "tiny"], default="nesso")
    parser.add_argument("--model", default=None, help="a model folder instead of a random --shape model")
    args = parser.parse_args()

    import mlx.core as mx
    from bench_constrained import bench_model
    from mlx_lm.generate import generate_step
    from mlx_lm.models import llama
    from mlx_lm.sample_utils import make_sampler

    from nesso_mlx.generation import prefill

    model, _, label = bench_model(args.model, args.shape)
    a = model.args
    theirs = llama.Model(
        llama.ModelArgs(
            model_type="llama",
            hidden_size=a.hidden_size,
            num_hidden_layers=a.num_hidden_layers,
            intermediate_size=a.intermediate_size,
            num_attention_heads=a.num_attention_heads,
            num_key_value_heads=a.num_key_value_heads,
            rms_norm_eps=a.rms_norm_eps,
            vocab_size=a.vocab_size,
            rope_theta=a.rope_theta,
            tie_word_embeddings=a.tie_word_embeddings,
            head_dim=a.head_dim,
        )
    )
    theirs.update(model.parameters())
    mx.eval(theirs.parameters())
    mx.random.seed(0)
    prompt = mx.random.randint(0, 1000, (args.prompt,)).astype(mx.int32)
    greedy = make_sampler(0.0)

    def ours(chunk: int) -> tuple[float, float]:
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        logits = prefill(model, prompt, model.make_cache(), chunk)
        mx.eval(logits)
        return args.prompt / (time.perf_counter() - t0), mx.get_peak_memory() / 2**20

    def mlx_lms(chunk: int) -> tuple[float, float]:
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        token, _ = next(generate_step(prompt, theirs, max_tokens=1, sampler=greedy, prefill_step_size=chunk))
        return args.prompt / (time.perf_counter() - t0), mx.get_peak_memory() / 2**20

    ours(128), mlx_lms(128)  # warm up
    print(f"{label}; prompt {args.prompt} tokens; best of {args.repeats}")
    print("| chunk | nesso-mlx tok/s | mlx-lm tok/s | ratio | nesso-mlx peak MiB | mlx-lm peak MiB |")
    print("|---|---|---|---|---|---|")
    for chunk in (int(c) for c in args.chunks.split(",")):
        runs_ours, runs_theirs = [], []
        for _ in range(args.repeats):
            runs_ours.append(ours(chunk))
            runs_theirs.append(mlx_lms(chunk))
        (o, om), (t, tm) = max(runs_ours), max(runs_theirs)
        print(f"| {chunk} | {o:.0f} | {t:.0f} | {o / t:.2f}x | {om:.0f} | {tm:.0f} |")


if __name__ == "__main__":
    main()
