"""A multi-turn conversation that keeps its KV cache: each turn prefills only its new tokens."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .api import stream_generate
from .cache import CacheRollbackError, rollback_cache
from .errors import NessoError
from .model import Model
from .reply import GenerationChunk
from .sampling import SamplingOptions
from .tokenizer import Tokenizer
from .tools import ToolSpec, parse_tool_calls, tool_schemas


@dataclass(kw_only=True)
class SamplingSettings(SamplingOptions):
    """Per-session generation settings, changeable between turns: the sampling options (with a
    chat's defaults) and the longest reply."""

    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 1024

    def set(self, name: str, value: str) -> None:
        """Set a field from text (as typed after `/set`); raises ValueError with a clear message."""
        kinds = {f.name: f.type for f in fields(self)}
        if name not in kinds:
            raise ValueError(f"unknown setting {name!r}; settings: {', '.join(kinds)}")
        if value.lower() in ("none", "off") and "None" in str(kinds[name]):
            setattr(self, name, None)
            return
        cast = int if "int" in str(kinds[name]) else float
        try:
            parsed = cast(value)
        except ValueError:
            raise ValueError(f"{name} needs {'an integer' if cast is int else 'a number'}, got {value!r}") from None
        limits = {
            "temperature": (0, 10),
            "top_p": (1e-9, 1),
            "top_k": (0, 10**6),
            "min_p": (0, 0.999999),
            "repetition_penalty": (1e-3, 10),
            "repetition_context_size": (1, 2**20),
            "max_tokens": (1, 10**6),
            "seed": (0, 2**63),
        }
        low, high = limits[name]
        if not low <= parsed <= high:
            raise ValueError(f"{name} must be between {low} and {high}, got {value}")
        setattr(self, name, parsed)


@dataclass
class TurnStats:
    prompt_tokens: int = 0  # tokens of the whole conversation sent to the model
    prefilled_tokens: int = 0  # of which were new (the rest came from the cache)
    generated_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    time_to_first_token: float = 0.0
    finish_reason: str | None = None


LOW_WATER = 0.5
"""When old exchanges must go, drop down to this fraction of the prompt budget (the window less the
room kept for the reply), not just below the budget: the next turns then extend the cached prefix
again instead of each dropping one more exchange and re-prefilling the whole conversation."""


class ChatSession:
    """Messages, settings and the KV cache of one conversation.

    `send(text)` yields `GenerationChunk`s of the reply; nothing happens until it is iterated.

    Interruption (Ctrl-C, closing the generator early, or any exception) at any point of a turn
    leaves `messages`, `cached_tokens` and every cache layer consistent:

    - once a token has been handed out, the partial reply is kept in the history (and the cache
      holds the conversation up to it);
    - before that (during the prompt's prefill, or on a refused message), the conversation is as
      before the turn: the message is not added, a retried reply is put back, dropped turns are
      restored, and the cache keeps the prefix it shares with the conversation.

    Context policy: a message that cannot fit the window even with only the system prompt is
    refused (NessoError) before anything is dropped. Otherwise, when the prompt would leave less
    than `min(max_tokens, max_context // 2)` tokens for the reply, whole exchanges (a user
    message with every reply, tool call and tool result after it) are dropped, oldest first,
    until the prompt takes at most `low_water` of that budget; the system prompt and the current
    exchange are never dropped, and a notice says so in `notices`.

    `kv_bits` (4 or 8) and `max_kv_size` choose the cache (see `Model.make_cache`). A bounded cache
    (`max_kv_size`) cannot go back to a position whose window it has dropped: when a turn's prompt
    shares less with the cache than that (after `/retry`, `/undo`, an edit or dropped exchanges),
    the cache is emptied and the whole conversation is prefilled again, with a notice.
    """

    prefill_chunk_size = 512  # tokens per forward pass when prefilling the prompt

    def __init__(
        self,
        model: Model,
        tokenizer: Tokenizer,
        system: str | None = None,
        settings: SamplingSettings | None = None,
        max_context: int | None = None,
        tools: list[ToolSpec] | None = None,
        low_water: float = LOW_WATER,
        kv_bits: int | None = None,
        max_kv_size: int | None = None,
        prompt_lookup: bool = False,
    ) -> None:
        if not 0 < low_water <= 1:
            raise ValueError(f"low_water must be in (0, 1], got {low_water}")
        self.model, self.tokenizer = model, tokenizer
        self.system = system
        self.settings = settings or SamplingSettings()
        self.max_context = min(max_context or model.args.max_position_embeddings, model.args.max_position_embeddings)
        self.low_water = low_water
        self.tools = tool_schemas(tools)
        self.tool_choice: str | dict[str, Any] = "auto"  # for the next replies: "auto", "required", "none" or a tool
        self.messages: list[dict[str, Any]] = []
        self.cache_options = {"kv_bits": kv_bits, "max_kv_size": max_kv_size}
        self.prompt_lookup = prompt_lookup  # prompt-lookup decoding (see `stream_generate`)
        self.cache = model.make_cache(**self.cache_options)
        self.cached_tokens: list[int] = []  # the tokens whose keys/values are in the cache
        self.last = TurnStats()
        self.notices: list[str] = []  # things the user should know (e.g. dropped turns)

    # --- the conversation -------------------------------------------------------------------

    def _all_messages(self) -> list[dict[str, Any]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def _tokens(self, messages: list[dict[str, Any]]) -> list[int]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return self.tokenizer.apply_chat_template(system + messages, tools=self.tools)

    def context_used(self) -> int:
        return len(self.cached_tokens)

    def _prompt(self) -> list[int]:
        """The conversation's tokens, after dropping the oldest exchanges if the reply would not fit.

        Refuses (NessoError, `messages` unchanged) when the current exchange (the last user message
        and what follows it) cannot fit the window even with only the system prompt.
        """
        ids = self._tokens(self.messages)
        budget = self.max_context - min(self.settings.max_tokens, self.max_context // 2)
        if len(ids) <= budget:
            return ids
        # Where an exchange may start: a user message (never a `tool` or an assistant reply).
        cuts = [i for i, m in enumerate(self.messages) if m["role"] == "user" and i > 0]
        minimal = self._tokens(self.messages[cuts[-1] :]) if cuts else ids
        if len(minimal) >= self.max_context:
            raise NessoError(
                f"the message needs {len(minimal)} tokens (with the system prompt) but the context window is "
                f"{self.max_context}; shorten it"
            )
        if not cuts:
            return ids  # the current exchange alone: the reply gets what room is left
        # The oldest cut that brings the prompt down to the low-water mark (the current exchange
        # is kept even when it alone is above it). Prompts shrink as the cut moves on: bisect.
        target = int(self.low_water * budget)
        low, high, found = 0, len(cuts) - 1, {len(cuts) - 1: minimal}
        while low < high:
            middle = (low + high) // 2
            found[middle] = self._tokens(self.messages[cuts[middle] :])
            if len(found[middle]) <= target:
                high = middle
            else:
                low = middle + 1
        cut, ids = cuts[low], found[low]
        self.messages = self.messages[cut:]
        self.notices.append(
            f"context almost full: dropped the {cut} oldest messages (system prompt kept); "
            f"the conversation now takes {len(ids)} of {self.max_context} tokens"
        )
        return ids

    def _settle(self, known: list[int]) -> None:
        """Make every cache layer and `cached_tokens` agree.

        `known` are the tokens the cache's positions hold, in order, as far as they go. Each layer
        holds a prefix of them (layers are only appended to, and `stream_generate` rolls every layer
        back to one offset), so the cache keeps the longest prefix all layers and `known` share.
        """
        keep = min([layer.offset for layer in self.cache] + [len(known)])
        self.cached_tokens = known[: self._rollback(keep)]

    def _rollback(self, offset: int) -> int:
        """Roll the cache back to `offset`; returns where it is now: `offset`, or 0 when a bounded
        cache had dropped what `offset` needs (it is then empty)."""
        try:
            rollback_cache(self.cache, offset)
        except CacheRollbackError:
            self.notices.append(
                f"the KV cache (--max-kv-size {self.cache_options['max_kv_size']}) no longer holds the start of the "
                "conversation's window: reading the whole conversation again"
            )
            return 0
        return offset

    def _reuse_cache(self, ids: list[int]) -> list[int]:
        """Roll the cache back to the longest common prefix with `ids`; returns the tokens to prefill."""
        self._settle(self.cached_tokens)
        common = 0
        for a, b in zip(self.cached_tokens, ids, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # at least one token must go through the model
        common = self._rollback(common)  # the cache first: `cached_tokens` stays a valid description
        self.cached_tokens = self.cached_tokens[:common]
        return ids[common:]

    def send(self, text: str) -> Iterator[GenerationChunk]:
        """Add a user message and stream the assistant's reply."""
        return self._reply({"role": "user", "content": text})

    def _reply(self, message: dict[str, Any] | None = None, retry: bool = False) -> Iterator[GenerationChunk]:
        """Add `message` (or take back the last reply, to `retry`), then stream a new reply."""
        before, notices = list(self.messages), len(self.notices)
        self.last = TurnStats()
        ids: list[int] | None = None  # set once the prompt's prefill may start
        pieces: list[str] = []
        tokens: list[int] = []
        stream = None
        finished = interrupted = False
        try:
            if retry:
                if not self.messages or self.messages[-1]["role"] != "assistant":
                    raise NessoError("there is no reply to retry yet")
                self.messages.pop()
            if message is not None:
                self.messages.append(message)
            prompt = self._prompt()
            new = self._reuse_cache(prompt)
            self.last = TurnStats(prompt_tokens=len(prompt), prefilled_tokens=len(new))
            ids = prompt
            stream = self._stream(new)
            for chunk in stream:
                if chunk.token is not None:
                    if not tokens:
                        self.last.prompt_tps = chunk.prompt_tps
                        self.last.time_to_first_token = len(new) / chunk.prompt_tps if chunk.prompt_tps else 0.0
                    tokens.append(chunk.token)
                pieces.append(chunk.text)
                self.last.generated_tokens = chunk.generation_tokens
                self.last.generation_tps = chunk.generation_tps
                self.last.finish_reason = chunk.finish_reason
                yield chunk
            finished = True
        except (KeyboardInterrupt, GeneratorExit):
            interrupted = True
            raise
        finally:
            if stream is not None and hasattr(stream, "close"):
                stream.close()  # its own `finally` rolls every layer back to one offset
            # The cache holds `ids` and the reply's tokens (stream_generate leaves all but the last),
            # or, if the prefill never started, a prefix of the old `cached_tokens`.
            self._settle(self.cached_tokens if ids is None else ids + tokens)
            if ids is not None and self.last.finish_reason is None:
                self.last.finish_reason = "interrupted"
            if finished or pieces:
                self.messages.append(self._assistant_message("".join(pieces)))
            else:  # no reply at all: the conversation is as before the turn
                self.messages = before
                del self.notices[notices:]
                if interrupted and ids is not None:
                    what = "the message was not added" if message is not None else "the conversation is unchanged"
                    self.notices.append(f"interrupted before the reply began: {what}")

    def _assistant_message(self, text: str) -> dict[str, Any]:
        """The reply as a message. Well-formed tool calls become `tool_calls`, so the template
        renders them as the model wrote them (and the next turn reuses their cached tokens); a
        reply with a malformed call keeps its raw text, for the caller to report it."""
        if not self.tools:
            return {"role": "assistant", "content": text}
        content, calls = parse_tool_calls(text)
        if not calls or not all(call.ok for call in calls):
            return {"role": "assistant", "content": text}
        return {"role": "assistant", "content": content, "tool_calls": [call.to_message() for call in calls]}

    def _stream(self, new_tokens: list[int]) -> Iterator[GenerationChunk]:
        """Generate from the cache plus `new_tokens` (the one place the model is called)."""
        s = self.settings
        room = self.max_context - len(self.cached_tokens) - len(new_tokens)  # the reply stays in the window
        return stream_generate(
            self.model,
            self.tokenizer,
            new_tokens,
            cache=self.cache,
            cached_ids=self.cached_tokens,
            max_tokens=max(1, min(s.max_tokens, room)),
            sampling=s,
            tools=self.tools,
            tool_choice=self.tool_choice,
            prefill_chunk_size=self.prefill_chunk_size,
            prompt_lookup=self.prompt_lookup,
        )

    def add_tool_result(self, content: str) -> None:
        """Append a tool's result (a `tool` message) for the model to read on the next reply."""
        self.messages.append({"role": "tool", "content": content})

    def continue_reply(self) -> Iterator[GenerationChunk]:
        """Generate the next assistant reply without a new user message (after tool results)."""
        return self._reply()

    def retry(self) -> Iterator[GenerationChunk]:
        """Regenerate the last reply (it is replaced once the new one starts)."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise NessoError("there is no reply to retry yet")
        return self._reply(retry=True)

    def undo(self) -> bool:
        """Remove the last exchange (user message and reply); False if there is none."""
        if not self.messages:
            return False
        while self.messages and self.messages[-1]["role"] != "user":
            self.messages.pop()
        if self.messages:
            self.messages.pop()
        return True

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages = []

    # --- prompt-cache files -----------------------------------------------------------------

    def static_prefix(self) -> list[int]:
        """The tokens every conversation of this session starts with: the system prompt and the
        tool schemas as the template renders them, up to where the first user message's text begins."""
        a = self._tokens([{"role": "user", "content": "a"}])
        b = self._tokens([{"role": "user", "content": "b"}])
        common = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        return a[:common]

    def save_prompt_cache(self, path: str | Path) -> int:
        """Prefill the static prefix (system prompt and tools) once and save its keys and values,
        with the model's identity and the token ids, to a .safetensors file. Returns its length."""
        import mlx.core as mx

        from .cache import save_cache
        from .generation import prefill

        ids = self.static_prefix()
        if not ids:
            raise NessoError("nothing to cache: the conversation has no fixed beginning (no system prompt or tools)")
        cache = self.model.make_cache()
        mx.eval(prefill(self.model, mx.array(ids, dtype=mx.int32), cache, self.prefill_chunk_size))
        save_cache(path, cache, {"kind": "prompt"}, model=self.model, tokens=ids)
        return len(ids)

    def load_prompt_cache(self, path: str | Path) -> int:
        """Start from a prompt cache saved by `save_prompt_cache` (refused, in one line, if another
        model made it): the turns that begin with its tokens prefill only what follows them.
        Returns how many of its tokens this session's conversation starts with."""
        from .cache import load_cache

        loaded = load_cache(path, self.model, **self.cache_options)
        if loaded.tokens is None or loaded.metadata.get("kind") != "prompt":
            raise NessoError(f"{path}: not a prompt cache made by `nesso-mlx chat --prompt-cache`")
        self.cache, self.cached_tokens = loaded.cache, loaded.tokens
        prefix = self.static_prefix()
        return next(
            (i for i, (x, y) in enumerate(zip(prefix, loaded.tokens, strict=False)) if x != y),
            min(len(prefix), len(loaded.tokens)),
        )

    # --- persistence ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"format": "nesso-mlx-chat/1", "system": self.system, "messages": self.messages, "settings": asdict(self.settings)}

    def save(self, path: str | Path) -> Path:
        """Write the conversation as JSON, atomically."""
        path = Path(path).expanduser()
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=2), encoding="utf-8")
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise NessoError(f"{path}: cannot write ({e.strerror})") from None
        return path

    def load(self, path: str | Path) -> None:
        """Replace the conversation with one saved by `save`."""
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            messages = data["messages"]
            if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
                raise ValueError("messages must be a list of {role, content}")
            settings = SamplingSettings(**data.get("settings", {}))
        except FileNotFoundError:
            raise NessoError(f"{path}: file not found") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise NessoError(f"{path}: not a saved nesso-mlx conversation ({e})") from None
        self.system, self.messages, self.settings = data.get("system"), messages, settings
