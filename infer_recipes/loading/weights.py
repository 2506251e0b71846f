"""Building a model on the meta device and filling it from one of the sources, with a progress bar."""
from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable

import torch
from torch import nn
from tqdm import tqdm

from ..config import ModelConfig
from ..device import trim_host_memory
from ..errors import ModelSourceError
from ..layers.parallel import Shard
from ..models.llama import LlamaForCausalLM, shard_tensor
from . import gguf as gguf_loader
from . import hf as hf_loader
from . import synthetic
from .source import ModelSource


def drop_metadata(source: ModelSource) -> None:
    """Once config and tokenizer are read: a GGUF reader's parsed metadata is not needed to read tensors."""
    if source.kind == "gguf":
        gguf_loader.drop_metadata(source.location)
        gc.collect()


def release_loader_memory() -> None:
    """After loading: drop the cached GGUF readers (their mapped pages count as resident) and return the freed
    float weights' heap to the OS."""
    gguf_loader.open_gguf.cache_clear()
    gguf_loader._tensors_by_name.cache_clear()
    gc.collect()
    trim_host_memory()


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


def _unit(param_name: str) -> str:
    parts = param_name.split(".")
    return ".".join(parts[:3]) if parts[:2] == ["model", "layers"] else ".".join(parts[:-1])


def load_model(source: ModelSource, dtype: torch.dtype, device: torch.device, max_positions: int | None = None,
               progress: bool = True, config: ModelConfig | None = None,
               on_loaded: Callable[[LlamaForCausalLM, str], None] | None = None,
               shard: Shard = Shard(), keep_quantized: Callable[[str], bool] | None = None) -> LlamaForCausalLM:
    """Reads config and weights; returns the model in eval mode on `device` in `dtype`.

    on_loaded(model, unit) runs as soon as one unit has all its weights, in whatever order the checkpoint holds
    them; units are the decoder layers (`model.layers.3`) and the other modules with weights
    (`model.embed_tokens`, `model.norm`, `lm_head` when untied). There the engine fuses and quantizes a unit
    while the next ones load, so the whole model never sits in float at once.

    shard: what this rank holds when the model is split across devices; each tensor is sliced as it arrives
    (and skipped when another pipeline stage holds it), so a rank never holds more than one whole tensor.

    keep_quantized(name): GGUF tensors that are never dequantized; they stay on the meta device and count as
    arrived, and `on_loaded` must replace their modules (from the file's blocks) or loading fails."""
    config = config or read_config(source)
    start = time.perf_counter()
    with torch.device("meta"):
        model = LlamaForCausalLM(config, max_positions=max_positions, shard=shard)
    if source.kind == "hf":
        tensors, total = hf_loader.iter_tensors(source.location, config), hf_loader.count_tensors(source.location)
    elif source.kind == "gguf":
        tensors = gguf_loader.iter_tensors(source.location, config, keep_quantized)
        total = len(gguf_loader.tensor_names(source.location))
    else:
        tensors, total = synthetic.iter_tensors(config, dtype, device), len(synthetic.parameter_shapes(config))
    waiting: dict[str, int] = {}
    for pname, _ in model.named_parameters():  # tied weights appear once, under the embedding
        waiting[_unit(pname)] = waiting.get(_unit(pname), 0) + 1
    bar = tqdm(total=total, desc=f"loading {source.name}", unit="tensor", disable=not progress, file=sys.stderr,
               leave=False)
    for name, tensor in tensors:
        if name == "lm_head.weight" and config.tie_word_embeddings:
            bar.update()
            continue
        if name.endswith("rotary_emb.inv_freq"):
            bar.update()
            continue
        if tensor is not None:  # None: kept in its GGUF blocks
            tensor = shard_tensor(name, tensor, config, shard)
            if tensor is None:  # another pipeline stage holds it
                bar.update()
                continue
            _set_parameter(model, name, tensor.to(device=device, dtype=dtype))
            del tensor
        bar.update()
        unit = _unit(name)
        waiting[unit] -= 1
        if waiting[unit] == 0 and on_loaded is not None:
            if unit == "model.embed_tokens":
                model.tie_weights()  # a tied lm_head must see the real table before anyone quantizes it
            on_loaded(model, unit)
    bar.close()
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ModelSourceError(f"the checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}: it is incomplete")
    model.rotary.to(device)
    model.load_seconds = time.perf_counter() - start
    return model.eval()
