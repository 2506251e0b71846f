"""INT8 weight-only: symmetric per output channel (`int8`) and the asymmetric [0, 255] min-max form (`int8-minmax`).

CPU kernel: `aten._weight_int8pack_mm`, fast with bfloat16 activations on AVX-512 (slow with float32 ones), so
activations are cast to bfloat16 for the matmul and the result cast back.
"""
from __future__ import annotations

import torch

from .. import kernels
from ..kernels import layout
from .base import QuantizedLinear, by_rows

ACT_DTYPE = torch.bfloat16


def representable_scale(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The scale the kernel will really hold (it keeps scales in the activation dtype), rounded up so the
    quantized range still covers the weights: quantizing against it keeps the error within half a step."""
    s = s.clamp(min=1e-10)
    held = s.to(dtype).float()
    return torch.where(held < s, torch.nextafter(held.to(dtype), torch.tensor(float("inf"), dtype=dtype)).float(),
                       held)


class Int8Linear(QuantizedLinear):
    """W ~= q * s, q in [-127, 127], one scale per output channel.

    Held for torch's kernel (`qweight` [N, K] int8, `scales` in bfloat16) or, with `native`, in our own kernel's
    layout (`packed`, `scales` float32 padded to whole tiles); `rows(ids)` reads weight rows back from either."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, native: bool = False):
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self._hold(*self.quantize(weight), native)

    @classmethod
    def from_parts(cls, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                   native: bool = False) -> Int8Linear:
        """From an int8 weight [N, K] and its row scales [N] (already representable in the kernel's dtype)."""
        self = cls.__new__(cls)
        QuantizedLinear.__init__(self, q.shape[1], q.shape[0], bias)
        self._hold(q, scales, native)
        return self

    @classmethod
    def from_native(cls, packed: torch.Tensor, scales: torch.Tensor, out_features: int, in_features: int,
                    bias: torch.Tensor | None = None) -> Int8Linear:
        """Already in our kernel's layout (`layout.pack_int8`) with row scales [N] representable in the kernel's
        dtype, as GGUF blocks convert at load; the caller has checked that the kernels run here."""
        self = cls.__new__(cls)
        QuantizedLinear.__init__(self, in_features, out_features, bias)
        self.native = True
        self._hold_native(packed, layout.pad_scales(scales.to(ACT_DTYPE), out_features))
        return self

    def _hold(self, q: torch.Tensor, scales: torch.Tensor, native: bool) -> None:
        self.native = native and q.shape[1] % 32 == 0 and kernels.available()
        if self.native:
            self._hold_native(*layout.pack_int8(q, scales.to(ACT_DTYPE)))  # the scales torch's kernel would hold
        else:
            self.register_buffer("qweight", q)  # [N, K] int8
            self.register_buffer("scales", scales.to(ACT_DTYPE))  # [N]

    def _hold_native(self, packed: torch.Tensor, padded_scales: torch.Tensor) -> None:
        self.register_buffer("packed", packed)
        self.register_buffer("scales", padded_scales)
        self._native_bias()

    def rows(self, ids: torch.Tensor | slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """(q int8 [R, K], scales [R] float32) of some weight rows: an int8 embedding table shares them."""
        if self.native:
            return (layout.int8_rows(self.packed, self.out_features, self.in_features, ids),
                    self.scales[:self.out_features][ids])
        return self.qweight[ids], self.scales[ids].float()

    @staticmethod
    def quantize(w: torch.Tensor, scale_dtype: torch.dtype = ACT_DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
        def rows(w):
            w = w.float()
            s = representable_scale(w.abs().amax(dim=1) / 127.0, scale_dtype)
            return torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8), s

        return by_rows(rows, w)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        q, s = self.rows()
        return (q.float() * s[:, None]).to(dtype)

    def native_form(self):
        return self._native_form(8, self.packed, self.scales) if self.native else None

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.native:
            return kernels.int8_linear(self._native_input(x), self.packed, self.scales, self.out_features,
                                       self.bias32)
        return torch.ops.aten._weight_int8pack_mm(x.to(ACT_DTYPE), self.qweight, self.scales)


class Int8MinMaxLinear(QuantizedLinear):
    """The CANN write-up's formula: q = round((W - min) / (max - min) * 255), per output channel, so
    W ~= q * s + min with s = (max - min) / 255.

    The int8 kernel is symmetric, so q is stored shifted to q - 128 and the offset is added back exactly:
    x W^T = s * (x (q - 128)^T) + (min + 128 s) * sum(x).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__(weight.shape[1], weight.shape[0], bias)

        def rows(w):
            w = w.float()
            lo, hi = w.amin(dim=1), w.amax(dim=1)
            s = representable_scale((hi - lo) / 255.0, ACT_DTYPE)
            q = torch.round((w - lo[:, None]) / s[:, None]).clamp(0, 255)
            return (q - 128).to(torch.int8), s, lo

        q, s, lo = by_rows(rows, weight)
        self.register_buffer("qweight", q)  # [N, K]
        self.register_buffer("scales", s.to(ACT_DTYPE))
        self.register_buffer("offsets", (lo + 128 * s).float())  # [N], float32: the offset term is large

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return (self.qweight.float() * self.scales.float()[:, None] + self.offsets[:, None]).to(dtype)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.to(ACT_DTYPE), self.qweight, self.scales).float()
        return y + x.float().sum(dim=1, keepdim=True) * self.offsets
