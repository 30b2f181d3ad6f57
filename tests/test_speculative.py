"""Prompt-lookup speculative decoding: the same tokens greedy, the same distribution sampling."""

from __future__ import annotations

import json

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from conftest import write_model_folder
from nesso_fixture import nesso_folder

import nesso_mlx.sampling as sampling
import nesso_mlx.speculative as speculative
from nesso_mlx import generate, load
from nesso_mlx.sampling import SamplingOptions
from nesso_mlx.speculative import NgramIndex, accept_draft


@pytest.fixture
def always_draft(monkeypatch):
    """Draft at every match, never pause: every verify path is exercised. Counts the verifies."""
    stats = {"verifies": 0, "drafted": 0, "accepted": 0}
    original = speculative.LookupController.verified

    def verified(self, drafted, accepted, seconds, forced=0, after_forced=False, **counts):
        stats["verifies"] += 1
        stats["drafted"] += drafted
        stats["accepted"] += accepted
        original(self, drafted, accepted, seconds, forced, after_forced, **counts)
        self.paused = 0

    monkeypatch.setattr(speculative.LookupController, "wants_draft", lambda self: True)
    monkeypatch.setattr(speculative.LookupController, "verified", verified)
    return stats


def test_ngram_index_drafts_what_followed_the_latest_earlier_match():
    index = NgramIndex([1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 7])
    assert index.draft(3) == []  # (6, 7) never came before
    for token in (1, 2, 3):
        index.append(token)
    assert index.draft(3) == [5, 6, 7]  # the latest earlier "1 2 3" was followed by 5 6 7
    index.append(9)
    assert index.draft(2) == []  # "2 3 9" and "3 9" are new
    index = NgramIndex([5, 8, 5, 8])
    assert index.draft(4) == [5, 8, 5, 8]  # a repetition continues with its period


class Words:
    """20 is `Ag`, 10 its spaced twin ` Ag`; 11 and 12 (`ost`, `ini`) go on with a word."""

    def spaced_id(self, token_id):
        return {20: 10}.get(token_id)

    def inside_word(self, token_id):
        return token_id in (11, 12)


def test_a_value_copied_without_its_space_continues_from_the_spaced_word():
    """`"Ag` (a JSON value) where the context has ` Ag ost ini`: drafted on from ` Ag`, when rare."""
    context = [1, 2, 10, 11, 12, 3, 4]  # "the hall ... Ag ost ini ..."
    assert NgramIndex([*context, 5, 20]).draft(3) == []  # no n-gram, and no tokenizer: nothing
    assert NgramIndex([*context, 5, 20], words=Words()).draft(3) == [11, 12, 3]
    assert NgramIndex([*context, 5, 20], words=Words()).draft(2, after=[7]) == []  # not past forced tokens
    twice = [*context, 10, 12]  # " Ag" twice: still rare
    assert NgramIndex([*twice, 5, 20], words=Words()).draft(2) == [12, 5]  # on from the latest ` Ag`
    thrice = [*context, 10, 11, 10, 12]  # three times: a common word, not a value
    assert NgramIndex([*thrice, 5, 20], words=Words()).draft(3) == []
    ending = [1, 10, 3, 4]  # ` Ag` followed by no piece of a word (` date,`): the prose's word was whole
    assert NgramIndex([*ending, 5, 20], words=Words()).draft(3) == []
    ngram = [1, 10, 11, 12, 5, 20, 9, 6, 5]
    assert NgramIndex([*ngram, 20], words=Words()).draft(2) == [9, 6]  # a real n-gram ("5 20") comes first


@pytest.mark.parametrize("vocabulary", ["smollm2", "nesso"])
def test_json_values_are_matched_to_the_prompts_words(vocabulary, smollm2_path):
    """On both vocabularies a name written after a quote is another token than in the prose; the
    tokenizer leads the lookup from one to the other, but not from a key the prose names."""
    from nesso_mlx.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(smollm2_path if vocabulary == "smollm2" else nesso_folder("text"))
    prompt = tokenizer.encode("Extract the date, time and place: the council met in the Agostini hall.", add_special_tokens=False)
    reply = tokenizer.encode('{"place": "Agostini', add_special_tokens=False)
    first = next(i for i, t in enumerate(reply) if tokenizer.decode(reply[i:]) == "Agostini")
    assert reply[first] not in prompt  # the premise: the value's first token is not the prose's
    at = prompt.index(tokenizer.spaced_id(reply[first]))
    assert tokenizer.decode(prompt[at:]).startswith(" Agostini hall")
    assert tokenizer.spaced_id(prompt[at]) is None  # already spaced
    assert tokenizer.spaced_id(tokenizer.eos_token_ids[0]) is None  # a control token has no word
    for text in (",", "\n", "\n\n", "«", "—"):  # nor punctuation or a line break (byte-level `Ċ`, `Â«`)
        (token,) = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.spaced_id(token) is None and not tokenizer.inside_word(token), text
    assert tokenizer.inside_word(tokenizer.encode("è", add_special_tokens=False)[0])  # an accented letter is one
    index = NgramIndex([*prompt, *reply[: first + 1]], words=tokenizer)
    assert index.draft(2) == prompt[at + 1 : at + 3]
    assert NgramIndex([*prompt, *reply[: first + 1]]).draft(2) == []
    key = tokenizer.encode('{"date', add_special_tokens=False)  # ` date` is followed by `,` in the prose
    assert tokenizer.spaced_id(key[-1]) in prompt and tokenizer.decode(key[-1:]) == "date"
    assert NgramIndex([*prompt, *key], words=tokenizer).draft(2) == []
    lines = tokenizer.encode("Extract the date\nand the place.", add_special_tokens=False)  # or by a line break
    assert tokenizer.spaced_id(key[-1]) in lines and NgramIndex([*lines, *key], words=tokenizer).draft(2) == []


def test_generation_and_the_server_give_lookup_the_tokenizer(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from nesso_mlx.server_engine import _prompt_lookup

    seen = []
    original = NgramIndex.__init__

    def init(self, tokens, *args, words=None, **kwargs):
        seen.append(words)
        original(self, tokens, *args, words=words, **kwargs)

    monkeypatch.setattr(NgramIndex, "__init__", init)
    model, tokenizer = load(write_model_folder(tmp_path / "m", seed=5))
    generate(model, tokenizer, messages=[{"role": "user", "content": "ciao"}], max_tokens=2, prompt_lookup=True)
    plan = SimpleNamespace(max_tokens=4, reply=SimpleNamespace(eos=[2]))
    _prompt_lookup(SimpleNamespace(prompt_lookup=True, tokenizer=tokenizer), [1, 2, 3], None, None, plan)
    assert seen == [tokenizer, tokenizer]


def test_ngram_index_drafts_after_tokens_still_to_come():
    """`after` (grammar-forced tokens) ends the n-gram looked up; the index itself does not move."""
    index = NgramIndex([1, 2, 3, 4, 5, 1, 2])
    assert index.draft(4, after=[3]) == [4, 5, 1, 2]  # "1 2 3" came before, followed by 4 5 1 2
    assert index.draft(3, after=[3, 4, 5, 1, 2, 3]) == [4, 5, 1]
    assert index.draft(3, after=[9]) == []
    assert index.tokens == [1, 2, 3, 4, 5, 1, 2] and index.draft(2) == [3, 4]
    index = NgramIndex([7, 8, 7, 8])
    assert index.draft(5, after=[7]) == [8, 7, 8, 7, 8]  # the period runs on through `after`
    lookup = speculative.PromptLookup([1, 2, 3, 4, 5, 6, 1], max_tokens=100)
    lookup.controller.probe = True  # k = 1: drafts of 2 tokens
    assert lookup.draft([2]) == ([2, 3], 1)  # forced tokens first, the n-gram continues after them
    lookup.controller.probe, lookup.controller.paused = False, 5  # n-gram drafts paused: what follows
    assert lookup.draft([2]) == ([2, 3], 1)  # forced tokens is still drafted, one token long,
    lookup.controller.follow_kept = 0.0  # while such tokens are kept more often than they cost:
    assert lookup.draft([2]) == ([], 0)  # never kept, so a lone forced token is no draft
    index = NgramIndex([5, 1, 9, 6, 2, 7])
    assert index.draft(2, after=[1]) == []  # one token is too short a match for an n-gram draft,
    assert index.draft(2, after=[1], shortest=1) == [9, 6]  # but not after forced tokens (a key's value)
    lookup = speculative.PromptLookup([5, 1, 9, 6, 2, 7, 3], max_tokens=100)
    lookup.controller.forced_kept = 1000.0  # forced drafts always kept
    lookup.controller.paused = 5

    class Forcing:
        active = True

        def forced(self):
            return [1]

    assert lookup.merged_draft(Forcing()) == ([1, 9], 1)  # in the pass of the token before: even one forced token
    lookup.controller.follow_kept = 0.0
    assert lookup.merged_draft(Forcing()) == ([1], 1)
    lookup.max_tokens, lookup.prompt_length = 2, 6  # one token out of 2: no room for a draft and the one after
    assert lookup.merged_draft(Forcing()) == ([], 0)
    forced, longest = list(range(10, 50)), speculative.PromptLookup.MAX_FORCED
    lookup = speculative.PromptLookup(
        [1, 2], sampling=SamplingOptions(temperature=0.5, seed=1)
    )  # untimed: a pass costs 1 + 0.1 k steps
    lookup.controller.forced_kept = 9.0  # 90% kept: a mid-length draft pays best
    assert 2 <= lookup.draft(forced)[1] < longest
    lookup.controller.forced_kept = 1000.0  # forced drafts always kept: the longest
    assert lookup.draft(forced) == (forced[:longest], longest)
    lookup.controller.forced_kept = 0.0  # forced drafts never kept here: not worth a pass,
    assert lookup.draft(forced) == (forced[:2], 2)  # but a one-token probe to measure again,
    assert lookup.draft(forced) == ([], 0)  # then a pause


COPYING = [
    "Ripeti esattamente: il gatto nero dorme sul divano rosso, il gatto nero dorme sul divano rosso.",
    "Copy this list: apple, banana, cherry, apple, banana, cherry, apple, banana",
    "Mario Rossi abita a Città di Castello. Dove abita Mario Rossi? Mario Rossi abita a",
    "1 2 3 4 5 6 7 8 9 10 1 2 3 4 5 6 7 8 9 10 1 2 3",
]


def induction(tokens: mx.array, logits: mx.array) -> mx.array:
    """Make a random model copy: favour the token that followed the last earlier occurrence of the
    latest token (what induction heads do in trained models), so drafts get confirmed."""
    seen = tokens.tolist()
    for j in range(len(seen) - 2, -1, -1):
        if seen[j] == seen[-1]:
            return logits + 40.0 * (mx.arange(logits.shape[-1]) == seen[j + 1])
    return logits


def add_induction(monkeypatch) -> None:
    """Random models made to copy: `induction` joins the built-in processors (a caller's own
    logits processors turn prompt lookup off, see below)."""
    original = sampling.make_logits_processors

    def with_induction(*args, **kwargs):
        return [*original(*args, **kwargs), induction]

    monkeypatch.setattr(sampling, "make_logits_processors", with_induction)


@pytest.fixture
def copying(monkeypatch):
    add_induction(monkeypatch)


@pytest.mark.parametrize("kind", ["tiny", "nesso-text"])
def test_greedy_output_is_identical(always_draft, monkeypatch, tmp_path, kind):
    folder = write_model_folder(tmp_path / "m", seed=5) if kind == "tiny" else nesso_folder("text")
    model, tokenizer = load(folder, dtype="float32")
    for copy in (False, True):
        with monkeypatch.context() as patch:
            if copy:
                add_induction(patch)
            for text in COPYING:
                for options in ({}, {"sampling": SamplingOptions(repetition_penalty=1.3)}):
                    messages = [{"role": "user", "content": text}]
                    plain = generate(model, tokenizer, messages=messages, max_tokens=40, **options)
                    fast = generate(model, tokenizer, messages=messages, max_tokens=40, prompt_lookup=True, **options)
                    assert fast.tokens == plain.tokens, (kind, text, options, copy)
                    assert fast.finish_reason == plain.finish_reason
    assert always_draft["verifies"] > 10 and always_draft["accepted"] > 0, always_draft  # the path really ran


def test_callers_logits_processors_turn_lookup_off(always_draft, tmp_path):
    """A caller's processor may keep state between calls (a grammar, a counter), which verifying
    several positions at once, some of them rolled back, would corrupt: it sees one call per token."""
    model, tokenizer = load(write_model_folder(tmp_path / "m", seed=5), dtype="float32")
    calls = []

    def stateful(tokens: mx.array, logits: mx.array) -> mx.array:
        calls.append(tokens.size)
        return induction(tokens, logits)

    messages = [{"role": "user", "content": COPYING[3]}]
    plain = generate(model, tokenizer, messages=messages, max_tokens=30, logits_processors=[stateful])
    seen_plain, calls[:] = list(calls), []
    fast = generate(model, tokenizer, messages=messages, max_tokens=30, prompt_lookup=True, logits_processors=[stateful])
    assert fast.tokens == plain.tokens and calls == seen_plain
    assert calls == list(range(calls[0], calls[0] + len(calls)))  # one call per position, in order
    assert always_draft["verifies"] == 0


def test_drafts_stop_at_eos_and_at_the_token_budget(always_draft, copying, monkeypatch, tmp_path):
    model, tokenizer = load(write_model_folder(tmp_path / "m", seed=5), dtype="float32")
    messages = [{"role": "user", "content": COPYING[3]}]
    drafts = []
    original = speculative.PromptLookup.draft

    def draft(self, forced=(), ngram=True):
        out = original(self, forced, ngram)
        drafts.append((len(self.index.tokens) - self.prompt_length, out[0]))
        return out

    monkeypatch.setattr(speculative.PromptLookup, "draft", draft)
    for max_tokens in (6, 9, 30):
        drafts.clear()
        plain = generate(model, tokenizer, messages=messages, max_tokens=max_tokens)
        fast = generate(model, tokenizer, messages=messages, max_tokens=max_tokens, prompt_lookup=True)
        assert fast.tokens == plain.tokens
        assert any(d for _, d in drafts)
        for produced, d in drafts:
            assert produced + len(d) + 1 <= max_tokens or not d  # the first, the kept, the one after
            eos = [i for i, t in enumerate(d) if t in tokenizer.eos_token_ids]
            assert not eos or eos[0] == len(d) - 1
    index = speculative.PromptLookup([7, 8, 2, 9, 7, 8], stop_ids=[2], max_tokens=100)
    assert index.draft() == ([], 0)  # [2, ...] cut after the stop: one token is not worth a pass
    index = speculative.PromptLookup([7, 8, 9, 2, 5, 7, 8], stop_ids=[2], max_tokens=100)
    assert index.draft() == ([9, 2], 0)  # cut after the stop token
    index = speculative.PromptLookup([7, 8, 9, 4, 5, 6, 7, 8], max_tokens=3)
    assert index.draft() == ([9, 4], 0)  # 3 tokens left: the first, one kept, the one after


def test_lookahead_stops_where_an_auto_call_closes():
    """Auto mode: after `</tool_call>` text is free again, so a draft that runs past the close is
    verified only up to it (an EOS-only mask there would force the reply to end)."""
    from nesso_mlx.constrained import build_processor

    for variant in ("text", "added"):
        model, tokenizer = load(nesso_folder(variant), dtype="float32")
        processor = build_processor(tokenizer, model.args.vocab_size, [TOOL], "auto")
        for token in tokenizer.encode("Cerco. <tool_call>", add_special_tokens=False):
            processor.advance(token)
        assert processor.active
        call = '\n{"name": "trova", "arguments": {"testo": "Bari"}}\n</tool_call> Fatto.'
        body = tokenizer.encode(call, add_special_tokens=False)
        close = next(i for i in range(len(body)) if tokenizer.decode(body[: i + 1]).endswith("</tool_call>"))
        masks = processor.lookahead(body)
        assert len(masks) == close, variant  # a mask after each token up to the closing one
        eos = tokenizer.eos_token_ids[0]
        assert all(not m[eos].item() for m in masks)
        for token in body[: close + 1]:  # the state did not move: the same tokens are still taken
            processor.advance(token)
        assert not processor.active  # free again after the close


def test_lookahead_stops_where_a_required_block_closes():
    """tool_choice "required" with a budget: after a closing tag `advance` decides whether another
    call fits (else only EOS may follow), so a draft is verified only up to the close, even when
    the closing token also holds the newline that would begin another block (`>\n`)."""
    from nesso_mlx.constrained import build_processor

    for variant in ("text", "added"):
        model, tokenizer = load(nesso_folder(variant), dtype="float32")
        processor = build_processor(tokenizer, model.args.vocab_size, [TOOL], "required", max_tokens=40)
        call = '<tool_call>\n{"name": "trova", "arguments": {"testo": "Bari"}}\n'
        for token in tokenizer.encode(call, add_special_tokens=False):
            processor.advance(token)
        rest = tokenizer.encode('</tool_call>\n<tool_call>\n{"name"', add_special_tokens=False)
        close = next(i for i in range(len(rest)) if tokenizer.decode(rest[: i + 1]).startswith("</tool_call>"))
        assert len(processor.lookahead(rest)) == close, variant


def test_greedy_on_smollm2_with_stop_strings(always_draft, smollm2_path):
    model, tokenizer = load(smollm2_path, dtype="float32")
    messages = [{"role": "user", "content": "Repeat exactly: the quick brown fox jumps over the lazy dog. The quick brown"}]
    plain = generate(model, tokenizer, messages=messages, max_tokens=24)
    fast = generate(model, tokenizer, messages=messages, max_tokens=24, prompt_lookup=True)
    assert fast.tokens == plain.tokens and always_draft["accepted"] > 0
    stop = plain.text.split()[3]
    cut = generate(model, tokenizer, messages=messages, max_tokens=24, stop=[stop], prompt_lookup=True)
    assert cut.text == plain.text[: plain.text.index(stop)] and cut.finish_reason == "stop"


SCHEMA = {
    "type": "object",
    "properties": {"nome": {"type": "string", "maxLength": 30}, "città": {"type": "string", "maxLength": 30}},
    "required": ["nome", "città"],
    "additionalProperties": False,
}
TOOL = {
    "type": "function",
    "function": {
        "name": "trova",
        "parameters": {"type": "object", "properties": {"testo": {"type": "string", "maxLength": 40}}, "required": ["testo"]},
    },
}


def merging(monkeypatch, merge: bool) -> dict[str, int]:
    """Forced tokens in the pass of the token before them (`merge`), or confirmed by a plain step
    first, whatever the measurements say. Counts the verify passes of each kind."""
    import nesso_mlx.generation as generation

    monkeypatch.setattr(speculative.LookupController, "merges_forced", property(lambda self: merge))
    counts = {"merged": 0, "confirmed": 0}
    original = generation.verify_draft

    def verify_draft(*args, **kwargs):
        counts["merged" if kwargs.get("advanced") else "confirmed"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(generation, "verify_draft", verify_draft)
    return counts


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("variant", ["text", "added"])
def test_constrained_greedy_output_is_identical(always_draft, copying, monkeypatch, variant, merge):
    """Drafted tokens go through the grammar: the same JSON and calls as without drafting."""
    counts = merging(monkeypatch, merge)
    model, tokenizer = load(nesso_folder(variant), dtype="float32")
    text = (
        'Nome: "Anna Bianchi", città: "Bari". {"nome": "Anna Bianchi", "città": "Bari"} '
        '<tool_call>\n{"name": "trova", "arguments": {"testo": "Bari"}}\n</tool_call> Fatto. '
    )
    messages = [{"role": "user", "content": text * 2}]
    requests = [
        {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
        {"tools": [TOOL], "tool_choice": "required"},
        {"tools": [TOOL], "tool_choice": "auto"},
    ]
    for request in requests:
        plain = generate(model, tokenizer, messages=messages, max_tokens=60, **request)
        fast = generate(model, tokenizer, messages=messages, max_tokens=60, prompt_lookup=True, **request)
        assert fast.tokens == plain.tokens, request
        if "response_format" in request and fast.finish_reason == "stop":
            jsonschema.validate(json.loads(fast.text), SCHEMA)
    assert always_draft["verifies"] > 0 and always_draft["accepted"] > 0, always_draft
    assert (counts["merged"] > 0) == merge, counts  # the path asked for really ran


def test_acceptance_rule_keeps_the_sampling_distribution():
    """Monte Carlo on fixed rows: the first token follows p0; after an accepted draft, the second follows p1."""
    rng = np.random.default_rng(0)
    vocab, temperature = 6, 0.8
    rows = mx.array(rng.normal(size=(3, vocab)) * 1.5, dtype=mx.float32)
    draft = [2, 4]
    p = np.exp(np.array(rows) / temperature)
    p /= p.sum(axis=-1, keepdims=True)
    n = 4000
    first = np.zeros(vocab)
    second = np.zeros(vocab)
    key = mx.random.key(1)
    for _ in range(n):
        key, sub = mx.random.split(key)
        accepted, following = accept_draft(rows, draft, temperature, key=sub)
        out = [*draft[:accepted], following]
        first[out[0]] += 1
        if out[0] == draft[0]:
            second[out[1]] += 1
    # Pearson chi-square against the exact distributions (5 degrees of freedom; 20.5 is p=0.001)
    chi_first = ((first - n * p[0]) ** 2 / (n * p[0])).sum()
    m = second.sum()
    chi_second = ((second - m * p[1]) ** 2 / (m * p[1])).sum()
    assert chi_first < 20.5 and chi_second < 20.5, (chi_first, chi_second)
    # and greedy keeps exactly the argmax chain
    greedy = mx.array([[0, 5, 1], [0, 1, 9], [7, 0, 0]], dtype=mx.float32)
    assert accept_draft(greedy, [1, 2], 0.0) == (2, 0)  # both are their rows' argmax; then row 2's
    assert accept_draft(greedy, [1, 1], 0.0) == (1, 2)  # row 1's argmax is 2, not 1: it follows instead
    assert accept_draft(greedy, [0, 2], 0.0) == (0, 1)


def test_seeded_sampling_with_lookup_is_reproducible(copying, monkeypatch, tmp_path):
    """The same seed gives the same tokens however fast the machine runs: drafting decisions do
    not depend on timing when seeded, and acceptance draws use their own key sequence."""
    import random

    model, tokenizer = load(write_model_folder(tmp_path / "m", seed=5), dtype="float32")
    messages = [{"role": "user", "content": COPYING[1]}]
    options = {"sampling": SamplingOptions(temperature=0.7, seed=11), "max_tokens": 40, "prompt_lookup": True}
    first = generate(model, tokenizer, messages=messages, **options)
    clock = random.Random(0)
    monkeypatch.setattr(speculative.time, "perf_counter", lambda: clock.random() * 1000)  # a machine gone erratic
    second = generate(model, tokenizer, messages=messages, **options)
    assert first.tokens == second.tokens
    lookup = speculative.PromptLookup([1, 2], sampling=SamplingOptions(temperature=0.7, seed=11))
    assert not lookup.controller.timed
    assert not mx.array_equal(lookup.key, mx.random.key(11)).item()  # not the sampler's key


def byte_spelled(processor) -> list[int]:
    """The forced tokens, all but the first spelled one byte-token each: grammar-valid, but not
    the tokens a model picks (the first stays, so the plain step confirms it and a pass runs)."""
    from nesso_mlx.constrained import _byte_tokens

    tokens = processor.matcher.compute_ff_tokens() if not processor.finished and not processor.matcher.is_stopped() else []
    rest = b"".join(processor.tokenizer.token_bytes(t) for t in tokens[1:])
    return tokens[:1] + _byte_tokens(processor.tokenizer, rest)


def test_merged_passes_keep_the_budget_and_the_cache(always_draft, copying, monkeypatch):
    """Forced tokens verified in the pass of the token before them: the same tokens as plain
    decoding whichever budget ends the reply (inside a pass, too), and the cache holds the prompt
    and every token handed out but the last, as `stream_generate` promises."""
    from nesso_mlx import stream_generate

    counts = merging(monkeypatch, True)
    model, tokenizer = load(nesso_folder("added"), dtype="float32")
    messages = [{"role": "user", "content": 'In JSON: {"nome": "Anna Bianchi", "città": "Bari"} ' * 2}]
    request = {"messages": messages, "response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}}
    prompt = tokenizer.apply_chat_template(messages)
    for max_tokens in (2, 3, 5, 8, 13, 40):
        plain = [c.token for c in stream_generate(model, tokenizer, max_tokens=max_tokens, **request)]
        cache = model.make_cache()
        chunks = stream_generate(model, tokenizer, max_tokens=max_tokens, prompt_lookup=True, cache=cache, **request)
        fast = [c.token for c in chunks]
        assert fast == plain, max_tokens
        assert cache[0].offset == len(prompt) + len(fast) - 1, max_tokens
    assert counts["merged"] > 0, counts


def test_a_merged_pass_hands_out_its_first_token_before_it_runs(always_draft, copying, monkeypatch):
    """The token whose pass takes the grammar's forced tokens reaches the caller before that pass
    runs (a streaming client sees it one pass sooner), and the reply is plain decoding's."""
    import nesso_mlx.generation as generation
    from nesso_mlx import stream_generate

    monkeypatch.setattr(speculative.LookupController, "merges_forced", property(lambda self: True))
    received: list[int] = []
    seen_at_pass: list[tuple[int, int]] = []  # (tokens the caller had, the pass's first token)
    original = generation.verify_draft

    def verify_draft(model, cache, first, *args, **kwargs):
        if kwargs.get("advanced"):
            seen_at_pass.append((len(received), first))
        return original(model, cache, first, *args, **kwargs)

    monkeypatch.setattr(generation, "verify_draft", verify_draft)
    model, tokenizer = load(nesso_folder("added"), dtype="float32")
    messages = [{"role": "user", "content": 'In JSON: {"nome": "Anna Bianchi", "città": "Bari"} ' * 2}]
    request = {"messages": messages, "response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}}
    plain = [c.token for c in stream_generate(model, tokenizer, max_tokens=30, **request)]
    for chunk in stream_generate(model, tokenizer, max_tokens=30, prompt_lookup=True, **request):
        received.append(chunk.token)
    assert received == plain
    assert seen_at_pass, "no merged pass ran"
    for had, first in seen_at_pass:
        assert had >= 1 and received[had - 1] == first, (had, first, received)


def test_an_interrupted_reply_leaves_every_layer_at_what_was_handed_out(always_draft, copying, monkeypatch):
    """The consumer stops after k tokens, or the grammar fails at its j-th mask, wherever that
    falls (a merged pass, a verify pass, a plain step): every layer holds the prompt and the
    tokens handed out but the last, and those tokens are plain decoding's."""
    from itertools import islice

    import nesso_mlx.constrained as constrained
    from nesso_mlx import stream_generate

    counts = merging(monkeypatch, True)
    model, tokenizer = load(nesso_folder("added"), dtype="float32")
    messages = [{"role": "user", "content": 'In JSON: {"nome": "Anna Bianchi", "città": "Bari"} ' * 2}]
    request = {"messages": messages, "response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}}
    prompt = tokenizer.apply_chat_template(messages)
    plain = [c.token for c in stream_generate(model, tokenizer, max_tokens=30, **request)]
    for k in range(1, len(plain)):
        cache = model.make_cache()
        chunks = stream_generate(model, tokenizer, max_tokens=30, prompt_lookup=True, cache=cache, **request)
        assert [c.token for c in islice(chunks, k)] == plain[:k]
        chunks.close()
        assert [layer.offset for layer in cache] == [len(prompt) + k - 1] * len(cache), k
    original, calls = constrained.GrammarProcessor.mask, {"n": 0, "fail": 0}

    def failing_mask(self):
        calls["n"] += 1
        if calls["n"] == calls["fail"]:
            raise RuntimeError("grammar failed")
        return original(self)

    monkeypatch.setattr(constrained.GrammarProcessor, "mask", failing_mask)
    for fail in range(2, 24, 3):
        calls.update(n=0, fail=fail)
        cache, out = model.make_cache(), []
        with pytest.raises(RuntimeError, match="grammar failed"):
            for chunk in stream_generate(model, tokenizer, max_tokens=30, prompt_lookup=True, cache=cache, **request):
                out.append(chunk.token)
        assert out == plain[: len(out)] and len(out) < len(plain), fail
        expected = len(prompt) + len(out) - 1 if out else 0
        assert [layer.offset for layer in cache] == [expected] * len(cache), fail
    assert counts["merged"] > 0 and always_draft["verifies"] > 0


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("variant", ["text", "added"])
@pytest.mark.parametrize("spelling", ["usual", "bytes"])
def test_grammar_forced_tokens_are_drafted_and_verified(monkeypatch, variant, spelling, merge):
    """A tool call's opening and a schema's keys are forced by the grammar: they are drafted even
    while n-gram drafting is paused (never here), and verified like any draft (a spelling the
    model would not choose is rejected): the output is plain decoding's."""
    from nesso_mlx.constrained import GrammarProcessor

    passes = []
    original = speculative.LookupController.verified

    def verified(self, drafted, accepted, seconds, forced=0, after_forced=False, **counts):
        passes.append((drafted, accepted))
        original(self, drafted, accepted, seconds, forced, after_forced, **counts)

    counts = merging(monkeypatch, merge)
    from nesso_mlx.model import Model

    logit_rows = []  # per verify pass: (positions, positions given logits)
    model_call = Model.__call__

    def call(self, inputs, cache=None, *, last_only=False, rows=None):
        if rows is not None:
            logit_rows.append((inputs.shape[1], len(rows)))
        return model_call(self, inputs, cache, last_only=last_only, rows=rows)

    monkeypatch.setattr(Model, "__call__", call)
    monkeypatch.setattr(speculative.LookupController, "wants_draft", lambda self: False)
    monkeypatch.setattr(speculative.LookupController, "follow_length", lambda self: 0)
    monkeypatch.setattr(speculative.LookupController, "verified", verified)
    if spelling == "bytes":
        monkeypatch.setattr(GrammarProcessor, "forced", byte_spelled)
    model, tokenizer = load(nesso_folder(variant), dtype="float32")
    messages = [{"role": "user", "content": "Trova Bari, poi rispondi in JSON."}]
    for request in (
        {"tools": [TOOL], "tool_choice": "required"},
        {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
    ):
        passes.clear()
        plain = generate(model, tokenizer, messages=messages, max_tokens=40, **request)
        fast = generate(model, tokenizer, messages=messages, max_tokens=40, prompt_lookup=True, **request)
        assert fast.tokens == plain.tokens, (request, spelling)
        assert passes, request  # drafting happened with the n-gram drafts off: forced tokens only
        assert (counts["merged"] > 0) == merge, counts
        if spelling == "usual":
            assert all(a == d for d, a in passes), passes  # the usual spelling is what greedy picks here
            if "tools" in request:  # '\n{"name": "trova", "arguments": {"testo":' after the open tag
                assert passes[0][0] >= 10, passes  # in one pass
                # where the grammar allows one token only, the pass computes no logits
                assert any(given < positions for positions, given in logit_rows), logit_rows
        else:  # byte by byte is rejected at once, by the model or, before the pass, by the mask
            # (which allows the usual spelling only): kept are at most the first forced token (in
            # the pass when merged; it keeps its usual spelling) and a byte that is a usual token
            assert max(a for _, a in passes) <= 1 + merge, passes


def test_controller_sizes_drafts_by_measured_cost_and_acceptance(monkeypatch):
    """Where a pass is dear (a CPU, ~0.45 step per drafted token), drafts stay short; where it is
    cheap (a GPU, ~0.05), they grow. The cost is measured, not assumed; drafting that never pays
    pauses and then probes with one token; grammar-forced tokens do not count as n-gram acceptance."""
    clock = [0.0]
    monkeypatch.setattr(speculative.time, "perf_counter", lambda: clock[0])

    def run(cost: float, keep: int, passes: int = 25, base: float = 1.0):
        controller = speculative.LookupController(max_draft=10)
        lengths, plain_between = [], []
        for _ in range(3):
            clock[0] += 1.0  # a plain step takes 1 s
            controller.plain_step()
        for _ in range(passes):
            plain = 0
            while not controller.wants_draft():
                clock[0] += 1.0
                controller.plain_step()
                plain += 1
            k = controller.k
            lengths.append(k)
            plain_between.append(plain)
            seconds = base - cost + cost * k if base > 1 else 1 + cost * k
            clock[0] += seconds
            controller.verified(k, min(k, keep), seconds)
            clock[0] += 1.0
            controller.plain_step()
        return lengths, plain_between, controller

    gpu, _, fast = run(cost=0.05, keep=2)
    cpu, _, slow = run(cost=0.45, keep=2)
    assert abs(fast.cost.per_token - 0.05) < 0.03 and abs(slow.cost.per_token - 0.45) < 0.05
    assert cpu[0] == gpu[0] == 1  # the first probe is short until the cost is known
    assert min(gpu[5:]) >= 4 and max(cpu[5:]) <= 3, (gpu, cpu)
    full, _, _ = run(cost=0.05, keep=10)
    assert full[-1] == 10  # everything kept and cheap: the longest drafts
    dear_short, _, dear = run(cost=0.45, keep=10, base=1.8)  # a CPU: even a 1-token pass costs 1.8 steps
    assert abs(dear.cost.base - 1.35) < 0.15 and abs(dear.cost.per_token - 0.45) < 0.05, dear.cost.sums
    assert dear_short[-1] == 10  # everything kept: long drafts amortize the dear pass
    never, waits, hopeless = run(cost=0.45, keep=0, passes=6)
    assert max(waits) >= speculative.LookupController.PAUSE - 1 and never[-1] == 1  # paused, then a 1-token probe
    assert hopeless.acceptance < 0.3

    controller = speculative.LookupController(timed=False)
    before = controller.acceptance
    controller.verified(10, 10, 1.0, forced=10)  # forced tokens only: nothing learnt about n-grams
    assert controller.acceptance == before
    follow = controller.follow_kept / (controller.follow_kept + controller.follow_rejected)
    controller.verified(12, 10, 1.0, forced=10)  # both tokens after the forced ones rejected:
    assert controller.acceptance == before  # counted apart from n-gram drafts
    assert controller.follow_kept / (controller.follow_kept + controller.follow_rejected) < follow
    controller.verified(3, 1, 1.0)  # an n-gram draft, partly rejected
    assert controller.acceptance < before
    before = controller.acceptance
    controller.confirmed(forced=False)  # a draft's first token is a draft token like the others
    confirmed = controller.acceptance
    assert confirmed > before
    controller.missed()
    assert controller.acceptance < confirmed and controller.misses == 1
    controller.misses = 0
    controller.probe = True
    controller.verified(5, 5, 1.0, forced=5)  # a forced pass does not use up the n-gram probe
    assert controller.probe
    forced_before = controller.forced_acceptance
    controller.missed(forced=True)  # the model spelled forced bytes its own way
    after_miss = controller.forced_acceptance
    assert after_miss < forced_before and controller.misses == 0
    controller.confirmed(forced=True)
    assert controller.forced_acceptance > after_miss

    controller.step_time, controller.forced_rate = 0.1, 0.2
    controller.host_time(0.001)
    assert not controller.merges_forced  # untimed (seeded sampling): never decided by the clock

    controller = speculative.LookupController()  # timed, first guess: 0.5 step per drafted token
    assert controller.merges_forced  # nothing measured yet: a reply's first forced run merges
    controller.forced_paused = 3
    assert not controller.merges_forced  # ... unless forced drafts pause
    controller.forced_paused = 0
    controller.step_time, controller.forced_rate = 0.1, 0.2  # a CPU: 100 ms steps, forced runs after 1 token in 5
    controller.host_time(0.004)  # the host's work on a token: far less than the 10 ms a forced run saves per token
    assert controller.merges_forced
    controller.step_time = 0.004  # a GPU: the same host work would idle it longer than merging saves
    assert not controller.merges_forced
    controller.step_time, controller.forced_paused = 0.1, 3  # forced drafts paused: nothing to merge
    assert not controller.merges_forced
    controller.forced_paused = 0
    controller.forced_kept = 0.5  # forced drafts hardly ever kept: not worth a pass
    assert controller.forced_length(20) == 2  # ... but one token to measure again, then a pause
    assert controller.forced_length(20) == 0
    for _ in range(speculative.LookupController.PAUSE):
        controller.plain_step()
    assert controller.forced_length(20) == 2  # the next probe


def test_a_pause_ends_when_foreseen_tokens_come_true():
    """While n-gram drafts pause, the n-gram's guess for each next token is checked against the
    token written (no pass spent); once drafting pays again by that count, the pause ends."""
    lookup = speculative.PromptLookup([1, 2, 3, 1, 2], sampling=SamplingOptions(temperature=0.5, seed=1))
    controller = lookup.controller  # untimed: a pass costs 1 + 0.1 k steps
    controller.kept, controller.rejected, controller.paused = 0.1, 3.0, 30  # hopeless so far
    assert lookup.next_draft() == ([], 0) and lookup._foresight == (5, 3)  # "1 2" was followed by 3
    lookup.index.append(4)  # not what it foresaw
    before = controller.acceptance
    lookup.next_draft()
    assert controller.acceptance < before and controller.paused
    resumed = None
    for step, token in enumerate([1, 2, 3] * 10):
        lookup.index.append(token)
        lookup.next_draft()
        if not controller.paused:
            resumed = step
            break
    assert resumed is not None and resumed < 20, (resumed, controller.acceptance)  # well before 30 steps

    def foreseeing(**state):
        lookup = speculative.PromptLookup([1, 2, 3, 1, 2], sampling=SamplingOptions(temperature=0.5, seed=1))
        vars(lookup.controller).update(state)
        lookup.next_draft()
        assert lookup._foresight == (5, 3)
        return lookup

    lookup = foreseeing(kept=100.0, rejected=1.0, paused=30)  # drafting would pay, yet a miss
    lookup.index.append(7)
    lookup.next_draft()
    assert lookup.controller.paused == 28  # ends no pause
    lookup = foreseeing(kept=100.0, rejected=1.0, paused=16, _missed_pause=True)  # first tokens missed in
    lookup.index.append(3)  # a row: even a hit ends no such pause (each miss cost a wait)
    lookup.next_draft()
    assert lookup.controller.paused == 14
    lookup = foreseeing(kept=100.0, rejected=1.0, paused=30)
    lookup.index.append(3)
    lookup.next_draft()
    assert lookup.controller.paused == 0  # a hit when drafting pays does


@pytest.mark.parametrize("kind", ["tiny", "nesso-text"])
def test_batch_decoder_drafts_for_a_row_alone_and_gives_plain_output(always_draft, tmp_path, kind):
    """The decoder verifies drafts for a row while it is alone, steps it one token at a time while
    another row shares the batch, and the tokens are plain decoding's."""
    from nesso_mlx.generation import Decoder, Row, prefill
    from nesso_mlx.sampling import greedy, vocab_limit_processor

    folder = write_model_folder(tmp_path / "m", seed=5) if kind == "tiny" else nesso_folder("text")
    model, tokenizer = load(folder, dtype="float32")
    processors = [induction]  # copies, so drafts are confirmed
    if model.args.vocab_size > tokenizer.vocab_size:
        processors.append(vocab_limit_processor(tokenizer.vocab_size, model.args.vocab_size))
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}]) for text in COPYING[:2]]
    plain = [generate(model, tokenizer, ids, max_tokens=30, logits_processors=[induction]).tokens for ids in prompts]

    def row(ids, lookup=True):
        cache = model.make_cache()
        logits = prefill(model, mx.array(ids), cache)
        lookup = speculative.PromptLookup(ids, max_tokens=30, stop_ids=tokenizer.eos_token_ids) if lookup else None
        return Row(greedy, processors, mx.array(ids), lookup=lookup), cache, logits

    decoder = Decoder(model)
    first, *joined = row(prompts[0])
    decoder.add(first, *joined)
    got: dict[int, list[int]] = {0: [], 1: []}
    second = None
    for step in range(40):
        if step == 3:  # a second row joins: both step one token at a time until it leaves
            second, *joined = row(prompts[1], lookup=False)
            decoder.add(second, *joined)
        verifies = always_draft["verifies"]
        for item in decoder.step():
            assert item.error is None
            got[0 if item.row is first else 1].append(item.token)
        if second is not None and second in decoder.rows:
            assert always_draft["verifies"] == verifies  # no drafts while batched
            if len(got[1]) >= 6:
                decoder.remove(second)
        else:  # alone: the cache holds the prompt and every token handed out (the last one's pass queued)
            assert all(layer.offset == len(prompts[0]) + len(got[0]) for layer in decoder.cache)
        if len(got[0]) >= 30 or (got[0] and got[0][-1] in tokenizer.eos_token_ids):
            break
    n = len(plain[0])
    assert got[0][:n] == plain[0], kind
    assert got[1] == plain[1][:6]
    assert always_draft["verifies"] > 2 and always_draft["accepted"] > 0, always_draft


def test_decoder_lookup_errors(always_draft, tmp_path, monkeypatch):
    """An error while a lone row's draft is made is that row's (as in a plain step): it comes in
    place of the step's token. A failure inside its verify pass (the model's pass) escapes `step`,
    as a plain pass's does. Either way the row's cache taken out ends where `remove` promises."""
    import nesso_mlx.generation as generation
    from nesso_mlx.generation import Decoder, Row, prefill
    from nesso_mlx.sampling import greedy

    model, tokenizer = load(write_model_folder(tmp_path / "m", seed=5), dtype="float32")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": COPYING[0]}])

    def decoder_alone() -> tuple[Decoder, Row]:
        cache = model.make_cache()
        logits = prefill(model, mx.array(ids), cache)
        row = Row(greedy, [induction], mx.array(ids), lookup=speculative.PromptLookup(ids, max_tokens=40))
        decoder = Decoder(model)
        decoder.add(row, cache, logits)
        return decoder, row

    decoder, row = decoder_alone()
    with monkeypatch.context() as patch:  # a plain step, then the draft the next step may verify
        patch.setattr(speculative.PromptLookup, "draft", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("draft")))
        [item] = decoder.step()
    assert item.row is row and item.token == -1 and str(item.error) == "draft"
    decoder.remove(row)  # the row leaves; the decoder goes on
    assert len(decoder) == 0

    decoder, row = decoder_alone()
    monkeypatch.setattr(generation, "verify_draft", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("verify")))
    taken: list[int] = []
    with pytest.raises(RuntimeError, match="verify"):
        for _ in range(20):
            taken += [item.token for item in decoder.step()]
    assert taken
    cache = decoder.remove(row, len(taken))
    assert [layer.offset for layer in cache] == [len(ids) + len(taken) - 1] * len(cache)


def test_a_draft_the_grammar_takes_none_of_counts_as_a_miss():
    """After the confirmed token, the grammar may reject the whole rest of a draft (an n-gram
    spelling `","` where compact JSON wants `", "`): the pass then verifies nothing, and it counts
    as a miss, so drafts like it pause instead of costing a synchronous step each time."""
    from nesso_mlx.constrained import build_processor
    from nesso_mlx.generation import prefill, verify_draft

    model, tokenizer = load(nesso_folder("text"), dtype="float32")
    grammar = build_processor(tokenizer, model.args.vocab_size, None, "auto", {"type": "json_object"})
    text = tokenizer.encode('{"nome": "Anna","citta": "Bari"}', add_special_tokens=False)
    at = next(i for i, t in enumerate(text) if tokenizer.decode([t]).strip() == "Anna")
    for token in text[:at]:
        grammar.advance(token)
    cache = model.make_cache()
    prefill(model, mx.array(text[:at]), cache)
    lookup = speculative.PromptLookup(text)
    kept, _ = verify_draft(model, cache, text[at], text[at + 1 : at + 4], lookup, (), None, grammar, 0)
    assert kept == [] and lookup.controller.drafted == 0  # nothing was verified
    assert lookup.controller.misses == 1


def test_a_draft_the_mask_cuts_at_once_counts_once():
    """A drafted spelling the grammar's mask does not allow (it allows the usual token only) ends
    the draft before the pass: one miss, counted once, and the streak of misses goes on; after a
    confirmed forced token it counts against the follow-ups, not against forced drafts."""
    from nesso_mlx.constrained import _byte_tokens, build_processor
    from nesso_mlx.generation import prefill, verify_draft

    model, tokenizer = load(nesso_folder("text"), dtype="float32")
    schema = {"type": "object", "properties": {"nome": {"type": "string"}}, "required": ["nome"]}
    response_format = {"type": "json_schema", "json_schema": {"schema": schema}}
    for after_forced in (False, True):
        grammar = build_processor(tokenizer, model.args.vocab_size, None, "auto", response_format)
        first = grammar.forced()[0]  # '{"' : then the key, forced, whose usual token is the only one allowed
        cache = model.make_cache()
        prompt = tokenizer.encode("Nome?", add_special_tokens=False)
        prefill(model, mx.array(prompt), cache)
        lookup = speculative.PromptLookup(prompt)
        controller = lookup.controller
        controller.misses = 2
        forced_before, follow_before = controller.forced_acceptance, controller.follow_rejected
        spelled = _byte_tokens(tokenizer, b"nome")  # the key byte by byte: try_consume takes it, the mask does not
        kept, following = verify_draft(model, cache, first, spelled, lookup, (), None, grammar, 0, after_forced=after_forced)
        assert kept == [] and tokenizer.decode([following]) == "nome"  # the one allowed token
        assert cache[0].offset == len(prompt) + 1
        if after_forced:
            assert controller.misses == 2 and controller.follow_rejected > follow_before
            assert controller.forced_acceptance == forced_before
        else:
            assert controller.misses == 3  # one more miss, and the streak is not reset


def test_decoder_refuses_lookup_with_logprobs(tmp_path):
    from nesso_mlx.generation import Decoder, Row
    from nesso_mlx.sampling import greedy

    model, _ = load(write_model_folder(tmp_path / "m", seed=5), dtype="float32")
    cache = model.make_cache()
    logits = model(mx.array([[1, 2, 3]]), cache)[:, -1, :]
    decoder = Decoder(model)
    with pytest.raises(ValueError, match="top_logprobs"):
        decoder.add(Row(greedy, top_logprobs=1, lookup=speculative.PromptLookup([1, 2, 3])), cache, logits)
    assert len(decoder) == 0


def test_lm_head_share_of_a_position():
    """What a position given no logits saves, for the pass cost line: the LM head's share of a
    position's weights (Nesso-0.4B's shape by hand; an explicit head_dim counts)."""
    from types import SimpleNamespace

    from nesso_mlx.config import ModelArgs
    from nesso_mlx.generation import _lm_head_share

    nesso = ModelArgs(
        hidden_size=960,
        num_hidden_layers=32,
        intermediate_size=2560,
        num_attention_heads=15,
        num_key_value_heads=5,
        vocab_size=128258,
    )
    layer = 2 * 960 * 960 + 2 * 960 * 320 + 3 * 960 * 2560
    assert _lm_head_share(SimpleNamespace(args=nesso)) == pytest.approx(128258 * 960 / (128258 * 960 + 32 * layer))
    wide = ModelArgs(
        hidden_size=64,
        num_hidden_layers=1,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        vocab_size=100,
    )
    layer = 2 * 64 * 128 + 2 * 64 * 32 + 3 * 64 * 64
    assert _lm_head_share(SimpleNamespace(args=wide)) == pytest.approx(6400 / (6400 + layer))
    assert _lm_head_share(object()) == 0.0  # a model without arguments: a position counts in full
