"""Shared fixtures: tiny random Llama folders and the real SmolLM2-135M-Instruct folder."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from nesso_mlx.config import ModelArgs
from nesso_mlx.model import Model

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 320,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}


def tiny_tokenizer_json() -> str:
    """A byte-level BPE with the 256 byte symbols, a few merges and the ChatML special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")]
    )
    return tok.to_str()


def random_weights(config: dict, seed: int = 0, scale: float = 0.15) -> dict[str, mx.array]:
    """Random float32 weights with Hugging Face names for `config`."""
    args = ModelArgs.from_dict(config)
    if args.tie_word_embeddings is None:
        args.tie_word_embeddings = True
    mx.random.seed(seed)
    out = {}
    for name, p in tree_flatten(Model(args).parameters()):
        if name.endswith("norm.weight"):
            out[name] = 1.0 + 0.1 * mx.random.normal(p.shape)
        else:
            out[name] = scale * mx.random.normal(p.shape)
    return out


def write_model_folder(
    path: Path,
    config: dict | None = None,
    weights: dict[str, mx.array] | None = None,
    dtype: mx.Dtype = mx.float32,
    chat_template: str | None = CHATML,
    seed: int = 0,
) -> Path:
    """A complete Hugging Face style model folder with random weights and the tiny tokenizer."""
    config = dict(TINY_CONFIG if config is None else config)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer_json = tiny_tokenizer_json()
    im_end = json.loads(tokenizer_json)["added_tokens"][2]["id"]
    config.setdefault("eos_token_id", im_end)
    weights = weights if weights is not None else random_weights(config, seed)
    mx.save_safetensors(str(path / "model.safetensors"), {k: v.astype(dtype) for k, v in weights.items()})
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer.json").write_text(tokenizer_json)
    tokenizer_config = {"eos_token": "<|im_end|>", "bos_token": None, "pad_token": "<|im_end|>"}
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return path


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    return write_model_folder(tmp_path / "tiny")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from smollm2_fixture import smollm2_path as build

    return build()


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    from nesso_mlx import load

    return load(smollm2_path)
