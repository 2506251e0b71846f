"""INT4 weight-only, group-wise asymmetric (group 32/64/128), through `aten._weight_int4pack_mm_for_cpu`.

The kernel's convention (tinygemm): W = (q - 8) * scale + zero per group, q in [0, 15]. Min-max quantization
maps exactly onto it with zero = min + 8 * scale. GGUF Q4_0 (W = d (q - 8)) and Q4_1 (W = d q + m), blocks of 32,
map onto it exactly too, so those blocks can run without going through float.
"""
from __future__ import annotations

import torch

from .. import kernels
from ..config import GROUP_SIZES
from ..kernels import layout
from .base import QuantizedLinear, by_rows
from .int8 import ACT_DTYPE, representable_scale


def _expand(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """W = (q - 8) * scale + zero per group: q [N, K], scales and zeros [N, K / group] -> float32 [N, K]."""
    N, K = q.shape
    return ((q.float().view(N, -1, group_size) - 8) * scales[..., None] + zeros[..., None]).view(N, K)


class Int4Linear(QuantizedLinear):
    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None, native: bool = False):
        """q [N, K] int in [0, 15]; scales, zeros [N, K / group]. `native`: our own kernel's layout (scale and
        zero in float16), where the kernel runs here; else torch's (scale and zero in bfloat16)."""
        super().__init__(q.shape[1], q.shape[0], bias)
        self.group_size = group_size
        self.native = native and kernels.available()
        if self.native:
            self._hold_native(*layout.pack_int4(q, scales, zeros, group_size))
            return
        # the packing wants int32 input: slice by rows (the packed layout is row-major, so slices concatenate)
        packed = by_rows(lambda r: (torch.ops.aten._convert_weight_to_int4pack_for_cpu(r.to(torch.int32), 2),), q)[0]
        self.register_buffer("packed", packed)
        sz = torch.stack([scales.float(), zeros.float()], dim=-1).transpose(0, 1).contiguous()  # [K/g, N, 2]
        self.register_buffer("scales_zeros", sz.to(ACT_DTYPE))

    @classmethod
    def from_native(cls, packed: torch.Tensor, scales_zeros: torch.Tensor, out_features: int, in_features: int,
                    group_size: int, bias: torch.Tensor | None = None) -> Int4Linear:
        """Already in our kernel's layout (`layout.pack_int4`), as GGUF blocks convert at load; the caller has
        checked that the kernels run here."""
        self = cls.__new__(cls)
        QuantizedLinear.__init__(self, in_features, out_features, bias)
        self.group_size, self.native = group_size, True
        self._hold_native(packed, scales_zeros)
        return self

    def _hold_native(self, packed: torch.Tensor, scales_zeros: torch.Tensor) -> None:
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", scales_zeros)
        self._native_bias()

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = 32,
                   native: bool = False):
        return cls(*cls.quantize(weight, group_size), group_size, bias, native)

    @staticmethod
    def quantize(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q [N, K] uint8 in [0, 15], scales, zeros [N, K / group]) of a float weight, min-max per group."""
        N, K = weight.shape
        if group_size not in GROUP_SIZES or K % group_size:
            raise ValueError(f"group_size must be one of {GROUP_SIZES} and divide in_features={K}")

        def rows(w):
            w = w.float().view(w.shape[0], K // group_size, group_size)
            scales, zeros = Int4Linear.grid(w)
            return Int4Linear.codes(w, scales[..., None], zeros[..., None]).view(-1, K), scales, zeros

        return by_rows(rows, weight)

    @staticmethod
    def grid(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Min-max scale and zero of each group along the last dimension of float `w`, rounded to what the kernel
        holds (bfloat16): a weight is then quantized against the values it is computed with."""
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        scales = representable_scale((hi - lo) / 15.0, ACT_DTYPE)
        return scales, (lo + 8 * scales).to(ACT_DTYPE).float()

    @staticmethod
    def codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        """q in [0, 15] (uint8) nearest to `w` on the grid (q - 8) * scale + zero."""
        return torch.round((w - (zeros - 8 * scales)) / scales).clamp(0, 15).to(torch.uint8)

    @classmethod
    def fake(cls, weight: torch.Tensor, group_size: int) -> torch.Tensor:
        """The float weight this scheme holds for `weight` (what its kernel computes with), without packing."""
        return _expand(*cls.quantize(weight, group_size), group_size)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        if self.native:
            parts = layout.unpack_int4(self.packed, self.scales_zeros, self.out_features, self.in_features,
                                       self.group_size)
            return _expand(*parts, self.group_size).to(dtype)
        eye = torch.eye(self.in_features, dtype=ACT_DTYPE)
        # the packed layout is the kernel's own; reading it back through the kernel is exact for an identity input
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size,
                                                         self.scales_zeros).t().to(dtype)

    def native_form(self):
        return self._native_form(4, self.packed, self.scales_zeros, self.group_size) if self.native else None

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.native:
            return kernels.int4_linear(self._native_input(x), self.packed, self.scales_zeros,
                                       self.group_size, self.out_features, self.bias32)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(ACT_DTYPE), self.packed, self.group_size,
                                                         self.scales_zeros)
