"""Constrained decoding with llguidance: JSON output and well-formed tool calls.

llguidance was chosen by measurement (benchmarks/bench_grammar.py, Llama-3.2 vocabulary):
no per-schema compile step, ~36 µs per token mask, Lark grammars with inline JSON schemas,
correct on byte-level BPE, and only numpy as a dependency.

What it guarantees, for any tokenization of the tool tags (plain text split into BPE pieces as
in Llama-3.2, where `>` merges with the newline after it, or single added tokens):

- JSON is written compactly with the separators of Python's `json.dumps` (`", "`, `": "`):
  no free whitespace, so a finished output is always complete and a bounded schema has a
  bounded length.
- `tool_choice="auto"`: text is free. The opening tag is found in the decoded bytes wherever
  token boundaries fall; from the byte after it the body must be one call to one of the tools,
  then the closing tag.
- `"required"` / a named tool: the whole reply is tagged calls; a new call is begun only while
  the token budget could still fit one as long as the longest so far, so finished replies
  never end inside a call.
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
# Compact JSON, with the separators chat templates use (`tojson` is json.dumps).
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_LL_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class GrammarError(NessoError):
    """A schema, grammar or tool_choice that cannot be used."""


class _TokenList:
    """What llguidance's TokenizerWrapper reads: every token's bytes, which ones are special, and encode."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self.special_token_ids = sorted(tokenizer.special_ids)
        self.eos_token_id = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None
        self.bos_token_id = None
        self._tokenizer = tokenizer

    def __call__(self, text: bytes) -> list[int]:
        return self._tokenizer.encode(text.decode("utf-8", errors="replace"), add_special_tokens=False)


def _ll_tokenizer(tokenizer: Tokenizer, vocab_size: int):
    """llguidance's view of our tokenizer, built once per tokenizer and vocabulary size (~0.4 s at 128k).

    Built from our own token bytes: only true special tokens are special to llguidance, and added
    tokens that are not special (`<tool_call>` in tool-tuned tokenizers) are the text they stand for.
    (Reading tokenizer.json directly, llguidance treats every added token as special, so a
    grammar's `"<tool_call>"` would not accept the model's own `<tool_call>` token.)
    """
    import llguidance

    cached = _LL_TOKENIZERS.setdefault(tokenizer, {})
    if vocab_size not in cached:
        wrapper = llguidance.TokenizerWrapper(_TokenList(tokenizer))
        cached[vocab_size] = llguidance.LLTokenizer(wrapper, n_vocab=vocab_size, eos_token=tokenizer.eos_token_ids or None)
    return cached[vocab_size]


def _literal(tokenizer: Tokenizer, text: str) -> str:
    """A Lark item for `text`: its special token when the vocabulary has one, else the string."""
    token_id = tokenizer.token_to_id(text)
    if token_id is not None and token_id in tokenizer.special_ids:
        return f"<[{token_id}]>"
    return json.dumps(text)


def _json(schema: dict[str, Any]) -> str:
    """A Lark `%json` item for `schema`, written compactly (see JSON_STYLE)."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_STYLE})  # a schema's own "x-guidance" is not taken


_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMAS = (
    "items",
    "additionalItems",
    "not",
    "if",
    "then",
    "else",
    "contains",
    "additionalProperties",
    "unevaluatedProperties",
)


# Keywords that combine with a schema's own `properties` (their properties count too, or they test
# the object): a schema beside one of them is left open, as closing it would refuse their keys.
_REFINERS = ("$ref", "allOf", "anyOf", "oneOf", "if", "then", "else", "dependentSchemas", "not")
_AS_IS = ("not", "if", "dependentSchemas")  # closing inside these would change what they exclude or test


def _extended_refs(schema: Any, refining: bool = False) -> set[str]:
    """The `$defs`/`definitions` names that some schema extends: a `$ref` beside `properties`, or
    one in an `allOf` branch. Their properties combine with others, so they are left open."""
    found: set[str] = set()
    if isinstance(schema, list):
        for item in schema:
            found |= _extended_refs(item, refining)
    elif isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and (refining or "properties" in schema) and ref.count("/") == 2:
            found.add(ref.rsplit("/", 1)[1])
        for key, value in schema.items():
            if isinstance(value, (dict, list)) and key != "enum" and key != "const":
                found |= _extended_refs(value, key == "allOf")
    return found


def closed_schema(schema: Any, close: bool = True, _extended: set[str] | None = None) -> Any:
    """`schema` with the convention of xgrammar and llama.cpp: an object schema that lists
    `properties` and does not mention `additionalProperties` allows no other properties.

    A copy (the caller's schema is not changed). Left open: `additionalProperties: true` (or a
    schema), an object schema listing no properties (`{"type": "object"}`), a schema whose
    properties combine with others (`$ref`, `allOf`, `anyOf`, `oneOf`, `if`/`then`/`else` beside
    `properties`), and the branches that refine such a schema (`allOf`'s always; `anyOf`'s and
    `oneOf`'s when the parent lists properties of its own), and a `$defs` entry that some schema
    extends (`$ref` beside `properties`, or in an `allOf`). `not`, `if` and `dependentSchemas` are
    kept as they are. Small models otherwise wander into keys the schema never named and run out
    of tokens inside the JSON.
    """
    if _extended is None:
        _extended = _extended_refs(schema)
    if isinstance(schema, list):
        return [closed_schema(s, close, _extended) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    own = "properties" in out
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict) and key not in _AS_IS:
            defs = key in ("$defs", "definitions")
            out[key] = {name: closed_schema(s, not (defs and name in _extended), _extended) for name, s in out[key].items()}
    for key in _SUBSCHEMA_LISTS + _SUBSCHEMAS:
        if isinstance(out.get(key), (dict, list)) and key not in _AS_IS:
            refines = key in ("allOf", "then", "else") or (key in ("anyOf", "oneOf") and own)
            out[key] = closed_schema(out[key], not refines, _extended)
    combined = any(key in out for key in _REFINERS)
    if close and own and not combined and "additionalProperties" not in out and "unevaluatedProperties" not in out:
        out["additionalProperties"] = False
    return out


def call_schema(tools: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """JSON schema of one call: {"name": one of the tools, "arguments": that tool's parameters}."""
    options = []
    for tool in tools:
        fn = tool["function"]
        parameters = closed_schema(fn.get("parameters") or {"type": "object", "properties": {}})
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
    return f"start: block{repeat}\nblock: {block}\ncall: {_json(call_schema(tools))}\n"


def tool_body_grammar(tokenizer: Tokenizer, tools: Sequence[dict[str, Any]]) -> str:
    """What follows an opening `<tool_call>`: a newline, the call's JSON, a newline, the closing tag."""
    return f'start: "\\n" call "\\n" {_literal(tokenizer, CLOSE)}\ncall: {_json(call_schema(tools))}\n'


def calls_or_format_grammar(tokenizer: Tokenizer, tools: Sequence[dict[str, Any]], format_grammar: str) -> str:
    """Lark grammar for a reply that is either tool calls or text in a format (`format_grammar`,
    as `response_format_grammar` gives it: a `start` rule)."""
    calls = tool_calls_grammar(tokenizer, tools).replace("start: block", "calls: block", 1)
    return f"start: calls | answer\n{calls}answer: {format_grammar.removeprefix('start: ')}\n"


def response_format_grammar(response_format: dict[str, Any]) -> str:
    """Lark grammar for an OpenAI-style `response_format`."""
    kind = response_format.get("type")
    if kind == "json_object":
        return "start: " + _json({"type": "object"})
    if kind == "json_schema":
        spec = response_format.get("json_schema", response_format)
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise GrammarError('response_format of type json_schema needs {"json_schema": {"schema": {...}}}')
        return "start: " + _json(closed_schema(schema))
    if kind in (None, "text"):
        return ""
    raise GrammarError(f"response_format type {kind!r} is not supported (json_object, json_schema or text)")


def _byte_tokens(tokenizer: Tokenizer, data: bytes) -> list[int]:
    """Token ids spelling `data` one byte at a time (every byte-level vocabulary has them)."""
    from .tokenizer import BYTE_SYMBOLS

    ids = [tokenizer.token_to_id(BYTE_SYMBOLS[b]) for b in data]
    if any(i is None for i in ids):  # not a byte-level vocabulary: let the tokenizer spell it
        return tokenizer.encode(data.decode("utf-8", errors="replace"), add_special_tokens=False, parse_special=False)
    return ids


class GrammarProcessor:
    """Allows only the tokens a grammar accepts; driven token by token by the decode loop.

    The decode loop feeds each sampled token with `advance(token)` and, while `active`, applies
    `mask()` to the next step's logits. While inactive (free text before a trigger) no mask is
    computed, so the loop stays fully pipelined. With `trigger`, generation is free until the
    decoded bytes contain `trigger`; the bytes after it go to the grammar, which applies until it
    completes; then generation is free again (so "auto" tool calls can be interleaved with text).

    With `max_tokens` and `last_block_grammar` (one block of a grammar of repeated tagged
    blocks), no block is begun that the budget could not finish, judging by the longest so far.
    The object also works as a plain logits processor `f(tokens, logits)`, as mlx-lm's are, at
    the cost of a host sync per token.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        grammar: str,
        vocab_size: int,
        trigger: str | None = None,
        max_tokens: int | None = None,
        last_block_grammar: str | None = None,
    ) -> None:
        self.tokenizer, self.vocab_size, self.trigger = tokenizer, vocab_size, trigger
        self.ll_tokenizer = _ll_tokenizer(tokenizer, vocab_size)
        self.grammar = self._compile(grammar)
        self.matcher = None if trigger else self._matcher(self.grammar)
        # For repeated blocks: the grammar of one last block, and the budget it must fit in.
        self.last_block = self._compile(last_block_grammar) if last_block_grammar else None
        self.max_tokens = max_tokens
        self.eos = sorted(set(tokenizer.eos_token_ids))
        self.count = 0  # tokens advanced
        self.tail = b""  # the last bytes, to find a tag that spans tokens
        self.block = b""  # bytes since the last closing tag
        self.finished = False  # only EOS may follow
        self._block_start = 0
        self._longest_block = 0
        self._close = CLOSE.encode()
        self._seen: int | None = None  # for the logits-processor interface

    def _compile(self, grammar: str):
        import llguidance

        try:
            compiled = llguidance.LLMatcher.grammar_from_lark(grammar)
        except ValueError as e:
            raise GrammarError(f"invalid grammar or schema: {str(e).splitlines()[0]}") from None
        check = self._matcher(compiled)
        if check.is_error():
            raise GrammarError(f"invalid grammar or schema: {check.get_error().splitlines()[0]}")
        return compiled

    def _matcher(self, grammar):
        import llguidance

        return llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)

    @property
    def active(self) -> bool:
        """Whether the next token is constrained (so the loop must wait for this one)."""
        return self.matcher is not None

    def advance(self, token: int) -> bool:
        """Feed one sampled token; returns True when it switched the constraint on (a trigger)."""
        self.count += 1
        data = self.tokenizer.token_bytes(token)
        if self.matcher is None:
            if not self.trigger:
                return False
            window = self.tail + data
            at = window.find(self.trigger.encode())
            if at == -1:
                self.tail = window[-len(self.trigger) :]
                return False
            self.matcher, self.tail = self._matcher(self.grammar), b""
            # The bytes past the tag in the same token go to the grammar (spaces, chosen freely
            # before the grammar applied, are left out: the call's text is stripped when parsed).
            if rest := window[at + len(self.trigger) :].lstrip(b" \t"):
                self.matcher.consume_tokens(_byte_tokens(self.tokenizer, rest))
            return True
        if token in self.eos:
            self.matcher = None
            return False
        self.matcher.consume_token(token)
        if self.trigger:
            if self.matcher.is_stopped() or self.matcher.is_error():
                self.matcher = None  # the call is complete (or hopeless): free text again
            return False
        if self.last_block is not None:
            self._track_blocks(data)
        return False

    def _track_blocks(self, data: bytes) -> None:
        """Count tokens per tagged block; end with the current block when another would not fit."""
        window = self.tail + data
        end = window.find(self._close)
        if end != -1:
            self._longest_block = max(self._longest_block, self.count - self._block_start)
            self._block_start, self.block = self.count, window[end + len(self._close) :]
        else:
            self.block += data
        self.tail = window[-(len(self._close) - 1) :]
        if self.max_tokens is None or not self._longest_block or self.finished:
            return
        left, longest = self.max_tokens - self.count, self._longest_block
        if not self.block.strip():  # between blocks: begin another only if one fits
            self.finished = left < longest + 2
        elif left < 2 * longest - (self.count - self._block_start) + 2:  # finish this one, then stop
            matcher = self._matcher(self.last_block)
            matcher.consume_tokens(_byte_tokens(self.tokenizer, self.block.lstrip(b"\n")))
            if not matcher.is_error():
                self.matcher, self.last_block = matcher, None

    def allowed(self) -> np.ndarray:
        """The tokens allowed next, as a boolean array over the vocabulary."""
        allowed = np.zeros(self.vocab_size, dtype=bool)
        if self.finished or self.matcher.is_stopped() or self.matcher.is_error():
            allowed[self.eos] = True  # complete (or broken): only EOS may follow
            return allowed
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed[:] = np.unpackbits(bits, count=self.vocab_size, bitorder="little").view(bool)
        if self.matcher.is_accepting():
            allowed[self.eos] = True
        return allowed

    # --- for speculative decoding: looking ahead without moving ---------------------------------

    def forced(self) -> list[int]:
        """The tokens the grammar forces next: llguidance's fast-forward tokens, the usual tokens
        of the bytes that are the only way on (a JSON key, a tool's name); [] when none or free.

        Another spelling of the same bytes may still be allowed, so they are a draft to verify,
        not tokens to emit unverified."""
        if self.matcher is None or self.finished or self.matcher.is_stopped() or self.matcher.is_error():
            return []
        return self.matcher.compute_ff_tokens()

    def free_prefix(self, tokens: Sequence[int]) -> int:
        """How many of `tokens` are free text that would not switch the constraint on."""
        if self.matcher is not None:
            return 0
        if not self.trigger:
            return len(tokens)
        window, trigger = self.tail, self.trigger.encode()
        for i, token in enumerate(tokens):
            window += self.tokenizer.token_bytes(token)
            if trigger in window:
                return i
            window = window[-len(trigger) :]
        return len(tokens)

    def lookahead(self, tokens: Sequence[int]) -> list[mx.array]:
        """The masks after each leading token of `tokens` that the grammar takes, in the middle of
        the grammar only; the state is left unchanged.

        It stops before a token the grammar rejects and before one after which the output could
        end (a closed call, a complete JSON value) or, for repeated blocks within a budget, one
        that closes a block: what may follow that is decided by `advance` (free text again after
        an "auto" call, EOS or another block within the budget)."""
        if self.matcher is None or self.finished:
            return []
        masks: list[mx.array] = []
        consumed = 0
        window = self.tail
        for token in tokens:
            if token in self.eos or not self.matcher.try_consume_tokens([token]):
                break
            consumed += 1
            if self.matcher.is_stopped() or self.matcher.is_accepting() or self.matcher.is_error():
                break
            if self.last_block is not None and self.max_tokens is not None:
                # Blocks within a budget: after a closing tag, `advance` decides what may follow.
                window += self.tokenizer.token_bytes(token)
                if self._close in window:
                    break
                window = window[-(len(self._close) - 1) :]
            masks.append(self.mask())
        if consumed:
            self.matcher.rollback(consumed)
        return masks

    def mask(self) -> mx.array:
        """`allowed()` as an MLX array, for `mx.where(mask, logits, -inf)`."""
        return mx.array(self.allowed())

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self._seen is None:  # first call: the history is the prompt
            new = []
        else:
            new = tokens[self._seen :].tolist()
        self._seen = tokens.size
        for token in new:
            self.advance(token)
        if self.matcher is None:
            return logits
        return mx.where(self.mask(), logits, -mx.inf)


def build_processor(
    tokenizer: Tokenizer,
    vocab_size: int,
    tools: Sequence[dict[str, Any]] | None = None,
    tool_choice: str | dict[str, Any] | None = "auto",
    response_format: dict[str, Any] | None = None,
    constrain: bool = True,
    max_tokens: int | None = None,
) -> GrammarProcessor | None:
    """The grammar processor for a request, or None when nothing is constrained.

    With both tools and a `response_format` (as OpenAI allows): under `tool_choice` "auto" the
    reply is either tool calls or text in the format; under "required" or a named tool it is a
    call, which the format does not govern; under "none" it is text in the format."""
    format_grammar = response_format_grammar(response_format) if response_format is not None else ""
    if format_grammar and tools and tool_choice == "auto":
        grammar = calls_or_format_grammar(tokenizer, tools, format_grammar)
        last = tool_calls_grammar(tokenizer, tools, single=True)
        return GrammarProcessor(tokenizer, grammar, vocab_size, max_tokens=max_tokens, last_block_grammar=last)
    if format_grammar and (not tools or tool_choice in (None, "none")):
        return GrammarProcessor(tokenizer, format_grammar, vocab_size)
    if not tools or not constrain or tool_choice in (None, "none"):
        return None
    if tool_choice == "auto":
        return GrammarProcessor(tokenizer, tool_body_grammar(tokenizer, tools), vocab_size, trigger=OPEN)
    if tool_choice == "required":
        grammar, last = tool_calls_grammar(tokenizer, tools), tool_calls_grammar(tokenizer, tools, single=True)
        return GrammarProcessor(tokenizer, grammar, vocab_size, max_tokens=max_tokens, last_block_grammar=last)
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else tool_choice
    chosen = [t for t in tools if t["function"]["name"] == name]
    if not chosen:
        raise GrammarError(f"tool_choice {name!r} is not one of the tools ({', '.join(tool_names(tools))})")
    return GrammarProcessor(tokenizer, tool_calls_grammar(tokenizer, chosen, single=True), vocab_size)
