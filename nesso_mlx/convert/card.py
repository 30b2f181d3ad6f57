"""The model card (README.md) written into every converted folder."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from . import ConversionResult

CARD_SIGNATURE = "converted with nesso-mlx"  # how --force recognises outputs written before the marker file


def precision_label(result: ConversionResult, recipe: str | None = None) -> str:
    q = result.quantization
    if q is None:
        return result.dtype
    if recipe:
        return f"{recipe} (group size {q['group_size']})"
    return f"{q['bits']}-bit (group size {q['group_size']})"


def quality_table(result: ConversionResult) -> str:
    q = result.quality
    if q is None:
        return "No quality evaluation was run (weights are unchanged from the source, or `--no-eval`)."
    rows = [("all", q.tokens, q.perplexity_source, q.perplexity_candidate, q.mean_kl, q.top1_agreement)]
    for lang, s in q.by_language.items():
        rows.append((lang, s["tokens"], s["perplexity_source"], s["perplexity_candidate"], s["mean_kl"], s["top1_agreement"]))
    lines = [
        "| text | tokens | perplexity (source) | perplexity (this) | mean KL (nats) | top-1 agreement |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.3f} | {r[4]:.5f} | {100 * r[5]:.1f}% |" for r in rows]
    return "\n".join(lines) + (
        "\n\nMeasured by nesso-mlx on its built-in Italian and English sample, comparing this model's "
        "effective (dequantized) weights with the source weights, both in float32."
    )


def model_card(result: ConversionResult, recipe: str | None = None) -> str:
    name = result.path.name
    size_mb = result.size_bytes / 1e6
    on_hub = re.fullmatch(r"[\w.-]+/[\w.-]+", result.source) and not Path(result.source).exists()
    source = f"[{result.source}](https://huggingface.co/{result.source})" if on_hub else f"`{result.source}`"
    base_model = f"base_model: {result.source}\n" if on_hub else ""
    return f"""---
library_name: mlx
{base_model}tags:
- mlx
- nesso-mlx
language:
- it
- en
pipeline_tag: text-generation
---

# {name}

MLX weights of {source}, {CARD_SIGNATURE}.

| | |
| --- | --- |
| precision | {precision_label(result, recipe)} |
| bits per weight | {result.bits_per_weight:.2f} |
| size on disk | {size_mb:.1f} MB |

## Quality

{quality_table(result)}

## Use

With nesso-mlx:

```bash
pip install nesso-mlx
nesso-mlx chat --model {name}
```

```python
from nesso_mlx import load, generate
model, tokenizer = load("{name}")
print(generate(model, tokenizer, messages=[{{"role": "user", "content": "Ciao!"}}]).text)
```

With mlx-lm:

```bash
pip install mlx-lm
mlx_lm.generate --model {name} --prompt "Ciao!"
```
"""
