"""ChatSession: cache reuse across turns, interruption, context overflow, retry/undo, save/load."""

from __future__ import annotations

import json

import pytest

from nesso_mlx import generate, load
from nesso_mlx.chat import ChatSession, SamplingSettings
from nesso_mlx.errors import NessoError

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


def test_interrupted_reply_is_kept_and_cache_stays_consistent(tiny):
    model, tokenizer = tiny
    chat = session(tiny)
    chat.settings.max_tokens = 40
    stream = chat.send("tell me a long story")
    partial = "".join(next(stream).text for _ in range(3))
    stream.close()  # what Ctrl-C does
    assert chat.messages[-1] == {"role": "assistant", "content": partial}
    assert chat.last.finish_reason == "interrupted"
    assert chat.cache[0].offset == len(chat.cached_tokens)
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
    with pytest.raises(NessoError, match="context window"):
        list(chat.send("x " * 200))


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
