"""KV cache: in-place growth, rollback with trim, and save/load through .safetensors."""

from __future__ import annotations

import mlx.core as mx
import pytest

from nesso_mlx import load, load_cache, save_cache, trim_cache
from nesso_mlx.cache import KVCache, model_identity
from nesso_mlx.errors import NessoError


def test_grows_in_steps_and_preallocates():
    cache = KVCache()
    k = mx.ones((1, 2, 1, 8))
    for _ in range(257):
        cache.update_and_fetch(k, k)
    assert cache.offset == 257 and cache.capacity == 512
    sized = KVCache(capacity=600)
    keys, _ = sized.update_and_fetch(mx.ones((1, 2, 3, 8)), mx.ones((1, 2, 3, 8)))
    assert sized.capacity == 768 and keys.shape == (1, 2, 3, 8)


def test_trim_rolls_back_exactly(tiny_folder):
    model, _ = load(tiny_folder)
    tokens = mx.array([[3, 9, 27, 81, 243, 100, 50, 25]])
    cache = model.make_cache()
    model(tokens[:, :5], cache)
    expected = model(tokens[:, 5:], cache)
    assert trim_cache(cache, 3) == 3 and cache[0].offset == 5
    # Write different tokens in the rolled-back positions, roll back again, then the original.
    model(mx.array([[1, 2, 4]]), cache)
    trim_cache(cache, 3)
    assert mx.allclose(model(tokens[:, 5:], cache), expected, atol=1e-6).item()
    assert trim_cache(cache, 100) == 8 and cache[0].offset == 0


def test_save_and_load_round_trip(tiny_folder, tmp_path):
    model, _ = load(tiny_folder)
    prefix, rest = mx.array([[5, 6, 7, 8, 9]]), mx.array([[10, 11]])
    cache = model.make_cache()
    model(prefix, cache)
    (tmp_path / "saved").mkdir()
    path = tmp_path / "saved" / "conversation.safetensors"
    save_cache(path, cache, {"model": "tiny"}, model=model, tokens=[5, 6, 7, 8, 9])
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    expected = model(rest, cache)
    loaded, metadata = load_cache(path, model)  # unpacks as before
    assert metadata == {"model": "tiny"}
    assert len(loaded) == len(cache) and loaded[0].offset == 5
    assert mx.allclose(model(rest, loaded), expected, atol=1e-6).item()
    result = load_cache(path)
    assert result.tokens == [5, 6, 7, 8, 9] and result.model_identity == model_identity(model)
    # Files without a model or tokens (the old format) still load; there is nothing to compare.
    save_cache(path, cache)
    assert load_cache(path, model).tokens is None and load_cache(path).model_identity is None


def test_empty_cache_round_trip(tiny_folder, tmp_path):
    model, _ = load(tiny_folder)
    save_cache(tmp_path / "empty.safetensors", model.make_cache(), model=model, tokens=[])
    cache, _ = loaded = load_cache(tmp_path / "empty.safetensors", model)
    assert loaded.tokens == [] and all(layer.offset == 0 for layer in cache)


def test_model_identity_is_stable_and_tells_models_apart(tmp_path):
    from conftest import write_model_folder

    first = write_model_folder(tmp_path / "a")
    assert model_identity(load(first)[0]) == model_identity(load(first)[0])
    assert model_identity(load(first)[0]) != model_identity(load(first, dtype="bfloat16")[0])
    # Same architecture, other weights (another fine-tune): another identity.
    assert model_identity(load(first)[0]) != model_identity(load(write_model_folder(tmp_path / "b", seed=1))[0])


def refused(path, model) -> str:
    with pytest.raises(NessoError) as e:
        load_cache(path, model)
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    return message


def test_cache_of_another_model_is_refused(tmp_path):
    from conftest import TINY_CONFIG, write_model_folder

    model, _ = load(write_model_folder(tmp_path / "a"))
    cache = model.make_cache()
    model(mx.array([[1, 2, 3]]), cache)
    path = tmp_path / "a.safetensors"
    save_cache(path, cache, model=model, tokens=[1, 2, 3])
    same_shape, _ = load(write_model_folder(tmp_path / "b", seed=1))
    assert "another model" in refused(path, same_shape)
    deeper, _ = load(write_model_folder(tmp_path / "c", {**TINY_CONFIG, "num_hidden_layers": 3}))
    assert "2 layers but the model has 3" in refused(path, deeper)
    # Without an identity in the file (saved without `model=`), the shapes are still checked.
    save_cache(path, cache)
    other_heads, _ = load(write_model_folder(tmp_path / "d", {**TINY_CONFIG, "num_key_value_heads": 4}))
    assert "keys of shape (1, 2, 3, 16)" in refused(path, other_heads)
    assert load_cache(path, same_shape)[0][0].offset == 3  # same shapes, no identity: accepted


def test_save_cache_checks_its_input(tiny_folder, tmp_path):
    model, _ = load(tiny_folder)
    cache = model.make_cache()
    model(mx.array([[1, 2, 3]]), cache)
    with pytest.raises(ValueError, match="2 tokens given for a cache that holds 3 positions"):
        save_cache(tmp_path / "x.safetensors", cache, tokens=[1, 2])
    cache[1].offset = 2  # an interrupted step left the layers at different positions
    with pytest.raises(ValueError, match="different numbers of positions"):
        save_cache(tmp_path / "x.safetensors", cache)
    with pytest.raises(NessoError, match="cannot write the cache"):
        save_cache(tmp_path / "no" / "such" / "dir.safetensors", model.make_cache())
    assert not (tmp_path / "x.safetensors").exists()


def test_load_cache_rejects_other_files(tmp_path):
    bogus = tmp_path / "x.safetensors"
    mx.save_safetensors(str(bogus), {"a": mx.zeros((2,))})
    with pytest.raises(NessoError, match="not a nesso-mlx cache file"):
        load_cache(bogus)
    meta = {"nesso_mlx.num_layers": "1", "nesso_mlx.offset": "4"}
    mx.save_safetensors(str(bogus), {"layers.0.keys": mx.zeros((1, 2, 4, 8))}, meta)  # no values
    with pytest.raises(NessoError, match="corrupt cache file"):
        load_cache(bogus)
