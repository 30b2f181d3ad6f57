"""Shared fixtures: tiny random Llama folders and the real SmolLM2-135M-Instruct folder."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from nesso_mlx.config import ModelArgs
from nesso_mlx.model import Model

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 320,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}


def tiny_tokenizer_json() -> str:
    """A byte-level BPE with the 256 byte symbols, a few merges and the ChatML special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")]
    )
    return tok.to_str()


def random_weights(config: dict, seed: int = 0, scale: float = 0.15) -> dict[str, mx.array]:
    """Random float32 weights with Hugging Face names for `config`."""
    args = ModelArgs.from_dict(config)
    if args.tie_word_embeddings is None:
        args.tie_word_embeddings = True
    mx.random.seed(seed)
    out = {}
    for name, p in tree_flatten(Model(args).parameters()):
        if name.endswith("norm.weight"):
            out[name] = 1.0 + 0.1 * mx.random.normal(p.shape)
        else:
            out[name] = scale * mx.random.normal(p.shape)
    return out


def write_model_folder(
    path: Path,
    config: dict | None = None,
    weights: dict[str, mx.array] | None = None,
    dtype: mx.Dtype = mx.float32,
    chat_template: str | None = CHATML,
    seed: int = 0,
) -> Path:
    """A complete Hugging Face style model folder with random weights and the tiny tokenizer."""
    config = dict(TINY_CONFIG if config is None else config)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer_json = tiny_tokenizer_json()
    im_end = json.loads(tokenizer_json)["added_tokens"][2]["id"]
    config.setdefault("eos_token_id", im_end)
    weights = weights if weights is not None else random_weights(config, seed)
    mx.save_safetensors(str(path / "model.safetensors"), {k: v.astype(dtype) for k, v in weights.items()})
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer.json").write_text(tokenizer_json)
    tokenizer_config = {"eos_token": "<|im_end|>", "bos_token": None, "pad_token": "<|im_end|>"}
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return path


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    return write_model_folder(tmp_path / "tiny")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from smollm2_fixture import smollm2_path as build

    return build()


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    from nesso_mlx import load

    return load(smollm2_path)


# `python -m pytest -m "not slow"` is the inner loop while you work (under 4 minutes on 2 cores);
# CI and the README's command run everything. Slow: whole files that start servers, clients or
# other processes, and the tests that took over ~5 s on a busy 2-core machine (real models
# decoding, subprocesses, the transformers and lm-eval references).
SLOW_FILES = {"test_server.py", "test_server_apis.py", "test_lm_eval.py", "test_soak.py", "test_mcp.py"}
SLOW_TESTS = {
    "test_agent.py": {
        "test_agent_loop_example_runs",
        "test_agent_repl_confirms_runs_and_continues",
        "test_generate_with_json_schema_and_tools_files",
    },
    "test_agentic_vocab.py": {
        "test_auto_body_is_forced_to_a_valid_call",
        "test_bounded_schema_finishes_valid_within_64_tokens",
        "test_forced_calls_always_complete",
        "test_streamed_call_deltas_reassemble_to_the_calls",
    },
    "test_batch.py": {"test_constrained_rows_in_one_batch", "test_seeded_tool_call_after_a_trigger_equals_generate"},
    "test_bench.py": {"test_every_workload_against_mlx_lm"},
    "test_chat.py": {"test_real_model_turn_two_prefills_exactly_its_new_tokens"},
    "test_chat_templates.py": {"test_a_risky_string_is_still_plain_text_in_every_template", "test_ids_equal_transformers"},
    "test_cli.py": {
        "test_chat_repl_session",
        "test_context_overflow_drops_old_turns",
        "test_ctrl_c_stops_a_reply_and_the_chat_goes_on",
        "test_generate_from_stdin_as_json",
        "test_repl_input_multiline_paste_unicode_and_history",
    },
    "test_convert.py": {"test_mlx_lm_load_generates_same_greedy_tokens", "test_sigterm_mid_conversion_leaves_nothing"},
    "test_eval_rules.py": {"test_authors_rules_on_real_generation", "test_eval_tools_command_reports_the_authors_way"},
    "test_generation.py": {"test_greedy_tokens_equal_mlx_lm", "test_italian_stream_equals_decode", "test_logprobs_equal_mlx_lm"},
    "test_kv_cache.py": {"test_a_bounded_cache_bounds_memory_and_generation_goes_on"},
    "test_model_card.py": {
        "test_the_cards_python_code_runs_as_written",
        "test_the_cards_terminal_command_runs_as_written",
    },
    "test_nesso_trained_fixture.py": {"test_it_models_english_on_nessos_vocabulary"},
    "test_speculative.py": {
        "test_an_interrupted_reply_leaves_every_layer_at_what_was_handed_out",
        "test_constrained_greedy_output_is_identical",
        "test_greedy_on_smollm2_with_stop_strings",
        "test_greedy_output_is_identical",
    },
    "test_tools.py": {
        "test_eval_command_runs_the_authors_file_as_is",
        "test_json_object_mode",
        "test_named_tool_choice_gives_a_valid_call",
        "test_schema_constrained_output_parses_and_validates",
    },
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.path.name
        if name in SLOW_FILES or getattr(item, "originalname", item.name) in SLOW_TESTS.get(name, ()):
            item.add_marker(pytest.mark.slow)
