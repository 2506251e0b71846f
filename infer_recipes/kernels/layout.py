"""The native kernels' weight layouts, packed once at load and read back exactly (for references and tests).

Output rows come in tiles of 16 (the last tile padded with zero rows). Within a tile, 64 bytes hold 16 rows x 4
consecutive inputs, row-major, which is what one VNNI instruction multiplies against 4 broadcast activations:
- int4: a group of g inputs is g/8 runs of 64 bytes; in each run the low nibbles hold inputs k..k+3 and the high
  nibbles k+4..k+7 of 8 consecutive ones. Beside it, per tile and group, 16 scales then 16 zeros in float16:
  W = (q - 8) * scale + zero, q in [0, 15].
- int8: K/4 runs of 64 bytes of q + 128 (unsigned, as VNNI wants one operand), per-row float32 scales padded to
  whole tiles: W = q * scale, q in [-127, 127].

Packing runs in the extension where it is built (`convert.cpp`: one pass, tiles in parallel; 5-7x the speed of
the torch permutes below on a [8960, 1536] weight, which stay as its reference and fallback: the same bytes).
"""
from __future__ import annotations

import torch

TILE = 16


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def tiles(n: int) -> int:
    return -(-n // TILE)


def _extension():
    from . import native

    return native()


def pack_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int):
    """q [N, K] in [0, 15], scales and zeros [N, K / group] -> (packed uint8, sz float16)."""
    ext = _extension()
    if ext is None:
        return pack_int4_reference(q, scales, zeros, group)
    packed, sz = ext.pack_int4(q.to(torch.uint8).contiguous(), scales.float().contiguous(),
                               zeros.float().contiguous(), group)
    return packed, sz


def pack_int4_reference(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int):
    """pack_int4 in torch operations."""
    N, K = q.shape
    T, G = tiles(N), K // group
    q = _pad_rows(q.to(torch.uint8), T * TILE).view(T, TILE, G, group // 8, 2, 4)
    q = q.permute(0, 2, 3, 1, 5, 4).contiguous()  # [T, G, runs, 16 rows, 4 k, low/high]
    packed = (q[..., 0] | (q[..., 1] << 4)).reshape(-1)
    sz = torch.stack([_pad_rows(scales.float(), T * TILE), _pad_rows(zeros.float(), T * TILE)])  # [2, Np, G]
    sz = sz.view(2, T, TILE, G).permute(1, 3, 0, 2).contiguous().to(torch.float16)  # [T, G, 2, 16]
    return packed, sz.reshape(-1)


def unpack_int4(packed: torch.Tensor, sz: torch.Tensor, n: int, k: int, group: int):
    """The inverse of pack_int4: (q uint8, scales float32, zeros float32) of the first n rows."""
    T, G = tiles(n), k // group
    b = packed.view(T, G, group // 8, TILE, 4)
    q = torch.stack([b & 0x0F, b >> 4], dim=-1)  # [T, G, runs, 16, 4, 2]
    q = q.permute(0, 3, 1, 2, 5, 4).reshape(T * TILE, k)[:n]
    s = sz.view(T, G, 2, TILE).permute(2, 0, 3, 1).reshape(2, T * TILE, G)[:, :n].float()
    return q, s[0], s[1]


def pack_int8(q: torch.Tensor, scales: torch.Tensor):
    """q [N, K] int8, scales [N] -> (packed uint8, scales float32 padded to whole tiles)."""
    ext = _extension()
    if ext is None:
        return pack_int8_reference(q, scales)
    return ext.pack_int8(q.to(torch.int8).contiguous()), pad_scales(scales, q.shape[0])


def pad_scales(scales: torch.Tensor, n: int) -> torch.Tensor:
    """The int8 layout's row scales: float32, padded to whole tiles."""
    return _pad_rows(scales.float(), tiles(n) * TILE).contiguous()


def pack_int8_reference(q: torch.Tensor, scales: torch.Tensor):
    """pack_int8 in torch operations."""
    N, K = q.shape
    T = tiles(N)
    u = (_pad_rows(q, T * TILE).to(torch.int16) + 128).to(torch.uint8).view(T, TILE, K // 4, 4)
    return u.permute(0, 2, 1, 3).contiguous().reshape(-1), _pad_rows(scales.float(), T * TILE).contiguous()


def int8_rows(packed: torch.Tensor, n: int, k: int, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
    """Rows of the int8 weight (q, int8) from the packed form: all of them, or those indexed by `rows`."""
    b = packed.view(tiles(n), k // 4, TILE, 4)
    if isinstance(rows, slice):
        return (b.permute(0, 2, 1, 3).reshape(-1, k)[:n][rows].to(torch.int16) - 128).to(torch.int8)
    rows = rows.reshape(-1)
    picked = b[rows // TILE, :, rows % TILE]  # [R, K/4, 4]
    return (picked.reshape(-1, k).to(torch.int16) - 128).to(torch.int8)
