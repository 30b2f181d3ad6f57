"""KV cache: in-place growth, rollback with trim, and save/load through .safetensors."""

from __future__ import annotations

import mlx.core as mx
import pytest

from nesso_mlx import load, load_cache, save_cache, trim_cache
from nesso_mlx.cache import KVCache
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
    save_cache(path, cache, {"model": "tiny", "tokens": "5,6,7,8,9"})
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    expected = model(rest, cache)
    loaded, metadata = load_cache(path)
    assert metadata == {"model": "tiny", "tokens": "5,6,7,8,9"}
    assert len(loaded) == len(cache) and loaded[0].offset == 5
    assert mx.allclose(model(rest, loaded), expected, atol=1e-6).item()


def test_load_cache_rejects_other_files(tmp_path):
    bogus = tmp_path / "x.safetensors"
    mx.save_safetensors(str(bogus), {"a": mx.zeros((2,))})
    with pytest.raises(NessoError, match="not a nesso-mlx cache file"):
        load_cache(bogus)
