"""The trained Nesso-vocabulary fixture (SmolLM2's layers, Nesso's tokenizer) is what it claims."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from nesso_fixture import nesso_folder, nesso_trained_folder

from nesso_mlx import load

TEXT = "The city council met on Monday in the town hall. The mayor presented the budget, and the councillors voted in favour."


@pytest.fixture(scope="module")
def trained():
    return load(nesso_trained_folder())


def _mean_nll(model, tokenizer) -> float:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    logits = model(mx.array([ids]))[0, :-1].astype(mx.float32)
    target = mx.take_along_axis(logits, mx.array(ids[1:])[:, None], axis=-1)[:, 0]
    return mx.mean(mx.logsumexp(logits, axis=-1) - target).item()


def _row(model, token_id: int) -> np.ndarray:
    return np.array(model.model.embed_tokens.weight[token_id].astype(mx.float32))


def test_each_token_is_the_mean_of_smollm2s_pieces(trained, smollm2):
    model, tokenizer = trained
    small, small_tokenizer = smollm2
    for piece in ("Ġcouncil", "ĠAg", "ost", "<|im_end|>", "<|im_start|>"):  # one SmolLM2 token each: the same row
        ours, theirs = tokenizer.token_to_id(piece), small_tokenizer.token_to_id(piece)
        assert ours is not None and theirs is not None, piece
        assert np.array_equal(_row(model, ours), _row(small, theirs)), piece
    ours = tokenizer.token_to_id("Ġcouncillors")  # SmolLM2 spells it in several tokens
    theirs = small_tokenizer.encode(" councillors", add_special_tokens=False)
    assert ours is not None and len(theirs) > 1
    mean = np.mean([_row(small, t) for t in theirs], axis=0)
    assert np.allclose(_row(model, ours), mean, rtol=1e-2, atol=1e-3)
    assert tokenizer.token_to_id("<|im_end|>") == 128256 and tokenizer.vocab_size == 128262  # Nesso's ids


def test_it_models_english_on_nessos_vocabulary(trained, smollm2):
    """Close to SmolLM2 on its own tokens, far below a uniform guess over 128k tokens (ln 128262 =
    11.8 nats) and the random fixture."""
    nll = _mean_nll(*trained)
    reference = _mean_nll(*smollm2)
    random_nll = _mean_nll(*load(nesso_folder("added")))
    assert nll < reference + 1.5 and nll < math.log(trained[1].vocab_size) - 5 and nll < random_nll - 5, (
        nll,
        reference,
        random_nll,
    )
