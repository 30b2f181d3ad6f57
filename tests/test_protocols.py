"""The protocol translations' own rules, without a server: the closed-schema convention, a Responses
stream that fails after it began, and a stored response whose call was cut by the token limit."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest

from nesso_mlx.constrained import closed_schema
from nesso_mlx.request import responses

BASE = {"$defs": {"B": {"properties": {"id": {}}}}}


@pytest.mark.parametrize(
    ("schema", "instance", "valid"),
    [
        ({"type": "object", "properties": {"a": {"type": "string"}}}, {"a": "x", "b": 1}, False),  # closed by default
        ({"type": "object", "properties": {"a": {}}, "additionalProperties": True}, {"a": "x", "b": 1}, True),
        ({"type": "object"}, {"anything": 1}, True),  # lists no properties: open
        ({"type": "object", "properties": {"o": {"type": "object", "properties": {"x": {}}}}}, {"o": {"x": 1, "y": 2}}, False),
        ({"anyOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]}, {"a": 1, "z": 2}, False),  # a union's branches
        # Branches that refine the parent's own properties stay open, and so does the parent.
        (
            {"properties": {"kind": {}, "size": {}}, "anyOf": [{"properties": {"kind": {"const": "a"}}}]},
            {"kind": "a", "size": 3},
            True,
        ),
        ({"properties": {"a": {}}, "allOf": [{"properties": {"b": {}}}]}, {"a": 1, "b": 2}, True),
        ({"properties": {"a": {}}, "not": {"properties": {"a": {"const": 1}}}}, {"a": 2}, True),  # `not` as it is
        # A definition another schema extends stays open; one used as it is (pydantic's nested models) is closed.
        ({**BASE, "$ref": "#/$defs/B", "properties": {"name": {}}}, {"id": 1, "name": "x"}, True),
        ({**BASE, "allOf": [{"$ref": "#/$defs/B"}, {"properties": {"name": {}}}]}, {"id": 1, "name": "x"}, True),
        ({**BASE, "properties": {"b": {"$ref": "#/$defs/B"}}}, {"b": {"id": 1, "z": 2}}, False),
    ],
)
def test_schemas_are_closed_where_nothing_else_adds_properties(schema, instance, valid):
    before = copy.deepcopy(schema)
    assert jsonschema.Draft202012Validator(closed_schema(schema)).is_valid(instance) is valid
    assert schema == before  # a copy: the caller's schema is kept


def request(body: dict, store: responses.ResponseStore) -> responses.ResponsesRequest:
    return responses.parse_responses_request(body, context_window=4096, vocab_size=1000, store=store)


def events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


def test_a_stream_that_fails_after_it_began_ends_with_response_failed():
    store = responses.ResponseStore()
    builder = responses.ResponseStream(request({"input": "hi", "stream": True}, store), "m")
    failed = {"type": "error", "status": 500, "error": {"error": {"message": "the server failed"}}}
    out = builder.start() + builder.add([{"content": "Ciao"}]) + builder.error(failed)
    seen = events(out)
    assert [e["type"] for e in seen][-3:] == ["response.output_item.done", "error", "response.failed"]
    assert seen[-2]["code"] == "server_error" and seen[-1]["response"]["status"] == "failed"
    assert seen[-1]["response"]["error"] == {"code": "server_error", "message": "the server failed"}
    assert [e["sequence_number"] for e in seen] == list(range(len(seen)))


def test_a_stored_call_cut_by_the_limit_does_not_poison_the_conversation():
    store = responses.ResponseStore()
    tools = [{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "string"}}}}]
    first = request({"input": "call f", "tools": tools}, store)
    builder = responses.ResponseStream(first, "m")
    builder.start()
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}
    cut = {"index": 0, "function": {"arguments": '{"a": "tru'}}
    builder.add([{"content": "Sì."}, {"tool_calls": [call]}, {"tool_calls": [cut]}])
    usage = {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14, "prompt_tokens_details": {"cached_tokens": 0}}
    builder.finish({"deltas": [], "finish_reason": "length", "usage": usage})
    assert builder.response["status"] == "incomplete" and builder.response["output"][1]["arguments"] == '{"a": "tru'
    store.put(builder.response, [*first.conversation, builder.assistant_message()])
    follow = request({"input": "go on", "previous_response_id": builder.response["id"], "tools": tools}, store)
    assert follow.conversation[-2] == {"role": "assistant", "content": "Sì."}  # the text kept, the cut call left out
    assert follow.conversation[-1]["content"] == "go on"


def test_the_store_is_bounded_by_size_too():
    store = responses.ResponseStore(size=10, max_chars=3000)
    for i in range(5):
        store.put({"id": f"resp_{i}"}, [{"role": "user", "content": "x" * 1000}])
    assert store.get("resp_0") is None and store.get("resp_4") is not None
    kept = [item for i in range(5) if (item := store.get(f"resp_{i}")) is not None]
    assert 1 <= len(kept) < 5 and sum(len(json.dumps(r)) + len(json.dumps(c)) for r, c in kept) <= 3000
