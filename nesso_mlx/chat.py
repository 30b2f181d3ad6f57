"""A multi-turn conversation that keeps its KV cache: each turn prefills only its new tokens."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .cache import trim_cache
from .errors import NessoError
from .generation import GenerationChunk, stream_generate
from .model import Model
from .tokenizer import Tokenizer
from .tools import ToolSpec, tool_schemas


@dataclass
class SamplingSettings:
    """Per-session generation settings, changeable between turns."""

    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    max_tokens: int = 1024
    seed: int | None = None

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


class ChatSession:
    """Messages, settings and the KV cache of one conversation.

    `send(text)` yields `GenerationChunk`s of the reply. Closing the generator early (Ctrl-C)
    keeps the partial reply in the history, and the cache stays consistent with it.
    """

    def __init__(
        self,
        model: Model,
        tokenizer: Tokenizer,
        system: str | None = None,
        settings: SamplingSettings | None = None,
        max_context: int | None = None,
        tools: list[ToolSpec] | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.system = system
        self.settings = settings or SamplingSettings()
        self.max_context = min(max_context or model.args.max_position_embeddings, model.args.max_position_embeddings)
        self.tools = tool_schemas(tools)
        self.messages: list[dict[str, Any]] = []
        self.cache = model.make_cache()
        self.cached_tokens: list[int] = []  # the tokens whose keys/values are in the cache
        self.last = TurnStats()
        self.notices: list[str] = []  # things the user should know (e.g. dropped turns)

    # --- the conversation -------------------------------------------------------------------

    def _all_messages(self) -> list[dict[str, Any]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def context_used(self) -> int:
        return len(self.cached_tokens)

    def _prompt(self) -> list[int]:
        """The conversation's tokens, dropping the oldest turns if the reply would not fit."""
        budget = self.max_context - min(self.settings.max_tokens, self.max_context // 2)
        dropped = 0
        while True:
            ids = self.tokenizer.apply_chat_template(self._all_messages(), tools=self.tools)
            if len(ids) <= budget or len(self.messages) <= 1:
                break
            # Drop the oldest exchange: everything up to (not including) the next user message.
            cut = next((i for i, m in enumerate(self.messages[1:], 1) if m["role"] == "user"), len(self.messages) - 1)
            dropped += cut
            self.messages = self.messages[cut:]
        if dropped:
            self.notices.append(f"context almost full: dropped the {dropped} oldest messages (system prompt kept)")
        if len(ids) >= self.max_context:
            raise NessoError(f"the message needs {len(ids)} tokens but the context window is {self.max_context}; shorten it")
        return ids

    def _reuse_cache(self, ids: list[int]) -> list[int]:
        """Roll the cache back to the longest common prefix with `ids`; returns the tokens to prefill."""
        common = 0
        for a, b in zip(self.cached_tokens, ids, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # at least one token must go through the model
        trim_cache(self.cache, len(self.cached_tokens) - common)
        self.cached_tokens = self.cached_tokens[:common]
        return ids[common:]

    def send(self, text: str) -> Iterator[GenerationChunk]:
        """Add a user message and stream the assistant's reply."""
        self.messages.append({"role": "user", "content": text})
        return self._reply()

    def _reply(self) -> Iterator[GenerationChunk]:
        ids = self._prompt()
        new = self._reuse_cache(ids)
        self.last = TurnStats(prompt_tokens=len(ids), prefilled_tokens=len(new))
        pieces: list[str] = []
        tokens: list[int] = []
        try:
            for chunk in self._stream(new):
                if not tokens and chunk.token is not None:
                    self.last.prompt_tps = chunk.prompt_tps
                    self.last.time_to_first_token = len(new) / chunk.prompt_tps if chunk.prompt_tps else 0.0
                if chunk.token is not None:
                    tokens.append(chunk.token)
                pieces.append(chunk.text)
                self.last.generated_tokens = chunk.generation_tokens
                self.last.generation_tps = chunk.generation_tps
                self.last.finish_reason = chunk.finish_reason
                yield chunk
        finally:
            # stream_generate leaves prompt + reply[:-1] in the cache, also when interrupted.
            self.cached_tokens = ids + tokens[:-1]
            if self.cache[0].offset != len(self.cached_tokens):  # interrupted before the first token
                trim_cache(self.cache, self.cache[0].offset)
                self.cached_tokens = []
            if self.last.finish_reason is None:
                self.last.finish_reason = "interrupted"
            self.messages.append({"role": "assistant", "content": "".join(pieces)})

    def _stream(self, new_tokens: list[int]) -> Iterator[GenerationChunk]:
        """Generate from the cache plus `new_tokens` (the one place the model is called)."""
        s = self.settings
        return stream_generate(
            self.model,
            self.tokenizer,
            new_tokens,
            cache=self.cache,
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            min_p=s.min_p,
            repetition_penalty=s.repetition_penalty,
            seed=s.seed,
            tools=self.tools,
        )

    def add_tool_result(self, content: str) -> None:
        """Append a tool's result (a `tool` message) for the model to read on the next reply."""
        self.messages.append({"role": "tool", "content": content})

    def continue_reply(self) -> Iterator[GenerationChunk]:
        """Generate the next assistant reply without a new user message (after tool results)."""
        return self._reply()

    def retry(self) -> Iterator[GenerationChunk]:
        """Regenerate the last reply."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise NessoError("there is no reply to retry yet")
        self.messages.pop()
        return self._reply()

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
