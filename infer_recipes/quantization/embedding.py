"""INT8 embedding table: symmetric per row. A row lookup needs no kernel, so any quantized model can drop its
float table; with a tied, int8-quantized lm_head the table *is* the lm_head's int8 weight (shared, no copy)."""
from __future__ import annotations

import torch
from torch import nn

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
