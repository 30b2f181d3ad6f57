"""Our Llama against mlx-lm's own Llama on the same weights; cached decode against full forward."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import TINY_CONFIG, random_weights, write_model_folder
from mlx.utils import tree_flatten
from mlx_lm.models import llama as mlx_lm_llama

from nesso_mlx.config import ModelArgs
from nesso_mlx.model import Model

CONFIGS = {
    "tied_gqa2": {},
    "untied_mha": {"tie_word_embeddings": False, "num_key_value_heads": 4},
    "mqa_head_dim": {"num_key_value_heads": 1, "head_dim": 24},
    "gqa3_bias": {
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "hidden_size": 96,
        "attention_bias": True,
        "mlp_bias": True,
    },
    "llama3_rope": {
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        "rope_theta": 500000.0,
    },
    "linear_rope": {"rope_scaling": {"type": "linear", "factor": 2.0}},
}


def build_pair(overrides: dict, dtype=mx.float32):
    config = {**TINY_CONFIG, **overrides}
    weights = [(k, v.astype(dtype)) for k, v in random_weights(config).items()]
    ours = Model(ModelArgs.from_dict(config))
    ours.load_weights(weights, strict=True)
    theirs = mlx_lm_llama.Model(mlx_lm_llama.ModelArgs.from_dict(config))
    theirs.load_weights(weights, strict=True)
    return ours, theirs


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_mlx_lm_float32(name):
    ours, theirs = build_pair(CONFIGS[name])
    tokens = mx.random.randint(0, TINY_CONFIG["vocab_size"], (2, 48))
    a, b = ours(tokens), theirs(tokens)
    assert a.shape == (2, 48, TINY_CONFIG["vocab_size"])
    assert mx.allclose(a, b, atol=1e-5, rtol=1e-5).item(), mx.abs(a - b).max().item()


@pytest.mark.parametrize("name", ["tied_gqa2", "untied_mha", "llama3_rope"])
def test_logits_bf16_within_bf16_tolerance(name):
    ours, theirs = build_pair(CONFIGS[name], mx.bfloat16)
    _, reference = build_pair(CONFIGS[name], mx.float32)
    tokens = mx.random.randint(0, TINY_CONFIG["vocab_size"], (1, 32))
    a = ours(tokens).astype(mx.float32)
    b = theirs(tokens).astype(mx.float32)
    c = reference(tokens)
    scale = mx.abs(c).max().item()
    assert a.dtype == mx.float32 and ours(tokens).dtype == mx.bfloat16
    # Same bf16 weights in both implementations: agreement to a few bf16 ulps.
    assert mx.abs(a - b).max().item() <= 0.02 * scale
    # Against the float32 reference: within bf16 rounding accumulated over two layers.
    assert mx.abs(a - c).max().item() <= 0.05 * scale


@pytest.mark.parametrize("name", ["tied_gqa2", "llama3_rope", "mqa_head_dim"])
def test_cached_decode_equals_full_forward(name):
    ours, _ = build_pair(CONFIGS[name])
    tokens = mx.random.randint(0, TINY_CONFIG["vocab_size"], (1, 300))  # crosses the 256 step
    full = ours(tokens)
    cache = ours.make_cache()
    pieces = [ours(tokens[:, :100], cache), ours(tokens[:, 100:270], cache)]  # chunked prefill
    pieces += [ours(tokens[:, i : i + 1], cache) for i in range(270, 300)]
    assert cache[0].offset == 300 and cache[0].capacity == 512
    assert mx.allclose(mx.concatenate(pieces, axis=1), full, atol=1e-4).item()


def test_last_only_is_last_row_of_full_logits():
    ours, _ = build_pair({})
    tokens = mx.random.randint(0, TINY_CONFIG["vocab_size"], (1, 10))
    assert mx.allclose(ours(tokens, last_only=True)[:, 0], ours(tokens)[:, -1], atol=1e-6).item()


@pytest.mark.parametrize("options", [{}, {"kv_bits": 8}, {"max_kv_size": 40}, {"max_kv_size": 16}])
def test_last_only_with_a_cache_keeps_every_key_and_value(options):
    """The last layer computes only the last position's output, but every position's keys and
    values still go into the cache, at their rotary positions (also after an earlier chunk, and
    in a bounded cache that has dropped positions)."""
    ours, _ = build_pair({"num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1})  # head dim 32
    tokens = mx.random.randint(0, TINY_CONFIG["vocab_size"], (1, 300))
    for cut in (0, 30, 280):
        full_cache, last_cache = ours.make_cache(**options), ours.make_cache(**options)
        if cut:
            ours(tokens[:, :cut], full_cache), ours(tokens[:, :cut], last_cache)
        full = ours(tokens[:, cut:], full_cache)[:, -1]
        last = ours(tokens[:, cut:], last_cache, last_only=True)[:, 0]
        assert mx.allclose(last, full, atol=1e-5).item(), (options, cut)
        for a, b in zip(full_cache, last_cache, strict=True):
            assert a.offset == b.offset and all(mx.array_equal(x, y).item() for x, y in zip(a.state, b.state, strict=True))
        after = mx.array([[5]])  # the next step sees the same cache
        assert mx.allclose(ours(after, full_cache), ours(after, last_cache), atol=1e-5).item()
    if options.get("max_kv_size") == 16:
        assert full_cache[0].dropped > 0  # the window really moved


def test_last_only_in_a_batch_of_left_padded_rows():
    """A batch cache (rows of different lengths, per-row rotary offsets, padding masked)."""
    from nesso_mlx.batch import merge_caches

    ours, _ = build_pair({"num_hidden_layers": 3})
    rows = [mx.random.randint(0, TINY_CONFIG["vocab_size"], (1, n)) for n in (9, 4)]
    caches = []
    for row in rows:
        cache = ours.make_cache()
        ours(row, cache)
        caches.append(cache)
    more = mx.random.randint(0, TINY_CONFIG["vocab_size"], (2, 5))
    full_batch, last_batch = merge_caches(caches), merge_caches(caches)
    full = ours(more, full_batch)[:, -1]
    last = ours(more, last_batch, last_only=True)[:, 0]
    assert mx.allclose(last, full, atol=1e-5).item()
    for a, b in zip(full_batch, last_batch, strict=True):
        assert all(mx.array_equal(x, y).item() for x, y in zip(a.state, b.state, strict=True))


def test_quantized_layers_match_mlx_lm():
    ours, theirs = build_pair({"hidden_size": 128, "intermediate_size": 256})
    for m in (ours, theirs):
        nn.quantize(m, group_size=64, bits=4)
    ours.load_weights(tree_flatten(theirs.parameters()), strict=True)
    tokens = mx.random.randint(0, TINY_CONFIG["vocab_size"], (1, 16))
    assert isinstance(ours.model.embed_tokens, nn.QuantizedEmbedding)
    assert mx.allclose(ours(tokens), theirs(tokens), atol=1e-4).item()


def test_logits_for_some_rows_are_those_of_the_whole_pass(tmp_path):
    """`rows=` gives the LM head's output at those positions only, the same as the full pass's."""
    from nesso_mlx import load

    model, _ = load(write_model_folder(tmp_path / "m", seed=3), dtype="float32")
    tokens = mx.array([[5, 9, 2, 7, 3]], dtype=mx.int32)
    full = model(tokens)
    some = model(tokens, rows=[0, 2, 4])
    assert some.shape == (1, 3, full.shape[-1])
    assert mx.allclose(some, full[:, mx.array([0, 2, 4])], atol=1e-5).item()
    with pytest.raises(ValueError, match="not both"):
        model(tokens, rows=[0], last_only=True)
