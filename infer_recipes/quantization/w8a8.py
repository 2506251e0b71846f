"""W8A8: int8 weights per output channel, int8 activations quantized per token at run time, int32 accumulation
through `torch._int_mm`."""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import kernels
from .base import QuantizedLinear
from .int8 import Int8Linear


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (int8 [M, K], scale [M, 1]) symmetric per row."""
    s = (x.abs().amax(dim=1, keepdim=True).float() / 127.0).clamp(min=1e-10)
    y = x.float() / s  # one fresh buffer, then rounded and clamped in place: prefill rows are many
    return y.round_().clamp_(-127, 127).to(torch.int8), s


class W8A8Linear(QuantizedLinear):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__(weight.shape[1], weight.shape[0], bias)
        q, s = Int8Linear.quantize(weight)
        self.register_buffer("qweight_t", q.t().contiguous().t())  # [N, K] viewed; _int_mm takes its transpose
        self.register_buffer("scales", s.float())  # [N]

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return (self.qweight_t.float() * self.scales[:, None]).to(dtype)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        xq, xs = quantize_per_token(x)
        acc = torch._int_mm(xq, self.qweight_t.t())  # [M, N] int32
        return acc.float().mul_(xs).mul_(self.scales)


class PhaseLinear(QuantizedLinear):
    """Two forms of one weight, picked per call by the number of rows: decode steps (few rows, memory-bound) go
    through `small` (int4 weight-only: the fewest bytes to read), prefill (many rows, compute-bound) through
    `large` (w8a8: int8 x int8 GEMM with VNNI). Costs both forms' memory; buys the fast kernel for each phase."""

    # measured on the SmolLM2 and Qwen2.5-1.5B shapes, 2 threads: torch's int4 kernel wins at 1-4 rows, w8a8
    # from 8; our native int4 kernel up to 16 (benchmarks/kernels.py). Without VNNI (our AVX2 kernels) torch's
    # int8 GEMM has no fast path either (~3 GFLOP/s on an AVX2 EPYC: a 512-token SmolLM2 prefill took 53 s,
    # against 2.0 s on our int4 kernel), so there the int4 form takes every call.
    ROWS, NATIVE_ROWS = 4, 16

    def __init__(self, small: QuantizedLinear, large: QuantizedLinear):
        super().__init__(small.in_features, small.out_features, None)
        self.small, self.large = small, large
        self.bias = small.bias
        native = getattr(small, "native", False)
        avx512 = (kernels.isa() or "").startswith("avx512")
        self.limit = (self.NATIVE_ROWS if avx512 else math.inf) if native else self.ROWS

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return self.small.dequantize(dtype)

    def form(self, rows: int) -> QuantizedLinear:
        return self.small if rows <= self.limit else self.large

    def idle_parts(self, rows: int) -> list[nn.Module]:
        """The form a call of `rows` rows leaves unread (what a memory roofline must not count)."""
        return [self.large if self.form(rows) is self.small else self.small]

    def native_form(self):
        form = self.small.native_form()  # the decode form, as long as a step's rows stay within the limit
        return form and (form[0], form[1], min(form[2], self.limit))

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.form(x.shape[0])._matmul(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # each form adds its bias its own way: the native int4 kernel inside its matmul, the others after it
        # (adding it here as well counted Qwen's q/k/v biases twice on the native form)
        return self.form(x.numel() // self.in_features).forward(x)
