"""The paged KV cache's tensors, and the one formula for what a token of it costs (used by the engine's pool
sizing, the model pool's budget, the benchmarks' roofline and the deployment planner)."""
from __future__ import annotations

import math

import numpy as np
import torch

from ..config import EngineConfig, ModelConfig
from ..device import device_memory_bytes
from ..errors import InferRecipesError

DEFAULT_KV_FRACTION = 0.25  # of device memory, when neither num_blocks nor kv_cache_memory is given


def kv_bytes_per_token(config: ModelConfig, element_size: float, kv_heads: float | None = None,
                       layers: int | None = None) -> float:
    """Bytes of keys and values one token holds: layers x 2 x KV heads x head_dim x element size (a rank of a
    split model: its own layers and KV heads)."""
    heads = config.num_kv_heads if kv_heads is None else kv_heads
    return (config.num_layers if layers is None else layers) * 2 * heads * config.head_dim * element_size


# where a CPU pool's tensors start: a 2 MB boundary (a huge page's, where the OS gives them), so each block's rows
# start on a cache line. numpy's large arrays start 16 bytes past a page, which put every 64-byte int8 row across two
# lines (the kernel's prefetch asked for one) and every 128-byte bfloat16 row across three: a batch-16 decode
# attention call read its keys 1.6x slower than from a freshly allocated copy of the same pool.
ALIGN = 2 << 20

SCALE_BYTES = 4  # an int8 cache keeps a float32 scale per token and KV head beside the blocks


def kv_storage_dtype(kv_cache_dtype: str, activation: torch.dtype) -> torch.dtype:
    """What the pool stores for an EngineConfig.kv_cache_dtype ("auto": the activation dtype)."""
    return activation if kv_cache_dtype == "auto" else getattr(torch, kv_cache_dtype)


def kv_element_size(kv_dtype: torch.dtype, head_dim: int) -> float:
    """Bytes per cached element, an int8 cache's share of its scales included."""
    return kv_dtype.itemsize + (SCALE_BYTES / head_dim if kv_dtype == torch.int8 else 0)


def kv_pool_blocks(model: ModelConfig, cfg: EngineConfig, max_model_len: int, dtype: torch.dtype,
                   device: torch.device) -> int:
    """Blocks for the KV pool: `num_blocks` if given, else what `kv_cache_memory` of the device holds, capped at
    what max_batch_size sequences of max_model_len tokens need, and never fewer than one full-length sequence.
    `dtype` is the activation dtype; the pool stores cfg.kv_cache_dtype."""
    one_seq = -(-max_model_len // cfg.block_size)
    if cfg.num_blocks is not None:
        if cfg.num_blocks < one_seq:
            raise InferRecipesError(f"num_blocks={cfg.num_blocks} cannot hold one sequence of max_model_len="
                                    f"{max_model_len} tokens ({one_seq} blocks of {cfg.block_size}): raise "
                                    f"num_blocks or lower max_model_len")
        return cfg.num_blocks
    element = kv_element_size(kv_storage_dtype(cfg.kv_cache_dtype, dtype), model.head_dim)
    block = int(kv_bytes_per_token(model, element) * cfg.block_size)
    budget = int((cfg.kv_cache_memory or DEFAULT_KV_FRACTION) * device_memory_bytes(device))
    return max(one_seq, min(cfg.max_batch_size * one_seq, budget // block))


class KVCache:
    """Each layer's keys and values as [num_blocks, H_kv, block_size, D] (a block is a [block_size, D] matrix
    per head, what the decode GEMMs read in place). Which blocks a sequence holds is the engine's BlockPool's
    business; this holds the numbers in them.

    An int8 pool holds per layer (keys, values, key scales, value scales), the scales float32
    [num_blocks, H_kv, block_size]: one per token and head, written with the token (`quantize_kv`), so a block's
    contents never depend on what else shares it (prefix caching stays exact).

    On the CPU the pool is zero pages from the OS (numpy's calloc), each tensor starting on a 2 MB boundary (ALIGN):
    memory is committed only as blocks are first written, so a pool sized for the worst case costs what is used.
    Blocks are reused most-recent-first."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_blocks, num_kv_heads, block_size, head_dim)
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype

        def layer():
            kv = (self._zeros(shape, dtype, device), self._zeros(shape, dtype, device))
            if dtype == torch.int8:
                kv += (self._zeros(shape[:3], torch.float32, device), self._zeros(shape[:3], torch.float32, device))
            return kv

        self.layers = [layer() for _ in range(num_layers)]

    @staticmethod
    def _zeros(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if device.type != "cpu":
            return torch.zeros(shape, dtype=dtype, device=device)
        nbytes = math.prod(shape) * dtype.itemsize
        raw = np.zeros(nbytes + ALIGN, dtype=np.uint8)
        start = -raw.ctypes.data % ALIGN  # numpy's own start is 16 bytes past a page: every row would straddle lines
        return torch.from_numpy(raw[start:start + nbytes]).view(dtype).view(shape)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer)
