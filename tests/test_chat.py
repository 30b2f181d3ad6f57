"""ChatSession: cache reuse across turns, interruption, context overflow, retry/undo, save/load."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

from nesso_mlx import generate, load, stream_generate
from nesso_mlx.chat import ChatSession, SamplingSettings
from nesso_mlx.errors import NessoError
from nesso_mlx.generation import prefill
from nesso_mlx.sampling import SamplingOptions

GREEDY = SamplingSettings(temperature=0.0, max_tokens=6)


@pytest.fixture
def tiny(tiny_folder):
    return load(tiny_folder)


def session(tiny, **kwargs) -> ChatSession:
    model, tokenizer = tiny
    return ChatSession(model, tokenizer, settings=SamplingSettings(**vars(GREEDY)), **kwargs)


def reply(chunks) -> str:
    return "".join(c.text for c in chunks)


def test_second_turn_reuses_the_whole_first_prompt(tiny):
    model, tokenizer = tiny
    chat = session(tiny, system="Be brief.")
    reply(chat.send("hello there"))
    assert chat.last.prefilled_tokens == chat.last.prompt_tokens  # nothing cached yet
    first_prompt = chat.last.prompt_tokens
    reply(chat.send("and then?"))
    # A random model's reply may not re-tokenize the same way (non-canonical BPE), so the
    # reply's tokens may be prefilled again; the system prompt and first message never are.
    assert chat.last.prefilled_tokens <= chat.last.prompt_tokens - first_prompt


def test_real_model_turn_two_prefills_exactly_its_new_tokens(smollm2):
    model, tokenizer = smollm2
    chat = ChatSession(model, tokenizer, settings=SamplingSettings(temperature=0.0, max_tokens=10))
    first = reply(chat.send("What is the capital of France?"))
    assert "Paris" in first
    cached_after_first = chat.context_used()
    second = reply(chat.send("And of Italy?"))
    full = tokenizer.apply_chat_template(
        [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "And of Italy?"},
        ]
    )
    assert "Rome" in second  # turn 2 refers to turn 1
    assert chat.last.prompt_tokens == len(full)
    assert chat.last.prefilled_tokens == len(full) - cached_after_first
    assert chat.last.prefilled_tokens < 20  # "<|im_end|>\n<|im_start|>user\nAnd of Italy?..." only


def test_replies_equal_a_fresh_generation_of_the_same_conversation(tiny):
    model, tokenizer = tiny
    chat = session(tiny)
    reply(chat.send("one"))
    second = reply(chat.send("two"))
    fresh = generate(model, tokenizer, messages=chat.messages[:-1], max_tokens=6).text
    assert second == fresh


def test_a_cached_turn_sees_the_whole_conversation(tiny, monkeypatch):
    """The session tells `stream_generate` which ids its cache holds, so the repetition penalty and
    prompt lookup's index see the earlier turns, not only the new tokens: caching does not change
    the reply (see the next test for the penalty's own check)."""
    import nesso_mlx.chat as chat_module
    import nesso_mlx.speculative as speculative

    model, tokenizer = tiny
    settings = SamplingSettings(temperature=0.0, max_tokens=16, repetition_penalty=8.0)
    chat = ChatSession(model, tokenizer, settings=settings, prompt_lookup=True)
    reply(chat.send("one two three"))
    held = list(chat.cached_tokens)
    contexts, given = [], []
    original_init, original_stream = speculative.PromptLookup.__init__, chat_module.stream_generate

    def spy_init(self, tokens, *args, **kwargs):
        contexts.append(list(tokens))
        original_init(self, tokens, *args, **kwargs)

    def spy_stream(*args, **kwargs):
        given.append(list(kwargs["cached_ids"]))
        return original_stream(*args, **kwargs)

    monkeypatch.setattr(speculative.PromptLookup, "__init__", spy_init)
    monkeypatch.setattr(chat_module, "stream_generate", spy_stream)
    second = reply(chat.send("two three four"))
    conversation = chat.messages[:-1]
    assert given and held[: len(given[0])] == given[0] and len(given[0]) > len(tokenizer.encode("one two three"))
    assert contexts == [tokenizer.apply_chat_template(conversation, add_generation_prompt=True)]
    fresh = generate(model, tokenizer, messages=conversation, max_tokens=16, sampling=settings).text
    assert second == fresh


def test_cached_ids_let_the_repetition_penalty_see_the_cached_context(tiny):
    model, tokenizer = tiny
    penalty = SamplingOptions(repetition_penalty=8.0)
    question = tokenizer.encode("two three four")
    # An earlier context holding the tokens the model would otherwise say next.
    likely = generate(model, tokenizer, tokenizer.encode("one") + question, max_tokens=8).tokens
    context = tokenizer.encode("one") + likely
    fresh = generate(model, tokenizer, context + question, max_tokens=8, sampling=penalty).tokens

    def cached(ids):
        cache = model.make_cache()
        prefill(model, mx.array(context), cache)
        return generate(model, tokenizer, question, max_tokens=8, sampling=penalty, cache=cache, cached_ids=ids).tokens

    assert cached(context) == fresh
    assert cached(None) != fresh  # the check can tell: the penalty missed the cached tokens before


def test_cached_ids_must_describe_the_cache(tiny):
    model, tokenizer = tiny
    cache = model.make_cache()
    list(stream_generate(model, tokenizer, "ciao", max_tokens=2, cache=cache))
    with pytest.raises(ValueError, match="cached_ids has 1 ids but the cache holds"):
        list(stream_generate(model, tokenizer, "ciao", cache=cache, cached_ids=[1]))


def test_interrupted_reply_is_kept_and_cache_stays_consistent(tiny):
    model, tokenizer = tiny
    chat = session(tiny)
    chat.settings.max_tokens = 40
    stream = chat.send("tell me a long story")
    partial = "".join(next(stream).text for _ in range(3))
    stream.close()  # what Ctrl-C does
    assert chat.messages[-1] == {"role": "assistant", "content": partial}
    assert chat.last.finish_reason == "interrupted"
    assert [layer.offset for layer in chat.cache] == [len(chat.cached_tokens)] * len(chat.cache)
    chat.settings.max_tokens = 6
    after = reply(chat.send("go on"))
    fresh = generate(model, tokenizer, messages=chat.messages[:-1], max_tokens=6).text
    assert after == fresh


def test_context_overflow_drops_oldest_turns_keeps_system(tiny):
    chat = session(tiny, system="SYSTEM PROMPT", max_context=96)
    for i in range(8):
        reply(chat.send(f"message number {i} with some words"))
        assert chat.context_used() + chat.settings.max_tokens <= 96
    assert chat.notices and "dropped" in chat.notices[0]
    assert chat.messages[0] == {"role": "user", "content": chat.messages[0]["content"]}
    assert "message number 0" not in json.dumps(chat.messages) and "message number 7" in json.dumps(chat.messages)
    assert chat.system == "SYSTEM PROMPT"
    before, cached, notices = list(chat.messages), list(chat.cached_tokens), list(chat.notices)
    with pytest.raises(NessoError, match="context window"):
        list(chat.send("x " * 200))
    # Refused before anything is dropped: the history, the cache and the notices are as they were.
    assert chat.messages == before and chat.cached_tokens == cached and chat.notices == notices
    assert [layer.offset for layer in chat.cache] == [len(cached)] * len(chat.cache)
    reply(chat.send("a short one"))
    assert chat.messages[-2] == {"role": "user", "content": "a short one"}


def exchange(i: int, tools: bool) -> list[dict]:
    question = {"role": "user", "content": f"question {i} asks about something"}
    if not tools:
        return [question, {"role": "assistant", "content": f"answer {i} says something back"}]
    return [
        question,
        {"role": "assistant", "content": f'<tool_call>{{"name": "look", "arguments": {{"n": {i}}}}}</tool_call>'},
        {"role": "tool", "content": f"result {i} of the tool"},
        {"role": "assistant", "content": f"answer {i} from the result"},
    ]


def test_trimming_drops_whole_exchanges_with_their_tool_calls_and_results(tiny):
    chat = session(tiny, system="SYSTEM", max_context=700)
    history = [m for i in range(8) for m in exchange(i, tools=i % 2 == 0)]
    chat.messages = list(history)
    reply(chat.send("the new question"))
    budget = 700 - chat.settings.max_tokens
    assert chat.notices and "dropped" in chat.notices[-1]
    cut = len(history) - (len(chat.messages) - 2)
    assert cut > 0 and history[cut]["role"] == "user" and chat.messages[: len(history) - cut] == history[cut:]
    assert chat.last.prompt_tokens <= chat.low_water * budget  # down to the low-water mark, not just below the budget
    # The current exchange is never cut, even while the model is reading its tool results.
    current = exchange(99, tools=True)[:3]  # question, tool call, tool result
    chat.messages = history + current
    reply(chat.continue_reply())
    kept = chat.messages[:-1]
    assert kept[-3:] == current and kept[0]["role"] == "user"
    assert kept[:-3] == history[len(history) - len(kept) + 3 :]  # whole exchanges: no lone tool result
    assert chat.last.prompt_tokens <= chat.low_water * budget


def test_a_full_window_drops_to_the_low_water_mark_so_later_turns_reuse_the_cache(tiny):
    chat = session(tiny, system="SYSTEM PROMPT", max_context=400)
    budget = 400 - chat.settings.max_tokens
    drops, previous = [], None
    for turn in range(30):
        reply(chat.send(f"message {turn} with a few words"))
        if chat.notices:
            drops.append(turn)
            chat.notices.clear()
            assert chat.last.prompt_tokens <= int(chat.low_water * budget)
        elif previous is not None:  # the cache held the whole previous prompt: only the reply and new message are new
            assert chat.last.prefilled_tokens <= chat.last.prompt_tokens - previous
        previous = chat.last.prompt_tokens
        assert chat.context_used() <= 400 and chat.messages[0]["role"] == "user"
        if turn == 20:  # retry and undo after drops
            first = reply(chat.retry())
            assert chat.last.prefilled_tokens == 1 and reply(chat.retry()) == first
            count = len(chat.messages)
            assert chat.undo() and len(chat.messages) == count - 2
            previous = None
    assert len(drops) >= 2
    assert min(b - a for a, b in zip(drops, drops[1:], strict=False)) >= 3  # several turns reuse the cache between drops


def test_retry_undo_reset(tiny):
    chat = session(tiny)
    with pytest.raises(NessoError, match="no reply to retry"):
        chat.retry()
    first = reply(chat.send("hi"))
    again = reply(chat.retry())
    assert again == first and len(chat.messages) == 2
    assert chat.last.prefilled_tokens == 1  # the prompt was still in the cache
    chat.settings.set("temperature", "1.5")
    chat.settings.set("seed", "3")
    reply(chat.retry())
    assert len(chat.messages) == 2
    assert chat.undo() and chat.messages == []
    assert not chat.undo()
    reply(chat.send("hi"))
    chat.reset()
    assert chat.messages == []


def test_save_and_load(tiny, tmp_path):
    chat = session(tiny, system="Sii breve.")
    reply(chat.send("Ciao, come stai? 😀"))
    chat.settings.set("top_k", "40")
    path = chat.save(tmp_path / "chat.json")
    assert not list(tmp_path.glob(".*"))
    other = session(tiny)
    other.load(path)
    assert other.messages == chat.messages and other.system == "Sii breve." and other.settings.top_k == 40
    (tmp_path / "bad.json").write_text('{"messages": 3}')
    with pytest.raises(NessoError, match="not a saved nesso-mlx conversation"):
        other.load(tmp_path / "bad.json")
    with pytest.raises(NessoError, match="file not found"):
        other.load(tmp_path / "missing.json")


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("temperature", "hot", "needs a number"),
        ("top_p", "2", "between"),
        ("max_tokens", "1.5", "integer"),
        ("colour", "1", "unknown setting"),
    ],
)
def test_settings_validation(name, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingSettings().set(name, value)
    s = SamplingSettings()
    s.set("repetition_penalty", "none")
    assert s.repetition_penalty is None
