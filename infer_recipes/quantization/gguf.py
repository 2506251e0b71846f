"""GGUF blocks onto our kernels, without a float copy of any whole tensor.

- Q4_0, Q4_1 and Q4_K become the int4 kernel's group-32 form W = (q - 8) * scale + zero exactly (Q4_K: scale =
  d * sub-block scale, zero = 8 * scale - dmin * sub-block min); the kernel then holds scale and zero in
  bfloat16, the only rounding.
- Every other quantized type (Q5_0, Q5_1, Q6_K, Q8_0, ...) becomes int8 per output row: the rows are dequantized
  a slice at a time by `gguf` and requantized, so float temporaries stay at one slice.

Q4_K, Q5_0, Q6_K and Q8_0 convert in the native extension where the engine runs it (`native`: the same values,
in one parallel pass over the blocks; the numpy/torch code here stays as the reference and the fallback).

The int8 form is also the common ground when a fused module's parts differ (Q4_K q/k with a Q6_K v): int4 cannot
hold 6-bit values, int8 holds 4-bit ones to within half an 8-bit step of each row's range.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
ROWS = 1024  # rows dequantized at a time on the int8 path
NATIVE_TYPES = ("Q4_K", "Q5_0", "Q6_K", "Q8_0")  # the types the extension dequantizes


def _extension(native: bool):
    if not native:
        return None
    from .. import kernels

    return kernels.native()


def as_tensor(raw: np.ndarray) -> torch.Tensor:
    """uint8 blocks as a tensor without a copy: they are read-only pages of the mapped file, which the native
    conversion only reads (hence no warning about writing to them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(raw))


def kernel_for(qtype: str) -> str | None:
    """'int4', 'int8', or None for float tensors (which load as float)."""
    if qtype in FLOAT_TYPES:
        return None
    return "int4" if qtype in INT4_TYPES else "int8"


def int4_parts(qtype: str, blocks: np.ndarray, rows: int, cols: int, native: bool = False):
    """(q [N, K] uint8 in [0, 15], scales [N, K/32], zeros [N, K/32]) float32, with W = (q - 8) * scale + zero."""
    raw = np.asarray(blocks).reshape(rows, -1)
    ext = _extension(native)
    if qtype == "Q4_K" and ext is not None:
        q, scale, zero = ext.gguf_q4k(as_tensor(raw), rows, cols)
        return q, scale, zero
    if qtype == "Q4_K":
        return _q4_k(raw, rows, cols)
    raw = raw.reshape(rows, cols // 32, -1)
    d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # [N, nb]
    if qtype == "Q4_1":
        m = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        qs, zeros = raw[..., 4:], m + 8 * d  # d q + m = (q - 8) d + (m + 8 d)
    elif qtype == "Q4_0":
        qs, zeros = raw[..., 2:], np.zeros_like(d)  # d (q - 8)
    else:
        raise ValueError(f"{qtype} has no exact int4 form")
    qs = torch.from_numpy(np.ascontiguousarray(qs))  # [N, nb, 16]: low nibbles are elements 0..15, high 16..31
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(rows, cols)
    return q, torch.from_numpy(d), torch.from_numpy(zeros)


def _q4_k(raw: np.ndarray, rows: int, cols: int):
    """Q4_K super-blocks of 256: d, dmin (float16), 12 bytes of 6-bit sub-block scales and mins, 128 bytes of
    nibbles (each 32-byte run holds two sub-blocks: low nibbles the first, high nibbles the second)."""
    nsb = cols // 256
    raw = raw.reshape(rows, nsb, 144)
    d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)[..., None]  # [N, nsb, 1]
    dmin = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)[..., None]
    s = raw[..., 4:16].astype(np.uint8)  # [N, nsb, 12]
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    scale = d * sc.astype(np.float32)  # [N, nsb, 8]
    zero = 8 * scale - dmin * mn.astype(np.float32)
    qs = torch.from_numpy(np.ascontiguousarray(raw[..., 16:])).view(rows, nsb, 4, 32)
    q = torch.stack([qs & 0x0F, qs >> 4], dim=3).reshape(rows, cols)  # [N, nsb, 4 runs, 2 halves, 32]
    return q, torch.from_numpy(scale.reshape(rows, -1)), torch.from_numpy(zero.reshape(rows, -1))


def int8_parts(qtype: str, blocks: np.ndarray, rows: int, cols: int, native: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [N, K] int8, scales [N] float32): symmetric per row, against the scales the int8 kernel holds. A slice
    of rows at a time, in place: float temporaries stay at one slice."""
    ext = _extension(native)
    if ext is not None and qtype in NATIVE_TYPES:
        return _native_int8(ext, qtype, blocks, rows, cols, packed=False)
    q = torch.empty(rows, cols, dtype=torch.int8)
    s = torch.empty(rows, dtype=torch.float32)
    for i in range(0, rows, ROWS):
        w = dequantize_rows(qtype, blocks[i:i + ROWS], cols)
        scale = _int8_scales(w.abs().amax(dim=1))
        q[i:i + ROWS] = w.div_(scale[:, None]).round_().clamp_(-127, 127)
        s[i:i + ROWS] = scale
    return q, s


def _int8_scales(amax: torch.Tensor) -> torch.Tensor:
    """Each row's int8 scale from its largest |w|, as the int8 kernel will hold it."""
    from .int8 import ACT_DTYPE, representable_scale

    return representable_scale(amax / 127.0, ACT_DTYPE)


def _native_int8(ext, qtype: str, blocks: np.ndarray, rows: int, cols: int, packed: bool):
    raw = as_tensor(np.asarray(blocks).reshape(rows, -1))
    s = _int8_scales(ext.gguf_row_amax(raw, qtype, cols))
    return ext.gguf_int8(raw, qtype, cols, s, packed=packed), s


def int4_packed(qtype: str, blocks: np.ndarray, rows: int, cols: int, native: bool):
    """Q4_K blocks straight into the native int4 layout, (packed, scales and zeros): what Int4Linear(native)
    holds for int4_parts' values, in one pass with no [N, K] temporary. None where there is no such path."""
    ext = _extension(native)
    if ext is None or qtype != "Q4_K":
        return None
    packed, sz = ext.gguf_q4k_packed(as_tensor(np.asarray(blocks).reshape(rows, -1)), cols)
    return packed, sz


def int8_packed(qtype: str, blocks: np.ndarray, rows: int, cols: int, native: bool):
    """int8_parts straight into the native int8 layout: (packed, scales [N]). None where there is no such path."""
    ext = _extension(native)
    if ext is None or qtype not in NATIVE_TYPES or cols % 4:
        return None
    return _native_int8(ext, qtype, blocks, rows, cols, packed=True)


def dequantize(qtype: str, blocks: torch.Tensor, cols: int, native: bool = False) -> torch.Tensor:
    """float32 rows of uint8 blocks [N, bytes]: in the extension where it runs and has the type, else
    `dequantize_rows` (the same values)."""
    ext = _extension(native)
    if ext is not None and qtype in NATIVE_TYPES:
        return ext.gguf_dequantize(blocks.contiguous(), qtype, cols)
    return dequantize_rows(qtype, blocks.numpy(), cols)


def dequantize_rows(qtype: str, blocks: np.ndarray, cols: int) -> torch.Tensor:
    """float32 rows of some blocks: 4-bit types through their exact int4 form, others through `gguf`."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    raw = np.asarray(blocks)
    rows = raw.shape[0]
    if qtype in INT4_TYPES:
        q, scale, zero = int4_parts(qtype, raw, rows, cols)
        w = q.view(rows, -1, 32).float().sub_(8).mul_(scale[..., None]).add_(zero[..., None])
        return w.view(rows, cols)
    w = dequantize(raw, GGMLQuantizationType[qtype])
    return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).reshape(rows, cols)
