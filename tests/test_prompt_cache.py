"""Prompt-cache files: the system prompt and tool schemas prefilled once, reused by new sessions."""

from __future__ import annotations

import pytest
import typer
from conftest import write_model_folder
from nesso_fixture import nesso_folder

from nesso_mlx import load
from nesso_mlx.chat import ChatSession, SamplingSettings
from nesso_mlx.cli import use_prompt_cache
from nesso_mlx.errors import NessoError

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "cerca_orari",
            "description": "Orari dei treni tra due città.",
            "parameters": {
                "type": "object",
                "properties": {"da": {"type": "string"}, "a": {"type": "string"}},
                "required": ["da", "a"],
            },
        },
    }
]
SYSTEM = "Sei un assistente per i viaggi in treno in Italia. Rispondi in italiano, in breve."


@pytest.fixture(scope="module")
def nesso():
    return load(nesso_folder("text"))


def session(model_and_tokenizer, system=SYSTEM):
    model, tokenizer = model_and_tokenizer
    return ChatSession(model, tokenizer, system=system, tools=TOOLS, settings=SamplingSettings(temperature=0.0, max_tokens=6))


def reply(chat, text):
    return [c.token for c in chat.send(text) if c.token is not None]


def test_a_new_session_starts_from_the_file(nesso, tmp_path):
    path = tmp_path / "viaggi.safetensors"
    builder = session(nesso)
    prefix = builder.static_prefix()
    assert builder.save_prompt_cache(path) == len(prefix) > 100  # the system prompt and the tool schemas
    fresh, cached = session(nesso), session(nesso)
    assert cached.load_prompt_cache(path) == len(prefix)
    question = "Treni da Roma a Bari domani?"
    expected = reply(fresh, question)
    assert reply(cached, question) == expected  # the same reply (greedy)
    assert fresh.last.prefilled_tokens == fresh.last.prompt_tokens
    assert cached.last.prefilled_tokens == cached.last.prompt_tokens - len(prefix)  # only the question
    # a session with another system prompt reuses only what it shares, and still answers right
    other = session(nesso, system="Rispondi in inglese.")
    shared = other.load_prompt_cache(path)
    assert 0 < shared < len(prefix)
    reference = session(nesso, system="Rispondi in inglese.")
    assert reply(other, question) == reply(reference, question)
    assert other.last.prefilled_tokens == other.last.prompt_tokens - shared


def test_another_models_file_is_refused_and_kept(nesso, tmp_path):
    path = tmp_path / "viaggi.safetensors"
    session(nesso).save_prompt_cache(path)
    before = path.read_bytes()
    other = load(nesso_folder("added"))  # another model (other weights and vocabulary)
    with pytest.raises(NessoError, match="another model"):
        session(other).load_prompt_cache(path)
    with pytest.raises(typer.Exit):
        use_prompt_cache(session(other), str(path))
    assert path.read_bytes() == before
    tiny = load(write_model_folder(tmp_path / "tiny"))
    with pytest.raises(NessoError, match="layers|another model"):
        ChatSession(*tiny, system="x").load_prompt_cache(path)


def test_the_cli_builds_reuses_and_rebuilds(nesso, tmp_path, capsys):
    path = tmp_path / "p.safetensors"
    first = session(nesso)
    use_prompt_cache(first, str(path))
    assert "prefilled and saved" in capsys.readouterr().err and path.exists()
    assert first.cached_tokens == first.static_prefix()
    second = session(nesso)
    use_prompt_cache(second, str(path))
    assert "tokens from" in capsys.readouterr().err and second.cached_tokens == second.static_prefix()
    changed = session(nesso, system="Parla solo di treni regionali.")
    use_prompt_cache(changed, str(path))
    assert "rebuilding" in capsys.readouterr().err and changed.cached_tokens == changed.static_prefix()
    (tmp_path / "notes.safetensors").write_bytes(b"not a cache")
    with pytest.raises(typer.Exit):
        use_prompt_cache(session(nesso), str(tmp_path / "notes.safetensors"))
    assert (tmp_path / "notes.safetensors").read_bytes() == b"not a cache"  # never replaced
