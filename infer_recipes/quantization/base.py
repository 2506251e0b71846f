"""What every quantized linear shares: flattening to [M, K], the bias, and the way back to the input dtype."""
from __future__ import annotations

import math

import torch
from torch import nn

ROWS_PER_CHUNK = 2048  # quantize big matrices (a 49k-row lm_head) in slices: float temporaries stay small
_NATIVE_DTYPES = (torch.float32, torch.bfloat16)  # what the native kernels take and give back


def by_rows(fn, w: torch.Tensor, rows: int | None = None) -> tuple[torch.Tensor, ...]:
    """fn(row slice of w) -> tuple of tensors with rows first; the slices' results concatenated."""
    rows = rows or ROWS_PER_CHUNK
    parts = [fn(w[i:i + rows]) for i in range(0, w.shape[0], rows)]
    return tuple(torch.cat([p[j] for p in parts]) for j in range(len(parts[0])))


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W stored quantized. Subclasses give `quantize` (from a float weight), `dequantize`
    (the reference: the float weight the stored form stands for) and `_matmul` (the fast kernel)."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    bias_in_matmul = False  # the native kernels add the bias themselves

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias_in_matmul and x.dtype in _NATIVE_DTYPES and x.is_contiguous():
            # our kernels: rows in x's dtype in, rows in x's dtype out, the bias added inside; a decode step makes
            # hundreds of these calls, so no cast and no copy (the general path below costs ~4 us more per call)
            return self._matmul(x.view(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        shape = x.shape
        y = self._matmul(x.reshape(-1, self.in_features)).to(x.dtype)  # [M, N]
        if self.bias is not None and not self.bias_in_matmul:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def native_form(self) -> tuple[list[torch.Tensor], list[int], float] | None:
        """How our fused decode layer (`kernels.native().decode_layer`) runs this linear: ([t0, t1, bias], [kind,
        group, out_features], the most rows it holds for), or None when no native kernel runs it."""
        return None

    def _native_form(self, kind: int, t0: torch.Tensor, t1: torch.Tensor, group: int = 0):
        """`native_form` of a native layout (kind 4 or 8), with the bias the kernels take (empty for none)."""
        bias = self.bias32 if self.bias32 is not None else t0.new_empty(0, dtype=torch.float32)
        return [t0, t1, bias], [kind, group, self.out_features], math.inf

    def _native_bias(self) -> None:
        """Gives the native kernels the bias as they take it (float32), once."""
        self.bias_in_matmul = True
        self.register_buffer("bias32", None if self.bias is None else self.bias.detach().float().contiguous())

    @staticmethod
    def _native_input(x: torch.Tensor) -> torch.Tensor:
        """Activations as the native kernels take them: contiguous float32 or bfloat16."""
        if x.dtype not in _NATIVE_DTYPES:
            x = x.float()
        return x.contiguous()

    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
