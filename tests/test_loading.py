"""load(): local folders, the HF cache offline, quantized mlx-lm folders, and every bad-input case."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import TINY_CONFIG, random_weights, write_model_folder
from mlx_lm.models import llama as mlx_lm_llama
from mlx_lm.utils import load_model as mlx_lm_load_model
from mlx_lm.utils import quantize_model, save_config, save_model

from nesso_mlx import load
from nesso_mlx.config import ModelArgs, load_config
from nesso_mlx.errors import ConfigError, HubError, NessoError, WeightsError
from nesso_mlx.sampling import SamplingOptions


def tokens():
    return mx.array([[5, 80, 200, 33, 7, 260]])


def test_load_local_folder_keeps_dtype_and_matches_weights(tmp_path):
    folder = write_model_folder(tmp_path / "m", dtype=mx.bfloat16)
    model, tokenizer = load(folder)
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    model32, _ = load(folder, dtype="float32")
    assert model32.model.layers[0].mlp.up_proj.weight.dtype == mx.float32
    assert tokenizer.eos_token_ids == [tokenizer.token_to_id("<|im_end|>")]
    assert model(tokens()).shape == (1, 6, TINY_CONFIG["vocab_size"])


def test_untied_inferred_from_lm_head_when_config_is_silent(tmp_path):
    config = {k: v for k, v in TINY_CONFIG.items() if k != "tie_word_embeddings"}
    weights = random_weights({**config, "tie_word_embeddings": False})
    model, _ = load(write_model_folder(tmp_path / "m", config, weights))
    assert model.args.tie_word_embeddings is False
    assert mx.array_equal(model.lm_head.weight, weights["lm_head.weight"]).item()


def test_sharded_folder_with_index(tmp_path):
    folder = write_model_folder(tmp_path / "m")
    weights = mx.load(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(weights)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, keys in shards.items():
        mx.save_safetensors(str(folder / shard), {k: weights[k] for k in keys})
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    model, _ = load(folder)
    assert mx.array_equal(model.model.norm.weight, weights["model.norm.weight"]).item()


@pytest.mark.parametrize("mixed", [False, True])
def test_loads_mlx_lm_quantized_folder_and_matches_mlx_lm(tmp_path, mixed):
    """A folder written by mlx-lm's own quantize_model/save_model (per-layer config when mixed)."""
    config = {**TINY_CONFIG, "hidden_size": 128, "intermediate_size": 256}
    reference = mlx_lm_llama.Model(mlx_lm_llama.ModelArgs.from_dict(config))
    reference.load_weights(list(random_weights(config).items()))

    def predicate(path, module):  # 8-bit embedding and first layer's MLP, 4-bit elsewhere
        if "embed_tokens" in path or path.startswith("model.layers.0.mlp"):
            return {"group_size": 32, "bits": 8}
        return True

    reference, qconfig = quantize_model(reference, config, 64, 4, quant_predicate=predicate if mixed else None)
    folder = write_model_folder(tmp_path / "q", config)
    (folder / "model.safetensors").unlink()
    save_model(folder, reference)
    save_config(qconfig, folder / "config.json")
    model, _ = load(folder)
    theirs, _ = mlx_lm_load_model(folder)
    assert isinstance(model.model.layers[1].self_attn.q_proj, nn.QuantizedLinear)
    if mixed:
        assert model.model.embed_tokens.bits == 8 and model.model.layers[0].mlp.up_proj.bits == 8
        assert model.model.layers[0].self_attn.q_proj.bits == 4
    assert mx.allclose(model(tokens()), theirs(tokens()), atol=1e-4).item()


def test_rows_beyond_tokenizer_load_and_are_never_generated(tmp_path):
    """Checkpoints pad the embedding past the tokenizer (Nesso: 49152 rows for fewer tokens).

    Loading must accept the extra rows, and generation must never pick one, even when the model
    ranks them first: here the LM head's padding rows are large, so they win every argmax.
    """
    from nesso_mlx import generate

    config = {**TINY_CONFIG, "tie_word_embeddings": False}
    weights = random_weights(config)
    head = weights["lm_head.weight"]
    rows = mx.arange(head.shape[0])[:, None]
    tokenizer_size = 265  # the tiny tokenizer: 256 bytes, 6 merges, 3 special tokens
    weights["lm_head.weight"] = mx.where(rows >= tokenizer_size, 5.0 * head, 0.01 * head)
    model, tokenizer = load(write_model_folder(tmp_path / "m", config, weights))
    assert tokenizer.vocab_size == tokenizer_size < model.args.vocab_size == 320
    prompt = tokenizer.encode("the weather in Rome")
    assert mx.argmax(model(mx.array([prompt]))[0], axis=-1).min().item() >= tokenizer_size  # padding wins unbanned
    for settings in (
        SamplingOptions(temperature=0.0),
        SamplingOptions(temperature=1.0, seed=1),
        SamplingOptions(temperature=2.0, top_k=5, seed=2),
    ):
        out = generate(model, tokenizer, prompt, max_tokens=24, sampling=settings)
        assert out.tokens and max(out.tokens) < tokenizer_size, settings


# --- config parsing -------------------------------------------------------------------------


def test_config_rope_parameters_and_eos_variants(tmp_path):
    config = {k: v for k, v in TINY_CONFIG.items() if k != "rope_theta"}
    config["rope_parameters"] = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    config["eos_token_id"] = [7, 8]
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [8, 9]}))
    args = load_config(tmp_path)
    assert args.rope_theta == 500000.0
    assert args.rope_scaling["rope_type"] == "llama3" and args.rope_scaling["factor"] == 32.0
    assert args.eos_token_id == [7, 8, 9]
    default = ModelArgs.from_dict(
        {**TINY_CONFIG, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}, "eos_token_id": 3}
    )
    assert default.rope_scaling is None and default.eos_token_id == [3] and default.head_dim == 16


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2'"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "yarn"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 2.0}}, "low_freq_factor"),
        ({"hidden_size": "64"}, "'hidden_size' must be an integer"),
        ({"num_attention_heads": 5, "num_key_value_heads": 5}, "set head_dim"),
    ],
)
def test_bad_config_names_the_key(change, needle):
    with pytest.raises(ConfigError, match=needle):
        ModelArgs.from_dict({**TINY_CONFIG, **change})


# --- bad input: one-line errors naming the file or key --------------------------------------


def one_line(err: NessoError) -> str:
    message = str(err)
    assert "\n" not in message and message
    return message


def test_missing_config_json(tiny_folder):
    (tiny_folder / "config.json").unlink()
    with pytest.raises(ConfigError) as e:
        load(tiny_folder)
    assert "no config.json" in one_line(e.value)


def test_empty_folder(tmp_path):
    with pytest.raises(ConfigError) as e:
        load(tmp_path)
    assert str(tmp_path) in one_line(e.value)


def test_truncated_safetensors(tiny_folder):
    file = tiny_folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError) as e:
        load(tiny_folder)
    assert "truncated" in one_line(e.value) and "model.safetensors" in str(e.value)


def test_corrupt_safetensors_header(tiny_folder):
    (tiny_folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(WeightsError) as e:
        load(tiny_folder)
    assert "corrupt" in one_line(e.value)


def test_wrong_tensor_shape(tmp_path):
    weights = random_weights(TINY_CONFIG)
    weights["model.layers.1.mlp.up_proj.weight"] = mx.zeros((100, 64))
    with pytest.raises(WeightsError) as e:
        load(write_model_folder(tmp_path / "m", weights=weights))
    assert "model.layers.1.mlp.up_proj.weight" in one_line(e.value) and "(100, 64)" in str(e.value)


def test_missing_and_unexpected_tensors(tmp_path):
    weights = random_weights(TINY_CONFIG)
    del weights["model.norm.weight"]
    with pytest.raises(WeightsError, match="'model.norm.weight' is missing"):
        load(write_model_folder(tmp_path / "a", weights=weights))
    weights = {**random_weights(TINY_CONFIG), "model.layers.9.extra.weight": mx.zeros((2,))}
    with pytest.raises(WeightsError, match="unexpected tensor 'model.layers.9.extra.weight'"):
        load(write_model_folder(tmp_path / "b", weights=weights))


def test_unknown_model_type(tiny_folder):
    config = json.loads((tiny_folder / "config.json").read_text())
    (tiny_folder / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    with pytest.raises(ConfigError) as e:
        load(tiny_folder)
    assert "model_type 'mamba'" in one_line(e.value)


def test_pickle_only_folder_is_refused(tiny_folder):
    (tiny_folder / "model.safetensors").unlink()
    (tiny_folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(WeightsError, match="safetensors only"):
        load(tiny_folder)


def test_missing_tokenizer(tiny_folder):
    (tiny_folder / "tokenizer.json").unlink()
    with pytest.raises(NessoError, match="no tokenizer.json"):
        load(tiny_folder)


# --- the Hugging Face Hub, without a network ------------------------------------------------


def hf_cache_with(cache_dir: Path, repo_id: str, source: Path) -> Path:
    """Lay out a model like huggingface_hub's cache: refs/main -> snapshots/<commit>/files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_offline_repo_id_from_hf_cache(hf_cache, tmp_path):
    snapshot = hf_cache_with(hf_cache, "mii-llm/tiny-test", write_model_folder(tmp_path / "src"))
    model, tokenizer = load("mii-llm/tiny-test")
    assert model.path.resolve() == snapshot.resolve()
    assert model(tokens()).shape[-1] == TINY_CONFIG["vocab_size"]


def test_offline_repo_id_not_in_cache(hf_cache):
    with pytest.raises(HubError) as e:
        load("mii-llm/nesso-0.4B-instruct")
    message = one_line(e.value)
    assert "mii-llm/nesso-0.4B-instruct" in message and "HF_HUB_OFFLINE" in message


def test_unreachable_hub_is_one_line(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = {}

    def fake_snapshot_download(repo_id, **kwargs):
        calls.update(kwargs, repo_id=repo_id)
        raise LocalEntryNotFoundError("connection error")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(HubError) as e:
        load("mii-llm/nesso-0.4B-agentic")
    assert "cannot be reached" in one_line(e.value)
    # Only what we read is asked for: safetensors, JSON, templates; never pickles.
    assert calls["repo_id"] == "mii-llm/nesso-0.4B-agentic"
    assert "*.safetensors" in calls["allow_patterns"] and not any(".bin" in p for p in calls["allow_patterns"])


@pytest.fixture
def hanging_hub(monkeypatch):
    """The network made to hang: an online `snapshot_download` or any socket connection blocks.

    `.online` lists what went online; `.hang` is how long it blocks (short, so that a failure is
    quick; 0 where going online is expected). Cache look-ups (`local_files_only=True`) work.
    """
    import socket
    import threading
    from types import SimpleNamespace

    from huggingface_hub.errors import LocalEntryNotFoundError

    real = huggingface_hub.snapshot_download
    hub = SimpleNamespace(online=[], hang=3.0)

    def snapshot_download(repo_id, **kwargs):
        if kwargs.get("local_files_only"):
            return real(repo_id, **kwargs)
        hub.online.append(repo_id)
        threading.Event().wait(hub.hang)  # a hub that does not answer
        raise LocalEntryNotFoundError("connection timed out")

    def connect(*args, **kwargs):
        hub.online.append("socket")
        threading.Event().wait(hub.hang)
        raise OSError("network unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", connect)
    return hub


def test_cached_repo_id_starts_without_the_network(hf_cache, hanging_hub, tmp_path):
    """Offline first: a complete cached snapshot is used with no request to the Hub, even when online."""
    import time

    from nesso_mlx.hub import is_downloaded

    snapshot = hf_cache_with(hf_cache, "mii-llm/tiny-test", write_model_folder(tmp_path / "src"))
    start = time.perf_counter()
    model, _ = load("mii-llm/tiny-test")
    assert time.perf_counter() - start < 2.5 and hanging_hub.online == []
    assert model.path.resolve() == snapshot.resolve()
    assert is_downloaded("mii-llm/tiny-test") and hanging_hub.online == []


@pytest.mark.parametrize(
    "missing",
    ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "model-00002-of-00002.safetensors"],
)
def test_partial_cached_snapshot_goes_online(hf_cache, hanging_hub, tmp_path, missing):
    """An interrupted download is not trusted: without its config, tokenizer or every shard, ask the Hub."""
    from nesso_mlx.hub import is_downloaded

    hanging_hub.hang = 0.0
    source = write_model_folder(tmp_path / "src")
    if missing.startswith("model-"):  # a sharded checkpoint whose second shard never arrived
        weights = mx.load(str(source / "model.safetensors"))
        (source / "model.safetensors").unlink()
        names = sorted(weights)
        shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
        for shard, keys in shards.items():
            mx.save_safetensors(str(source / shard), {k: weights[k] for k in keys})
        index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
        (source / "model.safetensors.index.json").write_text(json.dumps(index))
    snapshot = hf_cache_with(hf_cache, "mii-llm/partial", source)
    (snapshot / missing).unlink()
    assert not is_downloaded("mii-llm/partial")
    with pytest.raises(HubError) as e:
        load("mii-llm/partial")
    assert hanging_hub.online == ["mii-llm/partial"] and "cannot be reached" in one_line(e.value)


def test_partial_cached_snapshot_offline_says_so(hf_cache, tmp_path):
    snapshot = hf_cache_with(hf_cache, "mii-llm/partial", write_model_folder(tmp_path / "src"))
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(HubError) as e:
        load("mii-llm/partial")
    assert "only partly" in one_line(e.value) and "HF_HUB_OFFLINE" in str(e.value)


def test_not_a_folder_nor_repo_id(tmp_path):
    with pytest.raises(HubError, match="not a Hugging Face repo id"):
        load(str(tmp_path / "does" / "not" / "exist"))


def test_quantize_on_load(tmp_path):
    from nesso_mlx.quantize import dequantize_model

    config = {**TINY_CONFIG, "hidden_size": 128, "intermediate_size": 256}
    folder = write_model_folder(tmp_path / "m", config)
    reference, _ = load(folder)
    errors = {}
    for bits in (4, 8):
        model, _ = load(folder, quantize=bits)
        assert isinstance(model.model.layers[0].mlp.up_proj, nn.QuantizedLinear)
        assert model.args.quantization["bits"] == bits
        logits = model(tokens())
        effective, _ = load(folder, quantize=bits)
        # The quantized layers compute exactly what their effective (dequantized) weights do.
        assert mx.allclose(logits, dequantize_model(effective, mx.float32)(tokens()), atol=1e-4).item()
        errors[bits] = mx.abs(logits - reference(tokens())).max().item()
    assert errors[8] < errors[4] / 4
