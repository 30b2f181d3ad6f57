"""Fault injection in ChatSession: Ctrl-C inside the model (every layer of a prefill chunk or a
decode step) and exceptions from a logits processor leave the messages, `cached_tokens` and every
cache layer consistent, and the next turn equals a fresh session's on the same conversation."""

from __future__ import annotations

import functools
from contextlib import contextmanager

import mlx.core as mx
import pytest
from conftest import TINY_CONFIG, write_model_folder

import nesso_mlx.chat as chat_module
from nesso_mlx import load
from nesso_mlx.api import stream_generate
from nesso_mlx.chat import ChatSession, SamplingSettings

LAYERS = 3
SYSTEM = "You are terse."
FIRST = "the first message of the conversation"
SECOND = "the second message, long enough to need several prefill chunks"
THIRD = "and a third one"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config = dict(TINY_CONFIG, num_hidden_layers=LAYERS)
    return load(write_model_folder(tmp_path_factory.mktemp("faults") / "tiny", config))


def new_session(tiny, **kwargs) -> ChatSession:
    model, tokenizer = tiny
    return ChatSession(model, tokenizer, system=SYSTEM, settings=SamplingSettings(temperature=0.0, max_tokens=6), **kwargs)


@contextmanager
def interrupt_layer(model, layer: int, call: int, after: bool = False, exception: type[BaseException] = KeyboardInterrupt):
    """Make `model.model.layers[layer]` raise on its `call`-th call (before computing, or `after` it)."""
    layers = model.model.layers
    original, calls = layers[layer], [0]

    def faulty(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call and not after:
            raise exception("injected")
        out = original(*args, **kwargs)
        if calls[0] == call:
            raise exception("injected")
        return out

    layers[layer] = faulty
    try:
        yield calls
    finally:
        layers[layer] = original


def consume(stream) -> tuple[list, BaseException | None]:
    """The chunks a stream handed out before it raised, and what it raised."""
    chunks = []
    try:
        for chunk in stream:
            chunks.append(chunk)
    except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt is the point
        return chunks, e
    return chunks, None


def assert_consistent(session: ChatSession) -> None:
    """Every layer holds exactly `cached_tokens`, and their keys/values are those of a fresh prefill."""
    offsets = [layer.offset for layer in session.cache]
    assert offsets == [len(session.cached_tokens)] * len(offsets)
    if not session.cached_tokens:
        return
    reference = session.model.make_cache()
    session.model(mx.array(session.cached_tokens)[None], reference)
    n = len(session.cached_tokens)
    for got, want in zip(session.cache, reference, strict=True):
        assert mx.allclose(got.keys[..., :n, :], want.keys[..., :n, :], atol=1e-4).item()
        assert mx.allclose(got.values[..., :n, :], want.values[..., :n, :], atol=1e-4).item()


def assert_next_turn_equals_a_fresh_session(tiny, session: ChatSession, text: str = THIRD) -> None:
    fresh = new_session(tiny, max_context=session.max_context)
    fresh.messages = [dict(m) for m in session.messages]
    got = [c.token for c in session.send(text)]
    want = [c.token for c in fresh.send(text)]
    assert got == want
    assert session.messages == fresh.messages
    assert_consistent(session)


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


# Forward passes of turn two: with a chunk size of 8, P prefill chunks, then decode step j is pass
# P + 1 + j, which feeds token j before token j is handed out.
PLACES = {
    "middle prefill chunk": lambda chunks: 2,
    "last prefill chunk": lambda chunks: chunks,
    "first decode step": lambda chunks: chunks + 1,
    "decode step 3": lambda chunks: chunks + 3,
}


@pytest.mark.parametrize("place", list(PLACES))
@pytest.mark.parametrize("layer, after", [(i, False) for i in range(LAYERS)] + [(LAYERS - 1, True)])
def test_ctrl_c_inside_the_model_leaves_a_consistent_session(tiny, place, layer, after):
    model, tokenizer = tiny
    session = new_session(tiny)
    session.prefill_chunk_size = 8
    list(session.send(FIRST))
    before, cached = [dict(m) for m in session.messages], list(session.cached_tokens)
    prompt = session._tokens([*before, {"role": "user", "content": SECOND}])
    reused = min(common_prefix(cached, prompt), len(prompt) - 1)
    chunks = -(-(len(prompt) - reused) // 8)
    assert chunks >= 3  # so that the middle chunk is not the last
    call = PLACES[place](chunks)
    handed_out = max(0, call - chunks - 1)

    with interrupt_layer(model, layer, call, after) as calls:
        got, error = consume(session.send(SECOND))
    assert isinstance(error, KeyboardInterrupt) and calls[0] == call
    assert len(got) == handed_out
    assert_consistent(session)
    assert session.last.finish_reason == "interrupted"
    if handed_out:  # the partial reply is kept, and the cache holds it but its last token
        partial = {"role": "assistant", "content": "".join(c.text for c in got)}
        assert session.messages == [*before, {"role": "user", "content": SECOND}, partial]
        assert session.cached_tokens == prompt + [c.token for c in got][:-1]
    else:  # as before the turn, and the cache keeps the prefix it shared with the new prompt
        assert session.messages == before
        assert session.cached_tokens == prompt[:reused] and reused > 0
        assert session.notices[-1] == "interrupted before the reply began: the message was not added"
    assert_next_turn_equals_a_fresh_session(tiny, session)


@pytest.mark.parametrize("call, handed_out", [(1, 0), (2, 0), (4, 2)])
def test_an_exception_from_a_logits_processor_leaves_a_consistent_session(tiny, monkeypatch, call, handed_out):
    session = new_session(tiny)
    list(session.send(FIRST))
    before = [dict(m) for m in session.messages]
    calls = [0]

    def broken(history, logits):
        calls[0] += 1
        if calls[0] == call:
            raise RuntimeError("broken processor")
        return logits

    with monkeypatch.context() as patch:
        patch.setattr(chat_module, "stream_generate", functools.partial(stream_generate, logits_processors=[broken]))
        got, error = consume(session.send(SECOND))
    assert isinstance(error, RuntimeError) and len(got) == handed_out
    assert_consistent(session)
    if handed_out:
        assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
        assert session.messages[-1]["content"] == "".join(c.text for c in got)
    else:
        assert session.messages == before and len(session.cached_tokens) > 0
        assert not session.notices  # an error, not an interruption: the caller sees the exception
    assert_next_turn_equals_a_fresh_session(tiny, session)


def test_ctrl_c_before_a_retried_reply_begins_puts_the_old_reply_back(tiny):
    model, _ = tiny
    session = new_session(tiny)
    list(session.send(FIRST))
    before = [dict(m) for m in session.messages]
    with interrupt_layer(model, 1, 1) as calls:
        got, error = consume(session.retry())
    assert isinstance(error, KeyboardInterrupt) and calls[0] == 1 and not got
    assert session.messages == before
    assert_consistent(session)
    assert session.notices == ["interrupted before the reply began: the conversation is unchanged"]
    again = "".join(c.text for c in session.retry())
    assert again == before[-1]["content"] and session.messages == before
    assert session.last.prefilled_tokens == 1


def test_ctrl_c_while_reading_tool_results_keeps_them_and_the_cache(tiny):
    model, _ = tiny
    session = new_session(tiny)
    list(session.send(FIRST))
    session.add_tool_result("a tool's result, to read before the next reply")
    before = [dict(m) for m in session.messages]
    with interrupt_layer(model, 0, 1):
        got, error = consume(session.continue_reply())
    assert isinstance(error, KeyboardInterrupt) and not got
    assert session.messages == before and session.messages[-1]["role"] == "tool"
    assert_consistent(session)
    assert len(session.cached_tokens) > 0
    reply = list(session.continue_reply())
    assert reply and session.messages[-1]["role"] == "assistant"
    assert_consistent(session)


def test_ctrl_c_before_the_reply_begins_restores_the_exchanges_a_drop_removed(tiny):
    model, _ = tiny
    session = new_session(tiny, max_context=300)
    next_prompt = [{"role": "user", "content": SECOND}]
    while len(session._tokens(session.messages + next_prompt)) <= 300 - session.settings.max_tokens:
        list(session.send(FIRST))
    assert not session.notices and len(session.messages) >= 4
    before = [dict(m) for m in session.messages]
    with interrupt_layer(model, 2, 1):  # the prompt of this turn needs a drop; the prefill is interrupted
        got, error = consume(session.send(SECOND))
    assert isinstance(error, KeyboardInterrupt) and not got
    assert session.messages == before
    assert session.notices == ["interrupted before the reply began: the message was not added"]
    assert_consistent(session)
    session.notices.clear()
    assert_next_turn_equals_a_fresh_session(tiny, session, SECOND)  # this time the drop happens
    assert "dropped" in session.notices[0]
