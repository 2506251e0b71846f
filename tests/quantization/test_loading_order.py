"""Quantizing a unit while the rest of the model is still on the meta device (loading fills it unit by unit, in
the checkpoint's order: the Qwen GGUFs hold output.weight first and the embedding, our first parameter, later)."""
from __future__ import annotations

import pytest
import torch

from infer_recipes.config import ModelConfig
from infer_recipes.models.llama import LlamaForCausalLM
from infer_recipes.quantization import quantize

CONFIG = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=16, max_position_embeddings=64)


@pytest.mark.parametrize("scheme", ["int8", "int8-minmax", "w8a8", "int4", "int4-w8a8"])
def test_a_unit_quantizes_while_the_first_parameter_is_still_meta(scheme):
    with torch.device("meta"):
        model = LlamaForCausalLM(CONFIG)
    layer = model.model.layers[1]
    g = torch.Generator().manual_seed(0)
    for name, p in list(layer.named_parameters()):
        module_name, _, leaf = name.rpartition(".")
        setattr(layer.get_submodule(module_name), leaf,
                torch.nn.Parameter(torch.randn(p.shape, generator=g) * 0.05, requires_grad=False))
    assert next(model.parameters()).is_meta  # the embedding has not arrived
    x = torch.randn(3, 64, generator=g)
    ref = layer.self_attn.q_proj(x)
    quantize(model, scheme, root="model.layers.1", progress=False)
    assert type(layer.mlp.down_proj).__name__ != "Linear"
    assert (layer.self_attn.q_proj(x) - ref).abs().max() < 0.1 * ref.abs().max()  # the same layer, quantized
