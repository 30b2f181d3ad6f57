"""Tokenizer: `tokenizers` for BPE, jinja2 for chat templates, and a streaming detokenizer.

Chat templates are rendered with user text wrapped in random markers, so that after rendering we
know which characters came from the template and which from the user. Only the template's own
text may produce special tokens; user text containing `<|im_start|>` is encoded as plain text.
"""

from __future__ import annotations

import codecs
import json
import re
import secrets
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import TokenizerError

# Plain ChatML with Hermes-style tools, for models that ship no template (Zagreus base).
CHATML_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- 'You may call one or more functions to assist with the user query. The function signatures \
are inside <tools></tools> XML tags:\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
{{- '\\n</tools>\\n\\nFor each function call, return a JSON object with the function name and \
arguments inside <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, \
"arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages and messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- else %}
{{- '<|im_start|>' + message.role }}
{%- if message.content or not message.tool_calls %}{{- '\\n' + (message.content or '') }}{%- endif %}
{%- for call in message.tool_calls or [] %}
{%- set fn = call.function if call.function is defined else call %}
{{- '\\n<tool_call>\\n{"name": "' + fn.name + '", "arguments": ' }}
{%- if fn.arguments is string %}{{- fn.arguments }}{%- else %}{{- fn.arguments | tojson }}{%- endif %}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Like transformers: no HTML escaping, so templates render as the model was trained.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str) -> None:
    raise TokenizerError(f"chat template: {message}")


def _compile_template(source: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise TokenizerError(f"chat template does not compile: {e}") from None


def _tool_schemas(tools: Any) -> list[dict[str, Any]] | None:
    """Tool schemas as chat templates take them, `{"type": "function", "function": {...}}`; a
    bare function schema (`{"name": ..., "parameters": ...}`) is wrapped. Python functions are
    refused with a TypeError: describing them is `nesso_mlx.tools.tool_schemas`' work, done by
    the caller, so that the tokenizer knows nothing of tools beyond their schemas."""
    if not tools:
        return None
    out = []
    for tool in tools:
        if isinstance(tool, dict) and "function" in tool:
            out.append(tool)
        elif isinstance(tool, dict) and "name" in tool:
            out.append({"type": "function", "function": tool})
        elif callable(tool):
            name = getattr(tool, "__name__", type(tool).__name__)
            raise TypeError(
                f"the tokenizer takes tool schemas, not the Python function {name!r}: "
                "pass nesso_mlx.tools.tool_schemas(tools) instead"
            )
        else:
            raise ValueError(f"a tool must be a JSON-schema dict with a name, got {tool!r:.80}")
    return out


class _UserTextMarker:
    """Wraps the user strings that could form control tokens in unguessable ASCII markers.

    Only strings that contain an added token's text, or could join the template's text into one
    (they start with the end of one or end with its beginning), are wrapped; every other string
    renders exactly as given, so templates behave as they do in transformers (empty content stays
    falsy, `required` lists still match property names, slicing sees the real text).
    """

    def __init__(self, risky: Callable[[str], bool], whitespace_outside: bool = True) -> None:
        nonce = secrets.token_hex(8)
        self.open, self.close = f"NESSOUSEROPEN{nonce}Q", f"NESSOUSERCLOSE{nonce}Q"
        self.risky = risky
        self.whitespace_outside = whitespace_outside

    def wrap(self, text: str) -> str:
        if not self.risky(text):
            return text
        if not self.whitespace_outside:
            return f"{self.open}{text}{self.close}"
        # Leading and trailing whitespace stays outside the markers, so a template's `|trim` still
        # strips it (no control token contains whitespace, so it cannot help form one).
        core = text.strip()
        start = text.index(core) if core else len(text)
        return f"{text[:start]}{self.open}{core}{self.close}{text[start + len(core) :]}"

    def wrap_strings(self, obj: Any) -> Any:
        """`obj` with every risky string wrapped, dictionary keys included."""
        if isinstance(obj, str):
            return self.wrap(obj)
        if isinstance(obj, dict):
            return {self.wrap(k) if isinstance(k, str) else k: self.wrap_strings(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [self.wrap_strings(v) for v in obj]
        return obj

    def split(self, rendered: str) -> list[tuple[str, bool]]:
        """Split rendered text into (text, is_user_text) segments, markers removed."""
        segments: list[tuple[str, bool]] = []
        pos = 0
        while (start := rendered.find(self.open, pos)) != -1:
            end = rendered.find(self.close, start)
            if end == -1:
                raise TokenizerError("chat template cut a message apart; cannot encode it safely")
            segments.append((rendered[pos:start], False))
            segments.append((rendered[start + len(self.open) : end], True))
            pos = end + len(self.close)
        segments.append((rendered[pos:], False))
        if any(self.close in text for text, _ in segments):
            raise TokenizerError("chat template cut a message apart; cannot encode it safely")
        return [(text, is_user) for text, is_user in segments if text]


class Tokenizer:
    """Encode, decode and apply the chat template of a model folder's tokenizer."""

    def __init__(
        self,
        tokenizer: Any,
        chat_template: str | None = None,
        special_tokens: dict[str, str | None] | None = None,
        eos_token_ids: list[int] | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._lock = threading.Lock()
        self.special_tokens = special_tokens or {}
        self.has_chat_template = chat_template is not None
        self.chat_template = chat_template or CHATML_TEMPLATE
        self._template = None
        self._chatml = None
        self._renders_tools: bool | None = None
        added = tokenizer.get_added_tokens_decoder()
        self.special_ids = {i for i, t in added.items() if t.special}
        self._added_text = {i: t.content for i, t in added.items()}
        # Control texts: every added token, special or not (`<tool_call>` may be a plain added
        # token); user text never produces them.
        controls = sorted(set(self._added_text.values()), key=len, reverse=True)
        self._control_re = re.compile("|".join(map(re.escape, controls))) if controls else None
        self._control_heads = {t[:k] for t in controls for k in range(1, len(t))}
        self._control_tails = {t[-k:] for t in controls for k in range(1, len(t))}
        self._control_len = max(map(len, controls), default=0)
        self._control_has_space = any(c.isspace() for t in controls for c in t)
        self._plain_tokenizer: Any = None
        self._special_re: re.Pattern[str] | None = None
        self._max_token_chars: int | None = None
        self.eos_token_ids = list(eos_token_ids or [])
        eos = self.special_tokens.get("eos_token")
        if eos is not None and (eos_id := tokenizer.token_to_id(eos)) is not None:
            if eos_id not in self.eos_token_ids:
                self.eos_token_ids.append(eos_id)
        self._byte_level = _is_byte_level(tokenizer)
        self._bytes_cache: dict[int, bytes] = {}
        self._word_pieces: dict[int, tuple[int | None, bool]] = {}

    @classmethod
    def from_folder(cls, path: str | Path, eos_token_ids: list[int] | None = None) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json and chat_template.jinja from a folder."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.exists():
            raise TokenizerError(f"{path}: no tokenizer.json; nesso-mlx needs a fast tokenizer file")
        try:
            tokenizer = HFTokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the Rust error type is not exported
            raise TokenizerError(f"{tokenizer_file}: cannot be read ({e})") from None
        config: dict[str, Any] = {}
        if (path / "tokenizer_config.json").exists():
            try:
                config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise TokenizerError(f"{path / 'tokenizer_config.json'}: not valid JSON ({e})") from None
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: use "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        specials = {}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = config.get(name)
            specials[name] = value.get("content") if isinstance(value, dict) else value
        return cls(tokenizer, template, specials, eos_token_ids)

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce, added tokens included."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def max_token_chars(self) -> int:
        """The most characters one token can stand for (its vocabulary string's length: a byte-level
        symbol per byte, so at least its characters), computed once."""
        if self._max_token_chars is None:
            self._max_token_chars = max(map(len, self._tokenizer.get_vocab(with_added_tokens=True)), default=1)
        return self._max_token_chars

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def encode(self, text: str, *, add_special_tokens: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`. With `parse_special=False`, `<|im_start|>`, `<tool_call>` and every
        other added token stay plain text."""
        if parse_special:
            return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        return self._plain().encode(text, add_special_tokens=add_special_tokens).ids

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a raw prompt string, the caller's own text, as mlx-lm reads it.

        Special tokens in it are parsed (`<|im_start|>` is the control token). A string that
        starts with a special token is already in the chat format (`is_templated`): it gets no
        BOS from the tokenizer's post-processor (Llama-3.2's adds `<|begin_of_text|>`; a template
        that wants one writes it itself), so the string `apply_chat_template(..., tokenize=False)`
        returns encodes to exactly the ids of `tokenize=True`, and one that starts with BOS gets
        no second BOS, as in mlx-lm. Other text gets the tokenizer's usual special tokens, as in
        transformers and mlx-lm.
        """
        return self.encode(text, add_special_tokens=not self.is_templated(text))

    def is_templated(self, text: str) -> bool:
        """Whether a prompt string is already in the chat format: it starts (after white space)
        with a special token such as `<|im_start|>` or the BOS text."""
        return self._specials().match(text.lstrip()) is not None

    def _specials(self) -> re.Pattern[str]:
        """A pattern matching the text of any special token (built once)."""
        if self._special_re is None:
            texts = sorted({self._added_text[i] for i in self.special_ids}, key=len, reverse=True)
            self._special_re = re.compile("|".join(map(re.escape, texts)) if texts else r"(?!x)x")
        return self._special_re

    def _plain(self) -> Any:
        """A copy of the tokenizer that reads every added token's text as plain text (built once).

        A copy, so the shared tokenizer's settings never change under another thread's encode.
        `encode_special_tokens` stops special tokens from matching in text, but not plain added
        tokens such as a tool-tuned tokenizer's `<tool_call>`, which the copy leaves out.
        """
        if self._plain_tokenizer is None:
            with self._lock:
                if self._plain_tokenizer is None:
                    from tokenizers import Tokenizer as HFTokenizer

                    data = json.loads(self._tokenizer.to_str())
                    data["added_tokens"] = [t for t in data["added_tokens"] if t.get("special")]
                    plain = HFTokenizer.from_str(json.dumps(data))
                    plain.encode_special_tokens = True
                    self._plain_tokenizer = plain
        return self._plain_tokenizer

    def spaced_id(self, token_id: int) -> int | None:
        """For a token that starts a word without a space (`Ag`, `date`), the id of the same text
        with the space before it (` Ag`), where the vocabulary has one; else None.

        A value copied into JSON starts after a quote, without the space it had in the prompt, so
        its first token differs from the prompt's; prompt lookup matches it through this."""
        return self._word_piece(token_id)[0]

    def inside_word(self, token_id: int) -> bool:
        """Whether a token goes on with the word before it (`ost` after ` Ag`): no space before it,
        a letter or digit first."""
        return self._word_piece(token_id)[1]

    def _word_piece(self, token_id: int) -> tuple[int | None, bool]:
        """(spaced twin, inside a word) of a token, memoized (a draft asks about a token or two)."""
        known = self._word_pieces.get(token_id)
        if known is None:
            space = "Ġ" if self._byte_level else "▁"
            piece = None if token_id in self._added_text else self._tokenizer.id_to_token(token_id)
            inside = False
            if piece and not piece.startswith(space):
                # The character, not the byte-level symbol (`Ċ` is a newline, `Â«` is «, `Ã¨` is è).
                text = self.token_bytes(token_id).decode("utf-8", "ignore") if self._byte_level else piece
                inside = text[:1].isalnum()
            known = (self._tokenizer.token_to_id(space + piece) if inside else None), inside
            self._word_pieces[token_id] = known
        return known

    def _is_risky(self, text: str) -> bool:
        """Whether `text` contains a control token's text or could join the template's into one."""
        if not text or self._control_re is None:
            return False
        if self._control_re.search(text):
            return True
        # A string that starts with a control token's end or ends with its beginning could join a
        # neighbour into one. One character is not enough: the template's own text is whole
        # tokens, and of two user strings that split a control token one holds two characters or
        # more (and is wrapped). So a Markdown quote's leading `>` renders as transformers does.
        if not self._control_has_space:
            text = text.strip()
        n = min(len(text), self._control_len)
        return any(text[-k:] in self._control_heads or text[:k] in self._control_tails for k in range(2, n + 1))

    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        marker: _UserTextMarker | None = None,
        **kwargs: Any,
    ) -> str:
        """The chat template's text (user text wrapped in `marker`'s markers when given)."""
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        template = self._template
        if tools and not self._template_renders_tools():
            template = self._fallback_template()
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise TokenizerError("messages must be a list of {'role': ..., 'content': ...} dicts")
        # As transformers does: a key set to None (OpenAI clients send back `"tool_calls": null`)
        # is left out, so templates that test `is defined` see it absent.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        tools = _tool_schemas(tools)
        if marker is not None:
            messages = [marker.wrap_strings(m) for m in messages]
            tools = marker.wrap_strings(tools) if tools else None
        from jinja2 import TemplateError

        try:
            return template.render(
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                **{k: v for k, v in self.special_tokens.items() if v is not None},
                **kwargs,
            )
        except TemplateError as e:
            raise TokenizerError(f"chat template failed: {e}") from None

    def _template_renders_tools(self) -> bool:
        """Whether the model's template shows tools at all (SmolLM2's, for one, drops them)."""
        if self._renders_tools is None:
            probe = [{"role": "user", "content": "hi"}]
            tool = [{"type": "function", "function": {"name": "nesso_probe_tool", "parameters": {}}}]
            try:
                self._renders_tools = "nesso_probe_tool" in self._template.render(
                    messages=probe,
                    tools=tool,
                    add_generation_prompt=True,
                    **{k: v for k, v in self.special_tokens.items() if v is not None},
                )
            except Exception:  # a template that fails on the probe is given the benefit of the doubt
                self._renders_tools = True
        return self._renders_tools

    def _fallback_template(self):
        if self._chatml is None:
            self._chatml = _compile_template(CHATML_TEMPLATE)
        return self._chatml

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        **kwargs: Any,
    ) -> list[int] | str:
        """Render `messages` (and `tools`) with the model's chat template.

        Returns token ids (or the text with `tokenize=False`). `tools` are JSON schemas (OpenAI's
        function tools, or bare `{"name", "parameters"}` schemas); Python functions raise a
        TypeError: describe them first with `nesso_mlx.tools.tool_schemas`. Special tokens are
        produced only by the template itself, never by message content or tool schemas. If the model's template
        ignores `tools`, the built-in Hermes-style ChatML template renders the request instead.
        """
        marker = _UserTextMarker(self._is_risky, whitespace_outside=not self._control_has_space)
        rendered = self.render_chat(messages, tools, add_generation_prompt, marker, **kwargs)
        segments = marker.split(rendered)
        if not tokenize:
            return "".join(text for text, _ in segments)
        # The template's text is encoded as transformers does (its control tokens parsed); the
        # few user strings that could form control tokens are encoded as plain text.
        ids: list[int] = []
        for text, is_user in segments:
            ids += self.encode(text, add_special_tokens=False, parse_special=not is_user)
        return ids

    def detokenizer(self, skip_special_tokens: bool = True) -> StreamingDetokenizer:
        """A fresh streaming detokenizer for this tokenizer."""
        if self._byte_level:
            return ByteLevelDetokenizer(self, skip_special_tokens)
        return WindowDetokenizer(self, skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes a byte-level token stands for (memoized: it runs once per generated token)."""
        cached = self._bytes_cache.get(token_id)
        if cached is None:
            if token_id in self._added_text:
                cached = self._added_text[token_id].encode("utf-8")
            else:
                piece = self._tokenizer.id_to_token(token_id) or ""
                if all(c in _BYTE_DECODER for c in piece):
                    cached = bytes(_BYTE_DECODER[c] for c in piece)
                else:
                    cached = piece.encode("utf-8")
            self._bytes_cache[token_id] = cached
        return cached


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte <-> printable character table used by byte-level BPE.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_SYMBOLS = _bytes_to_unicode()  # byte -> the character byte-level BPE writes it as
_BYTE_DECODER = {c: b for b, c in BYTE_SYMBOLS.items()}


def _is_byte_level(tokenizer: Any) -> bool:
    # Only the decoder's own state: serializing the whole tokenizer costs 0.4 s at 128k tokens.
    decoder = json.loads(tokenizer.decoder.__getstate__()) if tokenizer.decoder is not None else {}
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", [])]
    return "ByteLevel" in kinds and all(k in ("ByteLevel", "Sequence", None) for k in kinds)


class StreamingDetokenizer:
    """Turns tokens into text one at a time, never emitting a partial UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = tokenizer.special_ids if skip_special_tokens else set()
        self.text = ""

    def add_token(self, token_id: int) -> str:
        """Feed one token; returns the text that became complete (may be empty)."""
        raise NotImplementedError

    def finalize(self) -> str:
        """Flush what is held back (incomplete bytes become U+FFFD)."""
        raise NotImplementedError


class ByteLevelDetokenizer(StreamingDetokenizer):
    """O(1) per token: token bytes go through an incremental UTF-8 decoder."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        super().__init__(tokenizer, skip_special_tokens)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._bytes: Callable[[int], bytes] = tokenizer.token_bytes

    def add_token(self, token_id: int) -> str:
        if token_id in self.skip:
            return ""
        new = self._decoder.decode(self._bytes(token_id))
        self.text += new
        return new

    def finalize(self) -> str:
        new = self._decoder.decode(b"", final=True)
        self.text += new
        return new


class WindowDetokenizer(StreamingDetokenizer):
    """For non byte-level decoders: decodes a short window of tokens since the last clean
    boundary (one earlier token kept as context for leading-space rules)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        super().__init__(tokenizer, skip_special_tokens)
        self._context: list[int] = []
        self._window: list[int] = []

    def _pending(self) -> str:
        prefix = self.tokenizer.decode(self._context)
        return self.tokenizer.decode(self._context + self._window)[len(prefix) :]

    def add_token(self, token_id: int) -> str:
        if token_id in self.skip:
            return ""
        self._window.append(token_id)
        text = self._pending()
        if text.endswith("\ufffd"):
            return ""
        self._context, self._window = self._window[-1:], []
        self.text += text
        return text

    def finalize(self) -> str:
        text = self._pending() if self._window else ""
        self._window = []
        self.text += text
        return text
