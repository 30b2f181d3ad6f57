"""Quantized and bounded KV caches: memory, fidelity (KL) and decode speed, nesso-mlx and mlx-lm.

    python benchmarks/bench_kv_cache.py                 # SmolLM2-135M test fixture, a few minutes on CPU
    python benchmarks/bench_kv_cache.py --model PATH    # any local Llama folder (e.g. Nesso on a Mac)

1. Memory: bytes of a cache holding 2048 positions for Nesso-0.4B's shape (32 layers, 5 kv heads,
   head_dim 64, bfloat16), nesso-mlx's caches and mlx-lm's, filled the same way.
2. KL: the same text (a prefill of --prompt tokens, then --steps tokens fed one at a time, teacher
   forced) through the model with a full-precision cache and with kv_bits 8 and 4; the mean KL
   divergence (nats per position) of the next-token distributions, for nesso-mlx and for mlx-lm's
   QuantizedKVCache on the same float32 weights. Each engine is compared with its own full cache.
3. Decode tok/s of nesso-mlx's `generate` after a --context-token prompt, per cache (CPU figures
   here; on a Mac run the same command for Metal).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

TEXT = (
    "The history of the Italian peninsula is long and varied. Rome grew from a small town on the Tiber "
    "into the capital of an empire that stretched from Britain to Mesopotamia. After its fall, the "
    "peninsula was divided among kingdoms, city states and the Papal States for more than a thousand "
    "years. Venice and Genoa built fleets and traded across the Mediterranean; Florence was the home of "
    "bankers, painters and poets. The unification came only in the nineteenth century, after wars and "
    "uprisings led by figures such as Garibaldi, Mazzini and Cavour. "
)


def memory_table() -> None:
    from mlx_lm.models import cache as lm_cache

    from nesso_mlx.cache import BoundedKVCache, KVCache, QuantizedKVCache

    layers, positions = 32, 2048
    k = mx.zeros((1, 5, positions, 64), dtype=mx.bfloat16)

    def nbytes_nesso(layer) -> int:
        if isinstance(layer, BoundedKVCache):  # filled as a decode would: in steps
            for i in range(0, positions, 64):
                layer.update_and_fetch(k[:, :, i : i + 64], k[:, :, i : i + 64])
        else:
            layer.update_and_fetch(k, k)
        mx.eval(layer.state)
        return layers * layer.nbytes

    def nbytes_lm(layer) -> int:
        layer.update_and_fetch(k, k)
        mx.eval(layer.state)
        return layers * layer.nbytes

    full = nbytes_nesso(KVCache())
    rows = [
        ("full (bf16)", full, nbytes_lm(lm_cache.KVCache())),
        ("kv_bits 8", nbytes_nesso(QuantizedKVCache(bits=8)), nbytes_lm(lm_cache.QuantizedKVCache(64, 8))),
        ("kv_bits 4", nbytes_nesso(QuantizedKVCache(bits=4)), nbytes_lm(lm_cache.QuantizedKVCache(64, 4))),
        ("max_kv_size 512", nbytes_nesso(BoundedKVCache(512)), None),
    ]
    print(f"## KV cache memory at {positions} positions, Nesso-0.4B shape (32 layers, 5 kv heads, head_dim 64, bf16)\n")
    print("| cache | nesso-mlx MB | vs full | mlx-lm MB |")
    print("| --- | ---: | ---: | ---: |")
    for name, ours, theirs in rows:
        print(f"| {name} | {ours / 1e6:.1f} | {ours / full:.3f} | {'-' if theirs is None else f'{theirs / 1e6:.1f}'} |")
    print()


def log_probs(forward, ids: list[int], prompt: int) -> mx.array:
    x = mx.array([ids])
    out = [forward(x[:, :prompt])[:, -1:]]
    for i in range(prompt, len(ids) - 1):
        out.append(forward(x[:, i : i + 1]))
        mx.eval(out[-1])
    logits = mx.concatenate(out, axis=1).astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def kl(reference: mx.array, other: mx.array) -> float:
    return (mx.exp(reference) * (reference - other)).sum(-1).mean().item()


def kl_table(path: str, prompt: int, steps: int) -> None:
    from mlx_lm import load as lm_load
    from mlx_lm.models import cache as lm_cache

    from nesso_mlx import load

    model, tokenizer = load(path, dtype="float32")
    ids = (tokenizer.encode(TEXT * 20))[: prompt + steps]
    lm_model, _ = lm_load(path)
    lm_model.set_dtype(mx.float32)

    def nesso(**options):
        cache = model.make_cache(**options)
        return log_probs(lambda x: model(x, cache), ids, prompt)

    def mlx_lm(bits=None):
        n = len(lm_model.layers)
        cache = [lm_cache.KVCache() if bits is None else lm_cache.QuantizedKVCache(64, bits) for _ in range(n)]
        return log_probs(lambda x: lm_model(x, cache=cache), ids, prompt)

    ours_full, theirs_full = nesso(), mlx_lm()
    print(f"## KL to the full-precision cache: {Path(path).name}, float32, {prompt}-token prefill + {steps} decode steps\n")
    print("| cache | nesso-mlx KL | mlx-lm KL | ratio |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| full: nesso-mlx vs mlx-lm | {kl(theirs_full, ours_full):.2e} | - | - |")
    for bits in (8, 4):
        ours, theirs = kl(ours_full, nesso(kv_bits=bits)), kl(theirs_full, mlx_lm(bits))
        print(f"| kv_bits {bits} | {ours:.2e} | {theirs:.2e} | {ours / theirs:.2f} |")
    window = max(64, prompt // 2)
    print(f"| max_kv_size {window} | {kl(ours_full, nesso(max_kv_size=window)):.2e} | - | - |")
    print()


def speed_table(path: str, context: int, tokens: int, repetitions: int) -> None:
    from nesso_mlx import generate, load

    # bfloat16 matmuls are slow on the CPU backend: float32 there, the weights as stored on Metal.
    model, tokenizer = load(path, dtype=None if mx.metal.is_available() else "float32")
    ids = tokenizer.encode(TEXT * 40)[:context]
    print(f"## Decode tok/s after a {context}-token prompt, {tokens} tokens, best of {repetitions} ({mx.default_device()})\n")
    print("| cache | tok/s | vs full |")
    print("| --- | ---: | ---: |")
    base = None
    for name, options in (
        ("full", {}),
        ("kv_bits 8", {"kv_bits": 8}),
        ("kv_bits 4", {"kv_bits": 4}),
        (f"max_kv_size {context // 2}", {"max_kv_size": context // 2}),
    ):
        best = 0.0
        for _ in range(repetitions):
            out = generate(model, tokenizer, prompt=ids, max_tokens=tokens, cache=model.make_cache(**options))
            best = max(best, out.generation_tps)
        base = base or best
        print(f"| {name} | {best:.1f} | {best / base:.2f} |", flush=True)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local model folder (default: the SmolLM2-135M test fixture)")
    parser.add_argument("--prompt", type=int, default=128, help="prefill tokens of the KL test")
    parser.add_argument("--steps", type=int, default=32, help="decode steps of the KL test")
    parser.add_argument("--context", type=int, default=512, help="prompt tokens before the speed test")
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated in the speed test")
    parser.add_argument("--repetitions", type=int, default=1)
    args = parser.parse_args()
    if args.model is None:
        from smollm2_fixture import smollm2_path

        args.model = str(smollm2_path())
    t0 = time.perf_counter()
    memory_table()
    kl_table(args.model, args.prompt, args.steps)
    print(f"({time.perf_counter() - t0:.0f} s so far)\n", flush=True)
    speed_table(args.model, args.context, args.tokens, args.repetitions)
    print(f"({time.perf_counter() - t0:.0f} s; python benchmarks/bench_kv_cache.py {' '.join(sys.argv[1:])})")


if __name__ == "__main__":
    main()
