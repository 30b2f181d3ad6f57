"""Samplers and logits processors; everything stays in the MLX graph so decode can run ahead."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import mlx.core as mx

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def _top_k(logprobs: mx.array, k: int) -> mx.array:
    if k <= 0 or k >= logprobs.shape[-1]:
        return logprobs
    kth = mx.sort(mx.argpartition(-logprobs, k - 1, axis=-1)[..., :k], axis=-1)
    threshold = mx.min(mx.take_along_axis(logprobs, kth, axis=-1), axis=-1, keepdims=True)
    return mx.where(logprobs < threshold, -mx.inf, logprobs)


def _top_p(logprobs: mx.array, p: float) -> mx.array:
    if p >= 1.0:
        return logprobs
    order = mx.argsort(-logprobs, axis=-1)
    sorted_lp = mx.take_along_axis(logprobs, order, axis=-1)
    cumulative = mx.cumsum(mx.exp(sorted_lp), axis=-1)
    # Keep the smallest prefix whose mass reaches p (the first token is always kept).
    keep_sorted = (cumulative - mx.exp(sorted_lp)) < p
    keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
    return mx.where(keep, logprobs, -mx.inf)


def _min_p(logprobs: mx.array, min_p: float) -> mx.array:
    if min_p <= 0.0:
        return logprobs
    threshold = mx.max(logprobs, axis=-1, keepdims=True) + math.log(min_p)
    return mx.where(logprobs < threshold, -mx.inf, logprobs)


def make_sampler(
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
) -> Sampler:
    """A function from logits (batch, vocab) to token ids (batch,).

    `temperature` 0 is greedy. With a `seed`, sampling uses its own key sequence, so the same
    seed gives the same tokens regardless of any other use of MLX's global random state.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not 0.0 <= min_p < 1.0:
        raise ValueError(f"min_p must be in [0, 1), got {min_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if temperature == 0:
        return lambda logits: mx.argmax(logits, axis=-1)

    state = {"key": mx.random.key(seed)} if seed is not None else None

    def sample(logits: mx.array) -> mx.array:
        logprobs = logits.astype(mx.float32) / temperature
        logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
        logprobs = _min_p(_top_p(_top_k(logprobs, top_k), top_p), min_p)
        if state is None:
            return mx.random.categorical(logprobs)
        state["key"], key = mx.random.split(state["key"])
        return mx.random.categorical(logprobs, key=key)

    return sample


def repetition_penalty_processor(penalty: float, context_size: int = 64) -> LogitsProcessor:
    """Divide positive (multiply negative) logits of recently seen tokens by `penalty`."""
    if penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {penalty}")

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.size == 0:
            return logits
        recent = tokens[-context_size:]
        selected = logits[:, recent]
        selected = mx.where(selected < 0, selected * penalty, selected / penalty)
        logits[:, recent] = selected
        return logits

    return process


def vocab_limit_processor(tokenizer_size: int, model_vocab: int) -> LogitsProcessor:
    """Ban embedding rows beyond the tokenizer (padding rows no tokenizer can decode)."""
    ban = mx.concatenate([mx.zeros(tokenizer_size), mx.full(model_vocab - tokenizer_size, -mx.inf)])

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        return logits + ban.astype(logits.dtype)

    return process


def make_logits_processors(
    repetition_penalty: float | None = None,
    repetition_context_size: int = 64,
    logits_processors: Sequence[LogitsProcessor] | None = None,
) -> list[LogitsProcessor]:
    processors = list(logits_processors or [])
    if repetition_penalty is not None and repetition_penalty != 1.0:
        processors.append(repetition_penalty_processor(repetition_penalty, repetition_context_size))
    return processors
