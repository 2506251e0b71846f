"""Building a model on the meta device and filling it from one of the sources, with a progress bar."""
from __future__ import annotations

import sys
import time

import torch
from torch import nn
from tqdm import tqdm

from ..config import ModelConfig
from ..errors import ModelSourceError
from ..models.llama import LlamaForCausalLM
from . import gguf as gguf_loader
from . import hf as hf_loader
from . import synthetic
from .source import ModelSource


def read_config(source: ModelSource) -> ModelConfig:
    if source.kind == "hf":
        return hf_loader.read_config(source.location)
    if source.kind == "gguf":
        return gguf_loader.read_config(source.location)
    return synthetic.read_config(source.location)


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_path, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_path)
    current = getattr(module, leaf, None)
    if not isinstance(current, nn.Parameter):
        raise ModelSourceError(f"the checkpoint has a tensor {name} that this architecture does not have")
    if tuple(current.shape) != tuple(tensor.shape):
        raise ModelSourceError(f"tensor {name} has shape {tuple(tensor.shape)} but the config implies "
                               f"{tuple(current.shape)}: config and weights do not belong together")
    setattr(module, leaf, nn.Parameter(tensor, requires_grad=False))


def load_model(source: ModelSource, dtype: torch.dtype, device: torch.device, max_positions: int | None = None,
               progress: bool = True, config: ModelConfig | None = None) -> LlamaForCausalLM:
    """Reads config and weights; returns the model in eval mode on `device` in `dtype`."""
    config = config or read_config(source)
    start = time.perf_counter()
    with torch.device("meta"):
        model = LlamaForCausalLM(config, max_positions=max_positions)
    if source.kind == "hf":
        tensors, total = hf_loader.iter_tensors(source.location, config), hf_loader.count_tensors(source.location)
    elif source.kind == "gguf":
        tensors, total = gguf_loader.iter_tensors(source.location, config), len(gguf_loader.tensor_names(source.location))
    else:
        tensors, total = synthetic.iter_tensors(config, dtype, device), len(synthetic.parameter_shapes(config))
    bar = tqdm(total=total, desc=f"loading {source.name}", unit="tensor", disable=not progress, file=sys.stderr,
               leave=False)
    for name, tensor in tensors:
        if name == "lm_head.weight" and config.tie_word_embeddings:
            bar.update()
            continue
        if name.endswith("rotary_emb.inv_freq"):
            bar.update()
            continue
        _set_parameter(model, name, tensor.to(device=device, dtype=dtype))
        bar.update()
    bar.close()
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ModelSourceError(f"the checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}: it is incomplete")
    model.rotary.to(device)
    model.load_seconds = time.perf_counter() - start
    return model.eval()
