"""Quantized KV cache (kv_bits) and bounded KV cache (max_kv_size): attention against mlx-lm's,
fidelity (KL) against the full-precision cache, chunked prefill, rollback, interrupts, chat
sessions, save/load and the CLI flags."""

from __future__ import annotations

import shutil
import subprocess

import mlx.core as mx
import pytest
from conftest import TINY_CONFIG, write_model_folder

from nesso_mlx import load
from nesso_mlx.api import generate, stream_generate
from nesso_mlx.cache import (
    BoundedKVCache,
    CacheRollbackError,
    KVCache,
    QuantizedKVCache,
    _Bounded,
    load_cache,
    quantized_attention,
    rollback_cache,
    save_cache,
    trim_cache,
)
from nesso_mlx.chat import ChatSession, SamplingSettings
from nesso_mlx.errors import NessoError
from nesso_mlx.sampling import SamplingOptions

# Nesso's attention shape in miniature: head_dim 64 (group size 64), 3 query heads per kv head.
GQA_CONFIG = dict(TINY_CONFIG, hidden_size=384, num_attention_heads=6, num_key_value_heads=2, intermediate_size=256)


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    return load(write_model_folder(tmp_path_factory.mktemp("kv") / "gqa", GQA_CONFIG), dtype="float32")


@pytest.fixture(scope="module")
def nesso(tmp_path_factory):
    """The Nesso vocabulary and template, with head_dim 32 (so kv_bits uses group size 32)."""
    import json

    from conftest import random_weights
    from nesso_fixture import nesso_folder

    src = nesso_folder("text")
    dest = tmp_path_factory.mktemp("kv") / "nesso32"
    shutil.copytree(src, dest)
    config = json.loads((src / "config.json").read_text())
    config.update(num_attention_heads=2, num_key_value_heads=1)
    (dest / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(dest / "model.safetensors"), random_weights(config, seed=7, scale=0.5))
    return load(dest, dtype="float32")


def log_probs(model, ids, cache, first=8):
    """Next-token log-probabilities at every position: a prefill of `first` tokens, then one at a time."""
    x = mx.array([ids])
    logits = [model(x[:, :first], cache)] + [model(x[:, i : i + 1], cache) for i in range(first, len(ids))]
    logits = mx.concatenate(logits, axis=1)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def sample_ids(model, tokenizer, n=64):
    prompt = "the weather in the north is"
    return (
        tokenizer.encode(prompt)
        + generate(model, tokenizer, prompt=prompt, max_tokens=n, sampling=SamplingOptions(temperature=1.0, seed=3)).tokens
    )


# --- quantized attention ---------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 5])
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_attention_matches_mlx_lm(length, bits):
    from mlx_lm.models.base import quantized_scaled_dot_product_attention

    mx.random.seed(0)
    queries = mx.random.normal((1, 15, length, 64))  # Nesso: 15 query heads, 5 kv heads
    keys, values = mx.random.normal((1, 5, 40, 64)), mx.random.normal((1, 5, 40, 64))
    qk, qv = mx.quantize(keys, group_size=64, bits=bits), mx.quantize(values, group_size=64, bits=bits)
    mask = "causal" if length > 1 else None
    ours = quantized_attention(queries, qk, qv, 0.125, mask, 64, bits)
    # (a copy: mlx-lm scales its `queries` argument in place)
    theirs = quantized_scaled_dot_product_attention(mx.array(queries), qk, qv, scale=0.125, mask=mask, group_size=64, bits=bits)
    assert ours.shape == (1, 15, length, 64)
    assert mx.allclose(ours, theirs, atol=1e-5).item()
    # The cache's own path (quantize on write, attend) gives the same on the same tensors.
    cache = QuantizedKVCache(bits=bits)
    cache.update_and_fetch(keys[:, :, : 40 - length], values[:, :, : 40 - length])
    out = cache.attend(queries, keys[:, :, 40 - length :], values[:, :, 40 - length :], 0.125)
    assert mx.allclose(out, theirs, atol=1e-5).item()


def test_quantized_cache_grows_in_blocks_and_is_smaller():
    full, quantized = KVCache(), QuantizedKVCache(bits=8)
    k = mx.ones((1, 5, 300, 64), dtype=mx.float16)
    full.update_and_fetch(k, k)
    quantized.update_and_fetch(k, k)
    assert quantized.offset == 300 and quantized.capacity == 512 == full.capacity
    # 64 values: 128 bytes in float16; 64 + a float16 scale and bias at 8 bits, 32 + 4 at 4 bits
    assert quantized.nbytes / full.nbytes == pytest.approx(68 / 128)
    four = QuantizedKVCache(bits=4)
    four.update_and_fetch(k, k)
    assert four.nbytes / full.nbytes == pytest.approx(36 / 128)
    with pytest.raises(ValueError, match="kv_bits must be 4 or 8"):
        QuantizedKVCache(bits=3)


# --- fidelity against the full-precision cache --------------------------------------------


def test_kl_to_the_full_precision_cache_is_small_at_8_bits_and_larger_at_4(gqa):
    model, tokenizer = gqa
    ids = sample_ids(model, tokenizer)
    reference = log_probs(model, ids, model.make_cache())
    kl = {}
    for bits in (8, 4):
        got = log_probs(model, ids, model.make_cache(kv_bits=bits))
        kl[bits] = (mx.exp(reference) * (reference - got)).sum(-1).mean().item()
    # Measured on this random model: 0.0065 (8 bits) and 0.94 (4 bits) nats per position.
    assert kl[8] < 0.03
    assert kl[4] > 5 * kl[8]


def test_chunked_prefill_equals_prefill_at_once(gqa):
    model, tokenizer = gqa
    ids = mx.array([sample_ids(model, tokenizer, 40)])
    for bits in (4, 8):
        once = model(ids, model.make_cache(kv_bits=bits))
        cache = model.make_cache(kv_bits=bits)
        chunks = [model(ids[:, i : i + 16], cache) for i in range(0, ids.shape[1], 16)]
        assert mx.allclose(mx.concatenate(chunks, axis=1), once, atol=1e-5).item()


def test_quantized_rollback_is_exact(gqa):
    model, _ = gqa
    tokens = mx.array([[3, 9, 27, 81, 243, 100, 50, 25]])
    cache = model.make_cache(kv_bits=8)
    model(tokens[:, :5], cache)
    expected = model(tokens[:, 5:], cache)
    assert trim_cache(cache, 3) == 3 and cache[0].offset == 5
    model(mx.array([[1, 2, 4]]), cache)
    rollback_cache(cache, 5)
    assert mx.allclose(model(tokens[:, 5:], cache), expected, atol=1e-6).item()


def test_generation_continues_from_a_quantized_cache(gqa):
    model, tokenizer = gqa
    cache = model.make_cache(kv_bits=8)
    first = generate(model, tokenizer, prompt="the cat", max_tokens=8, cache=cache)
    assert all(layer.offset == len(tokenizer.encode("the cat")) + len(first.tokens) - 1 for layer in cache)
    held = tokenizer.encode("the cat") + first.tokens[:-1]
    second = generate(model, tokenizer, prompt=[first.tokens[-1], *tokenizer.encode(" in")], max_tokens=8, cache=cache)
    fresh = generate(
        model,
        tokenizer,
        prompt=[*held, first.tokens[-1], *tokenizer.encode(" in")],
        max_tokens=8,
        cache=model.make_cache(kv_bits=8),
    )
    assert second.tokens == fresh.tokens


def quantized_state_of(model, ids, **options):
    cache = model.make_cache(**options)
    model(mx.array([ids]), cache)
    return cache


@pytest.mark.parametrize("handed_out", [0, 3])
def test_an_exception_mid_generation_leaves_the_quantized_cache_consistent(gqa, handed_out):
    model, tokenizer = gqa
    ids = tokenizer.encode("the weather in the north")
    cache = model.make_cache(kv_bits=4)
    calls = [0]

    def broken(history, logits):
        calls[0] += 1
        if calls[0] > handed_out:
            raise RuntimeError("broken processor")
        return logits

    tokens = []
    with pytest.raises(RuntimeError, match="broken processor"):
        for chunk in stream_generate(model, tokenizer, prompt=ids, max_tokens=10, cache=cache, logits_processors=[broken]):
            tokens.append(chunk.token)
    held = ids + tokens[:-1] if tokens else []
    assert [layer.offset for layer in cache] == [len(held)] * len(cache)
    if held:  # the quantized keys and values are those of a fresh prefill of the held tokens
        reference = quantized_state_of(model, held, kv_bits=4)
        for got, want in zip(cache, reference, strict=True):
            for a, b in zip(got.state, want.state, strict=True):
                assert mx.allclose(a, b, atol=1e-4).item()


# --- bounded cache (max_kv_size) --------------------------------------------------------------


@pytest.fixture
def small_slack(monkeypatch):
    """Compact often: every 8 positions past the bound, keeping 6 for rollbacks."""
    monkeypatch.setattr(_Bounded, "slack", 14)
    monkeypatch.setattr(_Bounded, "reserve", 6)


def test_the_window_mask_is_sinks_plus_the_recent_positions():
    cache = BoundedKVCache(16)
    k = mx.zeros((1, 1, 40, 8))
    cache.update_and_fetch(k, k)
    mask = cache._mask(3).tolist()  # the last three queries, positions 37..39, over all 40 slots
    for row, q in zip(mask, range(37, 40), strict=True):
        assert [p for p in range(40) if row[p]] == [0, 1, 2, 3, *range(q - 11, q + 1)]


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_a_bounded_cache_bounds_memory_and_generation_goes_on(gqa, small_slack, kv_bits, monkeypatch):
    model, tokenizer = gqa
    ids = sample_ids(model, tokenizer, 90)
    # Compacted every few tokens (small slack) == never compacted (huge slack): same windows.
    compacted_cache = model.make_cache(max_kv_size=24, kv_bits=kv_bits)
    compacted = log_probs(model, ids, compacted_cache)
    assert compacted_cache[0].dropped > 50 and compacted_cache[0].capacity == 256  # one block: 24 + 14 positions
    assert all(len(a.shape) == 4 and a.shape[2] <= 24 + 14 for a in compacted_cache[0].state)
    monkeypatch.setattr(_Bounded, "slack", 10_000)
    uncompacted = log_probs(model, ids, model.make_cache(max_kv_size=24, kv_bits=kv_bits))
    assert mx.allclose(compacted, uncompacted, atol=1e-4).item()
    # A bound longer than the sequence changes nothing.
    plain = log_probs(model, ids, model.make_cache(kv_bits=kv_bits))
    assert mx.allclose(log_probs(model, ids, model.make_cache(max_kv_size=512, kv_bits=kv_bits)), plain, atol=1e-4).item()
    # The window does change the distribution once the sequence is longer than it.
    assert not mx.allclose(compacted, plain, atol=1e-3).item()


def test_generation_beyond_the_bound(gqa, small_slack):
    model, tokenizer = gqa
    cache = model.make_cache(max_kv_size=24)
    out = generate(model, tokenizer, prompt="the cat", max_tokens=100, cache=cache, prompt_lookup=True)
    assert len(out.tokens) == 100 or out.finish_reason == "stop"
    assert cache[0].offset == len(tokenizer.encode("the cat")) + len(out.tokens) - 1
    assert cache[0].capacity == 256 and cache[0].dropped > 0


def test_rolling_back_past_the_window_empties_and_raises(gqa, small_slack):
    model, _ = gqa
    cache = model.make_cache(max_kv_size=24)
    model(mx.array([list(range(3, 43))]), cache)
    model(mx.array([list(range(43, 63))]), cache)  # positions before the window are dropped before this write
    lowest = cache[0].min_offset
    assert 0 < lowest < 60
    assert trim_cache(cache, 100) == 60 - lowest and cache[0].offset == lowest  # trim goes as far as it can
    with pytest.raises(CacheRollbackError, match="cannot go back to position"):
        rollback_cache(cache, lowest - 1)
    assert [layer.offset for layer in cache] == [0, 0] and cache[0].state == ()
    model(mx.array([[5, 6, 7]]), cache)  # usable again from the start
    assert cache[0].offset == 3


def test_an_interrupted_prefill_with_a_dropped_window_leaves_an_empty_cache(gqa, small_slack):
    model, tokenizer = gqa
    cache = model.make_cache(max_kv_size=24)
    model(mx.array([list(range(3, 40))]), cache)

    def broken(history, logits):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # not a CacheRollbackError: the interrupt goes through
        list(
            stream_generate(
                model,
                tokenizer,
                prompt=list(range(50, 90)),
                max_tokens=4,
                cache=cache,
                logits_processors=[broken],
                prefill_chunk_size=8,
            )
        )
    assert [layer.offset for layer in cache] == [0, 0]


def test_no_tokens_asked_on_a_dropped_window_leaves_an_empty_cache(gqa, small_slack):
    """max_tokens=0 after a prompt that pushed the window past what the cache held before: the
    cache cannot go back, so it is emptied, once, and nothing is raised."""
    model, tokenizer = gqa
    cache = model.make_cache(max_kv_size=24)
    model(mx.array([list(range(3, 40))]), cache)
    chunks = list(stream_generate(model, tokenizer, prompt=list(range(50, 90)), max_tokens=0, cache=cache, prefill_chunk_size=8))
    assert [c.finish_reason for c in chunks] == ["length"]
    assert [layer.offset for layer in cache] == [0, 0]


def new_session(nesso, **kwargs):
    model, tokenizer = nesso
    settings = SamplingSettings(temperature=0.0, max_tokens=20)
    return ChatSession(model, tokenizer, system="Sei un assistente.", settings=settings, **kwargs)


@pytest.mark.parametrize("kv_bits", [None, 4])
def test_a_chat_session_with_a_bounded_cache(nesso, small_slack, kv_bits):
    session = new_session(nesso, max_kv_size=40, kv_bits=kv_bits)
    assert isinstance(session.cache[0], _Bounded) and (kv_bits is None) != isinstance(session.cache[0], QuantizedKVCache)
    for text in ("Ciao, come stai oggi?", "Raccontami una storia lunga.", "E poi?"):
        list(session.send(text))
        assert [layer.offset for layer in session.cache] == [len(session.cached_tokens)] * len(session.cache)
    assert session.context_used() > 60 and session.cache[0].dropped > 0 and session.last.prefilled_tokens < 30
    # /retry goes back before the window: the cache is emptied, the conversation read again, with a notice.
    list(session.retry())
    assert session.notices and "reading the whole conversation again" in session.notices[-1]
    assert session.last.prefilled_tokens == session.last.prompt_tokens
    # ... and the next turn is what a fresh session gives on the same conversation.
    fresh = new_session(nesso, max_kv_size=40, kv_bits=kv_bits)
    fresh.messages = [dict(m) for m in session.messages]
    assert [c.token for c in session.send("Grazie")] == [c.token for c in fresh.send("Grazie")]


# --- save and load ------------------------------------------------------------------------


def test_save_refuses_a_quantized_cache_and_load_quantizes(gqa, tmp_path):
    model, _ = gqa
    ids = mx.array([[5, 6, 7, 8, 9, 10]])
    quantized = model.make_cache(kv_bits=8)
    model(ids, quantized)
    with pytest.raises(NessoError) as e:
        save_cache(tmp_path / "q.safetensors", quantized, model=model)
    message = str(e.value)
    assert "\n" not in message and "q.safetensors" in message and "load_cache(path, model, kv_bits=" in message
    assert not (tmp_path / "q.safetensors").exists()
    full = model.make_cache()
    model(ids, full)
    save_cache(tmp_path / "f.safetensors", full, model=model, tokens=ids[0].tolist())
    loaded = load_cache(tmp_path / "f.safetensors", model, kv_bits=8)
    assert isinstance(loaded.cache[0], QuantizedKVCache) and loaded.cache[0].offset == 6
    # The file's full-precision keys and values, quantized (not a quantized prefill: there the later
    # layers' keys come from quantized attention).
    reference = model.make_cache(kv_bits=8)
    for layer, source in zip(reference, full, strict=True):
        layer.set_state(*source.state)
    nxt = mx.array([[11, 12]])
    assert mx.allclose(model(nxt, loaded.cache), model(nxt, reference), atol=1e-5).item()


def test_save_refuses_a_bounded_cache_that_dropped_positions(gqa, small_slack, tmp_path):
    model, _ = gqa
    cache = model.make_cache(max_kv_size=24)
    model(mx.array([list(range(3, 13))]), cache)
    save_cache(tmp_path / "ok.safetensors", cache, model=model)  # nothing dropped yet: a plain prefix
    model(mx.array([list(range(13, 63))]), cache)
    model(mx.array([[63]]), cache)
    with pytest.raises(NessoError, match=r"b\.safetensors: this bounded KV cache \(max_kv_size=24\) has dropped"):
        save_cache(tmp_path / "b.safetensors", cache, model=model)


def test_a_prompt_cache_loads_into_a_quantized_session(nesso, tmp_path):
    session = new_session(nesso, kv_bits=8)
    session.save_prompt_cache(tmp_path / "p.safetensors")
    assert session.load_prompt_cache(tmp_path / "p.safetensors") == len(session.static_prefix())
    assert isinstance(session.cache[0], QuantizedKVCache)
    list(session.send("Ciao"))
    assert session.last.prefilled_tokens < session.last.prompt_tokens


def test_make_cache_arguments(gqa, nesso):
    model, _ = gqa
    assert type(model.make_cache()[0]) is KVCache and type(model.make_cache(64)[0]) is KVCache
    with pytest.raises(ValueError, match="kv_bits must be 4 or 8"):
        model.make_cache(kv_bits=2)
    with pytest.raises(ValueError, match="max_kv_size must be more than 8"):
        model.make_cache(max_kv_size=8)
    tiny = load(write_model_folder(__import__("pathlib").Path(__import__("tempfile").mkdtemp()) / "t"))[0]
    with pytest.raises(ValueError, match="head dimension divisible by 32; this model's is 16"):
        tiny.make_cache(kv_bits=8)


# --- CLI ------------------------------------------------------------------------------------


def nesso_mlx(*args, env=None):
    return subprocess.run(["nesso-mlx", *args], capture_output=True, text=True, timeout=300, env=env)


def test_generate_with_kv_flags(tmp_path):
    folder = write_model_folder(tmp_path / "gqa", GQA_CONFIG)
    common = ["generate", "--model", str(folder), "--prompt", "the", "--raw", "--max-tokens", "40", "--json"]
    plain = nesso_mlx(*common)
    flagged = nesso_mlx(*common, "--kv-bits", "8", "--max-kv-size", "16")
    assert plain.returncode == flagged.returncode == 0, flagged.stderr
    import json

    assert json.loads(flagged.stdout)["generation_tokens"] == json.loads(plain.stdout)["generation_tokens"]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--kv-bits", "3"], "--kv-bits must be 4 or 8, got 3"),
        (["--kv-bits", "x"], "--kv-bits must be 4 or 8, got 'x'"),
        (["--max-kv-size", "8"], "--max-kv-size must be an integer >= 9, got 8"),
        (["--max-kv-size", "-1"], "--max-kv-size must be an integer >= 9"),
    ],
)
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_bad_kv_flags_are_one_line_usage_errors(command, args, needle):
    from typer.testing import CliRunner

    from nesso_mlx.cli import app

    extra = ["--prompt", "hi"] if command == "generate" else []
    result = CliRunner().invoke(app, [command, "--model", "/no/such/model", *extra, *args])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.output


def test_kv_bits_on_a_model_that_cannot_take_it_is_one_line(tiny_folder):
    result = nesso_mlx("generate", "--model", str(tiny_folder), "--prompt", "the", "--raw", "--kv-bits", "8")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "head dimension divisible by 32" in lines[0], result.stderr
