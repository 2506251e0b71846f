"""Random weights in the published shapes of real models, for speed work only: their outputs are meaningless."""
from __future__ import annotations

from collections.abc import Iterator

import torch

from ..config import ModelConfig
from ..models.llama import LlamaForCausalLM
from ..models.registry import PRESETS


def read_config(preset: str) -> ModelConfig:
    return PRESETS[preset]


def parameter_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = LlamaForCausalLM(config, max_positions=2)
    return {n: p.shape for n, p in model.named_parameters()}  # tied weights appear once


def iter_tensors(config: ModelConfig, dtype: torch.dtype, device: torch.device,
                 seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, shape in parameter_shapes(config).items():
        t = torch.empty(shape, dtype=dtype, device=device)
        if name.endswith("norm.weight"):
            t.fill_(1.0)
        elif name.endswith(".bias"):
            t.zero_()
        else:
            t.normal_(0.0, 0.02, generator=gen)
        yield name, t
