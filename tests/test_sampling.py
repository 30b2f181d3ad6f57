"""Sampling order: penalties, then top-k, top-p, min-p on the untempered distribution, then temperature.

The reference is mlx-lm's own filter functions (`mlx_lm.sample_utils`): we compare which tokens
keep a non-zero probability and what that probability is, not samples.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

from nesso_mlx.sampling import filter_logprobs, make_sampler


def fixed_logits() -> list[mx.array]:
    """A peaked, a flat and a two-headed distribution over 64 tokens (no ties)."""
    rng = np.random.default_rng(7)
    peaked = rng.normal(size=64) * 3.0
    flat = rng.normal(size=64) * 0.3
    two = rng.normal(size=64)
    two[[5, 40]] = [6.0, 5.9]
    return [mx.array(v.astype(np.float32))[None] for v in (peaked, flat, two)]


def ours(logits: mx.array, temperature: float, **filters) -> np.ndarray:
    return np.array(mx.softmax(filter_logprobs(logits, **filters) / temperature, axis=-1))


def reference(logits: mx.array, temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> np.ndarray:
    """mlx-lm's filters on log-probabilities, in llama.cpp's order, then mlx-lm's `logits / temp`."""
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if top_k:
        logprobs = apply_top_k(logprobs, top_k)
    if top_p < 1.0:
        logprobs = apply_top_p(logprobs, top_p)  # normalizes by the mass that is left
    if min_p:
        logprobs = apply_min_p(logprobs, min_p)
    return np.array(mx.softmax(logprobs * (1.0 / temperature), axis=-1))


SETTINGS = [
    {},
    {"top_p": 0.9},
    {"top_k": 5},
    {"min_p": 0.1},
    {"top_k": 5, "top_p": 0.9},
    {"top_p": 0.9, "min_p": 0.1},
    {"top_k": 5, "min_p": 0.1},
    {"top_k": 5, "top_p": 0.9, "min_p": 0.1},
    {"top_k": 20, "top_p": 0.5},
]


@pytest.mark.parametrize("filters", SETTINGS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "none")
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.6])
def test_filters_match_mlx_lm(filters, temperature):
    for logits in fixed_logits():
        mine, theirs = ours(logits, temperature, **filters), reference(logits, temperature, **filters)
        assert np.array_equal(mine > 0, theirs > 0), filters  # the same tokens survive
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("filters", [f for f in SETTINGS if not ("top_k" in f and "top_p" in f)], ids=str)
def test_without_top_k_and_top_p_together_the_order_is_mlx_lms(filters):
    """mlx-lm's make_sampler runs top-p, min-p, top-k: the same result unless top-k and top-p meet."""
    for logits in fixed_logits():
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if "top_p" in filters:
            logprobs = apply_top_p(logprobs, filters["top_p"])
        if "min_p" in filters:
            logprobs = apply_min_p(logprobs, filters["min_p"])
        if "top_k" in filters:
            logprobs = apply_top_k(logprobs, filters["top_k"])
        np.testing.assert_allclose(ours(logits, 0.7, **filters), np.array(mx.softmax(logprobs / 0.7, axis=-1)), atol=1e-7)


def test_filters_see_the_untempered_distribution():
    """Which tokens survive does not depend on the temperature (it used to be applied first)."""
    for logits in fixed_logits():
        for filters in SETTINGS[1:]:
            survivors = {tuple(np.flatnonzero(ours(logits, t, **filters) > 0)) for t in (0.3, 0.7, 1.0, 2.5)}
            assert len(survivors) == 1, filters
    # An explicit case: with p(a) = 0.6, p(b) = 0.3, p(c) = 0.1, top-p 0.8 keeps a and b at any
    # temperature (dividing by 0.3 first would have made a alone reach 0.8).
    logits = mx.log(mx.array([[0.6, 0.3, 0.1]]))
    for t in (0.3, 1.0, 3.0):
        assert list(ours(logits, t, top_p=0.8)[0] > 0) == [True, True, False]
    # min-p 0.4: b (0.3 / 0.6 = 0.5 of the best) stays, c (1/6) goes, whatever the temperature.
    assert list(ours(logits, 0.3, min_p=0.4)[0] > 0) == [True, True, False]


def test_top_k_keeps_exactly_k_and_top_p_always_keeps_the_best():
    logits = mx.array(np.random.default_rng(0).normal(size=(3, 1000)).astype(np.float32))
    assert (np.isfinite(np.array(filter_logprobs(logits, top_k=7))).sum(axis=-1) == 7).all()
    best = np.array(mx.argmax(logits, axis=-1))
    kept = np.array(filter_logprobs(logits, top_p=1e-9))
    assert (np.isfinite(kept).sum(axis=-1) == 1).all() and (kept.argmax(axis=-1) == best).all()


def test_banned_tokens_stay_banned():
    """A -inf from a logits processor (grammar mask, padding rows) is never resurrected by the filters."""
    logits = mx.array([[5.0, -mx.inf, 4.0, 3.0, -mx.inf, 1.0]])
    for filters in SETTINGS:
        probs = ours(logits, 0.7, **filters)
        assert probs[0, 1] == 0 and probs[0, 4] == 0 and math.isclose(probs.sum(), 1.0, rel_tol=1e-5)


def test_sampled_frequencies_follow_the_distribution():
    """One seeded batch of 20,000 draws: the frequencies match the filtered, tempered probabilities."""
    logits = mx.array([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]])
    settings = {"temperature": 0.7, "top_p": 0.9, "top_k": 5, "min_p": 0.1}
    expected = reference(logits, 0.7, top_k=5, top_p=0.9, min_p=0.1)[0]
    n = 20_000
    draws = np.array(make_sampler(seed=3, **settings)(mx.broadcast_to(logits, (n, logits.shape[-1]))))
    counts = np.bincount(draws, minlength=logits.shape[-1])
    assert set(np.flatnonzero(counts)) == set(np.flatnonzero(expected))  # never a filtered token
    live = expected > 0
    chi2 = (((counts - n * expected) ** 2)[live] / (n * expected[live])).sum()
    assert chi2 < 20.0, (counts / n, expected)  # 99.9th percentile of chi-square, 4 degrees of freedom: 18.5


def test_top_p_at_128k_needs_no_full_sort(monkeypatch):
    """Nesso's vocabulary: the nucleus from the top-1024 candidates equals the full sort's whenever
    they hold p of the mass; a near-uniform distribution keeps exactly those candidates."""
    import nesso_mlx.sampling as sampling

    vocab = 128262
    mx.random.seed(3)
    peaked = mx.random.normal((4, vocab)) * 6
    flat = mx.random.normal((1, vocab)) * 0.01
    fast_peaked, fast_flat = sampling.filter_logprobs(peaked, top_p=0.9), sampling.filter_logprobs(flat, top_p=0.9)
    monkeypatch.setattr(sampling, "TOP_P_CANDIDATES", 10**9)  # the full sort
    full_peaked = sampling.filter_logprobs(peaked, top_p=0.9)
    assert mx.array_equal(mx.isinf(fast_peaked), mx.isinf(full_peaked)).item()
    assert mx.array_equal(mx.where(mx.isinf(fast_peaked), 0, fast_peaked), mx.where(mx.isinf(full_peaked), 0, full_peaked)).item()
    kept = mx.sum(~mx.isinf(fast_flat)).item()
    assert kept == 1024 and mx.sum(~mx.isinf(sampling.filter_logprobs(flat, top_p=0.9))).item() > 100_000
