"""The Nesso family: short aliases, Hugging Face repo ids and what each model is for."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KnownModel:
    alias: str
    repo_id: str
    purpose: str
    parameters: str = "0.4B"


KNOWN_MODELS = [
    KnownModel("nesso-instruct", "mii-llm/nesso-0.4B-instruct", "chat (Italian/English)"),
    KnownModel("nesso-agentic", "mii-llm/nesso-0.4B-agentic", "function calling, structured JSON"),
    KnownModel("zagreus", "mii-llm/zagreus-0.4B-ita", "base model (Italian)"),
    KnownModel("open-zagreus", "mii-llm/open-zagreus-0.4B", "base model"),
]
DEFAULT_CHAT_MODEL = "nesso-instruct"
_BY_ALIAS = {m.alias: m for m in KNOWN_MODELS}


def resolve_alias(name: str) -> str:
    """A short alias such as `nesso-agentic` becomes its repo id; anything else is returned as is."""
    known = _BY_ALIAS.get(name)
    return known.repo_id if known else name
