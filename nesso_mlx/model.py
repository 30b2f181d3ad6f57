"""Llama in MLX: embeddings, RMSNorm, RoPE, grouped-query attention, SwiGLU MLP."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache, make_cache
from .config import ModelArgs


class RoPE(nn.Module):
    """Rotary embedding with optional linear or llama3 frequency scaling."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.dims = args.head_dim
        self.base: float | None = args.rope_theta
        self.scale = 1.0
        scaling = args.rope_scaling or {}
        if scaling.get("rope_type") == "linear":
            self.scale = 1.0 / float(scaling["factor"])
        elif scaling.get("rope_type") == "llama3":
            self._freqs = self._llama3_periods(args.rope_theta, scaling)
            self.base = None

    def _llama3_periods(self, theta: float, s: dict) -> mx.array:
        # Llama 3.1 scaling: long wavelengths are stretched by `factor`, short ones kept,
        # and the band in between is interpolated smoothly.
        factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old_context = float(s["original_max_position_embeddings"])
        inv_freq = 1.0 / theta ** (mx.arange(0, self.dims, 2, dtype=mx.float32) / self.dims)
        wavelen = 2 * math.pi / inv_freq
        scaled = mx.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        return 1.0 / mx.where(medium, smoothed, scaled)

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        return mx.fast.rope(
            x,
            self.dims,
            traditional=False,
            base=self.base,
            scale=self.scale,
            offset=offset,
            freqs=self._freqs if self.base is None else None,
        )


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        head_dim, bias = args.head_dim, args.attention_bias
        self.scale = head_dim**-0.5
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * head_dim, args.hidden_size, bias=bias)
        self.rope = RoPE(args)

    def __call__(self, x: mx.array, cache: KVCache | None = None, last_only: bool = False) -> mx.array:
        """Attention output for every position of `x`, or with `last_only` for its last one (the
        keys and values of every position still go into the cache)."""
        B, L, _ = x.shape
        queries = x[:, -1:] if last_only else x
        Q = queries.shape[1]
        q = self.q_proj(queries).reshape(B, Q, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.rope_offset if cache is not None else 0
        q, k = self.rope(q, offset + (L - Q) if last_only else offset), self.rope(k, offset)
        if cache is None:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask="causal" if Q > 1 else None)
        else:  # the cache stores the new keys and values and attends over what it holds
            out = cache.attend(q, k, v, self.scale)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, Q, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        dim, hidden, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, cache: KVCache | None = None, last_only: bool = False) -> mx.array:
        h = (x[:, -1:] if last_only else x) + self.self_attn(self.input_layernorm(x), cache, last_only)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache: list[KVCache] | None = None, last_only: bool = False) -> mx.array:
        """Hidden states; with `last_only` the last layer computes only the last position's (the
        others' keys and values are all a prompt needs), as do the final norm and the LM head."""
        h = self.embed_tokens(inputs)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            h = layer(h, cache[i] if cache is not None else None, last_only and i == last)
        return self.norm(h)


class Model(nn.Module):
    """Causal Llama language model; parameter names follow Hugging Face checkpoints."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model = LlamaModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(
        self, inputs: mx.array, cache: list[KVCache] | None = None, *, last_only: bool = False, rows: list[int] | None = None
    ) -> mx.array:
        """Logits of shape (batch, seq, vocab); with `last_only`, only the last position; with
        `rows`, only those positions (the LM head is the dearest part of a position at 128k)."""
        if rows is not None and last_only:
            raise ValueError("pass rows or last_only, not both")
        h = self.model(inputs, cache, last_only=last_only)
        if rows is not None:
            h = h[:, mx.array(rows, dtype=mx.int32)]
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self) -> list[TransformerBlock]:
        return self.model.layers

    def make_cache(self, capacity: int = 0, *, kv_bits: int | None = None, max_kv_size: int | None = None) -> list[KVCache]:
        """A fresh per-layer KV cache, preallocated for `capacity` positions if given; `kv_bits`
        (4 or 8) stores keys and values quantized, `max_kv_size` bounds it to attention sinks and a
        sliding window of that many positions (see cache.py)."""
        if kv_bits is not None and self.args.head_dim % 32:
            raise ValueError(f"kv_bits needs a head dimension divisible by 32; this model's is {self.args.head_dim}")
        return make_cache(len(self.layers), capacity, kv_bits=kv_bits, max_kv_size=max_kv_size)
