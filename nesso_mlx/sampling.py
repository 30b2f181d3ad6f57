"""Samplers and logits processors; everything stays in the MLX graph so decode can run ahead."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import mlx.core as mx

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]
TOP_P_CANDIDATES = 1024  # top-p without top-k looks for the nucleus among this many tokens


@dataclass(kw_only=True)
class SamplingOptions:
    """How each next token is chosen (`stream_generate(sampling=...)`); the defaults are greedy.

    `repetition_penalty` (None or 1.0: off) divides the positive logits (multiplies the negative
    ones) of the tokens among the last `repetition_context_size`; then top-k, top-p and min-p
    filter and `temperature` scales (see `make_sampler`). With a `seed`, the draws are
    reproducible.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    repetition_context_size: int = 64
    seed: int | None = None

    def sampler(self) -> Sampler:
        """The sampler these options describe (raises ValueError for an out-of-range value)."""
        return make_sampler(self.temperature, self.top_p, self.top_k, self.min_p, self.seed)

    def processors(self, extra: Sequence[LogitsProcessor] | None = None) -> list[LogitsProcessor]:
        """`extra` (a caller's own processors, first) and the repetition penalty, if on."""
        return make_logits_processors(self.repetition_penalty, self.repetition_context_size, extra)

    @classmethod
    def merged(cls, sampling: SamplingOptions | None, loose: dict[str, Any], caller: str = "") -> SamplingOptions:
        """`sampling` with mlx-lm style loose keywords (`temp=0.3`, `top_p=0.9`, ...) applied.

        `temp` is `temperature`. A keyword that is not a sampling option raises TypeError, as an
        unknown argument does; two values for one option (`temp` and `temperature`, or a loose
        keyword and `sampling` saying different things) raise ValueError naming both.
        """
        if not loose:
            return sampling or cls()
        values: dict[str, Any] = {}
        said: dict[str, str] = {}
        for key, value in loose.items():
            name = "temperature" if key == "temp" else key
            if name not in cls.__dataclass_fields__:
                raise TypeError(f"{caller}{'() ' if caller else ''}got an unexpected keyword argument {key!r}")
            if name in values and values[name] != value:
                raise ValueError(f"{said[name]}={values[name]!r} and {key}={value!r} disagree; pass one of them")
            values[name], said[name] = value, key
        if sampling is not None:
            for name, value in values.items():
                if getattr(sampling, name) != value:
                    raise ValueError(
                        f"{said[name]}={value!r} and sampling.{name}={getattr(sampling, name)!r} disagree; "
                        "pass the option once, loose or in sampling=SamplingOptions(...)"
                    )
            return sampling
        return cls(**values)


def _filter(logprobs: mx.array, top_k: int, top_p: float, min_p: float) -> mx.array:
    """Mask with -inf the tokens that top-k, then top-p, then min-p remove (llama.cpp's order).

    `logprobs` are untempered log-probabilities (batch, vocab). top-k keeps exactly the k most
    likely tokens; top-p keeps the smallest set of the most likely survivors whose probability,
    renormalized over the survivors, reaches p; min-p keeps the tokens whose probability is at
    least `min_p` times the most likely one's. Everything stays in the graph: no host sync.
    """
    vocab = logprobs.shape[-1]
    use_k = 0 < top_k < vocab
    if use_k:
        # argpartition is O(vocab); only the k candidates are ever sorted.
        index = mx.argpartition(-logprobs, top_k - 1, axis=-1)[..., :top_k]
        candidates = mx.take_along_axis(logprobs, index, axis=-1)
        logprobs = mx.put_along_axis(mx.full(logprobs.shape, -mx.inf, logprobs.dtype), index, candidates, axis=-1)
    else:
        candidates = logprobs
    if top_p < 1.0:
        if not use_k and vocab > TOP_P_CANDIDATES:
            # No full sort of a 128k vocabulary every token: the nucleus is found among the most
            # likely TOP_P_CANDIDATES tokens (argpartition, O(vocab)), with their probabilities
            # over the whole vocabulary, so the result is exact whenever they hold p of the mass.
            # When they hold less (a near-uniform distribution), all of them are kept.
            index = mx.argpartition(-logprobs, TOP_P_CANDIDATES - 1, axis=-1)[..., :TOP_P_CANDIDATES]
            ranked = -mx.sort(-mx.take_along_axis(logprobs, index, axis=-1), axis=-1)
            probs = mx.exp(ranked)  # `logprobs` are normalized over the whole vocabulary
        else:
            ranked = -mx.sort(-candidates, axis=-1)  # most likely first
            probs = mx.exp(ranked - mx.logsumexp(ranked, axis=-1, keepdims=True))  # over the survivors
        # A token stays while the mass of the tokens ranked above it is below p: the smallest
        # prefix reaching p, always at least the most likely token.
        kept = mx.sum((mx.cumsum(probs, axis=-1) - probs) < top_p, axis=-1, keepdims=True)
        threshold = mx.take_along_axis(ranked, mx.maximum(kept, 1) - 1, axis=-1)
        logprobs = mx.where(logprobs < threshold, -mx.inf, logprobs)
    if min_p > 0.0:
        threshold = mx.max(logprobs, axis=-1, keepdims=True) + math.log(min_p)
        logprobs = mx.where(logprobs < threshold, -mx.inf, logprobs)
    return logprobs


def log_softmax(logits: mx.array, block: int = 256) -> mx.array:
    """Log-probabilities in float32, summing the vocabulary in blocks: MLX's one-pass float32
    `logsumexp` over a 49k-128k vocabulary is off by ~2e-4; two levels of sums bring it to ~3e-6."""
    x = logits.astype(mx.float32)
    top = mx.max(x, axis=-1, keepdims=True)
    e = mx.exp(x - top)
    pad = (-e.shape[-1]) % block
    if pad:
        e = mx.pad(e, [(0, 0)] * (e.ndim - 1) + [(0, pad)])
    total = e.reshape(*e.shape[:-1], -1, block).sum(axis=-1).sum(axis=-1, keepdims=True)
    return x - top - mx.log(total)


def filter_logprobs(logits: mx.array, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> mx.array:
    """Untempered log-probabilities of `logits` with the tokens the filters remove set to -inf."""
    logprobs = logits.astype(mx.float32)
    logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
    return _filter(logprobs, top_k, top_p, min_p)


def greedy(logits: mx.array) -> mx.array:
    """The most likely token of each row: the sampler of temperature 0."""
    return mx.argmax(logits, axis=-1)


def make_sampler(
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
) -> Sampler:
    """A function from logits (batch, vocab) to token ids (batch,).

    The order is llama.cpp's and mlx-lm's: logits processors (repetition penalty, grammar masks)
    run before the sampler; then top-k, top-p and min-p select tokens on the untempered
    distribution, and only then is `temperature` applied to what is left. So temperature
    changes how the survivors are weighted, never which tokens survive. (Where mlx-lm applies
    top-p before top-k, we apply top-p to the k survivors, renormalized, as llama.cpp does.)

    `temperature` 0 is greedy (the filters cannot change the most likely token). With a `seed`,
    sampling uses its own key sequence, so the same seed gives the same tokens regardless of any
    other use of MLX's global random state.
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
        return greedy

    inverse_temperature = 1.0 / temperature

    def scaled(logits: mx.array) -> mx.array:
        return filter_logprobs(logits, top_k, top_p, min_p) * inverse_temperature

    # Compiled: the filters and the draw fuse into fewer kernels (measured on the CPU at Nesso's
    # 128k vocabulary, min-p + temperature: 3.5 ms -> 2.8 ms per token).
    if seed is None:  # MLX's global random state, threaded through the compiled function

        @partial(mx.compile, inputs=mx.random.state, outputs=mx.random.state)
        def sample(logits: mx.array) -> mx.array:
            return mx.random.categorical(scaled(logits))

        return sample

    draw = mx.compile(lambda logits, key: mx.random.categorical(scaled(logits), key=key))
    state = {"key": mx.random.key(seed)}

    def sample_seeded(logits: mx.array) -> mx.array:
        state["key"], key = mx.random.split(state["key"])
        return draw(logits, key)

    sample_seeded.key_state = state  # the key sequence, for a caller that must draw a position again
    return sample_seeded


def repetition_penalty_processor(penalty: float, context_size: int = 64) -> LogitsProcessor:
    """Divide positive (multiply negative) logits of recently seen tokens by `penalty`."""
    if penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {penalty}")

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.size == 0:
            return logits
        recent = tokens[-context_size:].astype(mx.int32)[None, :]
        selected = mx.take_along_axis(logits, recent, axis=-1)
        selected = mx.where(selected < 0, selected * penalty, selected / penalty)
        # A new array: the caller's logits stay as they were (a trigger re-samples from them).
        return mx.put_along_axis(logits, recent, selected, axis=-1)

    return process


def vocab_limit_processor(tokenizer_size: int, model_vocab: int) -> LogitsProcessor:
    """Ban embedding rows beyond the tokenizer (padding rows no tokenizer can decode)."""
    ban = mx.concatenate([mx.zeros(tokenizer_size), mx.full(model_vocab - tokenizer_size, -mx.inf)])

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        return logits + ban.astype(logits.dtype)

    process.reads_history = False  # so no token history is kept for it alone
    process.vocab_limit = tokenizer_size  # a batch of greedy rows takes its argmax over these at once
    return process


def reads_history(processors: Sequence[LogitsProcessor]) -> bool:
    """Whether any of `processors` looks at the tokens so far (the vocabulary limit does not)."""
    return any(getattr(p, "reads_history", True) for p in processors)


def make_logits_processors(
    repetition_penalty: float | None = None,
    repetition_context_size: int = 64,
    logits_processors: Sequence[LogitsProcessor] | None = None,
) -> list[LogitsProcessor]:
    processors = list(logits_processors or [])
    if repetition_penalty is not None and repetition_penalty != 1.0:
        processors.append(repetition_penalty_processor(repetition_penalty, repetition_context_size))
    return processors
