"""What constrained decoding costs per generated token, at Nesso's 128k vocabulary.

    python benchmarks/bench_constrained.py                    # Nesso's shape, random weights
    python benchmarks/bench_constrained.py --shape tiny       # Nesso's vocabulary, 2 narrow layers
    python benchmarks/bench_constrained.py --model PATH       # a real checkpoint
    python benchmarks/bench_constrained.py --save DIR         # the random model as a folder, for
    nesso-mlx bench --model DIR --vs mlx-lm                   # ... the bench table on Nesso's shape

By default the model has Nesso-0.4B's dimensions (hidden 960, 32 layers, 15/5 heads, 2560 MLP)
with random bf16 weights, and the Nesso-vocabulary tokenizer from tests/nesso_fixture.py (the
real Llama-3.2 BPE, ChatML and the tool tags as added tokens: 128,262 entries). Greedy runs,
alternating, of the same prompt:

- free: no constraint;
- auto: tools offered with tool_choice="auto" (the grammar waits for a `<tool_call>` that a
  random model never writes: this is the cost of being ready);
- json: a JSON schema (every token masked);
- required: tool_choice="required" (every token masked).

It reports decode tokens/s and the ratio to free decode, the grammar's host time per token
(advancing the parser plus computing the mask), and the cost of applying a 128k mask to the
logits two ways: unpacking the bitmask on the host into a boolean array (what nesso-mlx does),
and llguidance.mlx's bitmask kernel (a Metal kernel: measured on a Mac only).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

NESSO_SHAPE = {
    "hidden_size": 960,
    "intermediate_size": 2560,
    "num_hidden_layers": 32,
    "num_attention_heads": 15,
    "num_key_value_heads": 5,
}
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
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city"],
            },
        },
    }
]


def nesso_shaped_model(shape: str):
    import mlx.core as mx
    from mlx.utils import tree_map
    from nesso_fixture import nesso_folder

    from nesso_mlx import load
    from nesso_mlx.config import ModelArgs
    from nesso_mlx.model import Model

    folder = nesso_folder("added")
    model, tokenizer = load(folder)
    if shape == "nesso":
        import json

        config = {**json.loads((folder / "config.json").read_text()), **NESSO_SHAPE}
        mx.random.seed(0)
        model = Model(ModelArgs.from_dict(config))
        model.update(tree_map(lambda p: p.astype(mx.bfloat16), model.parameters()))
        mx.eval(model.parameters())
    return model, tokenizer, f"{shape} shape, vocabulary {model.args.vocab_size}"


def bench_model(path: str | None, shape: str):
    """(model, tokenizer, label): the folder `path` if given, else a random model of `shape`."""
    if path:
        from nesso_mlx import load

        model, tokenizer = load(path)
        return model, tokenizer, path
    return nesso_shaped_model(shape)


def save_shaped_model(shape: str, dest: Path) -> None:
    """A loadable folder (ours and mlx-lm's) of the random model of `shape`, with the fixture's
    tokenizer: `nesso-mlx bench --model DIR --vs mlx-lm` on Nesso's shape."""
    import json
    import shutil

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from nesso_fixture import nesso_folder

    model, _, _ = nesso_shaped_model(shape)
    source = nesso_folder("added")
    dest.mkdir(parents=True, exist_ok=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, dest / name)
    config = json.loads((source / "config.json").read_text())
    if shape == "nesso":
        config.update(NESSO_SHAPE)
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    mx.save_safetensors(str(dest / "model.safetensors"), dict(tree_flatten(model.parameters())), metadata={"format": "mlx"})
    print(f"wrote {dest}")


def instrument():
    """Time the grammar's host work per token: advance() plus mask()."""
    import nesso_mlx.constrained as constrained

    timings: list[float] = []
    for name in ("advance", "mask"):
        original = getattr(constrained.GrammarProcessor, name)

        def timed(self, *args, _original=original):
            t0 = time.perf_counter()
            out = _original(self, *args)
            timings.append(time.perf_counter() - t0)
            return out

        setattr(constrained.GrammarProcessor, name, timed)
    return timings


def mask_application(vocab: int, repeats: int = 200) -> dict[str, float]:
    """µs to apply a 128k-token mask: host unpack vs llguidance.mlx's kernel (Metal only)."""
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(0)
    bits = rng.integers(0, 256, size=(vocab + 31) // 32 * 4, dtype=np.uint8)
    logits = mx.random.normal((1, vocab)).astype(mx.bfloat16)
    mx.eval(logits)
    out = {}
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        allowed = np.unpackbits(bits, count=vocab, bitorder="little").view(bool)
        mx.eval(mx.where(mx.array(allowed), logits, -mx.inf))
        times.append(time.perf_counter() - t0)
    out["host unpack + mx.where"] = statistics.median(times) * 1e6
    if mx.metal.is_available():
        from llguidance.mlx import apply_token_bitmask

        words = bits.view(np.int32)[None]
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            mx.eval(apply_token_bitmask(logits, words))
            times.append(time.perf_counter() - t0)
        out["llguidance.mlx kernel"] = statistics.median(times) * 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model folder (default: a Nesso-shaped random model)")
    parser.add_argument("--shape", choices=["nesso", "tiny"], default="nesso")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--save", metavar="DIR", help="write the random model of --shape to DIR (for nesso-mlx bench) and exit")
    args = parser.parse_args()

    from nesso_mlx import generate

    if args.save:
        save_shaped_model(args.shape, Path(args.save))
        return
    model, tokenizer, label = bench_model(args.model, args.shape)
    timings = instrument()
    messages = [{"role": "user", "content": "Descrivi Roma in JSON."}]
    modes = {
        "free": {},
        "auto": {"tools": TOOLS, "tool_choice": "auto"},
        "json": {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
        "required": {"tools": TOOLS, "tool_choice": "required"},
    }
    for options in modes.values():  # warm-up: compiles, builds llguidance's tokenizer once
        generate(model, tokenizer, messages=messages, max_tokens=4, **options)
    tps: dict[str, list[float]] = {m: [] for m in modes}
    tokens: dict[str, list[int]] = {m: [] for m in modes}
    host: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode, options in modes.items():
            timings.clear()
            result = generate(model, tokenizer, messages=messages, max_tokens=args.tokens, **options)
            tps[mode].append(result.generation_tps)
            tokens[mode].append(result.generation_tokens)
            host[mode].append(sum(timings) / max(result.generation_tokens, 1))
    free = statistics.median(tps["free"])
    print(f"{label}; greedy, up to {args.tokens} tokens, median of {args.repeats}")
    print("| mode | tokens | decode tok/s | vs free | grammar host µs/token |")
    print("|---|---:|---:|---:|---:|")
    for mode in modes:
        rate = statistics.median(tps[mode])
        print(
            f"| {mode} | {statistics.median(tokens[mode]):.0f} | {rate:.2f} | {rate / free:.2f}x | "
            f"{statistics.median(host[mode]) * 1e6:.0f} |"
        )
    print()
    print(f"applying a {model.args.vocab_size}-token mask, median µs:")
    for name, micros in mask_application(model.args.vocab_size).items():
        print(f"  {name:28s} {micros:8.0f}")
    import mlx.core as mx

    if not mx.metal.is_available():
        print("  llguidance.mlx kernel        (Metal only: to measure on a Mac)")


if __name__ == "__main__":
    main()
