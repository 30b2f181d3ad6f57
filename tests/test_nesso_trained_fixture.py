"""The trained Nesso-vocabulary fixture (SmolLM2's layers, Nesso's tokenizer) is what it claims."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
from nesso_fixture import nesso_folder, nesso_trained_folder

from nesso_mlx import load

TEXT = "The city council met on Monday in the town hall. The mayor presented the budget, and the councillors voted in favour."


def _mean_nll(folder) -> tuple[float, int]:
    model, tokenizer = load(folder)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    logits = model(mx.array([ids]))[0, :-1].astype(mx.float32)
    target = mx.take_along_axis(logits, mx.array(ids[1:])[:, None], axis=-1)[:, 0]
    return mx.mean(mx.logsumexp(logits, axis=-1) - target).item(), tokenizer.vocab_size


def test_shared_pieces_keep_smollm2s_embedding(smollm2_path):
    trained, tokenizer = load(nesso_trained_folder())
    small, small_tokenizer = load(smollm2_path)
    for piece in ("Ġcouncil", "ĠAg", "ost", "<|im_end|>", "<|im_start|>"):
        ours, theirs = tokenizer.token_to_id(piece), small_tokenizer.token_to_id(piece)
        assert ours is not None and theirs is not None, piece
        a = np.array(trained.model.embed_tokens.weight[ours].astype(mx.float32))
        b = np.array(small.model.embed_tokens.weight[theirs].astype(mx.float32))
        assert np.array_equal(a, b), piece
    assert tokenizer.token_to_id("<|im_end|>") == 128256 and tokenizer.vocab_size == 128262  # Nesso's ids


def test_it_models_english_on_nessos_vocabulary():
    """Far below a uniform guess over 128k tokens (ln 128262 = 11.8 nats), and below the random fixture."""
    nll, vocab = _mean_nll(nesso_trained_folder())
    random_nll, _ = _mean_nll(nesso_folder("added"))
    assert nll < 5.0 < math.log(vocab) < random_nll, (nll, random_nll)
