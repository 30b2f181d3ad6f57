"""Measure what each quantization recipe costs on one model, to choose the release recipes.

    python convert/measure_recipes.py --model PATH [--group-sizes 32 64 128] [--eval-tokens 256]

For every recipe and group size: bits per weight and the quality report (perplexity, mean KL,
top-1 agreement against the source on nesso-mlx's built-in Italian/English sample, through
float32 effective weights). mlx-lm's own `mixed_4_6` predicate is included for comparison: on a
model with tied embeddings it leaves the embedding, which is also the LM head, at 4 bits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from nesso_mlx.config import load_config
from nesso_mlx.quality import evaluate_quality, reference_logprobs
from nesso_mlx.quantize import QuantizationError, bits_per_weight, dequantize_model, quantize_model
from nesso_mlx.tokenizer import Tokenizer
from nesso_mlx.weights import load_model

VARIANTS = [
    ("8-bit", 8, None),
    ("4-bit", 4, None),
    ("mixed_4_6", 4, "mixed_4_6"),
    ("mixed_4_8", 4, "mixed_4_8"),
    ("mixed_3_6", 3, "mixed_3_6"),
    ("mlx-lm mixed_4_6", 4, "mlx-lm"),
]


def quantized_copy(path: Path, bits: int, group_size: int, recipe: str | None):
    model = load_model(path, load_config(path))
    if recipe == "mlx-lm":
        from mlx_lm.convert import mixed_quant_predicate_builder

        mlx_lm_predicate = mixed_quant_predicate_builder("mixed_4_6", model, group_size)
        for name, module in model.named_modules():  # same divisibility rule as ours, for a fair table
            if hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size:
                raise QuantizationError(f"group size {group_size} does not divide {name}'s input size")

        def predicate(path, module):  # mlx-lm's convert applies its recipe to quantizable layers only
            return hasattr(module, "to_quantized") and mlx_lm_predicate(path, module)

        nn.quantize(model, group_size, bits, class_predicate=predicate)
    else:
        quantize_model(model, bits, group_size, recipe)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: the SmolLM2 test fixture)")
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--eval-tokens", type=int, default=256)
    parser.add_argument("--recipes", nargs="+", choices=[v[0] for v in VARIANTS], help="only these recipes")
    parser.add_argument("--json", help="write the rows to this file too")
    args = parser.parse_args()
    if args.model is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from smollm2_fixture import smollm2_path

        args.model = str(smollm2_path())
    path = Path(args.model)
    tokenizer = Tokenizer.from_folder(path)
    reference = reference_logprobs(load_model(path, load_config(path), mx.float32), tokenizer, args.eval_tokens)
    rows = []
    print(f"model: {path}  sample: {sum(len(ids) - 1 for _, ids, _ in reference.windows)} positions")
    print("| recipe | group size | bits/weight | ppl source | ppl quantized | mean KL | top-1 agreement | it KL | en KL |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for group_size in args.group_sizes:
        for name, bits, recipe in VARIANTS:
            if args.recipes and name not in args.recipes:
                continue
            t0 = time.perf_counter()
            try:
                model = quantized_copy(path, bits, group_size, recipe)
            except QuantizationError as e:
                print(f"| {name} | {group_size} | — | — | — | — | — | — | — |  <!-- {e} -->")
                rows.append({"recipe": name, "group_size": group_size, "error": str(e)})
                continue
            bpw = bits_per_weight(model)
            q = evaluate_quality(reference, dequantize_model(model, mx.float32))
            it, en = q.by_language["it"], q.by_language["en"]
            print(
                f"| {name} | {group_size} | {bpw:.2f} | {q.perplexity_source:.2f} | {q.perplexity_candidate:.2f} | "
                f"{q.mean_kl:.4f} | {100 * q.top1_agreement:.1f}% | {it['mean_kl']:.4f} | {en['mean_kl']:.4f} |",
                flush=True,
            )
            rows.append(
                {
                    "recipe": name,
                    "group_size": group_size,
                    "bits_per_weight": bpw,
                    **q.as_dict(),
                    "seconds": time.perf_counter() - t0,
                }
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
