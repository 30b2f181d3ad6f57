"""Generation on the real SmolLM2 model (against mlx-lm) and on tiny models with scripted logits."""

from __future__ import annotations

import mlx.core as mx
import pytest

from nesso_mlx import generate, load, stream_generate
from nesso_mlx.errors import ContextLengthError
from nesso_mlx.sampling import SamplingOptions, make_sampler, repetition_penalty_processor

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


# --- the real model ----------------------------------------------------------------------------


def test_smollm2_answers_paris(smollm2):
    model, tokenizer = smollm2
    result = generate(model, tokenizer, messages=FRANCE, max_tokens=24)
    assert "Paris" in result.text
    assert result.finish_reason == "stop" and result.tokens[-1] in tokenizer.eos_token_ids
    assert result.prompt_tokens == len(tokenizer.apply_chat_template(FRANCE))
    assert result.generation_tokens == len(result.tokens) and result.prompt_tps > 0


def test_greedy_tokens_equal_mlx_lm(smollm2, smollm2_path):
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model

    model, tokenizer = smollm2
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours."}])
    ours = generate(model, tokenizer, prompt, max_tokens=16).tokens
    reference, _ = load_model(smollm2_path)
    theirs = [
        int(t)
        for t, _ in generate_step(mx.array(prompt), reference, max_tokens=len(ours), sampler=lambda lp: mx.argmax(lp, axis=-1))
    ]
    assert ours == theirs


def test_logprobs_equal_mlx_lm(smollm2, smollm2_path):
    """Each token's logprob and its top alternatives, against mlx-lm's own generate_step (float32)."""
    from mlx.utils import tree_map
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model

    model, tokenizer = load(smollm2_path, dtype="float32")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Dimmi un colore."}])
    chunks = list(stream_generate(model, tokenizer, prompt, max_tokens=8, top_logprobs=4))
    reference, _ = load_model(smollm2_path)
    reference.update(tree_map(lambda p: p.astype(mx.float32), reference.parameters()))
    steps = generate_step(mx.array(prompt), reference, max_tokens=len(chunks), sampler=lambda lp: mx.argmax(lp, axis=-1))
    for chunk, (token, logprobs) in zip(chunks, steps, strict=True):
        assert chunk.token == int(token)
        assert chunk.logprobs.logprob == pytest.approx(logprobs[chunk.token].item(), abs=1e-3)
        best = mx.argsort(-logprobs)[:4].tolist()
        assert [t for t, _ in chunk.logprobs.top][:2] == best[:2]  # ties among the rest may order either way
        for token_id, value in chunk.logprobs.top:
            assert value == pytest.approx(logprobs[token_id].item(), abs=1e-3)
    assert chunks[0].logprobs.top[0][0] == chunks[0].token  # greedy takes the best
    assert generate(model, tokenizer, prompt, max_tokens=2).tokens == [c.token for c in chunks[:2]]


def test_italian_stream_equals_decode(smollm2):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "Scrivi una frase sulla città di Napoli, con accenti."}]
    chunks = list(
        stream_generate(model, tokenizer, messages=messages, max_tokens=24, sampling=SamplingOptions(temperature=0.8, seed=3))
    )
    tokens = [c.token for c in chunks]
    text = "".join(c.text for c in chunks)
    assert text == tokenizer.decode([t for t in tokens if t not in tokenizer.eos_token_ids])
    assert chunks[-1].finish_reason in ("stop", "length") and all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].generation_tokens == len(tokens) and chunks[-1].peak_memory >= 0


def test_stop_string_on_real_model(smollm2):
    model, tokenizer = smollm2
    result = generate(model, tokenizer, messages=FRANCE, max_tokens=24, stop=["Paris"])
    assert result.finish_reason == "stop" and "Paris" not in result.text
    assert result.text.startswith("The capital of France is")


# --- tiny models with scripted logits --------------------------------------------------------


@pytest.fixture
def tiny(tiny_folder):
    return load(tiny_folder)


def script(tokenizer, text: str = "", then: int | None = None, ids: list[int] | None = None):
    """A logits processor that forces `ids`, or the tokens of `text` followed by `then` (e.g. EOS)."""
    if ids is None:
        ids = tokenizer.encode(text, add_special_tokens=False) + ([then] if then is not None else [])
    seen = {}

    def force(tokens: mx.array, logits: mx.array) -> mx.array:
        step = tokens.size - seen.setdefault("prompt", tokens.size)
        target = ids[min(step, len(ids) - 1)]
        return mx.where(mx.arange(logits.shape[-1]) == target, 100.0, -100.0)[None].astype(logits.dtype)

    return force


def test_stop_string_is_not_returned_and_partial_match_is_held(tiny):
    model, tokenizer = tiny
    force = script(tokenizer, "hello world, the end")
    chunks = list(stream_generate(model, tokenizer, "hi", max_tokens=40, stop=["world,", "zzz"], logits_processors=[force]))
    assert "".join(c.text for c in chunks) == "hello "
    assert chunks[-1].finish_reason == "stop"
    assert not any("w" in c.text for c in chunks)  # "w", "wo", ... were held back, never emitted


def test_eos_stops_and_max_tokens_gives_length(tiny):
    model, tokenizer = tiny
    eos = tokenizer.eos_token_ids[0]
    done = generate(model, tokenizer, "hi", max_tokens=40, logits_processors=[script(tokenizer, "ab", then=eos)])
    assert done.text == "ab" and done.finish_reason == "stop" and done.tokens[-1] == eos
    cut = generate(model, tokenizer, "hi", max_tokens=5, logits_processors=[script(tokenizer, "abcdefghij")])
    assert cut.text == "abcde" and cut.finish_reason == "length" and cut.generation_tokens == 5


def test_rows_beyond_the_tokenizer_are_never_sampled(tiny):
    model, tokenizer = tiny
    pad_row = tokenizer.vocab_size + 10  # an embedding row no tokenizer id maps to

    def prefer_pad(tokens, logits):
        return mx.where(mx.arange(logits.shape[-1]) == pad_row, 1e4, logits)

    result = generate(
        model, tokenizer, "hi", max_tokens=8, logits_processors=[prefer_pad], sampling=SamplingOptions(temperature=1.0, seed=0)
    )
    assert all(t < tokenizer.vocab_size for t in result.tokens)


def test_seed_reproducible(tiny):
    model, tokenizer = tiny
    runs = [
        generate(model, tokenizer, "the", max_tokens=12, sampling=SamplingOptions(temperature=1.0, seed=s)).tokens
        for s in (7, 7, 8)
    ]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_prompt_as_ids_or_messages(tiny):
    model, tokenizer = tiny
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    a = generate(model, tokenizer, ids, max_tokens=6).tokens
    b = generate(model, tokenizer, messages=[{"role": "user", "content": "hi"}], max_tokens=6).tokens
    assert a == b
    with pytest.raises(ValueError, match="exactly one"):
        generate(model, tokenizer, "x", messages=[{"role": "user", "content": "hi"}])


def test_ids_outside_the_embedding_are_refused(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="token id 320 is outside the model's 320 embedding rows"):
        generate(model, tokenizer, [5, 320])


def test_context_window(tiny):
    model, tokenizer = tiny
    context = model.args.max_position_embeddings
    with pytest.raises(ContextLengthError, match=f"context window is {context}"):
        generate(model, tokenizer, [5] * (context + 3))
    result = generate(model, tokenizer, [5] * (context - 4), max_tokens=100)
    assert result.finish_reason == "length" and result.generation_tokens == 4


def test_cache_continues_a_conversation(tiny):
    """After a reply, the cache holds prompt + reply minus its last token; continuing from it
    gives the same tokens as starting over from the whole text."""
    model, tokenizer = tiny
    first = [5, 6, 7, 8, 9, 10]
    cache = model.make_cache()
    reply = generate(model, tokenizer, first, max_tokens=7, cache=cache).tokens
    assert cache[0].offset == len(first) + len(reply) - 1
    follow_up = [reply[-1], 11, 12, 13]
    continued = generate(model, tokenizer, follow_up, max_tokens=6, cache=cache).tokens
    fresh = generate(model, tokenizer, first + reply[:-1] + follow_up, max_tokens=6).tokens
    assert continued == fresh


def test_chunked_prefill_matches_single_pass(tiny):
    model, tokenizer = tiny
    prompt = [(i * 7) % 250 for i in range(90)]
    a = generate(model, tokenizer, prompt, max_tokens=8, prefill_chunk_size=16).tokens
    b = generate(model, tokenizer, prompt, max_tokens=8, prefill_chunk_size=512).tokens
    assert a == b


# --- sampling ----------------------------------------------------------------------------------


def test_samplers_reduce_to_greedy_at_their_limits():
    logits = mx.random.normal((1, 500)) * 3
    greedy = mx.argmax(logits, axis=-1).item()
    for kwargs in ({"top_k": 1}, {"top_p": 1e-6}, {"min_p": 0.999}):
        sampler = make_sampler(temperature=1.5, seed=0, **kwargs)
        assert {sampler(logits).item() for _ in range(20)} == {greedy}
    assert make_sampler(0.0)(logits).item() == greedy


def test_top_k_only_samples_the_k_best():
    logits = mx.arange(100, dtype=mx.float32)[None] / 10
    sampler = make_sampler(temperature=5.0, top_k=3, seed=1)
    assert {sampler(logits).item() for _ in range(60)} == {97, 98, 99}


def test_repetition_penalty_matches_mlx_lm():
    from mlx_lm.sample_utils import make_repetition_penalty

    logits = mx.random.normal((1, 50))
    history = mx.array([3, 7, 7, 12, 40])
    ours = repetition_penalty_processor(1.3, 64)(history, mx.array(logits))
    theirs = make_repetition_penalty(1.3, 64)(history, mx.array(logits))
    assert mx.allclose(ours, theirs).item()
    assert not mx.allclose(ours, logits).item()


def test_repetition_penalty_leaves_its_input_alone():
    """Applied twice to the same logits (a trigger re-samples a step, masked), it penalizes once."""
    logits = mx.array([[2.0, -2.0, 4.0, 1.0]])
    process = repetition_penalty_processor(2.0, 64)
    first = process(mx.array([0, 1, 1]), logits)
    second = process(mx.array([0, 1, 1]), logits)
    assert logits.tolist() == [[2.0, -2.0, 4.0, 1.0]]
    assert first.tolist() == second.tolist() == [[1.0, -4.0, 4.0, 1.0]]


def test_bad_sampling_values():
    for kwargs in ({"temperature": -1}, {"top_p": 0.0}, {"min_p": 1.0}, {"top_k": -2}):
        with pytest.raises(ValueError):
            make_sampler(**{"temperature": 1.0, **kwargs})


def test_special_tokens_other_than_eos_stay_in_the_text(tiny):
    model, tokenizer = tiny
    marker = tokenizer.token_to_id("<|im_start|>")
    eos = tokenizer.eos_token_ids[0]
    force = script(tokenizer, ids=[marker, *tokenizer.encode("x", add_special_tokens=False), eos])
    result = generate(model, tokenizer, "hi", max_tokens=10, logits_processors=[force])
    assert result.text == "<|im_start|>x" and result.finish_reason == "stop"
