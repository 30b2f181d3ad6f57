"""Quantization: uniform and mixed recipes, recorded in config.json the way mlx-lm does."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .errors import NessoError
from .model import Model

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)

# Mixed recipes: name -> (low bits, high bits for sensitive layers, embedding / LM head bits).
# The sensitive layers follow llama.cpp's Q4_K_M choice (v_proj and down_proj of the first and
# last eighth of the layers and every third layer in between). Unlike mlx-lm's mixed recipes, the
# embedding is raised too: with tied weights it is also the LM head (a third of Nesso's weights).
RECIPES: dict[str, tuple[int, int, int]] = {
    "mixed_3_6": (3, 6, 6),
    "mixed_4_6": (4, 6, 6),
    "mixed_4_8": (4, 6, 8),
}


class QuantizationError(NessoError):
    """Quantization settings that cannot be applied to a model."""


def _sensitive(layer: int, num_layers: int) -> bool:
    eighth = num_layers // 8
    return layer < eighth or layer >= 7 * num_layers // 8 or (layer - eighth) % 3 == 2


def layer_plan(model: Model, bits: int, group_size: int, recipe: str | None = None) -> dict[str, dict[str, int]]:
    """Bits and group size for every quantizable layer (path -> {"bits", "group_size"})."""
    if bits not in SUPPORTED_BITS:
        raise QuantizationError(f"--q-bits {bits} is not supported (choose from {', '.join(map(str, SUPPORTED_BITS))})")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise QuantizationError(f"--q-group-size {group_size} is not supported (choose 32, 64 or 128)")
    if recipe is not None and recipe not in RECIPES:
        raise QuantizationError(f"--q-recipe {recipe!r} is unknown (choose from {', '.join(RECIPES)})")
    num_layers = len(model.layers)
    plan = {}
    for path, module in model.named_modules():
        if not hasattr(module, "to_quantized") or isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            continue
        layer_bits = bits
        if recipe is not None:
            low, high, head = RECIPES[recipe]
            layer_bits = low
            if "embed_tokens" in path or path == "lm_head":
                layer_bits = head
            elif path.endswith(("v_proj", "down_proj")) and _sensitive(int(path.split(".")[2]), num_layers):
                layer_bits = high
        in_dim = module.weight.shape[-1]
        if in_dim % group_size:
            divisors = [g for g in SUPPORTED_GROUP_SIZES if in_dim % g == 0]
            hint = f"use --q-group-size {' or '.join(map(str, divisors))}" if divisors else "this layer cannot be quantized"
            raise QuantizationError(f"--q-group-size {group_size} does not divide {path}'s input size {in_dim}; {hint}")
        plan[path] = {"group_size": group_size, "bits": layer_bits}
    return plan


def quantize_model(model: Model, bits: int = 4, group_size: int = 64, recipe: str | None = None) -> dict[str, Any]:
    """Quantize `model` in place; returns the `quantization` entry for config.json.

    The global bits/group size go at the top level; layers that differ get their own entry,
    as mlx-lm writes them, so mlx-lm and nesso-mlx both load the result.
    """
    plan = layer_plan(model, bits, group_size, recipe)
    default_bits = RECIPES[recipe][0] if recipe else bits
    nn.quantize(model, group_size, default_bits, class_predicate=lambda path, _: plan.get(path, False))
    config: dict[str, Any] = {"group_size": group_size, "bits": default_bits, "mode": "affine"}
    for path, params in plan.items():
        if params["bits"] != default_bits:
            config[path] = {**params, "mode": "affine"}
    return config


def dequantize_model(model: Model, dtype: mx.Dtype | None = None) -> Model:
    """Replace quantized layers by float ones holding their effective (dequantized) weights."""
    replacements = []
    for path, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            # Computed in float32: mx.dequantize works in the scales' dtype, which may be bf16.
            biases = module.get("biases")
            weight = mx.dequantize(
                module.weight,
                module.scales.astype(mx.float32),
                None if biases is None else biases.astype(mx.float32),
                module.group_size,
                module.bits,
                mode=getattr(module, "mode", "affine"),
            )
            weight = weight.astype(dtype or module.scales.dtype)
            if isinstance(module, nn.QuantizedEmbedding):
                layer = nn.Embedding(*weight.shape)
            else:
                layer = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
                if "bias" in module:
                    layer.bias = module.bias.astype(weight.dtype)
            layer.weight = weight
            replacements.append((path, layer))
    if replacements:
        model.update_modules(tree_unflatten(replacements))
    return model


def bits_per_weight(model: Model) -> float:
    """Stored bits per logical weight, scales and biases included."""
    stored = sum(v.nbytes for _, v in tree_flatten(model.parameters())) * 8
    logical = 0
    for _, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            logical += module.weight.size * 32 // module.bits
            if "bias" in module:
                logical += module.bias.size
        elif isinstance(module, (nn.Linear, nn.Embedding, nn.RMSNorm)):
            logical += sum(v.size for _, v in tree_flatten(module.parameters()))
    return stored / max(logical, 1)
