"""Quantized embedding tables. A row lookup needs no kernel, so any quantized model can drop its float table:
- INT8, symmetric per row; with a tied, int8-quantized lm_head the table *is* the lm_head's int8 weight (shared,
  no copy);
- a GGUF file's own blocks, memory-mapped and never copied: a lookup dequantizes the rows it reads (llama.cpp's
  get_rows), so the table costs what the file holds (4.5 bits a weight for Q4_K, against 8 for int8) and only
  the pages of rows ever looked up become resident."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import gguf as gguf_q
from .int8 import Int8Linear


class Int8Embedding(nn.Module):
    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
        """qweight [V, H] int8; scales [V]; lookups come back in `dtype`."""
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.dtype = dtype
        self.head = None
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Int8Embedding:
        q, s = Int8Linear.quantize(weight)
        return cls(q, s, weight.dtype)

    @classmethod
    def sharing(cls, linear: Int8Linear, dtype: torch.dtype) -> Int8Embedding:
        """The table is the tied head's own weight, read through the head (in whichever layout it holds it)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = linear.out_features, linear.in_features
        self.dtype = dtype
        self.head = [linear]  # in a list: not a submodule (the model owns the head)
        return self

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.head is not None:
            q, s = self.head[0].rows(ids.reshape(-1))
            return (q.float() * s.unsqueeze(-1)).to(self.dtype).reshape(*ids.shape, self.embedding_dim)
        return (self.qweight[ids].float() * self.scales[ids].float().unsqueeze(-1)).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


class GGUFEmbedding(nn.Module):
    def __init__(self, qtype: str, blocks: np.ndarray, embedding_dim: int, dtype: torch.dtype, native: bool):
        """blocks [V, bytes of a row's blocks] uint8 (a view of the mapped file); lookups come back in `dtype`.
        `native`: dequantize in the extension (the same values as the Python path)."""
        super().__init__()
        self.qtype, self.embedding_dim, self.dtype, self.native = qtype, embedding_dim, dtype, native
        self.num_embeddings = blocks.shape[0]
        self.register_buffer("blocks", gguf_q.as_tensor(blocks))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = gguf_q.dequantize(self.qtype, self.blocks[ids.reshape(-1)], self.embedding_dim, self.native)
        return rows.to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.qtype} blocks"
