"""Prompt-lookup speculative decoding: draft tokens from what was already written, verify them in one pass.

Nesso's jobs copy a lot from their input: tool-call arguments come from the question, JSON
extraction and Italian rewriting repeat its words. When the last few tokens occurred before (in
the prompt or the reply), the tokens that followed them then are a cheap guess (a draft) of what
follows now. The model checks a whole draft in one forward pass; every accepted token is a decode
step saved, and a rejected one costs only its share of that pass.

Exactness. Greedy: a draft token is kept only if it is the model's argmax, so the output is the
one plain decoding gives. Sampling: the standard acceptance rule for a deterministic proposal:
keep draft token d with probability p(d), else sample from p with d removed and renormalized;
the output has exactly the sampling distribution (tested statistically).

Never losing. Drafting happens only on an n-gram match (n >= 2), and a draft is verified only
after the ordinary decode step has confirmed its first token, so a wrong guess costs nothing. The
`LookupController` measures what a verify pass costs against a plain step on this backend and
this model, adapts the draft length to how much is accepted, and stops drafting for a while when
verifying does not pay.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import mlx.core as mx

from .sampling import filter_logprobs


class NgramIndex:
    """Where the latest n-gram of a token sequence occurred before, and what followed it."""

    def __init__(self, tokens: Sequence[int], max_ngram: int = 3, min_ngram: int = 2) -> None:
        self.tokens: list[int] = []
        self.sizes = range(max_ngram, min_ngram - 1, -1)  # longest first
        self.last: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        self.match: dict[int, int | None] = dict.fromkeys(self.sizes)
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        self.tokens.append(token)
        end = len(self.tokens) - 1
        for n in self.sizes:
            if end + 1 >= n:
                gram = tuple(self.tokens[end - n + 1 :])
                self.match[n] = self.last[n].get(gram)
                self.last[n][gram] = end

    def draft(self, k: int) -> list[int]:
        """Up to `k` tokens that followed the latest earlier occurrence of the current n-gram."""
        for n in self.sizes:
            if (at := self.match[n]) is not None:
                # Past the end, a match close behind (a repetition) continues with its period.
                period = len(self.tokens) - 1 - at
                draft = self.tokens[at + 1 : at + 1 + k]
                while len(draft) < k:
                    draft.append(draft[len(draft) - period])
                return draft
        return []


class LookupController:
    """Chooses the draft length by measurement: acceptance, and the cost of a verify pass vs a step.

    Untimed (`timed=False`, for seeded sampling, whose output must not depend on the machine's
    speed), a verify pass is assumed to cost one step plus a tenth of a step per drafted token.
    """

    VERIFY_COST_PER_TOKEN = 0.1  # untimed: a verify pass's extra cost per drafted token, in steps
    MISSES_BEFORE_PAUSE = 4  # drafts whose first token the step did not confirm, in a row

    def __init__(self, max_draft: int = 10, timed: bool = True) -> None:
        # A first probe of 2 tokens: a failed one costs little even where a verify pass costs
        # several steps (this CPU); full acceptance grows the draft by 2 each time.
        self.max_draft, self.k, self.timed = max_draft, 2, timed
        self.step_time: float | None = None  # seconds per plain decode step (moving average)
        self.gain = 1.0  # tokens per second of verifying, relative to plain steps (moving average)
        self.paused = 0  # plain steps left before drafting again
        self.verifies = self.drafted = self.accepted = self.misses = 0
        self._last: float | None = None

    def plain_step(self) -> None:
        """Called once per token made by a plain (pipelined) step."""
        now = time.perf_counter()
        if self._last is not None:
            dt = now - self._last
            self.step_time = dt if self.step_time is None else 0.9 * self.step_time + 0.1 * dt
        self._last = now
        if self.paused:
            self.paused -= 1

    def wants_draft(self) -> bool:
        return not self.paused and (self.step_time is not None or not self.timed)

    def missed(self) -> None:
        """A draft's first token was not confirmed. Checking cost the pipeline a step's overlap
        (the host waited for the token), so after several misses in a row, pause."""
        self.misses += 1
        if self.misses >= self.MISSES_BEFORE_PAUSE:
            self.paused, self.misses = 16, 0

    def verified(self, drafted: int, accepted: int, seconds: float) -> None:
        """Record a verify pass: `accepted` of `drafted` tokens kept (plus the bonus token) in `seconds`."""
        self.verifies += 1
        self.drafted += drafted
        self.accepted += accepted
        self.misses = 0
        if self.timed:
            gain = (accepted + 1) * (self.step_time or seconds) / max(seconds, 1e-9)
        else:
            gain = (accepted + 1) / (1 + self.VERIFY_COST_PER_TOKEN * drafted)
        self.gain = 0.8 * self.gain + 0.2 * gain
        self.k = min(self.max_draft, self.k + 2) if accepted == drafted else max(1, accepted + 1)
        if self.gain < 0.95:  # verifying costs more than it saves here: plain steps for a while
            self.paused, self.gain, self.k = 32, 1.0, 2
        self._last = time.perf_counter()


class PromptLookup:
    """What the decode loop needs to draft and verify: the n-gram index, the controller and the
    sampling settings (for the acceptance rule)."""

    def __init__(
        self,
        tokens: Sequence[int],
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        seed: int | None = None,
        max_draft: int = 10,
        max_tokens: int | None = None,
        stop_ids: Sequence[int] = (),
    ) -> None:
        self.index = NgramIndex(tokens)
        self.prompt_length = len(tokens)
        self.max_tokens, self.stop_ids = max_tokens, set(stop_ids)
        # Seeded sampling is reproducible: drafting decisions then do not depend on timing.
        self.controller = LookupController(max_draft, timed=seed is None or not temperature)
        self.settings = (temperature, top_p, top_k, min_p)
        # The acceptance draws use their own key sequence, not the sampler's (same seed, other stream).
        base = (seed + 0x9E3779B9) % 2**32 if seed is not None else time.time_ns() % 2**32
        self.key = mx.random.key(base) if temperature else None

    def draft(self) -> list[int]:
        """The next draft (its first token is the one the pending step should confirm), cut after
        a stop token and to what the token budget leaves; [] when there is nothing to verify."""
        draft = self.index.draft(self.controller.k + 1)
        if (stop := next((i for i, t in enumerate(draft) if t in self.stop_ids), None)) is not None:
            draft = draft[: stop + 1]
        if self.max_tokens is not None:
            # Tokens out so far; the confirmed first token, the kept ones and the one after them
            # must fit in what is left.
            left = self.max_tokens - (len(self.index.tokens) - self.prompt_length)
            draft = draft[: max(left - 1, 0)]
        return draft if len(draft) >= 2 else []

    def accept(self, rows: mx.array, draft: Sequence[int]) -> tuple[int, int]:
        """`accept_draft` with this generation's settings and the next random key."""
        key = None
        if self.key is not None:
            self.key, key = mx.random.split(self.key)
        return accept_draft(rows, draft, *self.settings, key=key)


def accept_draft(
    rows: mx.array,
    draft: Sequence[int],
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    key: mx.array | None = None,
) -> tuple[int, int]:
    """How many `draft` tokens to keep, and the token that follows them.

    `rows` (m, vocab) are processed logits: row i is the distribution of the token after draft
    token i-1 (row 0: after the last confirmed token), `len(draft) == m - 1`. Greedy keeps a draft
    token when it is the row's argmax; sampling keeps draft token d with probability p(d) and on
    rejection draws from p without d (exact for a deterministic proposal).
    """
    m = rows.shape[0]
    if temperature == 0:
        best = mx.argmax(rows, axis=-1).tolist()
        accepted = next((i for i in range(m - 1) if best[i] != draft[i]), m - 1)
        return accepted, best[accepted]
    keys = mx.random.split(key, 3) if key is not None else [None, None, None]
    logp = filter_logprobs(rows, top_k, top_p, min_p) / temperature
    logp = logp - mx.logsumexp(logp, axis=-1, keepdims=True)
    index = mx.array(list(draft), dtype=mx.int32)[:, None]
    p_draft = mx.exp(mx.take_along_axis(logp[: m - 1], index, axis=-1))[:, 0] if m > 1 else mx.array([])
    u = mx.random.uniform(shape=(max(m - 1, 1),), key=keys[0])
    keep = (u[: m - 1] < p_draft).tolist() if m > 1 else []
    accepted = next((i for i, k in enumerate(keep) if not k), m - 1)
    row = logp[accepted]
    if accepted < m - 1:  # rejected draft[accepted]: the residual distribution
        row = mx.where(mx.arange(row.shape[-1]) == draft[accepted], -mx.inf, row)
    return accepted, mx.random.categorical(row, key=keys[1]).item()
