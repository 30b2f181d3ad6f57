"""Soak: 100 chat turns far past a small window on SmolLM2 — no error, prefill bounded per turn
(after each drop the cached prefix is reused again), flat memory and a bounded cache.

A forward pass of the whole 30-layer SmolLM2 costs about 40 ms a token on a 2-core CPU, too slow
for 100 turns in CI, so by default the soak keeps the fixture's real tokenizer, chat template
(with its default system prompt), embeddings and first 2 layers. `NESSO_SOAK_LAYERS=all` runs the
whole model (a few minutes on CPU).
"""

from __future__ import annotations

import os

import mlx.core as mx

from nesso_mlx import load
from nesso_mlx.cache import KVCache
from nesso_mlx.chat import ChatSession, SamplingSettings

TURNS = 100
MAX_CONTEXT = 256
MAX_TOKENS = 6


def test_a_hundred_turns_past_the_window_keep_prefill_memory_and_cache_bounded(smollm2_path):
    model, tokenizer = load(smollm2_path)  # a copy of its own: the layers may be cut below
    layers = os.environ.get("NESSO_SOAK_LAYERS", "2")
    if layers != "all":
        model.model.layers = model.model.layers[: int(layers)]
    settings = SamplingSettings(temperature=0.0, max_tokens=MAX_TOKENS)
    chat = ChatSession(model, tokenizer, settings=settings, max_context=MAX_CONTEXT)
    budget = MAX_CONTEXT - MAX_TOKENS
    drops, memory = [], []
    for turn in range(TURNS):
        cached = chat.context_used()
        reply = list(chat.send(f"Number {turn}?"))
        s = chat.last
        assert s.finish_reason in ("stop", "length") and 0 < len(reply) <= MAX_TOKENS
        assert [layer.offset for layer in chat.cache] == [len(chat.cached_tokens)] * len(chat.cache)
        assert chat.context_used() <= MAX_CONTEXT and s.prompt_tokens <= budget
        if chat.notices:  # old exchanges dropped: the conversation is re-prefilled, down to the low-water mark
            assert "dropped" in chat.notices[-1]
            chat.notices.clear()
            drops.append(turn)
            assert s.prompt_tokens <= chat.low_water * budget
        else:  # everything the cache held was reused: only this turn's new tokens went through the model
            assert s.prefilled_tokens == s.prompt_tokens - cached
            assert turn == 0 or s.prefilled_tokens < 30
        if turn >= 20:
            memory.append(mx.get_active_memory())

    # The window filled many times over; each time, several turns extend the cached prefix before the next drop.
    assert len(drops) >= 5
    between = min(b - a for a, b in zip(drops, drops[1:], strict=False))
    assert between >= 3
    assert len(drops) <= TURNS // between + 1
    # Flat after warm-up: no array outlives its turn, and the cache never grows past the window.
    assert max(memory) - min(memory) <= 256 * 1024, (min(memory), max(memory))
    assert max(layer.capacity for layer in chat.cache) <= -(-MAX_CONTEXT // KVCache.step) * KVCache.step
