"""What quantization costs: perplexity, KL divergence and top-1 agreement against the source.

Both models are compared through float32 weights (the quantized one dequantized: its effective
weights), so the figures measure the weights alone, the same on every machine.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources

import mlx.core as mx

from .model import Model
from .tokenizer import Tokenizer

LANGUAGES = ("it", "en")


def sample_text(language: str) -> str:
    """The built-in evaluation text for `language` ("it" or "en"), written for this project."""
    return resources.files("nesso_mlx").joinpath("data", f"quality_{language}.txt").read_text(encoding="utf-8")


@dataclass
class QualityReport:
    """Source vs candidate on the built-in sample; per language and overall."""

    tokens: int
    perplexity_source: float
    perplexity_candidate: float
    mean_kl: float  # KL(source || candidate) per next-token distribution, nats
    top1_agreement: float  # share of positions where both predict the same next token
    by_language: dict[str, dict[str, float]]

    def as_dict(self) -> dict:
        return asdict(self)


def _log_softmax(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


@dataclass
class Reference:
    """The source model's next-token log-probabilities over the sample, computed once."""

    windows: list[tuple[str, list[int], mx.array]]  # (language, token ids, log-probs)


def reference_logprobs(source: Model, tokenizer: Tokenizer, max_tokens: int = 256, chunk: int = 256) -> Reference:
    """Run `source` over the built-in sample: each language cut to `max_tokens`, in windows of `chunk`."""
    windows = []
    for lang in LANGUAGES:
        ids = tokenizer.encode(sample_text(lang), add_special_tokens=False)[:max_tokens]
        for i in range(0, len(ids), chunk):
            if len(window := ids[i : i + chunk]) > 1:
                logprobs = _log_softmax(source(mx.array(window)[None])[0, :-1])
                mx.eval(logprobs)
                windows.append((lang, window, logprobs))
    return Reference(windows)


def compare(p: mx.array, candidate: Model, ids: list[int]) -> dict[str, float]:
    """Next-token statistics of `candidate` against reference log-probs `p` over `ids`."""
    targets = mx.array(ids[1:])
    q = _log_softmax(candidate(mx.array(ids)[None])[0, :-1])
    nll_p = -mx.take_along_axis(p, targets[:, None], axis=-1).squeeze(-1)
    nll_q = -mx.take_along_axis(q, targets[:, None], axis=-1).squeeze(-1)
    kl = mx.sum(mx.exp(p) * (p - q), axis=-1)
    agree = mx.argmax(p, axis=-1) == mx.argmax(q, axis=-1)
    stats = {
        "nll_source": mx.sum(nll_p),
        "nll_candidate": mx.sum(nll_q),
        "kl": mx.sum(kl),
        "agree": mx.sum(agree),
    }
    mx.eval(stats)
    return {k: v.item() for k, v in stats.items()} | {"positions": len(ids) - 1}


def evaluate_quality(reference: Reference, candidate: Model, progress: Callable[[int, int], None] | None = None) -> QualityReport:
    """Compare `candidate` (float weights; dequantize first) with the source's `reference`."""
    totals = {lang: {"nll_source": 0.0, "nll_candidate": 0.0, "kl": 0.0, "agree": 0.0, "positions": 0} for lang in LANGUAGES}
    for done, (lang, ids, logprobs) in enumerate(reference.windows, start=1):
        for key, value in compare(logprobs, candidate, ids).items():
            totals[lang][key] += value
        if progress is not None:
            progress(done, len(reference.windows))

    def summary(t: dict[str, float]) -> dict[str, float]:
        n = max(t["positions"], 1)
        return {
            "tokens": t["positions"],
            "perplexity_source": math.exp(t["nll_source"] / n),
            "perplexity_candidate": math.exp(t["nll_candidate"] / n),
            "mean_kl": t["kl"] / n,
            "top1_agreement": t["agree"] / n,
        }

    overall = summary({k: sum(t[k] for t in totals.values()) for k in totals["it"]})
    return QualityReport(by_language={lang: summary(totals[lang]) for lang in LANGUAGES}, **overall)
