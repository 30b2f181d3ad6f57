"""Constrained decoding with llguidance: JSON output and well-formed tool calls.

llguidance was chosen by measurement (benchmarks/bench_grammar.py, Llama-3.2 vocabulary):
no per-schema compile step, ~36 µs per token mask, Lark grammars with inline JSON schemas,
correct on byte-level BPE, and only numpy as a dependency.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from .errors import NessoError
from .tokenizer import Tokenizer
from .tools import tool_names

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_LL_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class GrammarError(NessoError):
    """A schema, grammar or tool_choice that cannot be used."""


def _ll_tokenizer(tokenizer: Tokenizer, vocab_size: int):
    """llguidance's view of our tokenizer (built once per tokenizer and vocabulary size: ~1 s at 128k)."""
    import llguidance

    cached = _LL_TOKENIZERS.setdefault(tokenizer, {})
    if vocab_size not in cached:
        eos = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None
        cached[vocab_size] = llguidance.LLTokenizer(tokenizer._tokenizer.to_str(), n_vocab=vocab_size, eos_token=eos)
    return cached[vocab_size]


def _literal(tokenizer: Tokenizer, text: str) -> str:
    """A Lark item for `text`: its special token when the vocabulary has one, else the string."""
    token_id = tokenizer.token_to_id(text)
    if token_id is not None and token_id in tokenizer.special_ids:
        return f"<[{token_id}]>"
    return json.dumps(text)


def call_schema(tools: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """JSON schema of one call: {"name": one of the tools, "arguments": that tool's parameters}."""
    options = []
    for tool in tools:
        fn = tool["function"]
        parameters = dict(fn.get("parameters") or {"type": "object", "properties": {}})
        # Strict, as OpenAI's strict mode: only the declared parameters, so a small model cannot
        # wander into invented keys (measured: SmolLM2 kept adding "description" keys otherwise).
        parameters.setdefault("additionalProperties", False)
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": fn["name"]}, "arguments": parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    return options[0] if len(options) == 1 else {"anyOf": options}


def tool_calls_grammar(tokenizer: Tokenizer, tools: Sequence[dict[str, Any]], single: bool = False) -> str:
    """Lark grammar for output made only of tool calls (`tool_choice` "required" or a named tool)."""
    block = f'{_literal(tokenizer, OPEN)} "\\n" call "\\n" {_literal(tokenizer, CLOSE)}'
    repeat = "" if single else ' ("\\n" block)*'
    return f"start: block{repeat}\nblock: {block}\ncall: %json {json.dumps(call_schema(tools))}\n"


def tool_body_grammar(tokenizer: Tokenizer, tools: Sequence[dict[str, Any]]) -> str:
    """What follows an opening `<tool_call>`: the call's JSON, then the closing tag."""
    return f'start: "\\n"? call "\\n"? {_literal(tokenizer, CLOSE)}\ncall: %json {json.dumps(call_schema(tools))}\n'


def response_format_grammar(response_format: dict[str, Any]) -> str:
    """Lark grammar for an OpenAI-style `response_format`."""
    kind = response_format.get("type")
    if kind == "json_object":
        return "start: %json " + json.dumps({"type": "object"})
    if kind == "json_schema":
        spec = response_format.get("json_schema", response_format)
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise GrammarError('response_format of type json_schema needs {"json_schema": {"schema": {...}}}')
        return "start: %json " + json.dumps(schema)
    if kind in (None, "text"):
        return ""
    raise GrammarError(f"response_format type {kind!r} is not supported (json_object, json_schema or text)")


class GrammarProcessor:
    """A logits processor that allows only tokens the grammar accepts.

    With `trigger`, generation is free until the text ends with `trigger`; then the grammar
    applies until it completes, and generation is free again (so "auto" tool calls can be
    interleaved with text, and each call's body is always well formed).
    """

    def __init__(self, tokenizer: Tokenizer, grammar: str, vocab_size: int, trigger: str | None = None) -> None:
        import llguidance

        self.tokenizer, self.vocab_size, self.trigger = tokenizer, vocab_size, trigger
        self.ll_tokenizer = _ll_tokenizer(tokenizer, vocab_size)
        try:
            self.grammar = llguidance.LLMatcher.grammar_from_lark(grammar)
        except ValueError as e:
            raise GrammarError(f"invalid grammar or schema: {str(e).splitlines()[0]}") from None
        check = llguidance.LLMatcher(self.ll_tokenizer, self.grammar, log_level=0)
        if check.is_error():
            raise GrammarError(f"invalid grammar or schema: {check.get_error().splitlines()[0]}")
        self.matcher = None if trigger else check
        self.seen: int | None = None  # how many tokens of the history were already consumed
        self.tail = b""
        self.eos = set(tokenizer.eos_token_ids)

    def _new_tokens(self, tokens: mx.array) -> list[int]:
        if self.seen is None:  # first call: the history is the prompt
            self.seen = tokens.size
            return []
        new = tokens[self.seen :].tolist()
        self.seen = tokens.size
        return new

    def _advance(self, token: int) -> None:
        import llguidance

        if self.matcher is not None:
            self.matcher.consume_token(token)
            if self.trigger and self.matcher.is_stopped():
                self.matcher, self.tail = None, b""
            return
        self.tail = (self.tail + self.tokenizer.token_bytes(token))[-64:]
        if self.trigger and self.tail.endswith(self.trigger.encode()):
            self.matcher = llguidance.LLMatcher(self.ll_tokenizer, self.grammar, log_level=0)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        for token in self._new_tokens(tokens):
            self._advance(token)
        if self.matcher is None:
            return logits
        if self.matcher.is_stopped():  # the grammar is complete: only EOS may follow
            allowed = np.zeros(self.vocab_size, dtype=bool)
            allowed[list(self.eos)] = True
        else:
            bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
            allowed = np.unpackbits(bits, bitorder="little")[: self.vocab_size].astype(bool)
            if self.matcher.is_accepting():
                allowed[list(self.eos)] = True
        return mx.where(mx.array(allowed), logits, -mx.inf)


def build_processor(
    tokenizer: Tokenizer,
    vocab_size: int,
    tools: Sequence[dict[str, Any]] | None = None,
    tool_choice: str | dict[str, Any] | None = "auto",
    response_format: dict[str, Any] | None = None,
    constrain: bool = True,
) -> GrammarProcessor | None:
    """The grammar processor for a request, or None when nothing is constrained."""
    if response_format is not None and (grammar := response_format_grammar(response_format)):
        if tools and tool_choice not in (None, "none"):
            raise GrammarError("response_format and tools cannot be combined; pass tool_choice='none'")
        return GrammarProcessor(tokenizer, grammar, vocab_size)
    if not tools or not constrain or tool_choice in (None, "none"):
        return None
    if tool_choice == "auto":
        return GrammarProcessor(tokenizer, tool_body_grammar(tokenizer, tools), vocab_size, trigger=OPEN)
    if tool_choice == "required":
        return GrammarProcessor(tokenizer, tool_calls_grammar(tokenizer, tools), vocab_size)
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else tool_choice
    chosen = [t for t in tools if t["function"]["name"] == name]
    if not chosen:
        raise GrammarError(f"tool_choice {name!r} is not one of the tools ({', '.join(tool_names(tools))})")
    return GrammarProcessor(tokenizer, tool_calls_grammar(tokenizer, chosen, single=True), vocab_size)
