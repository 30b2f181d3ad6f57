"""Model configuration: a `ModelArgs` dataclass read from a checkpoint's config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

SUPPORTED_MODEL_TYPES = {"llama"}
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM"}
SUPPORTED_ROPE_TYPES = {"default", "linear", "llama3"}


@dataclass
class ModelArgs:
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    # None: decided by the weights (tied when the checkpoint has no lm_head.weight).
    tie_word_embeddings: bool | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    model_type: str = "llama"
    eos_token_id: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    quantization: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"config.json: hidden_size {self.hidden_size} is not divisible by "
                    f"num_attention_heads {self.num_attention_heads}; set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config.json: num_attention_heads {self.num_attention_heads} is not a multiple "
                f"of num_key_value_heads {self.num_key_value_heads}"
            )
        for name in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config.json: {name} must be positive, got {getattr(self, name)}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in SUPPORTED_ROPE_TYPES:
                raise ConfigError(
                    f"config.json: rope_scaling type {kind!r} is not supported "
                    f"(supported: {', '.join(sorted(SUPPORTED_ROPE_TYPES))})"
                )
            if kind == "default":
                self.rope_scaling = None
            else:
                self.rope_scaling = {**self.rope_scaling, "rope_type": kind}
                required = {
                    "linear": ["factor"],
                    "llama3": ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"],
                }[kind]
                for key in required:
                    if key not in self.rope_scaling:
                        raise ConfigError(f"config.json: rope_scaling of type {kind} needs {key!r}")

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        """Build from a parsed config.json, accepting the variants real Llama checkpoints use."""
        model_type = config.get("model_type")
        architectures = config.get("architectures") or []
        if model_type is None and not architectures:
            raise ConfigError("config.json: neither 'model_type' nor 'architectures' is set")
        if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"config.json: model_type {model_type!r} is not supported (nesso-mlx runs Llama models)")
        if model_type is None and not set(architectures) & SUPPORTED_ARCHITECTURES:
            raise ConfigError(f"config.json: architectures {architectures} are not supported (nesso-mlx runs LlamaForCausalLM)")
        required = ["hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size"]
        for key in required:
            if key not in config:
                raise ConfigError(f"config.json: required key {key!r} is missing")
            if not isinstance(config[key], int) or isinstance(config[key], bool):
                raise ConfigError(f"config.json: {key!r} must be an integer, got {config[key]!r}")

        rope_theta = config.get("rope_theta")
        rope_scaling = config.get("rope_scaling")
        # transformers 5 writes both under rope_parameters.
        rope_parameters = config.get("rope_parameters")
        if isinstance(rope_parameters, dict):
            rope_theta = rope_parameters.get("rope_theta", rope_theta)
            if rope_scaling is None and rope_parameters.get("rope_type", "default") != "default":
                rope_scaling = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}

        eos = config.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        head_dim = config.get("head_dim")
        return cls(
            hidden_size=config["hidden_size"],
            num_hidden_layers=config["num_hidden_layers"],
            intermediate_size=config["intermediate_size"],
            num_attention_heads=config["num_attention_heads"],
            vocab_size=config["vocab_size"],
            num_key_value_heads=config.get("num_key_value_heads"),
            head_dim=int(head_dim) if head_dim else None,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(config.get("max_position_embeddings") or 2048),
            tie_word_embeddings=config.get("tie_word_embeddings"),
            attention_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
            model_type="llama",
            eos_token_id=eos_ids,
            bos_token_id=config.get("bos_token_id"),
            quantization=config.get("quantization"),
        )


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object from a file, with a one-line error naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def load_config(model_path: Path) -> ModelArgs:
    """Read config.json (and eos ids from generation_config.json) from a model folder."""
    config_file = model_path / "config.json"
    if not config_file.exists():
        raise ConfigError(f"{model_path}: no config.json found; pass the folder of a Hugging Face or MLX model")
    args = ModelArgs.from_dict(read_json(config_file))
    generation_file = model_path / "generation_config.json"
    if generation_file.exists():
        eos = read_json(generation_file).get("eos_token_id")
        for token_id in [eos] if isinstance(eos, int) else list(eos or []):
            if token_id not in args.eos_token_id:
                args.eos_token_id.append(token_id)
    return args
