"""RMSNorm, computed in float32 like the reference implementations, with an optional fused residual add."""
from __future__ import annotations

import torch
from torch import nn

from .. import kernels


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    native = False  # on our own kernel (`use_native`)

    def use_native(self, on: bool) -> None:
        """Norm (and residual add) in one pass of our kernel; it takes the weight in float32."""
        self.native = on
        self.register_buffer("weight32", self.weight.detach().float().contiguous() if on else None,
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native:
            return kernels.native().rms_norm(x.contiguous(), None, self.weight32, self.eps)[0]
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def forward_with_residual(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (norm(x + residual), x + residual): the residual add folded into the norm's call, so the fused
        block hands the next norm its input and the running sum together (two ops; a kernel could make it one)."""
        if self.native:
            return tuple(kernels.native().rms_norm(x.contiguous(), residual.contiguous(), self.weight32, self.eps))
        residual = x + residual
        return self.forward(residual), residual
