"""Prompt-lookup speculative decoding: draft tokens from what was already written, verify them in one pass.

Nesso's jobs copy a lot from their input: tool-call arguments come from the question, JSON
extraction and Italian rewriting repeat its words. When the last few tokens occurred before (in
the prompt or the reply), the tokens that followed them then are a cheap guess (a draft) of what
follows now. Under a grammar (a JSON schema, a tool call), the tokens it forces next (a key, a
tool's name) are a better guess still. The model checks a whole draft in one forward pass; every
accepted token is a decode step saved.

Exactness. Greedy: a draft token is kept only if it is the model's argmax, so the output is the
one plain decoding gives. Sampling: the standard acceptance rule for a deterministic proposal:
keep draft token d with probability p(d), else sample from p with d removed and renormalized;
the output has exactly the sampling distribution (tested statistically). Forced tokens are
verified the same way: another spelling of the same bytes may be allowed, and the model decides.

Paying its way. A draft is verified only after the ordinary decode step has confirmed its first
token, so a wrong first guess costs only the wait for that step. Forced tokens, almost always
kept, may instead go into the pass of the token before them (no plain step of their own) where
the host's wait for each token costs less than the steps this saves (`merges_forced`). The
`LookupController` measures what a verify pass costs against a plain step on this backend and
this model, estimates how much of a draft is kept (n-gram and forced drafts apart), sizes drafts
for the most tokens per step, and stops drafting for a while when verifying does not pay.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

import mlx.core as mx

from .sampling import SamplingOptions, filter_logprobs


class WordPieces(Protocol):
    """What the n-gram index asks a tokenizer about words (`Tokenizer` has both)."""

    def spaced_id(self, token_id: int) -> int | None: ...

    def inside_word(self, token_id: int) -> bool: ...


class NgramIndex:
    """Where the latest n-gram of a token sequence occurred before, and what followed it."""

    MAX_SPACED_COUNT = 2  # a word used at most this often in the context is a value worth copying on from

    def __init__(self, tokens: Sequence[int], max_ngram: int = 3, min_ngram: int = 2, words: WordPieces | None = None) -> None:
        """`min_ngram`: the shortest match a draft follows by default; unigrams are indexed too,
        for drafts that continue grammar-forced tokens (`draft(..., shortest=1)`). `words`: the
        tokenizer, for words written without the space they had in the context (see `draft`)."""
        self.tokens: list[int] = []
        self.min_ngram = min_ngram
        self.words = words
        self.counts: dict[int, int] = {}
        self.sizes = range(max_ngram, 0, -1)  # longest first
        self.last: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        self.match: dict[int, int | None] = dict.fromkeys(self.sizes)
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        self.tokens.append(token)
        self.counts[token] = self.counts.get(token, 0) + 1
        end = len(self.tokens) - 1
        for n in self.sizes:
            if end + 1 >= n:
                gram = tuple(self.tokens[end - n + 1 :])
                self.match[n] = self.last[n].get(gram)
                self.last[n][gram] = end

    def draft(self, k: int, after: Sequence[int] = (), shortest: int | None = None) -> list[int]:
        """Up to `k` tokens that followed the latest earlier occurrence of the current n-gram
        (at least `shortest` tokens long, default `min_ngram`); with `after`, of the n-gram the
        tokens will end with once `after` follows them (the index itself is not changed).

        With no such n-gram, a last token that starts a word without a space (`Ag` after a JSON
        quote), whose spaced twin (` Ag`) is a rare word in the context (`MAX_SPACED_COUNT`) and
        went on there (` Ag ost ini`), continues as it did there: a value copied from the prose."""
        tokens, after = self.tokens, list(after)
        total = len(tokens) + len(after)
        for n in self.sizes:
            if n < (self.min_ngram if shortest is None else shortest):
                break
            if not after:
                at = self.match[n]
            elif total >= n:
                at = self.last[n].get(tuple((tokens[-n:] + after)[-n:]))
            else:
                continue
            if at is not None:
                return self._continue(at, k, after)
        if not after and tokens and self.words is not None and (word := self.words.spaced_id(tokens[-1])) is not None:
            at = self.last[1].get((word,))
            if (
                at is not None
                and at < len(tokens) - 1  # a token that is its own twin (no tokenizer's) has nothing after it
                and self.counts[word] <= self.MAX_SPACED_COUNT
                and self.words.inside_word(tokens[at + 1])
            ):
                return self._continue(at, k, after)
        return []

    def _continue(self, at: int, k: int, after: list[int]) -> list[int]:
        """Up to `k` tokens after position `at` (then `after`); past the end, a match close
        behind (a repetition) continues with its period."""
        tokens = self.tokens
        period = len(tokens) + len(after) - 1 - at
        draft = (tokens[at + 1 : at + 1 + k] + after)[:k]
        while len(draft) < k:
            draft.append(draft[len(draft) - period])
        return draft


class PassCost:
    """What a verify pass over k drafted tokens costs in plain decode steps: a line, base +
    per_token * k, fitted to measured passes (recent ones weigh more) over a prior guess.

    On a GPU a pass costs about one step whatever k; on a CPU a pass is compute-bound and a
    2-token pass already costs more than a step (matrix-matrix instead of matrix-vector)."""

    DECAY = 0.8

    def __init__(self, per_token: float, base: float = 1.0) -> None:
        self.sums = [0.0] * 5  # weight, sum w*k, sum w*cost, sum w*k*k, sum w*k*cost
        # The prior: two quarter-weight passes on the guessed line, at k = 1 and k = 4, fading
        # like every measured pass.
        for k in (1, 4):
            self._add(k, base + per_token * k, 0.25)
        self.base, self.per_token = self._fit()

    def add(self, k: float, steps: float) -> None:
        """Record a measured pass: `k` drafted tokens in `steps` plain steps."""
        self.sums = [self.DECAY * v for v in self.sums]
        self._add(k, steps, 1.0)
        self.base, self.per_token = self._fit()

    def _add(self, k: float, steps: float, weight: float) -> None:
        for i, v in enumerate((1.0, k, steps, k * k, k * steps)):
            self.sums[i] += weight * v

    def _fit(self) -> tuple[float, float]:
        w, x, y, xx, xy = self.sums
        per_token = max((w * xy - x * y) / max(w * xx - x * x, 1e-9), 0.005)
        return max((y - per_token * x) / w, 1.0), per_token

    def __call__(self, k: int) -> float:
        return self.base + self.per_token * k


class LookupController:
    """Decides whether to verify a draft, and how long, by its expected gain.

    Each drafted token is taken to be kept with probability `acceptance` when those before it
    were, so a pass over k drafted tokens yields 1 + a + ... + a^k tokens (the kept ones and the
    one after them) for `cost(k)` plain steps. The draft length is the k that gives the most
    tokens per step; when no length beats a plain step, drafting pauses and later probes with
    one token. Timed, the cost is measured from verify passes against plain steps on this
    machine (see `PassCost`), starting from a cautious guess. Untimed (`timed=False`, for seeded
    sampling, whose output must not depend on the machine's speed), a pass is taken to cost
    1 + 0.1 k steps. Acceptance is counted from the n-gram drafts only (their first tokens, which
    the plain step confirms or not, included): grammar-forced tokens, almost always kept, would
    make it look better than it is. Forced tokens have their own estimate (`forced_acceptance`)
    and length (`forced_length`), with their own pause and probe, and so do the tokens drafted
    after them (`follow_length`). All share the cost line: a pass costs what its length costs,
    masks included.
    """

    UNTIMED_COST_PER_TOKEN = 0.1
    TIMED_FIRST_GUESS = 0.5  # per drafted token, until passes are measured: cheap first probes
    MISSES_BEFORE_PAUSE = 4  # drafts whose first token the step did not confirm, in a row
    PAUSE = 32  # plain steps without n-gram drafts when drafting does not pay

    def __init__(self, max_draft: int = 10, timed: bool = True) -> None:
        self.max_draft, self.timed = max_draft, timed
        self.cost = PassCost(self.TIMED_FIRST_GUESS if timed else self.UNTIMED_COST_PER_TOKEN)
        self.step_time: float | None = None  # seconds per plain decode step (moving average)
        self.kept, self.rejected = 2.0, 1.0  # decaying counts behind `acceptance` (prior 2/3)
        # The same for forced tokens: almost always kept (the model writes its tokenizer's usual
        # spelling), so the prior is 0.99 and a tool call's opening goes in one pass.
        self.forced_kept, self.forced_rejected = 99.0, 1.0
        # And for what follows forced tokens, drafted from what followed them before (after a
        # key, its value's opening): prior 2/3, as for n-grams.
        self.follow_kept, self.follow_rejected = 2.0, 1.0
        self.paused = 0  # plain steps left before drafting again
        self._missed_pause = False  # the pause is for first tokens missed in a row
        self.probe = False  # after a pause: one short draft to measure again
        self.forced_paused = 0  # the same for forced drafts
        self.verifies = self.drafted = self.accepted = self.misses = 0
        # Forced drafts in the token's own pass (see `merges_forced`): how often a token under a
        # grammar is followed by forced tokens, and the host time a token's arrival then costs.
        self.forced_rate = 0.1  # prior: one token in ten
        self.host_gap: float | None = None  # seconds (moving average)
        self._last: float | None = None
        # The best lengths change only when the estimates do: computed once per change, not per token.
        self._ngram_plan: tuple[tuple, tuple[int, float]] | None = None
        self._forced_plan: tuple[tuple, tuple[int, float]] | None = None

    @property
    def acceptance(self) -> float:
        """How likely an n-gram draft token is kept when those before it were."""
        return self.kept / (self.kept + self.rejected)

    @property
    def forced_acceptance(self) -> float:
        """The same for grammar-forced tokens."""
        return self.forced_kept / (self.forced_kept + self.forced_rejected)

    def expected_speedup(self, k: int, acceptance: float | None = None) -> float:
        """Tokens per plain step of a pass over `k` drafted tokens, by the current estimates."""
        a = min(self.acceptance if acceptance is None else acceptance, 0.999)
        return (1 - a ** (k + 1)) / (1 - a) / self.cost(k)

    def forced_length(self, available: int, merged: bool = False) -> int:
        """How many of `available` forced tokens to draft: the most tokens per step; when no
        length pays, a short probe, then 0 for a pause. The first is confirmed by the plain step
        and the rest verified, or with `merged` all are verified in the pass of the token before
        them (see `merges_forced`)."""
        verified = available if merged else available - 1
        if verified < 1 or self.forced_paused:
            return 0
        key = (verified, self.forced_kept, self.forced_rejected, self.cost.base, self.cost.per_token)
        if self._forced_plan is None or self._forced_plan[0] != key:
            a = self.forced_acceptance
            best = max(range(1, verified + 1), key=lambda k: self.expected_speedup(k, a))
            self._forced_plan = key, (best, self.expected_speedup(best, a))
        best, speedup = self._forced_plan[1]
        if speedup > 1.0:
            return best if merged else best + 1
        self.forced_paused = self.PAUSE  # not worth it now; after the pause, one token to measure again
        return 1 if merged else 2

    def follow_length(self) -> int:
        """How many tokens to draft after forced ones: the n-gram length while n-gram drafts
        pay, else one while such tokens are kept more often than a drafted token costs."""
        if self.wants_draft():
            return self.k
        a = self.follow_kept / (self.follow_kept + self.follow_rejected)
        return 1 if a > self.cost.per_token else 0

    @property
    def merges_forced(self) -> bool:
        """Whether, under a grammar, to wait for each token before its step is queued, so that
        the tokens the grammar forces after it go into that same pass (no plain step of their
        own). Waiting leaves the accelerator idle for the host's work on the token (`host_gap`);
        it pays where that is less than the step it saves for each forced run, one token in
        `1 / forced_rate` (on a CPU, where a step is long, it always does). Measured, so only
        for timed lookup; untimed (seeded sampling) keeps the plain step first. Until both are
        measured, it merges: a reply's first forced run (a schema's first key, a call's opening)
        comes before any measurement, and a wrong guess costs a few waits at most."""
        if not self.timed or self.forced_paused:
            return False
        if self.step_time is None or self.host_gap is None:
            return True
        # A run of k >= 2 forced tokens saves 1 + cost(k - 1) - cost(k) steps; a lone one, two
        # plain steps made one pass: 2 - cost(1). The lesser, to be safe.
        saved = min(1.0 - self.cost.per_token, 2.0 - self.cost(1))
        return self.host_gap < self.forced_rate * saved * self.step_time

    def forced_seen(self, found: bool) -> None:
        """Count a token under a grammar, and whether forced tokens followed it."""
        self.forced_rate = 0.95 * self.forced_rate + 0.05 * found

    def host_time(self, seconds: float) -> None:
        """Record the host's work on one token under a grammar before its step can be queued
        (the grammar's advance and the step's graph)."""
        self.host_gap = seconds if self.host_gap is None else 0.9 * self.host_gap + 0.1 * seconds

    @property
    def k(self) -> int:
        """The draft length to verify next (beyond the token the plain step confirms)."""
        return 1 if self.probe else self._best_ngram()[0]

    def _best_ngram(self) -> tuple[int, float]:
        """The n-gram draft length with the most tokens per step, and that figure."""
        key = (self.kept, self.rejected, self.cost.base, self.cost.per_token)
        if self._ngram_plan is None or self._ngram_plan[0] != key:
            best = max(range(1, self.max_draft + 1), key=self.expected_speedup)
            self._ngram_plan = key, (best, self.expected_speedup(best))
        return self._ngram_plan[1]

    def plain_step(self) -> None:
        """Called once per token made by a plain (pipelined) step."""
        now = time.perf_counter()
        if self._last is not None:
            dt = now - self._last
            self.step_time = dt if self.step_time is None else 0.9 * self.step_time + 0.1 * dt
        self._last = now
        if self.paused:
            self.paused -= 1
            self.probe = not self.paused
        if self.forced_paused:
            self.forced_paused -= 1

    def reset_clock(self) -> None:
        """The time since the last plain step is not a plain step's (a batched step, a prefill
        between two steps): the next plain step starts a new sample."""
        self._last = None

    def wants_draft(self) -> bool:
        """Whether to look for an n-gram draft now."""
        if self.paused or (self.timed and self.step_time is None):
            return False
        if self.probe or self._best_ngram()[1] > 1.0:
            return True
        self.paused, self._missed_pause = self.PAUSE, False
        return False

    def foreseen(self, hit: bool) -> None:
        """While n-gram drafts pause: whether the token an n-gram foresaw was the one written.
        No pass was spent on it; it counts like a draft's first token, and once drafting pays
        again by the count, the pause ends (rather than after a fixed number of steps)."""
        self.kept, self.rejected = 0.9 * self.kept + hit, 0.9 * self.rejected + (not hit)
        # Only a hit ends a pause, and not one for first tokens missed in a row (their waits).
        if hit and self.paused and not self._missed_pause and self._best_ngram()[1] > 1.0:
            self.paused, self.probe = 0, False

    def confirmed(self, forced: bool) -> None:
        """The plain step confirmed a draft's first token (`forced`: a forced one). A draft token
        like any other, so it counts in the acceptance estimate (as a miss does)."""
        if forced:
            self.forced_kept += 1
        else:
            self.kept, self.rejected = 0.9 * self.kept + 1, 0.9 * self.rejected

    def missed(self, forced: bool = False) -> None:
        """A draft's first token was not confirmed (`forced`: a forced one, the model spelled
        those bytes its own way). Checking cost the pipeline a step's overlap (the host waited
        for the token), so after several n-gram misses in a row, pause."""
        if forced:
            self.forced_kept, self.forced_rejected = 0.9 * self.forced_kept, 0.9 * self.forced_rejected + 1
            return
        self.kept, self.rejected = 0.9 * self.kept, 0.9 * self.rejected + 1
        self.misses += 1
        if self.misses >= self.MISSES_BEFORE_PAUSE:
            self.paused, self.misses, self._missed_pause = self.PAUSE // 2, 0, True

    def verified(
        self,
        drafted: int,
        accepted: int,
        seconds: float,
        forced: int = 0,
        after_forced: bool = False,
        *,
        computed: float | None = None,
    ) -> None:
        """Record a verify pass: `accepted` of `drafted` tokens kept (plus the one after them) in
        `seconds`; the first `forced` drafted tokens came from the grammar, and the rest follow
        forced tokens (counted apart from n-gram drafts) when `forced` or `after_forced` (the
        forced tokens were all before the pass: one confirmed by the plain step). A pass whose
        grammar cut the draft short counts the cut token as rejected (`drafted` includes it).
        `computed`: what the pass's cost line counts, in drafted positions (default all; a
        position given no logits counts for its share of the weights without the LM head)."""
        self.verifies += 1
        self.drafted += drafted
        self.accepted += accepted
        computed = drafted if computed is None else computed
        if self.timed and self.step_time and computed:
            self.cost.add(computed, min(seconds / self.step_time, 4.0 * (computed + 1)))
        forced = min(forced, drafted)
        if forced:
            self.forced_kept = 0.9 * self.forced_kept + min(accepted, forced)
            self.forced_rejected = 0.9 * self.forced_rejected + (accepted < forced)
        if (forced or after_forced) and accepted >= forced and drafted > forced:  # what follows forced tokens
            self.follow_kept = 0.9 * self.follow_kept + (accepted - forced)
            self.follow_rejected = 0.9 * self.follow_rejected + (accepted < drafted)
        elif accepted >= forced and drafted > forced:  # the n-gram draft was tried
            self.kept = 0.9 * self.kept + (accepted - forced)
            self.rejected = 0.9 * self.rejected + (accepted < drafted)
            self.misses, self.probe = 0, False
        self._last = None  # the next plain-step sample would include the kept tokens' consumer time


class PromptLookup:
    """What the decode loop needs to draft and verify: the n-gram index, the controller and the
    sampling settings (for the acceptance rule)."""

    MAX_FORCED = 32  # grammar-forced tokens drafted at once (a tool call opens with about 20)

    def __init__(
        self,
        tokens: Sequence[int],
        sampling: SamplingOptions | None = None,
        max_draft: int = 10,
        max_tokens: int | None = None,
        stop_ids: Sequence[int] = (),
        words: WordPieces | None = None,
    ) -> None:
        """`tokens`: the context to draft from (the prompt, with any earlier turns); `sampling`:
        the options the sampler uses (for the acceptance rule); `words`: the tokenizer (see
        `NgramIndex.draft`)."""
        s = sampling or SamplingOptions()
        self.index = NgramIndex(tokens, words=words)
        self.prompt_length = len(tokens)
        self._foresight: tuple[int, int] | None = None  # (index length, token) foreseen while paused
        self.max_tokens, self.stop_ids = max_tokens, set(stop_ids)
        # Seeded sampling is reproducible: drafting decisions then do not depend on timing.
        self.controller = LookupController(max_draft, timed=s.seed is None or not s.temperature)
        self.settings = (s.temperature, s.top_p, s.top_k, s.min_p)
        # The acceptance draws use their own key sequence, not the sampler's (same seed, other stream).
        base = (s.seed + 0x9E3779B9) % 2**32 if s.seed is not None else time.time_ns() % 2**32
        self.key = mx.random.key(base) if s.temperature else None

    def next_draft(self, constraint=None, forced: bool = True) -> tuple[list[int], int]:
        """After a plain step: the draft for the pending token on (grammar-forced tokens from
        `constraint` when it is active, unless `forced` is False, and what followed them before;
        else an n-gram draft), and how many of it are forced; ([], 0) when nothing is worth
        verifying now."""
        self.controller.plain_step()
        if self._foresight is not None:  # what the n-gram foresaw for the token just written
            at, token = self._foresight
            if at + 1 == len(self.index.tokens):
                self.controller.foreseen(self.index.tokens[-1] == token)
            self._foresight = None
        ngram = self.controller.wants_draft()
        tokens: list[int] = []
        if forced and constraint is not None and constraint.active and not self.controller.forced_paused:
            tokens = getattr(constraint, "forced", list)()  # a constraint may not know its forced tokens
            self.controller.forced_seen(bool(tokens))
        # Foreseen only where an n-gram draft would serve (not where the grammar forces tokens).
        if not ngram and not tokens and self.controller.paused and (guess := self.index.draft(1)):
            self._foresight = len(self.index.tokens), guess[0]
        return self.draft(tokens, ngram) if tokens or ngram else ([], 0)

    def merged_draft(self, constraint) -> tuple[list[int], int]:
        """For the token just sampled under an active `constraint` (already advanced over it),
        before its pass is queued: the tokens the grammar forces after it (as many as pay), then
        what followed them before (`follow_length`), to verify in that token's own pass, and how
        many are forced; ([], 0) when no forced tokens follow or they do not pay now (the plain
        step then runs)."""
        if self.controller.forced_paused:
            return [], 0
        tokens = getattr(constraint, "forced", list)()
        self.controller.forced_seen(bool(tokens))
        used = self.controller.forced_length(len(tokens[: self.MAX_FORCED]), merged=True) if tokens else 0
        if not used:
            return [], 0
        draft = tokens[:used]
        if used == len(tokens) and (follow := self.controller.follow_length()):
            draft += self.index.draft(follow, after=draft, shortest=1)
        return self._trim(draft, used, 1)

    def confirms(self, first: int, draft: Sequence[int], n_forced: int) -> bool:
        """Whether the token the plain step gave, `first`, is the draft's first (and count it)."""
        if first != draft[0]:
            self.controller.missed(forced=n_forced > 0)
            return False
        self.controller.confirmed(forced=n_forced > 0)
        return True

    def draft(self, forced: Sequence[int] = (), ngram: bool = True) -> tuple[list[int], int]:
        """The next draft (its first token is the one the pending step should confirm), cut after
        a stop token and to what the token budget leaves, and how many of its tokens are forced;
        ([], 0) when there is nothing to verify.

        `forced`, the tokens a grammar forces next, lead the draft (as many as pay, up to
        `MAX_FORCED`), continued by what followed them before (`follow_length`; only after all of
        them: not when forced drafts do not pay just now). Without forced tokens, with `ngram`,
        the draft is the n-gram index's, of the controller's length."""
        forced = list(forced[: self.MAX_FORCED])
        # One forced token needs no pass of its own: the plain step confirms it.
        used = len(forced) if len(forced) < 2 else self.controller.forced_length(len(forced))
        draft = forced[:used]
        if not draft and ngram:
            draft = self.index.draft(self.controller.k + 1)
        elif draft and used == len(forced) and (follow := self.controller.follow_length()):
            # After forced tokens (a key), even one token predicts well: what followed them before.
            draft += self.index.draft(follow, after=draft, shortest=1)
        return self._trim(draft, used, 2)

    def _trim(self, draft: list[int], forced: int, shortest: int) -> tuple[list[int], int]:
        """`draft` cut after a stop token and to what the token budget leaves, with how many of
        it are forced; ([], 0) when fewer than `shortest` tokens are left."""
        if (stop := next((i for i, t in enumerate(draft) if t in self.stop_ids), None)) is not None:
            draft = draft[: stop + 1]
        if self.max_tokens is not None:
            # Tokens out so far; the drafted tokens and the one after them must fit in what is
            # left (a draft confirmed by a plain step: its first is the step's token).
            left = self.max_tokens - (len(self.index.tokens) - self.prompt_length)
            draft = draft[: max(left - 1, 0)]
        return (draft, min(forced, len(draft))) if len(draft) >= shortest else ([], 0)

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
