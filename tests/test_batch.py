"""Batched decoding: `batch_generate` gives each request the reply `generate` gives it alone."""

from __future__ import annotations

import json

import jsonschema
import mlx.core as mx
import pytest
from conftest import write_model_folder
from nesso_fixture import nesso_folder

from nesso_mlx import generate, load
from nesso_mlx.api import batch_generate
from nesso_mlx.batch import merge_caches, row_cache
from nesso_mlx.cache import rollback_cache
from nesso_mlx.generation import Decoder, Row
from nesso_mlx.sampling import SamplingOptions, make_sampler, vocab_limit_processor

PROMPTS = [
    "Ciao! Come stai oggi?",
    "Elenca i giorni della settimana: lunedì, martedì, mercoledì",
    "x",
    "Scrivi una frase lunga, molto lunga, sulla città di Bologna e sui suoi portici.",
    "1 2 3 4 5",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load(write_model_folder(tmp_path_factory.mktemp("batch") / "m", seed=5), dtype="float32")


def chat(text: str, **options) -> dict:
    return {"messages": [{"role": "user", "content": text}], **options}


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_greedy_replies_equal_generate_alone(tiny, batch_size):
    """Different prompt lengths (left padding), different budgets (rows leave at different steps,
    and waiting requests take their slots)."""
    model, tokenizer = tiny
    requests = [chat(p, max_tokens=6 + 3 * i) for i, p in enumerate(PROMPTS)]
    alone = [generate(model, tokenizer, **r) for r in requests]
    together = batch_generate(model, tokenizer, requests, batch_size=batch_size)
    for a, b in zip(alone, together, strict=True):
        assert b.tokens == a.tokens and b.text == a.text and b.finish_reason == a.finish_reason
        assert b.prompt_tokens == a.prompt_tokens and b.generation_tokens == len(b.tokens)


def test_sampling_options_per_request(tiny):
    """Seeded sampling, repetition penalty, stop strings and plain prompts, each request its own."""
    model, tokenizer = tiny
    requests = [
        chat(PROMPTS[0], max_tokens=12, sampling=SamplingOptions(temperature=0.8, seed=3)),
        chat(PROMPTS[1], max_tokens=12, sampling=SamplingOptions(temperature=1.0, top_p=0.9, seed=4, repetition_penalty=1.3)),
        PROMPTS[3],
        chat(PROMPTS[4], max_tokens=12, sampling=SamplingOptions(temperature=0.7, top_k=5, min_p=0.05, seed=9)),
    ]
    alone = [
        generate(model, tokenizer, **r) if isinstance(r, dict) else generate(model, tokenizer, r, max_tokens=9) for r in requests
    ]
    together = batch_generate(model, tokenizer, requests, batch_size=4, max_tokens=9)
    for a, b in zip(alone, together, strict=True):
        assert b.tokens == a.tokens
    # a stop string taken from a reply cuts it there, in the batch as alone
    stop = together[2].text[3:6]
    cut = batch_generate(model, tokenizer, [PROMPTS[3], PROMPTS[0]], max_tokens=9, stop=[stop])
    assert cut[0].text == together[2].text[: together[2].text.index(stop)] and cut[0].finish_reason == "stop"


SCHEMA = {
    "type": "object",
    "properties": {"città": {"type": "string", "maxLength": 12}, "ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
    "required": ["città", "ok", "n"],
    "additionalProperties": False,
}
TOOL = {
    "type": "function",
    "function": {
        "name": "meteo",
        "parameters": {"type": "object", "properties": {"città": {"type": "string", "maxLength": 16}}, "required": ["città"]},
    },
}


@pytest.mark.parametrize("variant", ["text", "added"])
def test_constrained_rows_in_one_batch(variant):
    """On Nesso's vocabulary: a JSON-schema row, a required-call row, an auto row and a free row
    decode together; each gives what it gives alone, and the constrained ones are valid."""
    model, tokenizer = load(nesso_folder(variant), dtype="float32")
    requests = [
        chat("Estrai: Roma, sì, 2", response_format={"type": "json_schema", "json_schema": {"schema": SCHEMA}}, max_tokens=48),
        chat("Che tempo fa a Bari?", tools=[TOOL], tool_choice="required", max_tokens=48),
        chat("Ciao", tools=[TOOL], tool_choice="auto", max_tokens=10),
        chat("Ciao", max_tokens=10),
    ]
    for seed in (0, 1):
        options = {"sampling": SamplingOptions(temperature=0.9, seed=seed)}
        alone = [generate(model, tokenizer, **r, **options) for r in requests]
        together = batch_generate(model, tokenizer, requests, batch_size=4, **options)
        for a, b in zip(alone, together, strict=True):
            assert b.tokens == a.tokens and b.finish_reason == a.finish_reason
        assert together[0].finish_reason == "stop"  # a bounded schema finishes within its budget
        jsonschema.validate(json.loads(together[0].text), SCHEMA)
        call = together[1]
        assert call.finish_reason == "tool_calls"  # a required call always completes within the budget
        assert call.tool_calls[0].ok and call.tool_calls[0].name == "meteo"


@pytest.fixture
def sampled_alone(monkeypatch) -> list:
    """The rows `Decoder.step` samples one by one (not in a grouped argmax) in a batch of several,
    step after step (a row's first token, drawn when it joins, is not counted)."""
    rows, stepping = [], [False]
    original_sample, original_step = Decoder._sample, Decoder.step

    def count(row, *args):
        if stepping[0]:
            rows.append(row)
        return original_sample(row, *args)

    def step(self):
        stepping[0] = len(self.rows) > 1
        try:
            return original_step(self)
        finally:
            stepping[0] = False

    monkeypatch.setattr(Decoder, "_sample", staticmethod(count))
    monkeypatch.setattr(Decoder, "step", step)
    return rows


def test_decoder_joins_and_leaves_between_steps(tiny, sampled_alone):
    """Continuous batching by hand: a sequence joins mid-way; one leaves; the others go on as alone,
    and a row's cache taken out holds exactly its positions."""
    model, tokenizer = tiny
    assert model.args.vocab_size > tokenizer.vocab_size  # padding rows: each row has the vocabulary limit
    prompts = [tokenizer.encode(p) for p in PROMPTS[:3]]
    alone = [generate(model, tokenizer, p, max_tokens=8).tokens for p in prompts]

    def prefilled(ids):
        cache = model.make_cache()
        logits = model(mx.array([ids]), cache)[:, -1, :]
        return cache, logits

    # as `generate` does: the model's padding rows past the tokenizer's vocabulary are banned
    limit = [vocab_limit_processor(tokenizer.vocab_size, model.args.vocab_size)]
    decoder = Decoder(model)
    got: dict[int, list[int]] = {0: [], 1: [], 2: []}
    seqs = {}
    for i in (0, 1):
        seqs[i] = Row(make_sampler(0.0), limit, mx.array(prompts[i]), data=i)
        decoder.add(seqs[i], *prefilled(prompts[i]))
    for step in range(8):
        if step == 3:
            seqs[2] = Row(make_sampler(0.0), limit, mx.array(prompts[2]), data=2)
            decoder.add(seqs[2], *prefilled(prompts[2]))
        for item in decoder.step():
            got[item.row.data].append(item.token)
        if step == 4:
            cache = decoder.remove(seqs[0])
            assert cache[0].offset == len(prompts[0]) + 5  # the prompt and its 5 tokens (the 5th's pass queued)
            assert all(layer.offset == cache[0].offset for layer in cache)
    for _ in range(3):
        for item in decoder.step():
            got[item.row.data].append(item.token)
    assert got[0] == alone[0][:5]
    assert len(got[1]) == 11 and got[1][:8] == alone[1]
    assert got[2] == alone[2]  # joined at step 3: 5 + 3 tokens
    # Greedy rows whose only processor is the vocabulary limit take one argmax together.
    assert not sampled_alone
    # the removed row's cache, rolled back to before its last token, goes on as the row alone would
    rollback_cache(cache, len(prompts[0]) + 4)
    assert generate(model, tokenizer, [got[0][-1]], cache=cache, max_tokens=3).tokens == alone[0][5:8]


def test_merge_and_row_cache_round_trip(tiny):
    model, _ = tiny
    caches = []
    for n in (3, 7, 5):
        cache = model.make_cache()
        model(mx.arange(n)[None] + 4, cache)
        caches.append(cache)
    batch = merge_caches(caches)
    assert batch[0].offset == 7 and batch[0].rows.start_list == [4, 0, 2]
    for i, cache in enumerate(caches):
        row = row_cache(batch, i)
        for a, b in zip(row, cache, strict=True):
            assert a.offset == b.offset
            assert mx.array_equal(a.state[0], b.state[0]).item() and mx.array_equal(a.state[1], b.state[1]).item()


def test_bad_requests(tiny):
    model, tokenizer = tiny
    with pytest.raises(TypeError, match="unexpected"):
        batch_generate(model, tokenizer, ["a"], prompt_lookup=True)
    with pytest.raises(ValueError, match="batch_size"):
        batch_generate(model, tokenizer, ["a"], batch_size=0)
    assert batch_generate(model, tokenizer, []) == []


@pytest.mark.parametrize("variant", ["text", "added"])
def test_seeded_tool_call_after_a_trigger_equals_generate(variant):
    """An "auto" call that really starts (the opening tag forced as the 2nd token): the grammar
    switches on mid-reply, and seeded sampling still draws what `generate` draws."""
    model, tokenizer = load(nesso_folder(variant), dtype="float32")
    messages = [{"role": "user", "content": "Che tempo fa a Bari?"}]
    n_prompt = len(tokenizer.apply_chat_template(messages, tools=[TOOL]))
    opening = tokenizer.encode("<tool_call>", add_special_tokens=False)

    def force_call(tokens: mx.array, logits: mx.array) -> mx.array:
        at = tokens.size - n_prompt - 1  # the 2nd generated token onwards: the opening tag
        if 0 <= at < len(opening):
            return mx.where(mx.arange(logits.shape[-1])[None] == opening[at], mx.zeros_like(logits), -mx.inf)
        return logits

    request = {"messages": messages, "tools": [TOOL], "tool_choice": "auto", "max_tokens": 40, "logits_processors": [force_call]}
    for seed in (7, 8):
        alone = generate(model, tokenizer, **request, sampling=SamplingOptions(temperature=1.0, seed=seed))
        assert "<tool_call>" in alone.raw_text  # the trigger did fire
        together = batch_generate(
            model, tokenizer, [request, chat("Ciao", max_tokens=30)], sampling=SamplingOptions(temperature=1.0, seed=seed)
        )
        assert together[0].tokens == alone.tokens
        if alone.finish_reason == "tool_calls":
            assert together[0].tool_calls[0].name == "meteo"


def test_a_trigger_draws_its_position_again_with_the_same_key():
    """Seeded sampling takes one key per position: the position where an "auto" call's grammar
    switches on is drawn again, masked, with the key it had, so a reply with a trigger uses as
    many keys as its positions (checked against MLX's own key splitting, not another decode loop)."""
    from nesso_mlx.constrained import build_processor
    from nesso_mlx.generation import prefill

    model, tokenizer = load(nesso_folder("text"), dtype="float32")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Che tempo fa a Bari?"}], tools=[TOOL])
    opening = tokenizer.encode("<tool_call>", add_special_tokens=False)

    def force_call(tokens: mx.array, logits: mx.array) -> mx.array:
        at = tokens.size - len(ids) - 1  # the 2nd generated token onwards: the opening tag
        if 0 <= at < len(opening):
            return mx.where(mx.arange(logits.shape[-1])[None] == opening[at], mx.zeros_like(logits), -mx.inf)
        return logits

    def split(k: int) -> mx.array:
        key = mx.random.key(7)
        for _ in range(k):
            key, _ = mx.random.split(key)
        return key

    extra_keys = {}
    for trigger in (False, True):
        sampler = make_sampler(1.0, seed=7)
        constraint = build_processor(tokenizer, model.args.vocab_size, [TOOL], "auto")
        cache = model.make_cache()
        logits = prefill(model, mx.array(ids), cache)
        row = Row(sampler, [force_call] if trigger else [], mx.array(ids), constraint)
        decoder = Decoder(model)
        decoder.add(row, cache, logits)
        tokens = [item.token for _ in range(len(opening) + 4) for item in decoder.step()]
        assert (constraint.matcher is not None) == trigger  # the grammar switched on only when forced
        used = next(k for k in range(len(tokens) + 8) if mx.array_equal(sampler.key_state["key"], split(k)).item())
        extra_keys[trigger] = used - len(tokens)  # the pending draw(s) ahead of what was handed out
    assert extra_keys[True] == extra_keys[False], extra_keys


def test_one_sequence_failing_leaves_the_others_alone(tiny):
    model, tokenizer = tiny
    prompts = [tokenizer.encode(p) for p in PROMPTS[:3]]
    alone = [generate(model, tokenizer, p, max_tokens=6).tokens for p in prompts]
    limit = [vocab_limit_processor(tokenizer.vocab_size, model.args.vocab_size)]
    calls = {"n": 0}

    def breaks_on_third_call(tokens: mx.array, logits: mx.array) -> mx.array:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("a processor bug")
        return logits

    decoder = Decoder(model)
    seqs = []
    for i, ids in enumerate(prompts):
        cache = model.make_cache()
        logits = model(mx.array([ids]), cache)[:, -1, :]
        extra = [breaks_on_third_call] if i == 1 else []
        seqs.append(Row(make_sampler(0.0), [*limit, *extra], mx.array(ids), data=i))
        decoder.add(seqs[-1], cache, logits)
    got: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for _ in range(6):
        for item in decoder.step():
            if item.error is not None:
                assert item.row is seqs[1] and "processor bug" in str(item.error)
                decoder.remove(item.row)
                continue
            got[item.row.data].append(item.token)
    # The 3rd call draws token 2 in the step that hands out token 1: the error takes its place
    # (as `stream_generate` raises before handing out the token whose step failed).
    assert got[0] == alone[0] and got[2] == alone[2] and got[1] == alone[1][:1]
    with pytest.raises(RuntimeError, match="processor bug"):  # batch_generate hands the error to its caller
        calls["n"] = 0
        batch_generate(model, tokenizer, [chat("a", logits_processors=[breaks_on_third_call]), chat("b")], max_tokens=6)


def test_quantized_or_bounded_caches_decode_alone_and_are_refused_in_a_batch(tmp_path):
    """A row alone decodes in its own cache, whatever its kind, as `generate` does; a second row
    cannot join it (the batch cache is full-precision and unbounded): refused in one line."""
    from conftest import TINY_CONFIG

    from nesso_mlx.errors import NessoError

    config = dict(TINY_CONFIG, hidden_size=128, num_attention_heads=2, num_key_value_heads=1)  # head_dim 64
    model, tokenizer = load(write_model_folder(tmp_path / "m", config), dtype="float32")
    for options in ({"kv_bits": 8}, {"max_kv_size": 64}):
        want = generate(model, tokenizer, [1, 2, 3], max_tokens=4, cache=model.make_cache(**options)).tokens
        cache = model.make_cache(**options)
        decoder = Decoder(model)
        row = Row(make_sampler(0.0))
        decoder.add(row, cache, model(mx.array([[1, 2, 3]]), cache)[:, -1, :])
        got = [decoder.step()[0].token for _ in range(2)]
        other = model.make_cache()
        with pytest.raises(NessoError, match="full-precision, unbounded"):
            decoder.add(Row(make_sampler(0.0)), other, model(mx.array([[1, 2]]), other)[:, -1, :])
        assert len(decoder) == 1 and decoder.cache is cache
        got += [decoder.step()[0].token for _ in range(2)]
        assert got == want
        assert decoder.remove(row, 4) is cache and cache[0].offset == 3 + 3


def test_plain_greedy_rows_grouped_and_told_apart(tmp_path, sampled_alone):
    """Rows with nothing but the greedy sampler share one argmax, and equal-looking rows are still
    different rows: removing the second takes out the second."""
    from conftest import TINY_CONFIG

    model, tokenizer = load(write_model_folder(tmp_path / "m", dict(TINY_CONFIG, vocab_size=265), seed=3), dtype="float32")
    assert model.args.vocab_size == tokenizer.vocab_size  # no padding rows: no processors at all
    prompts = [tokenizer.encode(p) for p in PROMPTS[:3]]
    alone = [generate(model, tokenizer, p, max_tokens=6).tokens for p in prompts]
    decoder = Decoder(model)
    seqs = [Row(make_sampler(0.0)) for _ in prompts]
    assert seqs[0] != seqs[1]
    for seq, ids in zip(seqs, prompts, strict=True):
        cache = model.make_cache()
        decoder.add(seq, cache, model(mx.array([ids]), cache)[:, -1, :])
    got: list[list[int]] = [[], [], []]
    for step in range(6):
        for item in decoder.step():
            got[seqs.index(item.row)].append(item.token)  # identity: no two rows are equal
        if step == 2:
            cache = decoder.remove(seqs[1])
            assert cache[0].offset == len(prompts[1]) + 3 and decoder.rows == [seqs[0], seqs[2]]
    assert got[0] == alone[0] and got[2] == alone[2] and got[1] == alone[1][:3]
    assert not sampled_alone  # every step took the rows' tokens from one grouped argmax
    shared = [lambda tokens, logits: logits]  # one processor list shared by every request
    requests = [{"prompt": p, "max_tokens": 3 + 2 * i} for i, p in enumerate(PROMPTS[:3])]
    together = batch_generate(model, tokenizer, requests, logits_processors=shared)
    assert [r.tokens for r in together] == [generate(model, tokenizer, **r).tokens for r in requests]


def test_a_join_that_fails_leaves_the_batch_as_it_was(tiny, tmp_path):
    model, tokenizer = tiny
    ids = tokenizer.encode(PROMPTS[1])
    alone = generate(model, tokenizer, ids, max_tokens=5).tokens
    limit = [vocab_limit_processor(tokenizer.vocab_size, model.args.vocab_size)]
    decoder = Decoder(model)
    cache = model.make_cache()
    first = Row(make_sampler(0.0), limit, mx.array(ids))
    decoder.add(first, cache, model(mx.array([ids]), cache)[:, -1, :])
    got = [decoder.step()[0].token]
    short = model.make_cache()[:1]  # one layer: cannot join a batch of this model's layers
    model.layers[0](mx.zeros((1, 2, model.args.hidden_size)), short[0])
    with pytest.raises(ValueError):
        decoder.add(Row(make_sampler(0.0)), short, mx.zeros((1, model.args.vocab_size)))
    assert len(decoder) == 1 and decoder.rows == [first]
    for _ in range(4):
        got.append(decoder.step()[0].token)
    assert got == alone
